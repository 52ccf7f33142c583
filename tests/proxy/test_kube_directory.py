"""The Kubernetes directory against kmock over HTTP: routes follow the resources, and deleting a
device or changing its certificate ends its live session through the proxy."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kmock as kmocklib
import pytest
import yaml

from cloudconnector import api
from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.kube.client import KubeClient
from cloudconnector.kube.config import KubeConfig
from cloudconnector.model import ObjectRef
from cloudconnector.proxy.kube_directory import DEVICES, ENDPOINTS, GROUPS, KubeDirectory
from cloudconnector.proxy.server import Proxy
from tests.proxy.conftest import Client, Pki, World, proxy_config
from tests.support.procs import Mosquitto

CRDS = Path(__file__).resolve().parents[2] / "crds"


def serve_crds(kmock: kmocklib.KubernetesEmulator) -> None:
    kmock.resources.load_bundled()
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        names = crd["spec"]["names"]
        for version in crd["spec"]["versions"]:
            kmock.resources[f"{crd['spec']['group']}/{version['name']}/{names['plural']}"] = (
                kmocklib.ResourceInfo(
                    kind=names["kind"],
                    singular=names["singular"],
                    namespaced=True,
                    verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
                    subresources={"status"},
                )
            )


def body(kind: str, ns: str, name: str, spec: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": kind,
        "metadata": {"name": name, "namespace": ns, "uid": str(uuid.uuid4()), "resourceVersion": "1"},
        "spec": spec,
        "status": status,
    }


async def eventually(check: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


@pytest.fixture
async def kube(kmock: kmocklib.KubernetesEmulator) -> AsyncIterator[KubeClient]:
    serve_crds(kmock)
    client = KubeClient(KubeConfig(server=str(kmock.url).rstrip("/")))
    yield client
    await client.aclose()


async def test_directory_follows_resources_and_ends_sessions(
    kube: KubeClient, pki: Pki, broker: Mosquitto, admin: Client
) -> None:
    ns = f"p-{uuid.uuid4().hex[:6]}"
    world = World(pki, broker.port)  # only for its credentials and key store
    ip, iccid = "127.0.3.7", "8935301999999999999"
    device_ref = ObjectRef(ns, "meter-1")
    thing = "fleet_meter-1"
    ep_status = {"phase": "Ready", "host": "localhost", "port": broker.port}
    await kube.create(
        ENDPOINTS,
        ns,
        body(
            "Endpoint",
            ns,
            "broker",
            {"type": "MqttBroker", "mqtt": {"host": "localhost"}, "caCertificate": pki.ca.cert_pem},
            ep_status,
        ),
    )
    await kube.create(GROUPS, ns, body("Group", ns, "meters", {"endpointRef": {"name": "broker"}}, {}))
    dev_status = {"phase": "Ready", "endpoint": "broker", "cloudId": thing, "certificateId": "c1"}
    spec = {"group": "meters", "sim": {"iccid": iccid}, "ip": ip, "cloudId": thing}
    await kube.create(DEVICES, ns, body("Device", ns, "meter-1", spec, dev_status))

    directory = KubeDirectory(kube, ns, retry_seconds=0.2)
    revoked: list[ObjectRef] = []
    directory.subscribe(revoked.append)
    watcher = asyncio.create_task(directory.run())
    try:
        await eventually(lambda: directory.by_ip(ip) is not None, "device routed")
        route = directory.by_ip(ip)
        assert route is not None and route.client_id == thing and route.port == broker.port
        assert directory.by_iccid(iccid) == route

        issued = pki.ca.issue(thing, client=True)
        world.keys.items[device_ref] = KeyMaterial(issued.cert_pem, issued.key_pem)
        async with Proxy(proxy_config(pki), directory, world.keys) as proxy:
            dev = Client("d", bind=ip)
            try:
                assert await asyncio.to_thread(dev.connect, proxy.ports["mqtt"]) == 0
                # A rotation: the operator writes a new certificate id.
                await kube.patch(DEVICES, ns, "meter-1", {"status": {"certificateId": "c2"}}, status=True)
                await asyncio.to_thread(dev.disconnects.get, True, 10)
                assert revoked == [device_ref]
                await asyncio.to_thread(dev.close)
                dev = Client("d", bind=ip)
                assert await asyncio.to_thread(dev.connect, proxy.ports["mqtt"]) == 0
                # Deletion ends the session and the device is refused from then on.
                await kube.request("DELETE", DEVICES.path(ns, "meter-1"))
                await asyncio.to_thread(dev.disconnects.get, True, 10)
                await eventually(lambda: directory.by_ip(ip) is None, "device removed")
                again = Client("d", bind=ip)
                assert await asyncio.to_thread(again.connect, proxy.ports["mqtt"]) == 0x87
                await asyncio.to_thread(again.close)
            finally:
                await asyncio.to_thread(dev.close)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


async def test_group_and_endpoint_changes_reroute_their_devices(kube: KubeClient) -> None:
    ns = f"g-{uuid.uuid4().hex[:6]}"
    for name, host in (("ep-a", "a.example"), ("ep-b", "b.example")):
        spec = {"type": "MqttBroker", "mqtt": {"host": host}}
        await kube.create(ENDPOINTS, ns, body("Endpoint", ns, name, spec, {"phase": "Ready", "port": 8883}))
    await kube.create(GROUPS, ns, body("Group", ns, "g", {"endpointRef": {"name": "ep-a"}}, {}))
    for i in range(3):
        spec = {"group": "g", "sim": {"iccid": f"893530177777777777{i}"}, "ip": f"10.1.0.{i + 1}"}
        status = {"phase": "Ready", "endpoint": "ep-a", "cloudId": f"d{i}", "certificateId": "c1"}
        await kube.create(DEVICES, ns, body("Device", ns, f"d{i}", spec, status))
    directory = KubeDirectory(kube, ns, retry_seconds=0.2)
    revoked: list[ObjectRef] = []
    directory.subscribe(revoked.append)
    watcher = asyncio.create_task(directory.run())
    try:
        await eventually(lambda: len(directory.routes()) == 3, "three devices routed")
        assert {r.host for r in directory.routes()} == {"a.example"}
        # The endpoint's data host changes: every device of it is re-routed, sessions end.
        await kube.patch(ENDPOINTS, ns, "ep-a", {"status": {"host": "a2.example"}}, status=True)
        await eventually(lambda: {r.host for r in directory.routes()} == {"a2.example"}, "new host")
        assert sorted(r.name for r in revoked) == ["d0", "d1", "d2"]
        # The group moves to another endpoint: until the operator re-provisions the devices
        # there (status.endpoint), they have no usable route.
        await kube.patch(GROUPS, ns, "g", {"spec": {"endpointRef": {"name": "ep-b"}}})
        await eventually(lambda: directory.routes() == [], "devices unroutable mid-migration")
        assert directory.by_ip("10.1.0.1") is None
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
