"""One identity, one home, on a real API server with the chart's own rights: two tenants (two
namespaces) claiming the same IP, the same ICCID, or the same IP spelt as IPv4-mapped IPv6.

With the chart's default scope (the whole cluster) the operator reports every Device of such a clash
as ``Conflict``, and the proxy serves none of them. When Ready statuses disagree anyway (another
release's operator, a stale status) the proxy refuses an identity two Devices claim rather than
route it to whichever it saw last, and still serves a Device whose identity is its own.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from cloudconnector.identity import Scope
from cloudconnector.kube.client import KubeClient
from cloudconnector.kube.config import KubeConfig
from cloudconnector.mqtt import codec
from cloudconnector.mqtt.packets import Connect
from cloudconnector.proxy.kube_directory import KubeDirectory
from cloudconnector.routes import Route
from tests.e2e.harness import Install, Process, install, wait_until
from tests.support.kube import Kube
from tests.support.procs import Bao, Moto, free_port

API = "cloudconnector.io/v1alpha1"
FAKE_KEYS = {"AWS_ACCESS_KEY_ID": "AKIDE2ESCOPETEST", "AWS_SECRET_ACCESS_KEY": "e2e-scope-not-a-secret"}
NOT_AUTHORIZED = b"\x20\x02\x00\x05"
SERVER_UNAVAILABLE = b"\x20\x02\x00\x03"


class Tenant:
    """One namespace's Endpoint, Group and Devices, applied as a platform engineer would."""

    def __init__(self, kube: Kube, ns: str) -> None:
        self.kube, self.ns = kube, ns

    def aws(self, moto: Moto, upstream_port: int) -> None:
        data = {k: base64.b64encode(v.encode()).decode() for k, v in FAKE_KEYS.items()}
        self.kube.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "aws-keys", "namespace": self.ns},
                "data": data,
            },
            {
                "apiVersion": API,
                "kind": "Endpoint",
                "metadata": {"name": "aws", "namespace": self.ns},
                "spec": {
                    "type": "AwsIotCore",
                    "port": upstream_port,
                    "rateLimit": {"devicesPerSecond": 50},
                    "aws": {
                        "region": "eu-west-1",
                        "endpointUrl": moto.url,
                        "dataEndpoint": "127.0.0.1",  # nothing listens there: the proxy answers 0x03
                        "credentialsSecretRef": {"name": "aws-keys"},
                    },
                },
            },
            self.group(),
        )

    def group(self) -> dict[str, Any]:
        return {
            "apiVersion": API,
            "kind": "Group",
            "metadata": {"name": "meters", "namespace": self.ns},
            "spec": {"endpointRef": {"name": "aws"}},
        }

    def device(self, name: str, iccid: str, ip: str) -> None:
        self.kube.apply(
            {
                "apiVersion": API,
                "kind": "Device",
                "metadata": {"name": name, "namespace": self.ns},
                "spec": {"group": "meters", "sim": {"iccid": iccid}, "ip": ip},
            }
        )

    def status(self, kind: str, name: str) -> dict[str, Any]:
        return dict(self.kube.get(kind, self.ns, name).get("status") or {})

    def set_status(self, kind: str, name: str, status: dict[str, Any]) -> None:
        path = self.kube.path(kind, self.ns, name) + "/status"
        self.kube.request("PATCH", path, {"status": status}, content_type="application/merge-patch+json")

    def wait_phase(self, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
        return wait_until(
            f"Device {self.ns}/{name} {phase}",
            lambda: (s := self.status("Device", name)).get("phase") == phase and s,
            timeout,
        )


def conflict(status: dict[str, Any]) -> dict[str, Any]:
    (found,) = [c for c in status.get("conditions") or () if c["type"] == "Conflict"]
    return dict(found)


def connack(port: int, source: str, client_id: str = "device") -> bytes:
    """What the proxy answers a CONNECT sent from ``source`` (a loopback address)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15, source_address=(source, 0)) as s:
        s.sendall(codec.encode(Connect(client_id)))
        out = b""
        while len(out) < 4:
            chunk = s.recv(4 - len(out))
            if not chunk:
                break
            out += chunk
        return out


def refusals(proxy: Process) -> list[dict[str, Any]]:
    """The proxy's JSON log lines about devices refused after their CONNECT."""
    found = []
    for line in proxy.output().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if str(record.get("message", "")).startswith("device refused") and record.get("mqtt"):
            found.append(record)
    return found


def wait_proxy_ready(proxy: Process, port: int) -> None:
    def listening() -> bool:
        assert proxy.alive(), proxy.output()[-2000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    wait_until("the proxy listening", listening, timeout=60)


@pytest.fixture(scope="module")
def tenants(kube: Kube) -> tuple[Tenant, Tenant]:
    return Tenant(kube, kube.namespace("tenant-a")), Tenant(kube, kube.namespace("tenant-b"))


@pytest.fixture(scope="module")
def chart(
    kube: Kube, bao: Bao, tenants: tuple[Tenant, Tenant], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Install]:
    """The chart with its defaults: operator and proxy scope is the whole cluster."""
    values = {"operator": {"secretAccess": {"namespaces": [t.ns for t in tenants]}}}
    with install(kube, bao, tmp_path_factory.mktemp("scope"), values) as inst:
        yield inst


def test_clashes_across_namespaces_are_conflicts_and_never_served(
    chart: Install, tenants: tuple[Tenant, Tenant], moto_server: Moto
) -> None:
    a, b = tenants
    upstream = free_port()  # a closed port on 127.0.0.1: a served device is answered 0x03
    for tenant in tenants:
        tenant.aws(moto_server, upstream)
    operator = chart.operator()
    proxy, port = chart.proxy(CC_PROXY_IDENTITY="ip,client_id")
    try:
        # Tenant A's device is provisioned first; then tenant B claims its address.
        a.device("by-ip", "893530100000000001", "127.0.91.1")
        before = a.wait_phase("by-ip", "Ready", timeout=90)
        b.device("by-ip", "893530100000000002", "127.0.91.1")
        # Same SIM in both tenants, and one address written two ways.
        a.device("by-sim", "893530100000000003", "127.0.91.2")
        b.device("by-sim", "893530100000000003", "127.0.91.12")
        a.device("by-spelling", "893530100000000004", "127.0.91.3")
        b.device("by-spelling", "893530100000000005", "::ffff:127.0.91.3")

        expected = {"by-ip": "DuplicateIp", "by-sim": "DuplicateIccid", "by-spelling": "DuplicateIp"}
        for name, reason in expected.items():
            for mine, other in ((a, b), (b, a)):
                status = mine.wait_phase(name, "Conflict", timeout=60)
                cond = conflict(status)
                assert cond["status"] == "True" and cond["reason"] == reason, (mine.ns, name, cond)
                assert f"{other.ns}/{name}" in cond["message"]
        held = a.status("Device", "by-ip")
        assert held["certificateId"] == before["certificateId"]  # the older identity is kept
        assert not b.status("Device", "by-ip").get("certificateId")  # the newcomer got none

        wait_proxy_ready(proxy, port)
        assert connack(port, "127.0.91.1") == NOT_AUTHORIZED
        assert connack(port, "127.0.91.3") == NOT_AUTHORIZED
        assert connack(port, "127.0.91.99", client_id="893530100000000003") == NOT_AUTHORIZED
        refused = wait_until("three refusals logged", lambda: len(r := refusals(proxy)) == 3 and r)
        assert all(r["result"] == "unknown_device" and "device" not in r for r in refused), refused

        # The clash resolved: tenant A's device is Ready again with the identity it had, and the
        # proxy serves it (its key read from Vault, then the closed upstream port: 0x03).
        chart.kube.kubectl("delete", "ccd", "by-ip", "-n", b.ns, "--wait=false")
        after = a.wait_phase("by-ip", "Ready", timeout=60)
        assert after["certificateId"] == before["certificateId"]
        served = wait_until(
            "the proxy serving tenant A's device",
            lambda: connack(port, "127.0.91.1") == SERVER_UNAVAILABLE,
            timeout=30,
        )
        assert served
        (found,) = wait_until(
            "the served session logged", lambda: [r for r in refusals(proxy) if r.get("device")]
        )
        assert found["device"] == f"{a.ns}/by-ip" and found["result"] == "upstream_unavailable", found
    finally:
        proxy.stop()
        operator.stop()
    log = operator.output() + proxy.output()
    assert "PRIVATE KEY-----" not in log and FAKE_KEYS["AWS_SECRET_ACCESS_KEY"] not in log


def test_proxy_refuses_an_identity_two_ready_devices_claim(chart: Install, kube: Kube) -> None:
    """No operator runs here: the Ready statuses are written directly, as a second release's
    operator (or a stale status) could leave them. The proxy must not pick one."""
    c, d = Tenant(kube, kube.namespace("tenant-c")), Tenant(kube, kube.namespace("tenant-d"))
    for tenant in (c, d):
        kube.apply(
            {
                "apiVersion": API,
                "kind": "Endpoint",
                "metadata": {"name": "aws", "namespace": tenant.ns},
                "spec": {"type": "AwsIotCore", "aws": {"region": "eu-west-1", "dataEndpoint": "127.0.0.1"}},
            },
            tenant.group(),
        )
        tenant.set_status("Endpoint", "aws", {"phase": "Ready", "host": "127.0.0.1", "port": free_port()})
    c.device("twin", "893530200000000001", "127.0.92.1")
    d.device("twin", "893530200000000002", "::ffff:127.0.92.1")
    c.device("sim", "893530200000000003", "127.0.92.2")
    d.device("sim", "893530200000000003", "127.0.92.3")
    c.device("alone", "893530200000000004", "127.0.92.4")
    for tenant, name in ((c, "twin"), (d, "twin"), (c, "sim"), (d, "sim"), (c, "alone")):
        tenant.set_status(
            "Device",
            name,
            {
                "phase": "Ready",
                "endpoint": "aws",
                "cloudId": f"{tenant.ns}_{name}",
                "certificateId": "0" * 64,
                "keyLocation": f"vault:secret/cloud-connector/{tenant.ns}/{name}",
            },
        )
    proxy, port = chart.proxy(CC_PROXY_IDENTITY="ip,client_id")
    try:
        wait_proxy_ready(proxy, port)

        # The unambiguous device is found (and refused only for want of stored credentials).
        def found_alone() -> list[dict[str, Any]]:
            assert connack(port, "127.0.92.4") == NOT_AUTHORIZED
            return [r for r in refusals(proxy) if r["result"] == "no_credentials"]

        alone = wait_until("the proxy's index", found_alone, timeout=30)[0]
        assert alone["device"] == f"{c.ns}/alone"
        for source, client_id in (("127.0.92.1", "x"), ("127.0.92.99", "893530200000000003")):
            assert connack(port, source, client_id) == NOT_AUTHORIZED

        def ambiguous() -> list[dict[str, Any]]:
            found = [r for r in refusals(proxy) if r["result"] == "ambiguous_identity"]
            return found if len(found) == 2 else []

        assert not any("device" in r for r in wait_until("two ambiguous refusals", ambiguous))
        warned = [ln for ln in proxy.output().splitlines() if "claimed by several devices (" in ln]
        assert any(f"{c.ns}/twin" in ln and f"{d.ns}/twin" in ln for ln in warned), warned
        assert any(f"{c.ns}/sim" in ln and f"{d.ns}/sim" in ln for ln in warned), warned
    finally:
        proxy.stop()

    # A proxy told to serve only tenant C (as the chart does for an operator limited to it) sees
    # one claimant, through the chart's ClusterRole and its own filter.
    kubeconfig = kube.kubeconfig_for_token(chart.token("proxy"), chart.workdir / "proxy-scope.kubeconfig")
    routes = asyncio.run(_routes_in_scope(KubeConfig.from_kubeconfig(kubeconfig), Scope.parse(f"{c.ns},x-*")))
    assert sorted(str(r.device) for r in routes) == [f"{c.ns}/alone", f"{c.ns}/sim", f"{c.ns}/twin"]


async def _routes_in_scope(config: KubeConfig, scope: Scope) -> list[Route]:
    client = KubeClient(config)
    changed = asyncio.Event()
    directory = KubeDirectory(client, scope, retry_seconds=0.2, on_change=changed.set)
    task = asyncio.create_task(directory.run())
    try:
        async with asyncio.timeout(30):
            while not directory.ready:
                await changed.wait()
                changed.clear()
        assert (
            directory.by_ip("127.0.92.1") is not None and directory.by_iccid("893530200000000003") is not None
        )
        return directory.routes()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.aclose()
