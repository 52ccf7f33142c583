"""The byte relay after CONNACK, as two protocols wired transport to transport.

Where the endpoint needs no rewriting (AWS, a plain MQTT broker), each chunk goes from one side's
``data_received`` straight into the other side's ``write``: no task, coroutine or future per
session or per chunk. A coroutine pump costs about 70 tracked objects per idle session and a
future per read; with thousands of sessions that is memory, and full garbage collections long
enough to show in the latency tail (docs/benchmarks.md, section 6). Packets are still framed by a
``FrameScanner``, and counted for metrics: a malformed packet ends the session, and so does one
from the device over the session's size limit (MQTT 5: DISCONNECT 0x95 first); one from the
cloud over the limit is cut out of the stream and the session goes on.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from cloudconnector.errors import short
from cloudconnector.mqtt.codec import FrameScanner, MalformedPacket, PacketTooLarge, encode
from cloudconnector.mqtt.packets import MQTT_5
from cloudconnector.proxy.limits import Limits, too_large_disconnect
from cloudconnector.proxy.metrics import DOWN, UP, Metrics
from cloudconnector.proxy.openssl_private import stream_buffer
from cloudconnector.proxy.presence import Session as Usage

DropHook = Callable[[int, int], None]  # (size, limit) of a packet from the cloud that was dropped

WRITE_HIGH_WATER = 64 * 1024  # asyncio's own default high-water mark
FLUSH_EVERY = 1.0  # seconds between counter updates: a locked increment per chunk is measurable
LINGER_SECONDS = 1.0  # after a DISCONNECT to the device: how long its remaining bytes are dropped


def ended_reason(direction: str, what: str) -> str:
    """How a session's end is logged: which side, and what it did."""
    return f"{'device' if direction == UP else 'cloud'} {what}"


class Pipe(asyncio.Protocol):
    """Reads one transport (``src``, whose protocol it becomes) and writes the other (``dst``)."""

    __slots__ = (
        "_bytes", "_count_bytes", "_count_msgs", "_count_oversized", "_direction", "_flush_at",
        "_last_at", "_last_words", "_msgs", "_on_drop", "_scanner", "_usage", "device_level", "dst",
        "ended", "origin", "other", "src",
    )  # fmt: skip

    def __init__(
        self,
        metrics: Metrics,
        direction: str,
        max_packet_size: int,
        origin: asyncio.BaseProtocol,
        on_drop: DropHook | None = None,
    ) -> None:
        self._direction = direction
        self._scanner = FrameScanner(max_packet_size)
        self._count_bytes = metrics.bytes.labels(direction)
        self._count_msgs = metrics.messages.labels(direction)
        self._count_oversized = metrics.oversized.labels(direction)
        self._on_drop = on_drop  # set: oversized packets are dropped (from the cloud), else fatal
        self._bytes = self._msgs = 0
        self._flush_at = time.monotonic() + FLUSH_EVERY
        self.origin = origin  # the stream protocol it replaces, told of the close (wait_closed)
        self.src: Any = None
        self.dst: Any = None
        self.ended: asyncio.Future[str] | None = None
        self.other: Pipe | None = None  # the opposite direction
        self.device_level = 0  # the device's MQTT level, for the DISCONNECT before a cut
        self._usage: Usage | None = None  # the session's live-status record (presence.py)
        self._last_at = 0.0  # monotonic time of the last chunk, for the record's lastSeen
        self._last_words = ""  # set once a DISCONNECT was sent: why the session ends

    def data_received(self, data: bytes) -> None:
        if self._last_words:
            return  # after our DISCONNECT: dropped while the device reads it
        try:
            if self._on_drop is None:
                self._msgs += self._scanner.feed(data)
            else:
                dropped = self._scanner.dropped
                msgs, data = self._scanner.filter(data)
                self._msgs += msgs
                if self._scanner.dropped != dropped:
                    self._count_oversized.inc(self._scanner.dropped - dropped)
                    self._on_drop(self._scanner.last_dropped, self._scanner.max_size)
        except PacketTooLarge as e:
            self._count_oversized.inc()
            self._too_large(e)
            return
        except MalformedPacket as e:
            self._end(f"sent a bad packet: {e}")
            return
        self._bytes += len(data)
        if data:
            self.dst.write(data)
        self._last_at = now = time.monotonic()
        if now >= self._flush_at:
            self.flush()
            self._flush_at = now + FLUSH_EVERY

    @property
    def usage(self) -> Usage | None:
        return self._usage

    @usage.setter
    def usage(self, usage: Usage | None) -> None:
        # The record's writer pulls what an idle pipe has not flushed yet (one message, then quiet).
        self._usage = usage
        if usage is not None:
            usage.pulls.append(self.flush)

    def eof_received(self) -> bool:
        self._end("closed")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end("closed" if exc is None else f"connection failed: {short(exc, 120)}")
        self.origin.connection_lost(exc)

    # Our transport's send buffer is full: the other pipe writes it, so stop reading *its* source.
    def pause_writing(self) -> None:
        self.dst.pause_reading()

    def resume_writing(self) -> None:
        self.dst.resume_reading()

    def flush(self) -> None:
        if self._bytes:
            self._count_bytes.inc(self._bytes)
            self._count_msgs.inc(self._msgs)
            if self._usage is not None:
                seen = time.time() - (time.monotonic() - self._last_at)
                self._usage.add(self._direction == UP, self._msgs, self._bytes, seen)
            self._bytes = self._msgs = 0

    def _too_large(self, e: PacketTooLarge) -> None:
        # The device learns why (MQTT 5), unless the cloud's stream to it is mid-packet.
        other = self.other
        why = f"sent a packet of {e.size} bytes, over the limit of {e.limit}"
        if self.device_level != MQTT_5 or other is None or not other._scanner.at_boundary():
            self._end(why)
            return
        self.src.write(encode(too_large_disconnect(e.size, e.limit), MQTT_5))
        # Closing now, with the rest of the packet unread, would reset the connection and could
        # destroy the DISCONNECT before the device reads it: drop what it still sends for a moment
        # (nothing more from the cloud), until it closes or the moment is over.
        self._last_words = why
        self.dst.pause_reading()
        asyncio.get_running_loop().call_later(LINGER_SECONDS, self._end, why)

    def _end(self, what: str) -> None:
        what = self._last_words or what
        if self.ended is not None and not self.ended.done():
            self.ended.set_result(ended_reason(self._direction, what))

    def start(self, src: Any, dst: Any, buffered: bytes, at_eof: bool, ended: asyncio.Future[str]) -> None:
        """Take over ``src`` and first pass on what its stream reader had buffered."""
        self.src, self.dst, self.ended = src, dst, ended
        src.set_protocol(self)
        if buffered:
            self.data_received(buffered)
        if at_eof:
            self._end("closed")
        if src.get_write_buffer_size() > WRITE_HIGH_WATER:
            dst.pause_reading()  # the pause the stream protocol was told of, carried over
        src.resume_reading()  # the stream reader may have paused it while its buffer was full


def take_buffered(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """What the stream reader holds but nobody read yet (sent right behind CONNECT), and its EOF."""
    buffer = stream_buffer(reader)  # no public way to drain it without awaiting
    data = bytes(buffer)
    buffer.clear()
    return data, reader.at_eof() or reader.exception() is not None


async def relay_bytes(
    metrics: Metrics,
    limits: Limits,
    device: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    cloud: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    device_level: int,
    on_drop: DropHook,
    usage: Usage | None = None,
) -> str:
    """Relay until either side ends; returns why. Cancelling it leaves closing to the caller.
    ``usage`` gets the session's counters about once a second (live connection status)."""
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[str] = loop.create_future()
    dev_t, up_t = device[1].transport, cloud[1].transport
    up = Pipe(metrics, UP, limits.up, dev_t.get_protocol())
    down = Pipe(metrics, DOWN, limits.down, up_t.get_protocol(), on_drop)
    up.other, down.other = down, up
    up.device_level = device_level
    up.usage = down.usage = usage
    try:
        # Cloud first: the CONNACK is already with the device, and the cloud may have sent more.
        down_data, down_eof = take_buffered(cloud[0])
        up_data, up_eof = take_buffered(device[0])
        down.start(up_t, dev_t, down_data, down_eof, ended)
        up.start(dev_t, up_t, up_data, up_eof, ended)
        return await ended
    finally:
        up.flush()
        down.flush()
