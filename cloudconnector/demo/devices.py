"""Simulated devices: plain MQTT 3.1.1 clients, each from its own loopback source address.

A constrained device speaks unencrypted MQTT to the proxy and knows nothing about certificates;
the proxy tells devices apart by source IP, so each simulated device binds its own 127.x address.
The encoder is just what such a device needs (CONNECT, PUBLISH at QoS 1, DISCONNECT).
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from dataclasses import dataclass


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def connect_packet(client_id: str, keepalive: int = 30) -> bytes:
    body = _str("MQTT") + bytes([4, 0x02]) + struct.pack("!H", keepalive) + _str(client_id)
    return b"\x10" + _length(len(body)) + body


def publish_packet(topic: str, payload: bytes, packet_id: int) -> bytes:
    body = _str(topic) + struct.pack("!H", packet_id) + payload
    return b"\x32" + _length(len(body)) + body


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    header = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return header >> 4, await reader.readexactly(length)


@dataclass(frozen=True)
class DeviceRun:
    name: str
    ip: str
    sent: int
    acked: int
    error: str | None = None


async def run_device(
    name: str, cloud_id: str, ip: str, proxy: tuple[str, int], messages: int, patience: float = 20.0
) -> DeviceRun:
    """Connect from ``ip``, publish ``messages`` QoS 1 messages to ``<thing>/telemetry``, disconnect."""
    sent = acked = 0
    try:
        async with asyncio.timeout(patience):
            reader, writer = await asyncio.open_connection(proxy[0], proxy[1], local_addr=(ip, 0))
            try:
                writer.write(connect_packet(f"sensor-{name}"))
                kind, body = await read_packet(reader)
                if kind != 2 or len(body) < 2 or body[1] != 0:
                    code = body[1] if kind == 2 and len(body) > 1 else -1
                    return DeviceRun(name, ip, 0, 0, f"CONNACK refused (code {code})")
                for seq in range(1, messages + 1):
                    payload = json.dumps({"device": name, "thing": cloud_id, "seq": seq, "t": time.time_ns()})
                    writer.write(publish_packet(f"{cloud_id}/telemetry", payload.encode(), seq))
                    sent += 1
                    kind, body = await read_packet(reader)
                    if kind == 4 and struct.unpack("!H", body[:2])[0] == seq:
                        acked += 1
                writer.write(b"\xe0\x00")  # DISCONNECT
                await writer.drain()
            finally:
                writer.close()
                await writer.wait_closed()
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as e:
        return DeviceRun(name, ip, sent, acked, type(e).__name__)
    return DeviceRun(name, ip, sent, acked)
