"""Connections that only hold resources: slow-loris senders, silent sockets, and floods beyond
``max_connections``. The proxy must close the first two by its CONNECT timeout (which bounds the
whole CONNECT, not each byte) and refuse the flood at accept, while a connected device keeps
relaying."""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from cloudconnector.mqtt import codec
from cloudconnector.mqtt.packets import Connect
from tests.hardening.conftest import Records
from tests.proxy.conftest import Client, Pki, ProxyThread, World, client_tls, proxy_config, raw_connect
from tests.support.procs import wait_for

CONNECT_TIMEOUT = 1.0
DRIP = 0.3  # seconds between two bytes of a slow-loris sender
BOUND = 2 * CONNECT_TIMEOUT + 8.0  # handshake + CONNECT timeouts, plus slack for a loaded runner


@pytest.fixture
def strict(pki: Pki, world: World) -> Iterator[ProxyThread]:
    pt = ProxyThread(proxy_config(pki, connect_timeout=CONNECT_TIMEOUT), world)
    try:
        yield pt
    finally:
        pt.close()


def drip(s: socket.socket, data: bytes) -> tuple[int, bytes]:
    """Send ``data`` one byte at a time until the peer closes; returns (bytes sent, bytes heard)."""
    deadline = time.monotonic() + BOUND
    sent = 0
    heard = b""
    while time.monotonic() < deadline:
        if sent < len(data):
            try:
                s.send(data[sent : sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                return sent, heard
            sent += 1
        readable, _, _ = select.select([s], [], [], DRIP)
        if readable:
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:
                return sent, heard
            if not chunk:
                return sent, heard
            heard += chunk
    raise AssertionError(f"still open after {BOUND}s with {sent} of {len(data)} bytes sent")


def client_hello(pki: Pki) -> bytes:
    """The first flight of a real TLS client, to be sent at slow-loris pace."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_tls(pki, None, "").wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def assert_closed_silently(s: socket.socket) -> None:
    s.settimeout(BOUND)
    try:
        assert s.recv(4096) == b""
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"an idle connection was kept open over {BOUND}s") from None


def test_slow_loris_connect_is_cut_by_the_timeout(
    world: World, strict: ProxyThread, records: Records
) -> None:
    route = world.add()  # a known device: a complete CONNECT would be served
    connect = codec.encode(Connect("slow-but-known"))
    assert len(connect) * DRIP > 3 * CONNECT_TIMEOUT  # the whole CONNECT cannot arrive in time
    with socket.create_connection(("127.0.0.1", strict.port), source_address=(route.ip or "", 0)) as s:
        sent, heard = drip(s, connect)
    assert heard == b"" and sent < len(connect)
    assert records.alarms() == []


def test_slow_loris_tls_handshake_is_cut_by_the_timeout(
    world: World, strict: ProxyThread, pki: Pki, records: Records
) -> None:
    hello = client_hello(pki)
    with socket.create_connection(("127.0.0.1", strict.tls_port)) as s:
        sent, heard = drip(s, hello)
    assert heard == b"" and sent < len(hello)
    assert records.alarms() == []


def test_slow_loris_after_tls_handshake_is_cut_by_the_timeout(
    world: World, strict: ProxyThread, pki: Pki, records: Records
) -> None:
    route = world.add()
    raw = socket.create_connection(("127.0.0.1", strict.tls_port), source_address=(route.ip or "", 0))
    with client_tls(pki, None, "").wrap_socket(raw, server_hostname="localhost") as s:
        connect = codec.encode(Connect("slow-after-handshake"))
        deadline = time.monotonic() + BOUND
        sent = 0
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                if sent < len(connect):
                    s.send(connect[sent : sent + 1])
                    sent += 1
                s.settimeout(DRIP)
                closed = s.recv(4096) == b""
            except TimeoutError:
                continue
            except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
                closed = True
    assert closed, f"still open after {BOUND}s"
    assert sent < len(connect)
    assert records.alarms() == []


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_silent_connection_is_closed(strict: ProxyThread, tls: bool, records: Records) -> None:
    with socket.create_connection(("127.0.0.1", strict.tls_port if tls else strict.port)) as s:
        assert_closed_silently(s)
    assert records.alarms() == []


def test_flood_beyond_the_limit_is_refused_while_a_device_keeps_working(
    pki: Pki, world: World, admin: Client, records: Records
) -> None:
    limit = 6
    # A CONNECT timeout far above every wait below: any close seen here is the limit at work.
    pt = ProxyThread(proxy_config(pki, connect_timeout=60.0, max_connections=limit), world)
    idle: list[socket.socket] = []
    dev: Client | None = None
    try:
        route = world.add()
        admin.subscribe(f"{route.client_id}/#", 1)
        dev = Client("steady", bind=route.ip or "")
        assert dev.connect(pt.port) == 0
        # Fill the rest of the capacity with silent connections on both listeners, from a device's
        # address (any other is refused at once on the TLS port).
        for i in range(limit - 1):
            port = pt.tls_port if i % 2 else pt.port
            idle.append(socket.create_connection(("127.0.0.1", port), source_address=(route.ip or "", 0)))
        wait_for(lambda: open_connections(pt) == limit, what="capacity filled")

        for n in range(40):
            with socket.create_connection(("127.0.0.1", pt.tls_port if n % 2 else pt.port)) as extra:
                extra.settimeout(10.0)
                with contextlib.suppress(ConnectionResetError):
                    assert extra.recv(4096) == b""  # closed at accept, long before any timeout
            if n % 10 == 0:
                dev.publish(f"{route.client_id}/up", b"during flood %d" % n, 1)
                assert admin.expect().payload == b"during flood %d" % n
        refused = pt.run(
            lambda: pt.proxy.metrics.registry.get_sample_value(
                "cloudconnector_proxy_connections_total", {"result": "limit"}
            )
        )
        assert refused == 40
        # Said, with the reason, but not once per connection.
        said = [r for r in records.records if r.getMessage().startswith("connections refused")]
        assert said and len(said) < 40
        assert all(r.result == "limit" and str(limit) in r.reason for r in said)  # type: ignore[attr-defined]

        for s in idle:
            s.close()

        later = world.add()  # not the steady device: the broker would take its session over

        def accepted() -> bool:
            s = raw_connect(pt.port, later.ip or "", codec.encode(Connect("after-flood")))
            with s:
                return s.recv(4) == b"\x20\x02\x00\x00"

        wait_for(accepted, what="capacity back once the idle connections left")
        assert dev.disconnects.empty()  # the steady device was never dropped
        assert records.alarms() == []
    finally:
        for s in idle:
            s.close()
        if dev is not None:
            dev.close()
        pt.close()


def open_connections(pt: ProxyThread) -> float:
    return float(
        pt.run(lambda: pt.proxy.metrics.registry.get_sample_value("cloudconnector_proxy_open_connections"))
    )


@pytest.mark.parametrize("identity", ["ip", "client_id"])
def test_flood_of_huge_connects_costs_nothing_that_stays(
    pki: Pki, world: World, admin: Client, records: Records, identity: str
) -> None:
    """The issue's flood at test size: huge CONNECTs but their last byte, from addresses no device
    has, while a device publishes. Each is refused long before any timeout, the bytes held for
    unidentified connections never pass the budget and all come back, and the device is untouched."""
    budget = 4 * 1024 * 1024
    pt = ProxyThread(
        proxy_config(pki, connect_timeout=60.0, identity=(identity,), max_unidentified_bytes=budget), world
    )
    flood = 200
    data = b"\x10\x80\x80\x10" + (b"\x00\x04MQTT\x04\x02\x00\x3c" + b"\x00" * 262_134)[:-1]  # 262,144 bytes
    peak = [0]
    dev: Client | None = None
    try:
        route = world.add()
        admin.subscribe(f"{route.client_id}/#", 1)
        dev = Client(route.iccid if identity == "client_id" else "steady", bind=route.ip or "")
        assert dev.connect(pt.port) == 0

        def one(n: int) -> bytes:
            s = socket.create_connection(("127.0.0.1", pt.port), source_address=(f"127.0.7.{n % 250 + 2}", 0))
            with s:
                s.settimeout(20.0)  # far below the CONNECT timeout: a close seen is a refusal
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    s.sendall(data)
                heard = b""
                with contextlib.suppress(ConnectionResetError):
                    while chunk := s.recv(64):
                        heard += chunk
                peak[0] = max(peak[0], int(pt.run(lambda: pt.proxy.gate.held)))
                return heard

        with ThreadPoolExecutor(50) as pool:
            answers = pool.map(one, range(flood))
            for n in range(5):
                dev.publish(f"{route.client_id}/up", b"during flood %d" % n, 1)
                assert admin.expect().payload == b"during flood %d" % n
            heard = list(answers)
        # IP mode answers "not authorized" from the protocol level; otherwise the CONNECT is over
        # the first-packet limit, which MQTT 3.1.1 has no code for.
        assert set(heard) == ({b"\x20\x02\x00\x05"} if identity == "ip" else {b""})
        result = "unknown_device" if identity == "ip" else "connect_too_large"
        refused = pt.run(
            lambda: pt.proxy.metrics.registry.get_sample_value(
                "cloudconnector_proxy_connections_total", {"result": result}
            )
        )
        overloaded = pt.run(
            lambda: pt.proxy.metrics.registry.get_sample_value(
                "cloudconnector_proxy_connections_total", {"result": "overloaded"}
            )
        )
        assert (refused or 0) + (overloaded or 0) == flood
        assert peak[0] <= budget
        wait_for(lambda: pt.run(lambda: pt.proxy.gate.held) == 0, what="every unidentified byte released")
        wait_for(lambda: open_connections(pt) == 1, what="only the device left")
        assert dev.disconnects.empty()
        assert records.alarms() == []
    finally:
        if dev is not None:
            dev.close()
        pt.close()
