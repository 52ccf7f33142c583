"""Before the device is identified, the proxy holds little: an unknown address is refused from the
first bytes of CONNECT (or before the TLS handshake), a first byte that is not CONNECT closes at
once, a CONNECT over the first-packet limit is refused before its body is read, and what all
unidentified connections hold together is capped."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator

import pytest

from cloudconnector.mqtt import codec
from cloudconnector.mqtt.packets import MQTT_5, MQTT_311, Connack, Connect, Will
from cloudconnector.mqtt.wire import encode_string, encode_varint
from tests.proxy.conftest import Client, Pki, ProxyThread, World, client_tls, proxy_config, recv_all
from tests.proxy.mqtt_raw import metric, read_one
from tests.support.procs import wait_for

SLOW = 30.0  # a CONNECT timeout no test waits for: every close seen here has another cause
STRANGER = "127.0.9.9"
ATTEMPTS = "cloudconnector_proxy_connections_total"


def connect_prefix(level: int, remaining: int) -> bytes:
    """A CONNECT's fixed header announcing ``remaining`` bytes, then only the protocol name and level."""
    return b"\x10" + encode_varint(remaining) + encode_string("MQTT") + bytes((level,))


def sock(port: int, ip: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(ip, 0))
    s.settimeout(10)
    return s


@pytest.fixture
def patient(pki: Pki, world: World) -> Iterator[ProxyThread]:
    pt = ProxyThread(proxy_config(pki, connect_timeout=SLOW, max_connect_size=1024), world)
    try:
        yield pt
    finally:
        pt.close()


@pytest.mark.parametrize(
    ("level", "answer"), [(MQTT_311, b"\x20\x02\x00\x05"), (MQTT_5, b"\x20\x03\x00\x87\x00")]
)
def test_unknown_address_refused_from_the_first_bytes(
    patient: ProxyThread, level: int, answer: bytes
) -> None:
    # A CONNECT announcing 200 KB, of which only the protocol level is sent: the answer comes at
    # once, in the device's own protocol version, without waiting for (or reading) the rest.
    with sock(patient.port, STRANGER) as s:
        s.sendall(connect_prefix(level, 200_000))
        assert recv_all(s) == answer
    assert metric(patient, ATTEMPTS, result="unknown_device") == 1


def test_unknown_address_closed_before_the_tls_handshake(
    patient: ProxyThread, pki: Pki, world: World
) -> None:
    raw = sock(patient.tls_port, STRANGER)
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        client_tls(pki, None, "").wrap_socket(raw, server_hostname="localhost")
    raw.close()
    assert metric(patient, ATTEMPTS, result="unknown_device") == 1
    # A device's address still gets its handshake and its session.
    route = world.add()
    raw = sock(patient.tls_port, route.ip or "")
    with client_tls(pki, None, "").wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(codec.encode(Connect("tls")))
        assert s.recv(4) == b"\x20\x02\x00\x00"


@pytest.mark.parametrize("identity", [("ip",), ("client_id",)])
def test_first_byte_not_connect_closes_at_once(pki: Pki, world: World, identity: tuple[str, ...]) -> None:
    pt = ProxyThread(proxy_config(pki, connect_timeout=SLOW, identity=identity), world)
    try:
        route = world.add()
        for first in (b"\x30", b"\x11", b"\xc0"):  # PUBLISH, CONNECT with a reserved flag, PINGREQ
            with sock(pt.port, route.ip or "") as s:
                started = time.monotonic()
                s.sendall(first)  # one byte, and the socket left open
                assert recv_all(s) == b""
                assert time.monotonic() - started < SLOW / 3  # not the CONNECT timeout
        assert metric(pt, ATTEMPTS, result="malformed") == 3
    finally:
        pt.close()


@pytest.mark.parametrize("level", [MQTT_311, MQTT_5])
def test_connect_over_the_first_packet_limit(patient: ProxyThread, world: World, level: int) -> None:
    route = world.add()
    with sock(patient.port, route.ip or "") as s:
        s.sendall(connect_prefix(level, 2000))  # over 1024; the body is never sent
        answer = recv_all(s)
    if level == MQTT_5:
        assert codec.decode(answer[0], answer[2:], MQTT_5) == Connack(0x95)
    else:
        assert answer == b""  # 3.1.1 has no code for it
    assert metric(patient, ATTEMPTS, result="connect_too_large") == 1
    # Within the limit, a will and credentials are fine.
    small = Connect("w", level, username="u", password=b"p", will=Will(f"{route.client_id}/w", b"x" * 500))
    with sock(patient.port, route.ip or "") as s:
        s.sendall(codec.encode(small, level))
        connack = read_one(s, level)
        assert isinstance(connack, Connack) and connack.reason_code == 0
    assert metric(patient, ATTEMPTS, result="ok") == 1


def test_connect_over_the_first_packet_limit_over_tls(patient: ProxyThread, world: World, pki: Pki) -> None:
    route = world.add()
    raw = sock(patient.tls_port, route.ip or "")
    with client_tls(pki, None, "").wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(connect_prefix(MQTT_5, 2000))
        answer = s.recv(16)
    assert codec.decode(answer[0], answer[2:], MQTT_5) == Connack(0x95)
    assert metric(patient, ATTEMPTS, result="connect_too_large") == 1


def test_bytes_held_by_unidentified_connections_are_capped(
    pki: Pki, world: World, clients: list[Client]
) -> None:
    budget, connect_size = 64 * 1024, 16 * 1024
    pt = ProxyThread(
        proxy_config(
            pki, connect_timeout=SLOW, identity=("client_id",), max_connect_size=connect_size,
            max_unidentified_bytes=budget,
        ),
        world,
    )  # fmt: skip
    held: list[socket.socket] = []
    try:
        # Each sends a CONNECT of 16,000 bytes but one: held in full, waiting for the last byte.
        part = b"\x10" + encode_varint(16_000) + b"\x00" * 15_999
        for n in range(10):
            s = sock(pt.port, f"127.0.8.{n + 2}")
            s.sendall(part)
            held.append(s)
        time.sleep(0.5)
        assert pt.run(lambda: pt.proxy.gate.held) <= budget
        overloaded = metric(pt, ATTEMPTS, result="overloaded")
        assert overloaded >= 10 - budget // 16_000  # the ones beyond the budget were cut at once
        closed = 0
        for s in held:
            s.settimeout(0.2)
            with contextlib.suppress(TimeoutError):
                closed += s.recv(1) == b""
        assert closed == overloaded
        for s in held:
            s.close()
        # Released with the connections: a device gets through again.
        route = world.add()
        dev = Client(route.iccid, bind=route.ip or "")
        clients.append(dev)
        assert dev.connect(pt.port) == 0
        wait_for(lambda: pt.run(lambda: pt.proxy.gate.held) == 0, what="every unidentified byte released")
    finally:
        for s in held:
            s.close()
        pt.close()
