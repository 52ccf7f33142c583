"""Real peers for the proxy tests: a mosquitto that behaves like AWS IoT Core (mutual TLS, the
certificate's CN as user name, an ACL keyed on it), paho-mqtt devices each bound to its own
127.0.0.x address, and the proxy itself running on an event loop in a background thread so that
the blocking MQTT clients can drive it from plain test functions."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.keystore.vault import VaultKeyStore
from cloudconnector.keystore.vault_config import VaultConfig
from cloudconnector.keystore.vault_setup import OPERATOR_POLICY, PROXY_POLICY
from cloudconnector.model import EndpointType, ObjectRef
from cloudconnector.proxy.config import ProxyConfig
from cloudconnector.proxy.directory import StaticDirectory
from cloudconnector.proxy.server import Proxy
from cloudconnector.routes import Route
from tests.support.pki import CA, Issued
from tests.support.procs import Bao, Mosquitto, free_port, run_mosquitto
from tests.support.vault import bootstrapped
from tests.support.vault import mint_token as token

ADMIN = "admin"

ACL = f"""\
user {ADMIN}
topic readwrite #
topic read $SYS/#

pattern readwrite %u/#
"""


def broker_config(port: int, d: Path, crl: Path | None = None) -> str:
    lines = [
        "per_listener_settings false",
        # Started as root, mosquitto would switch to its own user and lose the 0600 key files.
        f"user {pwd.getpwuid(os.getuid()).pw_name}",
        "allow_anonymous false",
        f"log_dest file {d / f'broker-{port}.log'}",  # flushed per line, unlike stdout
        "log_type all",
        "connection_messages true",
        f"acl_file {d / 'acl'}",
        f"listener {port} 127.0.0.1",
        f"cafile {d / 'ca.crt'}",
        f"certfile {d / 'broker.crt'}",
        f"keyfile {d / 'broker.key'}",
        "require_certificate true",
        "use_identity_as_username true",
        "tls_version tlsv1.2",
    ]
    if crl is not None:
        lines.append(f"crlfile {crl}")
    return "\n".join(lines) + "\n"


@dataclass
class Pki:
    ca: CA
    dir: Path
    admin: Issued
    proxy_server: Issued

    def client_files(self, issued: Issued, stem: str) -> tuple[str, str]:
        c, k = issued.write(self.dir, stem)
        return str(c), str(k)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = CA()
    (d / "ca.crt").write_text(ca.cert_pem)
    ca.issue("localhost", hosts=("localhost", "127.0.0.1")).write(d, "broker")
    (d / "acl").write_text(ACL)
    proxy_server = ca.issue("proxy.local", hosts=("localhost", "127.0.0.1"))
    proxy_server.write(d, "proxy-server")
    return Pki(ca, d, ca.issue(ADMIN, client=True), proxy_server)


@contextlib.contextmanager
def start_broker(pki: Pki, crl: Path | None = None) -> Iterator[Mosquitto]:
    port = free_port()
    with run_mosquitto(broker_config(port, pki.dir, crl), port) as broker:
        yield broker


@pytest.fixture(scope="session")
def broker(pki: Pki) -> Iterator[Mosquitto]:
    with start_broker(pki) as b:
        yield b


class MemoryKeys:
    """A KeyReader over a dict; the real Vault-backed store is exercised in test_vault_keys."""

    def __init__(self) -> None:
        self.items: dict[ObjectRef, KeyMaterial] = {}
        self.reads = 0

    async def get(self, device: ObjectRef) -> KeyMaterial:
        self.reads += 1
        return self.items[device]


@dataclass
class World:
    """Devices, their routes and credentials, for one broker."""

    pki: Pki
    broker_port: int
    keys: MemoryKeys = field(default_factory=MemoryKeys)
    directory: StaticDirectory = field(default_factory=StaticDirectory)
    counter: int = 0

    def add(
        self, name: str | None = None, *, ready: bool = True, port: int | None = None, ip: str | None = None
    ) -> Route:
        self.counter += 1
        name = name or f"dev{self.counter}"
        thing = f"fleet_{name}"
        ip = ip or f"127.0.{1 + self.counter // 250}.{self.counter % 250 + 2}"
        iccid = f"{8935301000000000000 + self.counter}"
        route = Route(
            device=ObjectRef("fleet", name),
            iccid=iccid,
            imsi=None,
            ip=ip,
            endpoint_type=EndpointType.AWS,
            host="localhost",
            port=port or self.broker_port,
            ca_pem=self.pki.ca.cert_pem,
            client_id=thing,
            certificate_id="cert-1",
        )
        if ready:
            self.issue(route)
            self.directory.put(route)
        return route

    def issue(self, route: Route) -> Issued:
        issued = self.pki.ca.issue(route.client_id, client=True)
        self.keys.items[route.device] = KeyMaterial(issued.cert_pem, issued.key_pem)
        return issued

    def rotate(self, route: Route, certificate_id: str) -> Route:
        self.issue(route)
        new = replace(route, certificate_id=certificate_id)
        return new


class ProxyThread:
    """The proxy on its own event loop thread; ``run`` executes a call on that loop."""

    def __init__(self, config: ProxyConfig, world: World) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxy = Proxy(config, world.directory, world.keys)
        self.await_(self.proxy.start())
        self.port = self.proxy.ports.get("mqtt", 0)
        self.tls_port = self.proxy.ports.get("tls", 0)

    def await_(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Callable[[], Any]) -> Any:
        async def call() -> Any:
            return fn()

        return self.await_(call())

    def close(self) -> None:
        self.await_(self.proxy.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def proxy_config(pki: Pki, **overrides: Any) -> ProxyConfig:
    base: dict[str, Any] = {
        "bind": "127.0.0.1",
        "mqtt_port": 0,
        "tls_port": 0,
        "tls_cert_file": str(pki.dir / "proxy-server.crt"),
        "tls_key_file": str(pki.dir / "proxy-server.key"),
        "http_port": None,
        "connect_timeout": 5.0,
        "upstream_timeout": 5.0,
        "log_json": False,
    }
    base.update(overrides)
    return ProxyConfig(**base)


@pytest.fixture
def world(pki: Pki, broker: Mosquitto) -> World:
    return World(pki, broker.port)


@pytest.fixture
def proxy(pki: Pki, world: World) -> Iterator[ProxyThread]:
    pt = ProxyThread(proxy_config(pki), world)
    try:
        yield pt
    finally:
        pt.close()


@pytest.fixture
def stores(bao: Bao) -> Iterator[tuple[VaultKeyStore, VaultKeyStore]]:
    root = bootstrapped(bao)
    writer = VaultKeyStore(VaultConfig(address=bao.url, token=token(root, OPERATOR_POLICY)))
    reader = VaultKeyStore(VaultConfig(address=bao.url, token=token(root, PROXY_POLICY)))
    yield writer, reader
    writer.close()
    reader.close()


# ---------------------------------------------------------------- MQTT peers


@dataclass
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Any = None


class Client:
    """A blocking paho-mqtt client with queues for what it hears."""

    def __init__(
        self,
        client_id: str,
        *,
        bind: str = "",
        version: int = mqtt.MQTTv311,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTProtocolVersion(version)
        )
        self.c.reconnect_delay_set(60, 60)  # tests reconnect explicitly
        if tls is not None:
            self.c.tls_set_context(tls)
        self.bind = bind
        self.version = version
        self.messages: queue.Queue[Received] = queue.Queue()
        self.connacks: queue.Queue[int] = queue.Queue()
        self.disconnects: queue.Queue[int] = queue.Queue()
        self.subacks: queue.Queue[list[int]] = queue.Queue()
        self.c.on_connect = lambda c, u, f, rc, p: self.connacks.put(rc.value)
        self.c.on_disconnect = lambda c, u, f, rc, p: self.disconnects.put(rc.value)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put([r.value for r in rcs])
        self.c.on_message = lambda c, u, m: self.messages.put(
            Received(m.topic, m.payload, m.qos, bool(m.retain), getattr(m, "properties", None))
        )

    def connect(self, port: int, host: str = "127.0.0.1", timeout: float = 10) -> int:
        self.c.connect(host, port, keepalive=30, bind_address=self.bind)
        self.c.loop_start()
        return self.connacks.get(timeout=timeout)

    def subscribe(self, topic: str, qos: int = 1) -> list[int]:
        self.c.subscribe(topic, qos)
        return self.subacks.get(timeout=10)

    def publish(self, topic: str, payload: bytes, qos: int = 1, **kw: Any) -> None:
        info = self.c.publish(topic, payload, qos, **kw)
        if qos:
            info.wait_for_publish(10)

    def expect(self, timeout: float = 10) -> Received:
        return self.messages.get(timeout=timeout)

    def nothing(self, wait: float = 0.5) -> bool:
        """True when no message arrives within ``wait`` (a negative check; not a timing claim)."""
        try:
            self.messages.get(timeout=wait)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.c.disconnect()
        self.c.loop_stop()


def client_tls(pki: Pki, issued: Issued | None, stem: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.dir / "ca.crt"))
    if issued is not None:
        ctx.load_cert_chain(*pki.client_files(issued, stem))
    return ctx


@pytest.fixture
def admin(pki: Pki, broker: Mosquitto) -> Iterator[Client]:
    c = Client(f"admin-{time.monotonic_ns()}", tls=client_tls(pki, pki.admin, "admin"))
    assert c.connect(broker.port, host="localhost") == 0
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for c in made:
        c.close()


def raw_connect(port: int, bind: str, packet: bytes, prefix: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(bind, 0))
    s.sendall(prefix + packet)
    return s


def recv_all(s: socket.socket, limit: float = 10) -> bytes:
    """Everything the proxy sends until it closes the connection."""
    s.settimeout(limit)
    out = b""
    while True:
        try:
            chunk = s.recv(4096)
        except ConnectionResetError:  # closed with our bytes unread: a reset, still a close
            return out
        if not chunk:
            return out
        out += chunk


def broker_log(broker: Mosquitto) -> str:
    path = Path(broker.conf.read_text().split("log_dest file ", 1)[1].split("\n", 1)[0])
    return path.read_text(errors="replace") if path.exists() else ""
