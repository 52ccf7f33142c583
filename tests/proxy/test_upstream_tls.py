"""The cloud side's TLS: one identity per connection on shared contexts, checked against real servers.

Contexts are shared per trust bundle (proxy/upstream_tls.py), so these tests pin what sharing must
never change: no TLS session is resumed, the server's name is verified (DNS and IP), the device's
key is gone from the connection once the handshake is done, a chain's intermediates are sent, and
unusable credentials end in CONNACK 0x03 without a secret in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from dataclasses import replace

import pytest
from OpenSSL import SSL

from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.mqtt import codec
from cloudconnector.mqtt.packets import Connect
from cloudconnector.proxy.upstream_tls import ContextCache, UpstreamTLSError, device_connection, open_tls
from cloudconnector.routes import Route
from tests.proxy.conftest import Pki, ProxyThread, World, raw_connect, recv_all
from tests.support.pki import Issued
from tests.support.procs import Mosquitto, wait_for
from tests.support.tlsserver import LocalServer

CONNACK_OK = b"\x20\x02\x00\x00"
CONNACK_UNAVAILABLE = b"\x20\x02\x00\x03"


async def _mqtt_connect(route: Route, material: KeyMaterial, contexts: ContextCache) -> tuple[bytes, object]:
    """CONNECT with the device's identity; returns the CONNACK and the OpenSSL connection object."""
    conn = device_connection(contexts, route, material)
    reader, writer = await asyncio.wait_for(open_tls(route.host, route.port, conn), 10)
    try:
        writer.write(codec.encode(Connect(route.client_id)))
        connack = await asyncio.wait_for(reader.readexactly(4), 10)
        writer.write(b"\xc0\x00")  # PINGREQ: the connection still works after the key was dropped
        assert await asyncio.wait_for(reader.readexactly(2), 10) == b"\xd0\x00"
        return connack, conn
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def test_device_key_leaves_the_connection_after_the_handshake(world: World) -> None:
    route = world.add()
    material = world.keys.items[route.device]
    contexts = ContextCache(None)
    assert device_connection(contexts, route, material).get_certificate() is not None

    connack, conn = asyncio.run(_mqtt_connect(route, material, contexts))
    assert connack == CONNACK_OK  # the broker took the device's certificate as its identity
    assert conn.get_certificate() is None  # type: ignore[attr-defined]


class ResumingServer(LocalServer):
    """A mutual-TLS server that would resume sessions (cache and tickets on) and records if it did."""

    def __init__(self, pki: Pki, version: ssl.TLSVersion) -> None:
        cert, key = pki.client_files(
            pki.ca.issue("localhost", hosts=("localhost",)), f"resume-{version.name}"
        )
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.ctx.load_verify_locations(cadata=pki.ca.cert_pem)
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx.minimum_version = self.ctx.maximum_version = version
        self.reused: list[bool] = []
        self.start()

    def handle(self, raw: socket.socket) -> None:
        tls = self.ctx.wrap_socket(raw, server_side=True)
        self.reused.append(tls.session_reused)
        tls.sendall(b"x")  # lets a TLS 1.3 client receive its ticket
        tls.recv(1)
        tls.close()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_no_tls_session_is_ever_resumed(pki: Pki, world: World, version: ssl.TLSVersion) -> None:
    server = ResumingServer(pki, version)
    try:
        # Control: a client that keeps its session does resume here, so "not resumed" below means it.
        issued = pki.ca.issue("control", client=True)
        control = ssl.create_default_context(cadata=pki.ca.cert_pem)
        control.load_cert_chain(*pki.client_files(issued, f"control-{version.name}"))
        session = None
        for _ in range(2):
            with control.wrap_socket(
                socket.create_connection(("127.0.0.1", server.port), timeout=10),
                server_hostname="localhost",
                session=session,
            ) as s:
                s.recv(1)
                session = s.session
        assert server.reused == [False, True]

        # Two devices, then the first again, through one shared context: never resumed.
        first, second = world.add(port=server.port), world.add(port=server.port)
        contexts = ContextCache(None)

        async def handshake(route: Route) -> None:
            conn = device_connection(contexts, route, world.keys.items[route.device])
            reader, writer = await asyncio.wait_for(open_tls(route.host, route.port, conn), 10)
            assert await asyncio.wait_for(reader.readexactly(1), 10) == b"x"
            writer.close()

        for route in (first, second, first):
            asyncio.run(handshake(route))
        assert server.reused == [False, True, False, False, False]
    finally:
        server.close()


class NamedServer(LocalServer):
    """A modern TLS server (trusted CA) whose certificate names only ``hosts``."""

    def __init__(self, pki: Pki, hosts: tuple[str, ...]) -> None:
        cert, key = pki.client_files(pki.ca.issue(hosts[0], hosts=hosts), f"named-{hosts[0]}")
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.handshakes = 0
        self.start()

    def handle(self, raw: socket.socket) -> None:
        tls = self.ctx.wrap_socket(raw, server_side=True)
        self.handshakes += 1
        tls.recv(1)


@pytest.mark.parametrize(
    ("host", "names", "right"),
    [
        ("localhost", ("elsewhere.example",), None),  # DNS name not in the certificate
        ("127.0.0.1", ("localhost",), "localhost"),  # an address where only a name is certified
        ("localhost", ("127.0.0.1",), "127.0.0.1"),  # a name where only an address is certified
    ],
)
def test_endpoint_name_is_verified(
    pki: Pki, world: World, proxy: ProxyThread, host: str, names: tuple[str, ...], right: str | None
) -> None:
    server = NamedServer(pki, names)
    try:
        route = world.add(port=server.port)
        proxy.run(lambda: world.directory.put(replace(route, host=host)))
        s = raw_connect(proxy.port, route.ip or "", codec.encode(Connect("x")))
        assert recv_all(s) == CONNACK_UNAVAILABLE
        assert server.handshakes == 0
        if right is None:
            return

        # The same server under the name its certificate does carry: accepted, so the name decided.
        good = replace(route, host=right)

        async def reach() -> None:
            conn = device_connection(ContextCache(None), good, world.keys.items[route.device])
            _, writer = await asyncio.wait_for(open_tls(good.host, good.port, conn), 10)
            writer.close()

        asyncio.run(reach())
        wait_for(lambda: server.handshakes == 1, what="the handshake under the certified name")
    finally:
        server.close()


def test_name_mismatch_is_reported_as_verification_failure(pki: Pki, world: World) -> None:
    server = NamedServer(pki, ("elsewhere.example",))
    try:
        route = world.add(port=server.port)
        conn = device_connection(ContextCache(None), route, world.keys.items[route.device])
        with pytest.raises(UpstreamTLSError, match="certificate verify failed"):
            asyncio.run(open_tls(route.host, route.port, conn))
    finally:
        server.close()


def test_endpoint_by_ip_address(world: World, proxy: ProxyThread, admin: object) -> None:
    # The broker's certificate carries 127.0.0.1 as an IP SAN: verified as an address, no SNI.
    route = world.add()
    proxy.run(lambda: world.directory.put(replace(route, host="127.0.0.1")))
    s = raw_connect(proxy.port, route.ip or "", codec.encode(Connect("x")))
    try:
        assert s.recv(4) == CONNACK_OK
    finally:
        s.close()


def test_device_chain_with_intermediate_is_sent(
    pki: Pki, world: World, proxy: ProxyThread, broker: Mosquitto
) -> None:
    # The broker trusts the root only: it accepts the leaf only if the proxy sends the intermediate.
    sub = pki.ca.intermediate("Cloud Connector Test Issuing CA")
    route = world.add(ready=False)
    leaf = sub.issue(route.client_id, client=True)
    world.keys.items[route.device] = KeyMaterial(leaf.cert_pem + sub.cert_pem, leaf.key_pem)
    proxy.run(lambda: world.directory.put(route))
    s = raw_connect(proxy.port, route.ip or "", codec.encode(Connect("x")))
    try:
        assert s.recv(4) == CONNACK_OK
    finally:
        s.close()

    # Without the intermediate the broker refuses the handshake: the chain above was what counted.
    world.keys.items[route.device] = KeyMaterial(leaf.cert_pem, leaf.key_pem)
    s = raw_connect(proxy.port, route.ip or "", codec.encode(Connect("x")))
    assert recv_all(s) == CONNACK_UNAVAILABLE


@pytest.mark.parametrize("damage", ["other_key", "garbled_key", "garbled_cert"])
def test_unusable_credentials_end_in_server_unavailable(
    world: World, proxy: ProxyThread, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    route = world.add()
    good = world.keys.items[route.device]
    other: Issued = world.pki.ca.issue("someone-else", client=True)
    broken = {
        "other_key": KeyMaterial(good.certificate_pem, other.key_pem),
        "garbled_key": KeyMaterial(
            good.certificate_pem, good.private_key_pem[:40] + b"AAAA" + good.private_key_pem[44:]
        ),
        "garbled_cert": KeyMaterial(
            good.certificate_pem[:60] + "!!" + good.certificate_pem[62:], good.private_key_pem
        ),
    }[damage]
    world.keys.items[route.device] = broken
    registry = proxy.proxy.metrics.registry

    def refused() -> float:
        value = registry.get_sample_value(
            "cloudconnector_proxy_connections_total", {"result": "bad_credentials"}
        )
        return value or 0.0

    before = refused()
    with caplog.at_level(logging.INFO, logger="cloudconnector.proxy"):
        s = raw_connect(proxy.port, route.ip or "", codec.encode(Connect("x")))
        assert recv_all(s) == CONNACK_UNAVAILABLE
    assert refused() == before + 1
    text = caplog.text
    assert "device certificate/key rejected" in text
    assert "PRIVATE KEY" not in text and good.private_key_pem.decode().splitlines()[1][:32] not in text


class PostQuantumServer(LocalServer):
    """A TLS 1.3 server on the bundled OpenSSL, which prefers the hybrid X25519MLKEM768 group."""

    errors = (SSL.Error, OSError)

    def __init__(self, pki: Pki) -> None:
        issued = pki.ca.issue("localhost", hosts=("localhost",))
        self.ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        self.ctx.use_certificate(issued.cert)
        self.ctx.use_privatekey(issued.key)
        self.groups: list[str | None] = []
        self.start()

    def handle(self, raw: socket.socket) -> None:
        conn = SSL.Connection(self.ctx, raw)
        conn.set_accept_state()
        conn.do_handshake()
        self.groups.append(conn.get_group_name())


def test_hybrid_post_quantum_key_exchange_where_the_server_has_it(pki: Pki, world: World) -> None:
    server = PostQuantumServer(pki)
    try:
        route = world.add(port=server.port)

        async def handshake(r: Route) -> str | None:
            conn = device_connection(ContextCache(None), r, world.keys.items[route.device])
            _, writer = await asyncio.wait_for(open_tls(r.host, r.port, conn), 10)
            writer.close()
            return conn.get_group_name()

        assert asyncio.run(handshake(route)) == "X25519MLKEM768"
        wait_for(lambda: server.groups == ["X25519MLKEM768"], what="the server's view of the group")
        # mosquitto's OpenSSL has no ML-KEM: the same settings fall back to X25519, no failure.
        assert asyncio.run(handshake(replace(route, port=world.broker_port))) == "x25519"
    finally:
        server.close()
