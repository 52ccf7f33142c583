"""Devices speaking plain MQTT through the proxy to a mosquitto that behaves like IoT Hub.

The whole path is real: the provisioner registers each device in the registry double through its
REST API and stores its key in OpenBao; the proxy reads it from there at connect time;
mosquitto plays the hub's data plane: mutual TLS 1.2, the certificate's CN (= device id) as the
identity, an ACL that lets a device write only ``devices/{id}/messages/events/#``, read only
``devices/{id}/messages/devicebound/#``, and use ``$iothub/...``. Like the hub, it trusts exactly
the self-signed certificates registered for a device (here: files in its ``capath``).

The proxy, the registry double and the provisioner run on one event loop in a background thread,
so that blocking paho-mqtt clients can drive them from plain test functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import queue
import ssl
import subprocess
import threading
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloudconnector.clouds.azure import AzureIotHubProvisioner
from cloudconnector.clouds.base import Progress
from cloudconnector.clouds.certs import cert_info
from cloudconnector.keystore.vault import VaultKeyStore
from cloudconnector.keystore.vault_config import VaultConfig
from cloudconnector.model import Device, EndpointType, TopicMapping
from cloudconnector.proxy.config import ProxyConfig
from cloudconnector.proxy.directory import StaticDirectory
from cloudconnector.proxy.server import Proxy
from cloudconnector.ratelimit import RateLimiter
from cloudconnector.routes import Route
from tests.azure.conftest import azure_endpoint, new_device
from tests.azure.hub_double import HubDouble
from tests.support.pki import CA, Issued
from tests.support.procs import Mosquitto, free_port, run_mosquitto

ADMIN = "hub-backend"
DATA_HOST = "localhost"  # the hub's host name as the proxy dials it; mosquitto's cert names it


def _acl() -> str:
    # The hub's own rules, keyed on the device id the certificate carries.
    return (
        f"user {ADMIN}\ntopic readwrite devices/#\ntopic readwrite $iothub/#\n\n"
        "pattern write devices/%u/messages/events/#\n"
        "pattern read devices/%u/messages/devicebound/#\n"
        "pattern readwrite $iothub/#\n"
    )


def _broker_conf(port: int, d: Path) -> str:
    return "\n".join(
        [
            f"user {pwd.getpwuid(os.getuid()).pw_name}",  # stay this user: the files are private
            "per_listener_settings false",
            "allow_anonymous false",
            "log_dest stdout",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "connection_messages true",
            f"acl_file {d / 'acl'}",
            f"listener {port} 127.0.0.1",
            f"capath {d / 'trust'}",
            f"certfile {d / 'hub.crt'}",
            f"keyfile {d / 'hub.key'}",
            "require_certificate true",
            "use_identity_as_username true",
            "tls_version tlsv1.2",
            "",
        ]
    )


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Provisioned:
    device: Device
    route: Route
    progress: Progress


class AzureWorld:
    """Registry double + Vault + mosquitto-as-hub + proxy, and helpers to add devices."""

    def __init__(
        self, loop: LoopThread, d: Path, ca: CA, hub: HubDouble, broker: Mosquitto, proxy: Proxy, urls: Any
    ) -> None:
        self.loop, self.dir, self.ca, self.hub, self.broker, self.proxy = loop, d, ca, hub, broker, proxy
        url, operator, proxy_token = urls
        self.writer = VaultKeyStore(VaultConfig(address=url, token=operator))
        self.reader = VaultKeyStore(VaultConfig(address=url, token=proxy_token))
        self.directory: StaticDirectory = proxy.directory  # type: ignore[assignment]
        self.count = 0

    def provisioner(self, mapping: TopicMapping = TopicMapping.FLATTEN) -> AzureIotHubProvisioner:
        endpoint = azure_endpoint(self.hub, self.ca.cert_pem, topicMapping=mapping.value)
        return AzureIotHubProvisioner(
            endpoint, {"connectionString": self.hub.connection_string()}, RateLimiter(1000, burst=100)
        )

    def add(self, mapping: TopicMapping = TopicMapping.FLATTEN) -> Provisioned:
        self.count += 1
        device = new_device(f"e2e-{uuid.uuid4().hex[:6]}")
        ip = f"127.0.3.{self.count + 1}"
        progress: Progress = {}

        async def go() -> Any:
            prov = self.provisioner(mapping)
            try:
                return await prov.provision(device, progress, _noop, self.writer)
            finally:
                await prov.aclose()

        identity = self.loop.run(go())
        self.trust_current(device)
        route = Route(
            device=device.ref,
            iccid=device.iccid,
            imsi=None,
            ip=ip,
            endpoint_type=EndpointType.AZURE,
            host=DATA_HOST,
            port=self.broker.port,
            ca_pem=self.ca.cert_pem,
            client_id=identity.cloud_id,
            certificate_id=identity.certificate_id,
            topic_mapping=mapping,
        )
        self.loop.run(_call(lambda: self.directory.put(route)))
        return Provisioned(device, route, progress)

    def trust_current(self, device: Device) -> str:
        """Let the 'hub' accept the certificate now stored for ``device`` (as registering does)."""
        material = self.loop.run(self.reader.get(device.ref))
        return _add_to_capath(self.dir / "trust", material.certificate_pem)


def _remove_from_capath(capath: Path, thumbprint: str) -> None:
    """Drop a certificate and renumber the rest (OpenSSL stops at the first missing ``.N``)."""
    keep = [f.read_text() for f in sorted(capath.iterdir())]
    for f in capath.iterdir():
        f.unlink()
    for pem in keep:
        if cert_info(pem).sha256 != thumbprint:
            _add_to_capath(capath, pem)


async def _noop(_: Progress) -> None:
    return None


async def _call(fn: Any) -> Any:
    return fn()


def _add_to_capath(capath: Path, cert_pem: str) -> str:
    tmp = capath / "incoming.pem"
    tmp.write_text(cert_pem)
    digest = subprocess.run(
        ["openssl", "x509", "-hash", "-noout", "-in", str(tmp)], check=True, capture_output=True, text=True
    ).stdout.strip()
    n = 0
    while (capath / f"{digest}.{n}").exists():
        n += 1
    tmp.rename(capath / f"{digest}.{n}")
    return cert_info(cert_pem).sha256


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, azure_ca: CA, vault_tokens: Any) -> Iterator[AzureWorld]:
    d = tmp_path_factory.mktemp("azure-e2e")
    (d / "trust").mkdir()
    _add_to_capath(d / "trust", azure_ca.cert_pem)  # the backend client's issuer
    azure_ca.issue(DATA_HOST, hosts=(DATA_HOST, "127.0.0.1")).write(d, "hub")
    (d / "acl").write_text(_acl())
    loop = LoopThread()
    hub = HubDouble("test-hub.azure-devices.net", azure_ca)
    stack = contextlib.ExitStack()
    try:
        serving = hub.serve()  # keep a reference: a dropped context manager would stop the server
        loop.run(serving.__aenter__())
        port = free_port()
        broker = stack.enter_context(run_mosquitto(_broker_conf(port, d), port, workdir=d))
        reader = VaultKeyStore(VaultConfig(address=vault_tokens[0], token=vault_tokens[2]))
        config = ProxyConfig(
            bind="127.0.0.1",
            mqtt_port=0,
            tls_port=None,
            http_port=None,
            connect_timeout=5.0,
            upstream_timeout=5.0,
            log_json=False,
        )
        proxy = Proxy(config, StaticDirectory(), reader)
        loop.run(proxy.start())
        w = AzureWorld(loop, d, azure_ca, hub, broker, proxy, vault_tokens)
        yield w
        loop.run(proxy.stop(0))
        reader.close()
        w.writer.close()
        w.reader.close()
        loop.run(serving.__aexit__(None, None, None))
    finally:
        stack.close()
        loop.close()


# ------------------------------------------------------------------------------- MQTT peers


class Peer:
    """A blocking paho-mqtt client that queues what it hears."""

    def __init__(
        self, client_id: str, *, bind: str = "", v5: bool = False, tls: ssl.SSLContext | None = None
    ):
        version = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=version)
        self.c.reconnect_delay_set(120, 120)
        if tls is not None:
            self.c.tls_set_context(tls)
        self.bind = bind
        self.inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connacks: queue.Queue[int] = queue.Queue()
        self.closed: queue.Queue[int] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.c.on_connect = lambda c, u, f, rc, p: self.connacks.put(rc.value)
        self.c.on_disconnect = lambda c, u, f, rc, p: self.closed.put(rc.value)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put([r.value for r in rcs])
        self.c.on_message = lambda c, u, m: self.inbox.put(m)

    def connect(self, port: int, host: str = "127.0.0.1") -> int:
        self.c.connect(host, port, keepalive=30, bind_address=self.bind)
        self.c.loop_start()
        return self.connacks.get(timeout=10)

    def subscribe(self, topic: str, qos: int) -> list[int]:
        self.c.subscribe(topic, qos)
        return self.subacks.get(timeout=10)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        info = self.c.publish(topic, payload, qos, retain=retain)
        if qos:
            info.wait_for_publish(10)
            assert info.is_published()

    def receive(self) -> mqtt.MQTTMessage:
        return self.inbox.get(timeout=10)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for p in made:
        p.close()


def connect_backend(world: AzureWorld, peers: list[Peer]) -> Peer:
    """The solution side of the hub: reads telemetry, sends cloud-to-device messages."""
    issued: Issued = world.ca.issue(ADMIN, client=True)
    cert, key = issued.write(world.dir, f"backend-{uuid.uuid4().hex[:6]}")
    ctx = ssl.create_default_context(cafile=str(world.dir / "hub.crt"))
    ctx.load_verify_locations(cadata=world.ca.cert_pem)
    ctx.load_cert_chain(cert, key)
    p = Peer(f"backend-{uuid.uuid4().hex[:6]}", tls=ctx)
    peers.append(p)
    assert p.connect(world.broker.port, host=DATA_HOST) == 0
    return p


@pytest.fixture
def backend(world: AzureWorld, peers: list[Peer]) -> Peer:
    return connect_backend(world, peers)


def device_peer(world: AzureWorld, dev: Provisioned, peers: list[Peer], **kw: Any) -> Peer:
    p = Peer(f"whatever-{uuid.uuid4().hex[:4]}", bind=dev.route.ip or "", **kw)
    peers.append(p)
    return p


# ------------------------------------------------------------------------------- tests


def test_telemetry_is_flattened_under_events(world: AzureWorld, backend: Peer, peers: list[Peer]) -> None:
    dev = world.add()
    did = dev.route.client_id
    assert backend.subscribe(f"devices/{did}/messages/events/#", 1) == [1]
    device = device_peer(world, dev, peers)
    assert device.connect(world.proxy.ports["mqtt"]) == 0
    device.publish("/my/desired/topic", b"\x00\x01 payload", qos=1, retain=True)
    got = backend.receive()
    assert got.topic == f"devices/{did}/messages/events/my-desired-topic"
    assert got.payload == b"\x00\x01 payload"
    assert got.retain is False  # the hub keeps no retained messages
    # QoS 2 from the device completes (PUBREC/PUBREL/PUBCOMP with the proxy), arrives as QoS 1
    device.publish("/q2", b"exactly once-ish", qos=2)
    got = backend.receive()
    assert (got.topic, got.qos) == (f"devices/{did}/messages/events/q2", 1)


def test_property_mapping_is_lossless(world: AzureWorld, backend: Peer, peers: list[Peer]) -> None:
    dev = world.add(TopicMapping.PROPERTY)
    did = dev.route.client_id
    backend.subscribe(f"devices/{did}/messages/events/#", 1)
    device = device_peer(world, dev, peers)
    assert device.connect(world.proxy.ports["mqtt"]) == 0
    device.publish("/a-b/c d", b"x")
    assert backend.receive().topic == f"devices/{did}/messages/events/mqtt-topic=%2Fa-b%2Fc%20d"


def test_cloud_to_device_on_the_subscribed_topic(world: AzureWorld, backend: Peer, peers: list[Peer]) -> None:
    dev = world.add()
    did = dev.route.client_id
    device = device_peer(world, dev, peers)
    assert device.connect(world.proxy.ports["mqtt"]) == 0
    assert device.subscribe("/my/cmd", 2) == [1]  # QoS 2 granted as 1
    assert device.subscribe("/cfg/#", 0) == [0]
    backend.publish(f"devices/{did}/messages/devicebound/my-cmd", b"reboot", qos=1)
    got = device.receive()
    assert (got.topic, got.payload, got.qos) == ("/my/cmd", b"reboot", 1)
    backend.publish(f"devices/{did}/messages/devicebound/cfg-led", b"on", qos=1)
    got = device.receive()
    assert (got.topic, got.payload, got.qos) == ("/cfg/led", b"on", 0)
    # twin traffic passes through unchanged
    assert device.subscribe("$iothub/twin/res/#", 0) == [0]
    device.publish("$iothub/twin/GET/?$rid=1", b"", qos=0)
    backend.publish("$iothub/twin/res/200/?$rid=1", b"{}", qos=0)
    got = device.receive()
    assert got.topic == "$iothub/twin/res/200/?$rid=1"


def test_device_cannot_reach_another_devices_topics(
    world: AzureWorld, backend: Peer, peers: list[Peer]
) -> None:
    a, b = world.add(), world.add()
    device = device_peer(world, a, peers)
    assert device.connect(world.proxy.ports["mqtt"]) == 0
    backend.subscribe(f"devices/{b.route.client_id}/messages/events/#", 1)
    backend.subscribe(f"devices/{a.route.client_id}/messages/events/#", 1)
    device.publish("/t", b"from a")
    # whatever the device sends lands under its own id: the hub sees a's certificate
    assert backend.receive().topic == f"devices/{a.route.client_id}/messages/events/t"


def test_mqtt5_is_refused(world: AzureWorld, peers: list[Peer]) -> None:
    dev = world.add()
    device = device_peer(world, dev, peers, v5=True)
    assert device.connect(world.proxy.ports["mqtt"]) == 0x84  # unsupported protocol version


def test_topic_azure_cannot_take_ends_the_session(world: AzureWorld, peers: list[Peer]) -> None:
    dev = world.add()
    device = device_peer(world, dev, peers)
    assert device.connect(world.proxy.ports["mqtt"]) == 0
    assert device.subscribe("/bad topic", 1) == [0x80]  # refused in the SUBACK, session goes on
    device.c.publish("/a&b=c", b"x", qos=0)
    device.closed.get(timeout=10)


def test_rotation_keeps_the_session_and_new_connections_use_the_new_cert(
    world: AzureWorld, backend: Peer, peers: list[Peer]
) -> None:
    dev = world.add()
    did = dev.route.client_id
    backend.subscribe(f"devices/{did}/messages/events/#", 1)
    device = device_peer(world, dev, peers)
    assert device.connect(world.proxy.ports["mqtt"]) == 0
    old = dev.progress["thumbprint"]
    checkpoints: list[tuple[str | None, str | None]] = []

    async def rotate() -> Any:
        prov = world.provisioner()

        async def on_step(p: Progress) -> None:
            checkpoints.append(world.hub.thumbprints(did))

        try:
            return await prov.rotate(dev.device, dev.progress, on_step, world.writer)
        finally:
            await prov.aclose()

    new = world.loop.run(rotate())
    assert new.thumbprint != old and (old, new.thumbprint) in checkpoints
    assert world.trust_current(dev.device) == new.thumbprint
    # the live session was not dropped by the rotation
    device.publish("/after", b"same session")
    assert backend.receive().payload == b"same session"
    assert device.closed.empty()
    # The hub stops accepting the old certificate (mosquitto only rereads its trust store on
    # start); a new connection through the proxy then works only with the new one.
    device.close()
    _remove_from_capath(world.dir / "trust", old)
    world.broker.restart()
    backend = connect_backend(world, peers)
    backend.subscribe(f"devices/{did}/messages/events/#", 1)
    again = device_peer(world, dev, peers)
    assert again.connect(world.proxy.ports["mqtt"]) == 0
    again.publish("/reconnected", b"new cert")
    assert backend.receive().topic == f"devices/{did}/messages/events/reconnected"


def test_too_long_topic_ends_the_session(world: AzureWorld, peers: list[Peer]) -> None:
    dev = world.add()
    device = device_peer(world, dev, peers)
    assert device.connect(world.proxy.ports["mqtt"]) == 0
    device.c.publish("/" + "x" * 5000, b"x", qos=0)
    device.closed.get(timeout=10)


def test_unsubscribe_stops_delivery(world: AzureWorld, backend: Peer, peers: list[Peer]) -> None:
    dev = world.add()
    did = dev.route.client_id
    device = device_peer(world, dev, peers)
    assert device.connect(world.proxy.ports["mqtt"]) == 0
    device.subscribe("/a/+", 1)
    device.subscribe("/b", 1)
    device.c.unsubscribe("/a/+")
    backend.publish(f"devices/{did}/messages/devicebound/a-x", b"dropped", qos=1)
    backend.publish(f"devices/{did}/messages/devicebound/b", b"kept", qos=1)
    got = device.receive()  # the unsubscribed one never arrives, the later one does
    assert (got.topic, got.payload) == ("/b", b"kept")


def test_deletion_removes_the_identity_and_ends_the_session(world: AzureWorld, peers: list[Peer]) -> None:
    dev = world.add()
    did = dev.route.client_id
    device = device_peer(world, dev, peers)
    assert device.connect(world.proxy.ports["mqtt"]) == 0

    async def delete() -> None:
        prov = world.provisioner()
        try:
            await prov.deprovision(dev.device, dev.progress, _noop)
        finally:
            await prov.aclose()
        await world.writer.delete(dev.device.ref)
        world.directory.remove(dev.device.ref)  # what the operator's status change does

    world.loop.run(delete())
    assert did not in world.hub.devices
    device.closed.get(timeout=10)
    again = device_peer(world, dev, peers)
    assert again.connect(world.proxy.ports["mqtt"]) == 135  # not authorized: unknown device
