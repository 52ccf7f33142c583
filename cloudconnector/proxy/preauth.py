"""A connection before the device is identified: its first packet, read with bounded memory.

Until the proxy knows who is connecting, every byte it holds for a connection is held for whoever
opened it, so:

- the first byte must be CONNECT's (0x10), or the connection is closed at once;
- a CONNECT may be at most ``max_connect_size`` bytes (default 16 KiB, many times what a client
  id, credentials and a will need); a larger one is refused before its body is read (MQTT 5 with
  CONNACK 0x95, 3.1.1 has no code for it and is closed). On the plain port the fixed header is
  read off the raw socket (``first_header``), so not even a first read of the body happens;
- everything held in the read buffers of connections not yet identified counts against one budget
  for the process (``max_unidentified_bytes``): a connection whose data would exceed it is
  aborted and its data dropped, so a flood costs at most the budget, not a CONNECT per connection;
- in IP mode, an address that no Ready device has is refused before a stream is set up for it:
  on the plain port answered from the first bytes of its CONNECT, read off the raw socket (only
  enough to learn the protocol level of the refusal), on the TLS port closed before the handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cloudconnector.mqtt.codec import MalformedPacket, UnsupportedVersion, decode
from cloudconnector.mqtt.packets import (
    MQTT_5,
    NOT_AUTHORIZED,
    PACKET_TOO_LARGE,
    UNSUPPORTED_VERSION,
    Connack,
    Connect,
)
from cloudconnector.proxy.config import ProxyConfig
from cloudconnector.proxy.outcome import SessionEnd

CONNECT_HEADER = 0x10  # CONNECT's type with its reserved flags, which must be zero
READ_LIMIT = 4 * 1024  # stream buffer before identification: pauses reading at twice this
IDENTIFIED_READ_LIMIT = 64 * 1024  # asyncio's default, once the device is known


class BudgetExceeded(ConnectionError):
    """Connections not yet identified already hold all the bytes the proxy allows them."""


class Gate:
    """The bytes held by all connections not yet identified, against one limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n


class GatedReader(asyncio.StreamReader):
    """A stream reader whose data counts against a :class:`Gate` until ``identified`` is called.

    Data that would take the gate over its limit is not kept: the connection is aborted at once.
    """

    def __init__(self, gate: Gate) -> None:
        super().__init__(limit=READ_LIMIT)
        self._gate = gate
        self._held = 0
        self._gated = True
        self._abort: Callable[[], None] | None = None

    def set_transport(self, transport: asyncio.BaseTransport) -> None:
        super().set_transport(transport)
        self._abort = getattr(transport, "abort", None)  # every stream transport has it (uvloop's too)

    def feed_data(self, data: bytes) -> None:
        if self._gated and data:
            if not self._gate.take(len(data)):
                limit = self._gate.limit
                self.set_exception(BudgetExceeded(f"unidentified connections hold {limit} bytes, the limit"))
                if self._abort is not None:
                    self._abort()
                return
            self._held += len(data)
        super().feed_data(data)

    def identified(self) -> None:
        """The device is known (or the connection ended): its bytes no longer count."""
        if self._gated:
            self._gate.give(self._held)
            self._held, self._gated = 0, False
            # StreamReader has no public way to change its limit; the attribute is its own
            # constructor argument, stable since Python 3.4. A small limit before identification
            # lets more connections share the budget; after it, asyncio's default reads faster.
            self._limit = IDENTIFIED_READ_LIMIT


Read = Callable[[int], Awaitable[bytes]]  # exactly n bytes, or IncompleteReadError


async def _start(read: Read) -> tuple[int, int]:
    """CONNECT's fixed header: its remaining length and the packet's whole size."""
    if (await read(1))[0] != CONNECT_HEADER:
        raise SessionEnd("malformed", "first packet is not CONNECT")
    length = 0
    for i in range(4):
        byte = (await read(1))[0]
        length |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return length, 2 + i + length
    raise MalformedPacket("remaining length longer than 4 bytes")


async def _protocol_level(read: Read, length: int) -> tuple[int, int]:
    """The level from the start of a CONNECT body (protocol name, then level: at most 9 bytes),
    and how many bytes of the body follow it."""
    name_length = int.from_bytes(await read(2), "big") if length >= 2 else 0
    if name_length not in (4, 6) or length < 2 + name_length + 1:
        raise MalformedPacket("CONNECT without a known protocol name")
    prefix = await read(name_length + 1)
    if prefix[:-1] not in (b"MQTT", b"MQIsdp"):
        raise MalformedPacket("CONNECT without a known protocol name")
    return prefix[-1], length - 2 - name_length - 1


async def read_connect(cfg: ProxyConfig, reader: asyncio.StreamReader) -> Connect:
    """The device's CONNECT, read within the CONNECT timeout and the first-packet size limit."""
    try:
        async with asyncio.timeout(cfg.connect_timeout):  # unlike wait_for, no task per call
            length, size = await _start(reader.readexactly)
            if size > cfg.max_connect_size:
                level, _ = await _protocol_level(reader.readexactly, length)
                answer = Connack(PACKET_TOO_LARGE) if level == MQTT_5 else None
                reason = f"CONNECT of {size} bytes exceeds the first-packet limit of {cfg.max_connect_size}"
                raise SessionEnd("connect_too_large", reason, answer, level)
            body = await reader.readexactly(length) if length else b""
        packet = decode(CONNECT_HEADER, body)
    except TimeoutError:
        raise SessionEnd("timeout", "no CONNECT in time") from None
    except BudgetExceeded as e:
        raise SessionEnd("overloaded", str(e)) from None
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        raise SessionEnd("closed", "closed before CONNECT") from None
    except UnsupportedVersion as e:
        raise SessionEnd("malformed", str(e), UNSUPPORTED_VERSION) from None
    except MalformedPacket as e:
        raise SessionEnd("malformed", str(e)) from None
    assert isinstance(packet, Connect)
    return packet


async def _recv_exact(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    buf = b""
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise asyncio.IncompleteReadError(buf, n)
        buf += chunk
    return buf


@dataclass(frozen=True)
class RawRefusal:
    """A refusal decided on the raw socket, before any stream exists for the connection."""

    end: SessionEnd
    level: int | None = None  # the protocol level to answer in; None: not answered
    rest: int = 0  # the bytes of the CONNECT after its level, still unread


async def first_header(sock: socket.socket, max_connect_size: int, deadline: float) -> bytes | RawRefusal:
    """On the plain port, CONNECT's fixed header read off the raw socket (at most 5 bytes), so that
    a CONNECT over the first-packet limit is refused before any of its body is read; the bytes, to
    be fed to the stream reader, when it is within the limit."""
    head = bytearray()

    async def read(n: int) -> bytes:
        data = await _recv_exact(sock, n)
        head.extend(data)
        return data

    try:
        async with asyncio.timeout_at(deadline):
            length, size = await _start(read)
            if size <= max_connect_size:
                return bytes(head)
            level, rest = await _protocol_level(read, length)
    except SessionEnd as end:
        return RawRefusal(end)
    except TimeoutError:
        return RawRefusal(SessionEnd("timeout", "no CONNECT in time"))
    except (asyncio.IncompleteReadError, OSError):
        return RawRefusal(SessionEnd("closed", "closed before CONNECT"))
    except MalformedPacket as e:
        return RawRefusal(SessionEnd("malformed", str(e)))
    reason = f"CONNECT of {size} bytes exceeds the first-packet limit of {max_connect_size}"
    answer = Connack(PACKET_TOO_LARGE) if level == MQTT_5 else None
    return RawRefusal(SessionEnd("connect_too_large", reason, answer, level), level, rest)


async def unknown_source_refusal(sock: socket.socket, deadline: float) -> RawRefusal:
    """For an address no device has, on the plain port: the refusal and the protocol level to
    answer in, read with exact-size ``recv`` calls on the raw socket, so that not a byte past the
    level (at most 14) is ever read, whatever the peer sent."""
    reason = "no ready device has this address"

    async def read(n: int) -> bytes:
        return await _recv_exact(sock, n)

    try:
        async with asyncio.timeout_at(deadline):  # the loop's clock
            length, _ = await _start(read)
            level, rest = await _protocol_level(read, length)
    except SessionEnd as end:  # not a CONNECT at all
        return RawRefusal(end)
    except TimeoutError:
        return RawRefusal(SessionEnd("unknown_device", f"{reason} (and no CONNECT in time)"))
    except (asyncio.IncompleteReadError, OSError):
        return RawRefusal(SessionEnd("unknown_device", f"{reason} (closed before CONNECT)"))
    except MalformedPacket as e:
        return RawRefusal(SessionEnd("malformed", str(e)))
    return RawRefusal(SessionEnd("unknown_device", reason, NOT_AUTHORIZED, level), level, rest)


async def discard(sock: socket.socket, n: int, deadline: float) -> None:
    """Read and drop up to ``n`` bytes before ``deadline``, a few KiB at a time.

    Closing a socket with unread bytes sends a reset, which may destroy the answer just sent
    before the peer reads it; draining the rest of its CONNECT first lets it close normally.
    """
    loop = asyncio.get_running_loop()
    buf = memoryview(bytearray(min(n, 4096)))
    with contextlib.suppress(TimeoutError, OSError):
        async with asyncio.timeout_at(deadline):
            while n > 0:
                got = await loop.sock_recv_into(sock, buf[: min(n, len(buf))])
                if not got:
                    return
                n -= got
