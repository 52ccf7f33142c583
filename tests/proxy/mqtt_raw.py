"""A few blocking MQTT steps over a plain socket, for tests that must see exact packets (MQTT 5
properties, DISCONNECT reasons) or send what no well-behaved client library would."""

from __future__ import annotations

import socket
from typing import Any

from cloudconnector.mqtt import codec
from cloudconnector.mqtt.packets import MQTT_5, Connack, Connect, Packet
from cloudconnector.mqtt.properties import parse_properties
from tests.proxy.conftest import ProxyThread, raw_connect


def read_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise EOFError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def read_one(s: socket.socket, version: int, timeout: float = 10) -> Packet:
    """The next packet the proxy sends; EOFError when it closes instead."""
    s.settimeout(timeout)
    header = read_exact(s, 1)[0]
    length, shift = 0, 0
    while True:
        byte = read_exact(s, 1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return codec.decode(header, read_exact(s, length) if length else b"", version)


def connect(
    port: int, ip: str, version: int, client_id: str = "raw", **fields: Any
) -> tuple[socket.socket, Connack]:
    s = raw_connect(port, ip, codec.encode(Connect(client_id, version, **fields), version))
    connack = read_one(s, version)
    assert isinstance(connack, Connack)
    return s, connack


def props(raw: bytes) -> dict[int, Any]:
    return dict(parse_properties(raw))


def metric(pt: ProxyThread, name: str, **labels: str) -> float:
    value = pt.run(lambda: pt.proxy.metrics.registry.get_sample_value(name, labels))
    return float(value or 0.0)


def send(s: socket.socket, packet: Packet, version: int = MQTT_5) -> None:
    s.sendall(codec.encode(packet, version))
