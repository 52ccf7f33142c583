"""MQTT's primitive wire types: variable byte integers, length-prefixed strings and binaries.

Everything that reads untrusted bytes goes through :class:`Cursor`, which never reads past the
packet and raises :class:`MalformedPacket` on any violation, so that a hostile device can only
get its own connection closed.
"""

from __future__ import annotations

import struct


class MalformedPacket(ValueError):
    """The bytes are not valid MQTT; the connection that sent them must be closed."""


class PacketTooLarge(MalformedPacket):
    """The packet exceeds the configured maximum size.

    ``size`` counts the whole packet (fixed header included), as MQTT 5's Maximum Packet Size does;
    ``unread`` is how many of its bytes are still on the stream, for a reader that skips it.
    """

    def __init__(self, size: int, limit: int, unread: int = 0) -> None:
        super().__init__(f"packet of {size} bytes exceeds the limit of {limit}")
        self.size = size
        self.limit = limit
        self.unread = unread


def encode_varint(value: int) -> bytes:
    if not 0 <= value <= 268_435_455:
        raise ValueError("variable byte integer out of range")
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def check_utf8(raw: bytes) -> str:
    """Decode an MQTT UTF-8 string: well formed, and no U+0000 (MQTT forbids it)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MalformedPacket("invalid UTF-8 string") from e
    if "\x00" in text:
        raise MalformedPacket("string contains U+0000")
    return text


def encode_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError("string longer than 65535 bytes")
    return struct.pack("!H", len(raw)) + raw


def encode_binary(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("binary data longer than 65535 bytes")
    return struct.pack("!H", len(data)) + data


class Cursor:
    """Reads primitive fields from one packet body, bounds-checked."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def done(self) -> bool:
        return self.pos >= self.end

    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise MalformedPacket("packet truncated")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def rest(self) -> bytes:
        return self.take(self.end - self.pos)

    def byte(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack("!H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack("!I", self.take(4))[0])

    def varint(self) -> int:
        value = 0
        for shift in range(0, 28, 7):
            byte = self.byte()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
        raise MalformedPacket("variable byte integer longer than 4 bytes")

    def string(self) -> str:
        return check_utf8(self.take(self.u16()))

    def binary(self) -> bytes:
        return self.take(self.u16())

    def properties(self) -> bytes:
        """A 5.0 property block: its length, then the raw bytes (returned without the length)."""
        return self.take(self.varint())
