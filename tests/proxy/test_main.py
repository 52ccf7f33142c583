"""The real process: ``python -m cloudconnector.proxy.main`` with its directory from the Kubernetes
API (kmock), credentials from OpenBao (the proxy's read-only token) and mosquitto as the cloud;
SIGTERM drains it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import urllib.request
import uuid

import kmock as kmocklib

from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.keystore.vault import VaultKeyStore
from cloudconnector.kube.client import KubeClient
from cloudconnector.kube.config import KubeConfig
from cloudconnector.model import ObjectRef
from cloudconnector.proxy.kube_directory import DEVICES, ENDPOINTS, GROUPS
from tests.proxy.conftest import Client, Pki
from tests.proxy.test_kube_directory import body, serve_crds
from tests.support.procs import Bao, Mosquitto, free_port, port_open, wait_for


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


async def test_console_command_end_to_end(
    kmock: kmocklib.KubernetesEmulator,
    pki: Pki,
    broker: Mosquitto,
    bao: Bao,
    stores: tuple[VaultKeyStore, VaultKeyStore],
    admin: Client,
) -> None:
    serve_crds(kmock)
    server = str(kmock.url).rstrip("/")
    kube = KubeClient(KubeConfig(server=server))
    ns = f"m-{uuid.uuid4().hex[:6]}"
    thing, ip = "fleet_main-1", "127.0.4.9"
    ep_spec = {"type": "AwsIotCore", "aws": {"region": "eu-west-1"}, "caCertificate": pki.ca.cert_pem}
    ep_status = {"phase": "Ready", "host": "localhost", "port": broker.port}
    await kube.create(ENDPOINTS, ns, body("Endpoint", ns, "aws", ep_spec, ep_status))
    await kube.create(GROUPS, ns, body("Group", ns, "g", {"endpointRef": {"name": "aws"}}, {}))
    spec = {"group": "g", "sim": {"iccid": "8935301888888888888"}, "ip": ip, "cloudId": thing}
    status = {"phase": "Ready", "endpoint": "aws", "cloudId": thing, "certificateId": "c1"}
    await kube.create(DEVICES, ns, body("Device", ns, "main-1", spec, status))
    await kube.aclose()
    writer, reader = stores
    issued = pki.ca.issue(thing, client=True)
    await writer.put(ObjectRef(ns, "main-1"), KeyMaterial(issued.cert_pem, issued.key_pem), {})
    proxy_token = reader.config.token
    mqtt_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "CLOUDCONNECTOR_K8S_SERVER": server,
        "VAULT_ADDR": bao.url,
        "VAULT_TOKEN": proxy_token or "",
        "CC_PROXY_BIND": "127.0.0.1",
        "CC_PROXY_MQTT_PORT": str(mqtt_port),
        "CC_PROXY_TLS_PORT": "off",
        "CC_PROXY_HTTP_BIND": "127.0.0.1",
        "CC_PROXY_HTTP_PORT": str(http_port),
        "CC_PROXY_DRAIN_SECONDS": "0.2",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cloudconnector.proxy.main",
        "--namespace",
        ns,
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        ready = f"http://127.0.0.1:{http_port}/readyz"
        await asyncio.to_thread(wait_for, lambda: http_status(ready) == 200, 20.0, "proxy ready")
        assert port_open("127.0.0.1", mqtt_port)
        admin.subscribe(f"{thing}/#", 1)
        dev = Client("anything", bind=ip)
        try:
            assert await asyncio.to_thread(dev.connect, mqtt_port) == 0
            await asyncio.to_thread(dev.publish, f"{thing}/up", b"through the real process", 1)
            got = await asyncio.to_thread(admin.expect)
            assert got.payload == b"through the real process"
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(dev.disconnects.get, True, 10)  # drained
            assert await asyncio.wait_for(proc.wait(), 20) == 0
        finally:
            await asyncio.to_thread(dev.close)
    finally:
        if proc.returncode is None:
            proc.kill()
        assert proc.stderr is not None
        logs = (await proc.stderr.read()).decode()
    assert '"message": "session started"' in logs
    assert "PRIVATE KEY" not in logs and (proxy_token or "x") not in logs
