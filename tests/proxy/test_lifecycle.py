"""Sessions end when they must: deletion, rotation, broker restarts, bad input, limits."""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from cloudconnector.mqtt import codec
from cloudconnector.mqtt.packets import Connect, Pingreq, Publish
from tests.proxy.conftest import (
    Client,
    Pki,
    ProxyThread,
    World,
    broker_log,
    proxy_config,
    raw_connect,
    recv_all,
    start_broker,
)
from tests.support.pki import Issued
from tests.support.procs import Mosquitto, wait_for


def test_deletion_ends_live_session(world: World, proxy: ProxyThread, clients: list[Client]) -> None:
    route = world.add()
    dev = Client("d", bind=route.ip or "")
    clients.append(dev)
    assert dev.connect(proxy.port) == 0
    proxy.run(lambda: world.directory.remove(route.device))
    dev.disconnects.get(timeout=10)  # the proxy closed the device's connection
    assert proxy.run(lambda: proxy.proxy.live_sessions(route.device)) == 0
    again = Client("d", bind=route.ip or "")
    clients.append(again)
    assert again.connect(proxy.port) == 0x87  # gone from the directory: not authorized


def write_crl(pki: Pki, revoked: Issued, path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    entry = (
        x509.RevokedCertificateBuilder()
        .serial_number(revoked.cert.serial_number)
        .revocation_date(now - dt.timedelta(minutes=1))
        .build()
    )
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.ca.cert.subject)
        .last_update(now - dt.timedelta(minutes=1))
        .next_update(now + dt.timedelta(days=1))
        .add_revoked_certificate(entry)
        .sign(pki.ca.key, hashes.SHA256())
    )
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))


@pytest.fixture
def crl_broker(pki: Pki, tmp_path: Path) -> Iterator[tuple[Mosquitto, Path]]:
    crl = tmp_path / "crl.pem"
    write_crl(pki, pki.ca.issue("nobody", client=True), crl)  # revokes nothing that matters yet
    with start_broker(pki, crl) as b:
        yield b, crl


def test_rotation_picked_up_on_reconnect(
    pki: Pki, crl_broker: tuple[Mosquitto, Path], clients: list[Client]
) -> None:
    broker, crl = crl_broker
    world = World(pki, broker.port)
    pt = ProxyThread(proxy_config(pki), world)
    try:
        route = world.add()
        old = world.issue(route)
        dev = Client("d", bind=route.ip or "")
        clients.append(dev)
        assert dev.connect(pt.port) == 0

        # Rotation: new credentials in the key store, a new certificate id in the directory.
        rotated = world.rotate(route, "cert-2")
        pt.run(lambda: world.directory.put(rotated))
        dev.disconnects.get(timeout=10)  # the session on the old certificate ended

        # The broker now refuses the old certificate: only the new one can get through.
        write_crl(pki, old, crl)
        broker.restart()
        again = Client("d", bind=route.ip or "")
        clients.append(again)
        assert again.connect(pt.port) == 0
    finally:
        pt.close()


def test_broker_restart_closes_devices_and_they_reconnect(pki: Pki, clients: list[Client]) -> None:
    with start_broker(pki) as broker:
        world = World(pki, broker.port)
        pt = ProxyThread(proxy_config(pki), world)
        try:
            route = world.add()
            dev = Client("d", bind=route.ip or "")
            clients.append(dev)
            assert dev.connect(pt.port) == 0
            broker.proc.terminate()
            broker.proc.wait(10)
            dev.disconnects.get(timeout=10)  # upstream gone: device closed promptly
            dev.close()
            down = raw_connect(pt.port, route.ip or "", codec.encode(Connect("x")))
            assert recv_all(down) == b"\x20\x02\x00\x03"  # server unavailable while it is down
            broker.restart()
            again = Client("d", bind=route.ip or "")
            clients.append(again)
            assert again.connect(pt.port) == 0
            assert again.subscribe(f"{route.client_id}/x", 1) == [1]
            again.publish(f"{route.client_id}/x", b"back", 1)
            assert again.expect().payload == b"back"
        finally:
            pt.close()


def test_device_close_closes_upstream(world: World, proxy: ProxyThread, broker: Mosquitto) -> None:
    route = world.add()
    s = raw_connect(proxy.port, route.ip or "", codec.encode(Connect("x")))
    assert s.recv(4) == b"\x20\x02\x00\x00"
    s.close()
    # The broker notices the upstream connection closing (no DISCONNECT: it logs an error close).
    wait_for(
        lambda: (
            f"Client {route.client_id} closed its connection" in broker_log(broker)
            or f"Socket error on client {route.client_id}" in broker_log(broker)
        ),
        what="upstream close",
    )


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x10\xff\xff\xff\xff\x7f",  # remaining length of 5 bytes
        b"\x00\x00",  # reserved packet type
        b"\x10\x05\x00\x04MQ",  # truncated CONNECT, then close
        codec.encode(Pingreq()),  # not a CONNECT first
        b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x3c\x00\x03\xff\xfe\xfd",  # bad UTF-8 client id
        b"GET / HTTP/1.1\r\n\r\n",
    ],
)
def test_malformed_input_closes_only_that_connection(
    world: World, proxy: ProxyThread, clients: list[Client], garbage: bytes
) -> None:
    good, bad = world.add(), world.add()
    dev = Client("good", bind=good.ip or "")
    clients.append(dev)
    assert dev.connect(proxy.port) == 0
    s = socket.create_connection(("127.0.0.1", proxy.port), source_address=(bad.ip or "", 0))
    s.sendall(garbage)
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == b""  # closed without an answer
    assert dev.subscribe(f"{good.client_id}/t", 1) == [1]
    dev.publish(f"{good.client_id}/t", b"still fine", 1)
    assert dev.expect().payload == b"still fine"


def test_malformed_after_connect_and_oversized(pki: Pki, world: World, clients: list[Client]) -> None:
    pt = ProxyThread(proxy_config(pki, max_packet_size=4096), world)
    try:
        route = world.add()
        s = raw_connect(pt.port, route.ip or "", codec.encode(Connect("x")))
        assert s.recv(4) == b"\x20\x02\x00\x00"
        s.sendall(b"\x61\x02\x00\x01")  # reserved flags, caught by the raw relay's frame scanner
        assert recv_all(s) == b""
        s = raw_connect(pt.port, route.ip or "", codec.encode(Connect("x")))
        assert s.recv(4) == b"\x20\x02\x00\x00"
        s.sendall(codec.encode(Publish(f"{route.client_id}/big", b"x" * 5000)))
        assert recv_all(s) == b""
    finally:
        pt.close()


def test_connect_timeout_and_connection_limit(pki: Pki, world: World) -> None:
    pt = ProxyThread(proxy_config(pki, connect_timeout=0.5, max_connections=2), world)
    try:
        route = world.add()
        idle = [socket.create_connection(("127.0.0.1", pt.port)) for _ in range(2)]
        extra = socket.create_connection(("127.0.0.1", pt.port))
        assert recv_all(extra) == b""  # over the limit: closed at once
        for s in idle:
            assert recv_all(s) == b""  # no CONNECT in time: closed

        def accepted() -> bool:  # the closed connections' tasks finish just after their FIN
            s = raw_connect(pt.port, route.ip or "", codec.encode(Connect("x")))
            with s:
                return s.recv(4) == b"\x20\x02\x00\x00"

        wait_for(accepted, what="capacity after idle connections were closed")
    finally:
        pt.close()
