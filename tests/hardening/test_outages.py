"""Outages (issue 7, item 3): Vault, the cloud API, the Kubernetes API and the upstream broker each
taken down and brought back while the product runs.

For each: what a user sees while it is down (a condition, a CONNACK code, a metric), that nothing
needs a restart to recover, and that devices work afterwards with the credentials they had.
tests/operator/test_resilience.py already covers the operator with Vault frozen and
tests/proxy/test_lifecycle.py the broker restart itself; these build on them.
"""

# ruff: noqa: F811  (fixtures imported from tests/operator/conftest.py are parameters here)

from __future__ import annotations

import asyncio
import contextlib
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from cloudconnector.keystore.vault import VaultKeyStore
from cloudconnector.keystore.vault_config import VaultConfig
from cloudconnector.keystore.vault_setup import OPERATOR_POLICY, PROXY_POLICY
from cloudconnector.mqtt import codec
from cloudconnector.mqtt.packets import Connect
from cloudconnector.proxy.health import make_app, start_http
from cloudconnector.proxy.server import Proxy
from tests.hardening.crashloop import audit
from tests.operator.conftest import (  # noqa: F401  (fixtures reused)
    DEVICES,
    ENDPOINTS,
    GROUPS,
    Cluster,
    Fleet,
    OperatorProcess,
    Vault,
    aws,
    cluster,
    fleet,
    operator,
    operator_env,
    spare_bao,
    vault,
)
from tests.proxy.conftest import Client, Pki, World, proxy_config, raw_connect, recv_all, start_broker, token
from tests.support.faults import SERVICE_UNAVAILABLE, FaultProxy
from tests.support.procs import Bao, Moto, free_port
from tests.support.vault import bootstrapped

# MQTT 3.1.1 CONNACK "server unavailable": the device should retry later; its identity is fine.
SERVER_UNAVAILABLE = b"\x20\x02\x00\x03"


@contextlib.asynccontextmanager
async def metrics_port(proxy: Proxy) -> AsyncIterator[str]:
    """The proxy's /metrics served over real HTTP, as the proxy's console command does."""
    runner, port = await start_http(make_app(proxy.metrics, lambda: True), "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        await runner.cleanup()


async def scrape(url: str) -> dict[str, float]:
    """Samples by their exposition name with labels, e.g. ``x_total{result="ok"}``."""
    async with aiohttp.ClientSession() as http, http.get(url) as answer:
        text = await answer.text()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def attempts(samples: dict[str, float], result: str) -> float:
    return samples.get(f'cloudconnector_proxy_connections_total{{result="{result}"}}', 0.0)


async def relays(dev: Client, topic: str, payload: bytes) -> bool:
    """A QoS 1 round trip through the proxy and the broker (the device hears its own topic)."""
    await asyncio.to_thread(dev.publish, topic, payload, 1)
    got = await asyncio.to_thread(dev.expect)
    return got.payload == payload


async def connect(dev: Client, port: int) -> int:
    return await asyncio.to_thread(dev.connect, port)


# ------------------------------------------------------------------------------------------ Vault


async def test_vault_outage_refuses_new_devices_as_unavailable_then_heals(
    pki: Pki, broker: Any, spare_bao: Bao, clients: list[Client]
) -> None:
    root = bootstrapped(spare_bao)
    writer = VaultKeyStore(VaultConfig(address=spare_bao.url, token=token(root, OPERATOR_POLICY)))
    reader = VaultKeyStore(VaultConfig(address=spare_bao.url, token=token(root, PROXY_POLICY), timeout=1.0))
    world = World(pki, broker.port)
    early, late = world.add(), world.add()
    for route in (early, late):
        await writer.put(route.device, world.keys.items[route.device], {"certificateId": "cert-1"})
    proxy = Proxy(proxy_config(pki), world.directory, reader)
    try:
        async with proxy, metrics_port(proxy) as metrics:
            port = proxy.ports["mqtt"]
            live = Client(early.client_id, bind=early.ip or "")
            clients.append(live)
            assert await connect(live, port) == 0
            await asyncio.to_thread(live.subscribe, f"{early.client_id}/#", 1)

            spare_bao.proc.send_signal(signal.SIGSTOP)  # Vault hangs, as when its node is partitioned
            try:
                # Credentials are read at connect time only: a live session keeps relaying.
                assert await relays(live, f"{early.client_id}/during", b"vault is down")
                # A new device is told "server unavailable" (retry later), not "not authorized"
                # (which would tell it its identity is wrong).
                sock = await asyncio.to_thread(
                    raw_connect, port, late.ip or "", codec.encode(Connect("late"))
                )
                assert await asyncio.to_thread(recv_all, sock) == SERVER_UNAVAILABLE
                sock.close()
                down = await scrape(metrics)
                assert attempts(down, "key_store_error") == 1
                assert attempts(down, "no_credentials") == 0 and attempts(down, "unknown_device") == 0
            finally:
                spare_bao.proc.send_signal(signal.SIGCONT)

            # Nothing restarted: the same device now gets its (unchanged) credentials and relays.
            back = Client(late.client_id, bind=late.ip or "")
            clients.append(back)
            assert await connect(back, port) == 0
            await asyncio.to_thread(back.subscribe, f"{late.client_id}/#", 1)
            assert await relays(back, f"{late.client_id}/after", b"vault is back")
            assert await relays(live, f"{early.client_id}/after", b"still here")
            after = await scrape(metrics)
            assert attempts(after, "ok") == 2 and attempts(after, "key_store_error") == 1
    finally:
        writer.close()
        reader.close()


# -------------------------------------------------------------------------------------- cloud API


def ready_condition(obj: dict[str, Any] | None) -> dict[str, Any] | None:
    conditions = ((obj or {}).get("status") or {}).get("conditions") or ()
    return next((c for c in conditions if c["type"] == "Ready"), None)


DEVICES_KEY = f"{DEVICES.group}/{DEVICES.version}/{DEVICES.plural}"


async def cloud_outage(cluster: Cluster, fleet: Fleet, url: str, reason: str, detail: str) -> list[str]:
    """Devices created while the cloud API at ``url`` is down: the Endpoint must name the outage
    (``reason``, ``detail`` in its message) and every Device wait as Pending, never Failed."""
    await fleet.endpoint("aws", endpoint_url=url)
    await fleet.group("g", "aws")
    names = [f"o{i}" for i in range(4)]
    for name in names:
        await fleet.device(name, "g")
    # The Endpoint names the outage once the operator's own retries run out (a few seconds)...
    endpoint = await cluster.wait_for(
        ENDPOINTS,
        "aws",
        lambda o: (ready_condition(o) or {}).get("status") == "False",
        "the outage shown on the Endpoint",
    )
    cond = ready_condition(endpoint) or {}
    assert (endpoint or {})["status"]["phase"] == "Error"
    assert cond["reason"] == reason and detail in cond["message"], cond
    # ...and every Device says it waits for that Endpoint: nothing to fix on the Device.
    for name in names:
        device = await cluster.get(DEVICES, name)
        dcond = ready_condition(device) or {}
        assert (device or {})["status"]["phase"] == "Pending"
        assert dcond["status"] == "False" and dcond["reason"] == "EndpointNotReady"
    return names


async def recovered(cluster: Cluster, aws: Any, vault: Vault, names: list[str]) -> None:
    for name in names:
        await cluster.wait_phase(DEVICES, name, "Ready")
    for name in names:  # the outage never made a Device Failed
        history = cluster.kmock.objects[DEVICES_KEY, cluster.namespace, name].history
        assert "Failed" not in {((v or {}).get("status") or {}).get("phase") for v in history}
    assert await audit(cluster, aws(), vault, names) == []  # and retries left no duplicate


async def test_cloud_api_answering_503_shows_and_every_device_becomes_ready(
    cluster: Cluster,
    fleet: Fleet,
    operator: OperatorProcess,
    aws: Any,
    vault: Vault,
    moto_server: Moto,
) -> None:
    async with FaultProxy(moto_server.url) as cloud:
        cloud.arm(SERVICE_UNAVAILABLE, first=10**9)  # every AWS call answers 503
        names = await cloud_outage(cluster, fleet, cloud.url, "Unavailable", "ServiceUnavailableException")
        assert cloud.faulted > 0
        cloud.disarm()
        await recovered(cluster, aws, vault, names)


async def test_cloud_api_refusing_connections_shows_and_every_device_becomes_ready(
    cluster: Cluster,
    fleet: Fleet,
    operator: OperatorProcess,
    aws: Any,
    vault: Vault,
    moto_server: Moto,
) -> None:
    cloud = Cuttable(int(moto_server.url.rsplit(":", 1)[1]))
    cloud.port = free_port()  # nothing listens there yet: connection refused
    names = await cloud_outage(cluster, fleet, cloud.url, "Unreachable", "did not complete")
    await cloud.start()  # the API comes back at the same address
    try:
        await recovered(cluster, aws, vault, names)
    finally:
        await cloud.cut()


# --------------------------------------------------------------------------------- Kubernetes API


class Cuttable:
    """A TCP relay in front of the API server that can be cut (every connection reset, new ones
    refused) and restored on the same port, as a network partition between operator and API."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def restore(self) -> None:
        await self.start()  # the same port: the operator's configuration does not change

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self._open |= {writer, up_writer}
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._open.discard(writer)
            writer.transport.abort()


async def test_kubernetes_api_outage_loses_no_work(
    cluster: Cluster, fleet: Fleet, operator_env: dict[str, str], aws: Any, vault: Vault
) -> None:
    api = Cuttable(int(cluster.url.rsplit(":", 1)[1]))
    await api.start()
    with tempfile.TemporaryDirectory() as tmp:
        op = OperatorProcess({**operator_env, "CLOUDCONNECTOR_K8S_SERVER": api.url}, Path(tmp) / "op.log")
        op.start()
        try:
            await fleet.endpoint("aws")
            await fleet.group("g", "aws")
            before = ["k0", "k1"]
            for name in before:
                await fleet.device(name, "g")
            for name in before:
                await cluster.wait_phase(DEVICES, name, "Ready")

            await api.cut()
            during = ["k2", "k3", "k4"]  # created while the operator cannot see the API
            for name in during:
                await fleet.device(name, "g")
            for _ in range(20):  # the outage lasts a few seconds; the operator must ride it out
                await asyncio.sleep(0.2)
                assert op.proc is not None and op.proc.poll() is None, op.output()[-2000:]
            await api.restore()

            for name in before + during:
                await cluster.wait_phase(DEVICES, name, "Ready")
            assert op.proc is not None and op.proc.poll() is None
            assert await audit(cluster, aws(), vault, before + during) == []
            # The Group's counts catch up too, within a few of its 1 s status intervals: a status
            # timer that failed during the outage must not sit out kopf's default 60 s backoff.
            counts: dict[str, Any] = {}
            for _ in range(100):  # 20 s at most
                group = (await cluster.get(GROUPS, "g")) or {}
                counts = {k: (group.get("status") or {}).get(k) for k in ("total", "provisioned", "failed")}
                if counts == {"total": 5, "provisioned": 5, "failed": 0}:
                    break
                await asyncio.sleep(0.2)
            assert counts == {"total": 5, "provisioned": 5, "failed": 0}, counts
        finally:
            op.stop()
            await api.cut()


# ------------------------------------------------------------------------------- upstream broker


async def test_broker_outage_metrics_and_every_device_reconnects(pki: Pki, clients: list[Client]) -> None:
    with start_broker(pki) as broker:
        world = World(pki, broker.port)
        routes = [world.add() for _ in range(3)]
        proxy = Proxy(proxy_config(pki), world.directory, world.keys)
        async with proxy, metrics_port(proxy) as metrics:
            port = proxy.ports["mqtt"]
            devices = []
            for route in routes:
                dev = Client(route.client_id, bind=route.ip or "")
                clients.append(dev)
                assert await connect(dev, port) == 0
                devices.append(dev)
            assert (await scrape(metrics))["cloudconnector_proxy_active_sessions"] == 3

            await asyncio.to_thread(broker.proc.terminate)
            await asyncio.to_thread(broker.proc.wait, 10)
            for dev in devices:  # every live session is closed, not left hanging
                await asyncio.to_thread(dev.disconnects.get, True, 10)
                await asyncio.to_thread(dev.close)
            sock = await asyncio.to_thread(
                raw_connect, port, routes[0].ip or "", codec.encode(Connect("again"))
            )
            assert await asyncio.to_thread(recv_all, sock) == SERVER_UNAVAILABLE
            sock.close()
            down = await scrape(metrics)
            assert down["cloudconnector_proxy_active_sessions"] == 0
            assert attempts(down, "upstream_unavailable") == 1

            await asyncio.to_thread(broker.restart)
            for route in routes:
                dev = Client(route.client_id, bind=route.ip or "")
                clients.append(dev)
                assert await connect(dev, port) == 0
                await asyncio.to_thread(dev.subscribe, f"{route.client_id}/#", 1)
                assert await relays(dev, f"{route.client_id}/back", route.client_id.encode())
            up = await scrape(metrics)
            assert up["cloudconnector_proxy_active_sessions"] == 3
            assert attempts(up, "ok") == 6 and attempts(up, "upstream_unavailable") == 1
