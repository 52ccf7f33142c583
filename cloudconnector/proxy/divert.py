"""The byte relay with a few packet types taken out to the session's transform.

AWS sessions without a topic template must still see SUBSCRIBE and UNSUBSCRIBE (and the cloud's
answers) to keep the cloud's subscription limits (``proxy/subscriptions.py``), but PUBLISH, the
bulk of the traffic, should stay as cheap as on the plain byte relay (``proxy/pipe.py``). So each
direction is framed as there; a packet of a type in ``transform.divert`` is held until complete,
decoded, given to the transform, and what the transform returns is encoded into the streams in its
place. Everything else passes as the bytes it arrived in.

Packets the transform sends the *other* way (a SUBACK answered locally, the next part of a split
SUBSCRIBE after a SUBACK) are written into that direction's stream at its next packet boundary, so
they never land inside a packet being relayed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from cloudconnector.mqtt.codec import MalformedPacket, PacketTooLarge, check_fixed_header, decode, encode
from cloudconnector.proxy.limits import Limits
from cloudconnector.proxy.metrics import DOWN, UP, Metrics
from cloudconnector.proxy.pipe import FLUSH_EVERY, DropHook, Pipe, take_buffered
from cloudconnector.proxy.presence import Session as Usage
from cloudconnector.proxy.transform import Relay, SessionTransform, TransformError

PUBLISH = 3


def _header_ok(header: int) -> bool:
    try:
        check_fixed_header(header)
    except MalformedPacket:
        return False
    return True


_HEADER_OK = tuple(_header_ok(h) for h in range(256))  # a lookup per packet, as in FrameScanner

# (own output, bytes for the other direction) for one diverted packet: fixed header byte and body.
Handler = Callable[[int, bytes], tuple[list[bytes], list[bytes]]]


class DivertScanner:
    """Frames a relayed stream like ``codec.FrameScanner``, and cuts out the packets to divert.

    ``feed`` returns (PUBLISH packets started, the bytes to forward). Diverted packets, oversized
    ones when ``drop_oversized`` (else :class:`PacketTooLarge`) and a fixed header split across
    chunks are not forwarded as they come; so the output is between packets (``at_boundary``)
    whenever no relayed packet is part-way through.
    """

    __slots__ = (
        "_divert", "_dropping", "_handler", "_held", "_held_need", "_max_size", "_partial", "_skip",
        "drop_oversized", "dropped", "last_dropped", "other", "pending",
    )  # fmt: skip

    def __init__(self, max_size: int, divert: frozenset[int], handler: Handler, drop_oversized: bool) -> None:
        self._max_size = max_size
        self._divert = tuple(t in divert for t in range(16))
        self._handler = handler
        self.drop_oversized = drop_oversized
        self._skip = 0  # bytes of the current relayed (or dropped) packet still to come
        self._dropping = False
        self._partial = b""  # a fixed header split across chunks, not yet forwarded
        self._held = bytearray()  # a diverted packet being gathered: fixed header byte + body
        self._held_need = -1  # body bytes it still needs; -1 when none is being gathered
        self.pending: list[bytes] = []  # bytes from the other direction, for the next boundary
        self.dropped = 0
        self.last_dropped = 0
        self.other: DivertScanner | None = None

    @property
    def max_size(self) -> int:
        return self._max_size

    def at_boundary(self) -> bool:
        return not self._skip or self._dropping

    def feed(self, chunk: bytes) -> tuple[int, bytes]:
        if self._partial:
            chunk, self._partial = self._partial + chunk, b""
        out: list[bytes] = []
        publishes = 0
        pos, end = 0, len(chunk)
        while pos < end:
            if self._held_need >= 0:
                n = min(self._held_need, end - pos)
                self._held += chunk[pos : pos + n]
                pos += n
                self._held_need -= n
                if self._held_need:
                    break
                self._held_need = -1
                held, self._held = bytes(self._held), bytearray()
                own, others = self._handler(held[0], held[1:])
                out += own
                self._send_other(others)
                continue
            if self._skip:
                n = min(self._skip, end - pos)
                if not self._dropping:
                    out.append(chunk[pos : pos + n])
                pos += n
                self._skip -= n
                if self._skip:
                    break
                self._dropping = False
                continue
            if self.pending:  # between packets: the other direction's packets go in here
                out += self.pending
                self.pending.clear()
            header = chunk[pos]
            if not _HEADER_OK[header]:
                check_fixed_header(header)  # raises, naming what is wrong
            i, length, shift = pos + 1, 0, 0
            while True:
                if i >= end:
                    self._partial = chunk[pos:]
                    return publishes, b"".join(out)
                byte = chunk[i]
                i += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
                shift += 7
                if shift == 28:
                    raise MalformedPacket("remaining length longer than 4 bytes")
            size = i - pos + length
            if size > self._max_size:
                if not self.drop_oversized:
                    raise PacketTooLarge(size, self._max_size)
                self.dropped += 1
                self.last_dropped = size
                self._skip, self._dropping = length, True
                pos = i
                continue
            ptype = header >> 4
            publishes += ptype == PUBLISH  # a diverted one is still relayed, rewritten
            if self._divert[ptype]:
                if i + length <= end:  # the usual case: all of it in this chunk, no copy to gather
                    own, others = self._handler(header, chunk[i : i + length])
                    out += own
                    self._send_other(others)
                else:
                    self._held = bytearray(chunk[pos : pos + 1]) + chunk[i:end]  # header byte, body so far
                    self._held_need = length - (end - i)
                pos = i + length
                continue
            out.append(chunk[pos:i])
            self._skip = length
            pos = i
        if self.pending and self.at_boundary() and self._held_need < 0:
            out += self.pending
            self.pending.clear()
        return publishes, b"".join(out)

    def _send_other(self, data: list[bytes]) -> None:
        if data and self.other is not None:
            self.other.pending += data


class DivertPipe(Pipe):
    """A ``Pipe`` whose scanner is a :class:`DivertScanner`."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        if self._last_words:
            return  # after a DISCONNECT to the device (pipe.py): dropped while it reads that
        scanner: DivertScanner = self._scanner  # type: ignore[assignment]
        dropped = scanner.dropped
        try:
            msgs, data = scanner.feed(data)
        except PacketTooLarge as e:
            self._count_oversized.inc()
            self._too_large(e)
            return
        except MalformedPacket as e:
            self._end(f"sent a bad packet: {e}")
            return
        except TransformError as e:
            self._end(f"sent what the endpoint cannot take: {e}")
            return
        if scanner.dropped != dropped and self._on_drop is not None:
            self._count_oversized.inc(scanner.dropped - dropped)
            self._on_drop(scanner.last_dropped, scanner.max_size)
        self._msgs += msgs
        self._bytes += len(data)
        if data:
            self.dst.write(data)
        if isinstance(self.other, DivertPipe):
            self.other.flush_pending()
        self._last_at = now = time.monotonic()  # as Pipe does: lastSeen, counters once a second
        if now >= self._flush_at:
            self.flush()
            self._flush_at = now + FLUSH_EVERY

    def flush_pending(self) -> None:
        """Write what the other direction left for this stream, if it is between packets now."""
        scanner: DivertScanner = self._scanner  # type: ignore[assignment]
        if scanner.pending and scanner.at_boundary() and self.dst is not None:
            data = b"".join(scanner.pending)
            scanner.pending.clear()
            self.dst.write(data)


async def relay_diverted(
    metrics: Metrics,
    limits: Limits,
    device: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    cloud: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    levels: tuple[int, int],
    transform: SessionTransform,
    on_drop: DropHook,
    usage: Usage | None = None,
) -> str:
    """Like ``pipe.relay_bytes``, with ``transform.divert`` packets handled by ``transform``."""
    dev_level, up_level = levels

    raw_publish = getattr(transform, "raw_publish", None)  # topic templates: a splice, no decoding

    def handler(direction: str) -> Handler:
        def handle(header: int, body: bytes) -> tuple[list[bytes], list[bytes]]:
            if raw_publish is not None and header >> 4 == PUBLISH:
                src_level = dev_level if direction == UP else up_level
                if dev_level == up_level and (raw := raw_publish(header, body, direction == UP, src_level)):
                    return [raw], []
            if direction == UP:
                relay: Relay = transform.from_device(decode(header, body, dev_level))
                own = [encode(p, up_level) for p in relay.to_cloud]
                return own, [encode(p, dev_level) for p in relay.to_device]
            relay = transform.from_cloud(decode(header, body, up_level))
            own = [encode(p, dev_level) for p in relay.to_device]
            return own, [encode(p, up_level) for p in relay.to_cloud]

        return handle

    loop = asyncio.get_running_loop()
    ended: asyncio.Future[str] = loop.create_future()
    dev_t, up_t = device[1].transport, cloud[1].transport
    up = DivertPipe(metrics, UP, limits.up, dev_t.get_protocol())
    down = DivertPipe(metrics, DOWN, limits.down, up_t.get_protocol(), on_drop)
    up_scan = DivertScanner(limits.up, transform.divert, handler(UP), drop_oversized=False)
    down_scan = DivertScanner(limits.down, transform.divert, handler(DOWN), drop_oversized=True)
    up_scan.other, down_scan.other = down_scan, up_scan
    up._scanner, down._scanner = up_scan, down_scan  # type: ignore[assignment]
    up.other, down.other = down, up
    up.device_level = dev_level
    if usage is not None:  # the live connection status's counters, as on the byte relay
        up.usage = down.usage = usage
    try:
        down_data, down_eof = take_buffered(cloud[0])
        up_data, up_eof = take_buffered(device[0])
        down.start(up_t, dev_t, down_data, down_eof, ended)
        up.start(dev_t, up_t, up_data, up_eof, ended)
        return await ended
    finally:
        up.flush()
        down.flush()
