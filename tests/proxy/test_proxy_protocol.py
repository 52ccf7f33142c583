"""PROXY protocol v1/v2: the device's address survives a load balancer, but only a trusted one."""

from __future__ import annotations

import ipaddress
import socket
import ssl
from collections.abc import Iterator

import pytest

from cloudconnector.mqtt import codec
from cloudconnector.mqtt.packets import Connect
from cloudconnector.proxy import proxyproto
from cloudconnector.proxy.proxyproto import ProxyHeaderError
from tests.proxy.conftest import Pki, ProxyThread, World, broker_log, proxy_config, raw_connect, recv_all
from tests.support.procs import Mosquitto

BALANCER = "127.0.0.200"
STRANGER = "127.0.0.201"
CONNACK_OK = b"\x20\x02\x00\x00"


@pytest.fixture
def lb_proxy(pki: Pki, world: World) -> Iterator[ProxyThread]:
    nets = (ipaddress.ip_network(f"{BALANCER}/32"),)
    pt = ProxyThread(proxy_config(pki, trusted_proxies=nets), world)
    try:
        yield pt
    finally:
        pt.close()


@pytest.mark.parametrize("build", [proxyproto.build_v1, proxyproto.build_v2], ids=["v1", "v2"])
def test_trusted_balancer_passes_device_address(
    world: World, lb_proxy: ProxyThread, broker: Mosquitto, build: object
) -> None:
    route = world.add()
    header = build(route.ip, "127.0.0.1", 40000, lb_proxy.port)  # type: ignore[operator]
    s = raw_connect(lb_proxy.port, BALANCER, codec.encode(Connect("x")), prefix=header)
    assert s.recv(4) == CONNACK_OK
    s.close()
    assert f"as {route.client_id} " in broker_log(broker)


@pytest.mark.parametrize("build", [proxyproto.build_v1, proxyproto.build_v2], ids=["v1", "v2"])
def test_untrusted_source_cannot_claim_an_address(
    world: World, lb_proxy: ProxyThread, broker: Mosquitto, build: object
) -> None:
    route = world.add()
    header = build(route.ip, "127.0.0.1", 40000, lb_proxy.port)  # type: ignore[operator]
    before = broker_log(broker).count("New connection from")
    s = raw_connect(lb_proxy.port, STRANGER, codec.encode(Connect("x")), prefix=header)
    assert recv_all(s) == b""  # the header is not MQTT: closed, nothing sent upstream
    assert broker_log(broker).count("New connection from") == before


def test_trusted_source_must_send_a_header(world: World, lb_proxy: ProxyThread) -> None:
    s = raw_connect(lb_proxy.port, BALANCER, codec.encode(Connect("x")))
    assert recv_all(s) == b""


def test_local_command_uses_the_balancer_address(world: World, lb_proxy: ProxyThread) -> None:
    world.add()
    local = proxyproto.V2_SIGNATURE + b"\x20\x00\x00\x00"  # LOCAL, e.g. a health check
    s = raw_connect(lb_proxy.port, BALANCER, codec.encode(Connect("x")), prefix=local)
    assert recv_all(s) == b"\x20\x02\x00\x05"  # the balancer itself is no device


def test_header_before_tls(world: World, lb_proxy: ProxyThread, pki: Pki, broker: Mosquitto) -> None:
    route = world.add()
    raw = socket.create_connection(("127.0.0.1", lb_proxy.tls_port), timeout=10, source_address=(BALANCER, 0))
    raw.sendall(proxyproto.build_v2(route.ip or "", "127.0.0.1", 40001, lb_proxy.tls_port))
    ctx = ssl.create_default_context(cafile=str(pki.dir / "ca.crt"))
    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(codec.encode(Connect("x")))
        assert s.recv(4) == CONNACK_OK


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP6 ::1 ::2 1 2\r\n",
        b"PROXY UNKNOWN\r\n",
    ],
)
def test_parse_v1_good(line: bytes) -> None:
    proxyproto.parse_v1(line)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n",
    ],
)
def test_parse_v1_bad(line: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        proxyproto.parse_v1(line)


def test_parse_v2() -> None:
    v6 = proxyproto.build_v2("2001:db8::7", "2001:db8::1", 1234, 8883)
    got = proxyproto.parse_v2(v6[12], v6[13], v6[16:])
    assert (got.source, got.source_port) == ("2001:db8::7", 1234)
    with pytest.raises(ProxyHeaderError):
        proxyproto.parse_v2(0x21, 0x11, b"\x00" * 5)
    with pytest.raises(ProxyHeaderError):
        proxyproto.parse_v2(0x31, 0x11, b"\x00" * 12)
