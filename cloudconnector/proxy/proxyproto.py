"""PROXY protocol v1 (text) and v2 (binary) headers, read straight off an accepted socket.

A load balancer in front of the proxy puts the device's real address in this header. It is read
with exact-size ``recv`` calls on the raw socket, before TLS and before any stream buffering, so
that not one byte of the device's own data is consumed. The caller decides whether the peer is
trusted to send one at all: from anyone else a header would let a device claim another's address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the specification's longest v1 line, CRLF included
V2_MAX_EXTRA = 2048  # address block + TLVs we are willing to read


class ProxyHeaderError(ValueError):
    """The peer is trusted to send a PROXY header but sent something else."""


@dataclass(frozen=True)
class ProxiedAddress:
    """The original client address; None when the header says LOCAL/UNKNOWN (health checks)."""

    source: str | None
    source_port: int | None = None


async def _recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise ProxyHeaderError("connection closed inside the PROXY header")
        buf += chunk
    return bytes(buf)


async def read_proxy_header(sock: socket.socket) -> ProxiedAddress:
    """Consume exactly one v1 or v2 header from ``sock`` (non-blocking) and return its source."""
    loop = asyncio.get_running_loop()
    head = await _recv_exact(loop, sock, 8)
    if head.startswith(b"PROXY "):
        line = bytearray(head)
        while not line.endswith(b"\r\n"):
            if len(line) >= V1_MAX:
                raise ProxyHeaderError("PROXY v1 line too long")
            line += await _recv_exact(loop, sock, 1)
        return parse_v1(bytes(line))
    if head == V2_SIGNATURE[:8]:
        rest = await _recv_exact(loop, sock, 8)
        if (head + rest)[:12] != V2_SIGNATURE:
            raise ProxyHeaderError("bad PROXY v2 signature")
        (length,) = struct.unpack("!H", rest[6:8])
        if length > V2_MAX_EXTRA:
            raise ProxyHeaderError("PROXY v2 header too long")
        body = await _recv_exact(loop, sock, length) if length else b""
        return parse_v2(rest[4], rest[5], body)
    raise ProxyHeaderError("expected a PROXY protocol header")


def parse_v1(line: bytes) -> ProxiedAddress:
    try:
        parts = line[:-2].decode("ascii").split(" ")
    except UnicodeDecodeError as e:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from e
    if len(parts) >= 2 and parts[0] == "PROXY" and parts[1] == "UNKNOWN":
        return ProxiedAddress(None)
    if len(parts) != 6 or parts[0] != "PROXY" or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 line")
    try:
        src = ipaddress.ip_address(parts[2])
        ipaddress.ip_address(parts[3])
        sport = int(parts[4])
        if not 0 <= sport <= 65535 or not 0 <= int(parts[5]) <= 65535:
            raise ValueError("port out of range")
    except ValueError as e:
        raise ProxyHeaderError("malformed PROXY v1 address") from e
    if (src.version == 4) != (parts[1] == "TCP4"):
        raise ProxyHeaderError("PROXY v1 address family mismatch")
    return ProxiedAddress(str(src), sport)


def parse_v2(ver_cmd: int, family: int, body: bytes) -> ProxiedAddress:
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError("unsupported PROXY v2 version")
    command = ver_cmd & 0x0F
    if command == 0x0:  # LOCAL: the balancer's own connection, e.g. a health check
        return ProxiedAddress(None)
    if command != 0x1:
        raise ProxyHeaderError("unknown PROXY v2 command")
    if family == 0x11:  # TCP over IPv4
        if len(body) < 12:
            raise ProxyHeaderError("short PROXY v2 IPv4 block")
        return ProxiedAddress(str(ipaddress.IPv4Address(body[:4])), struct.unpack("!H", body[8:10])[0])
    if family == 0x21:  # TCP over IPv6
        if len(body) < 36:
            raise ProxyHeaderError("short PROXY v2 IPv6 block")
        return ProxiedAddress(str(ipaddress.IPv6Address(body[:16])), struct.unpack("!H", body[32:34])[0])
    if family == 0x00:
        return ProxiedAddress(None)
    raise ProxyHeaderError("PROXY v2 family is not TCP")


def build_v1(source: str, dest: str, sport: int, dport: int) -> bytes:
    """A v1 header; for tests and the benchmark's load balancer stand-in."""
    fam = "TCP4" if ipaddress.ip_address(source).version == 4 else "TCP6"
    return f"PROXY {fam} {source} {dest} {sport} {dport}\r\n".encode()


def build_v2(source: str, dest: str, sport: int, dport: int) -> bytes:
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(dest)
    family = 0x11 if src.version == 4 else 0x21
    block = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    return V2_SIGNATURE + bytes((0x21, family)) + struct.pack("!H", len(block)) + block
