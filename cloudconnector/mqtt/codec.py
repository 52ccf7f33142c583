"""Encode and decode MQTT 3.1.1 and 5.0 packets, and frame them off a stream.

Three entry points: :func:`read_packet` takes one packet off an ``asyncio.StreamReader`` with the
cheap checks (remaining length, size limit, fixed-header flags); :func:`decode` turns its body into
a packet value with the full checks; :func:`encode` is the reverse. :class:`FrameScanner` applies
the cheap checks to a raw byte stream that is relayed without decoding (the fast AWS path).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

from cloudconnector.mqtt.packets import (
    MQTT_5,
    MQTT_31,
    MQTT_311,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    PacketType,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)
from cloudconnector.mqtt.properties import parse_properties
from cloudconnector.mqtt.wire import (
    Cursor,
    MalformedPacket,
    PacketTooLarge,
    encode_binary,
    encode_string,
    encode_varint,
)

__all__ = [
    "FrameScanner",
    "MalformedPacket",
    "PacketTooLarge",
    "UnsupportedVersion",
    "decode",
    "encode",
    "read_packet",
    "skip_bytes",
]

DEFAULT_MAX_SIZE = 256 * 1024 + 1024  # the largest cloud payload (Azure, 256 KB) plus headers


class UnsupportedVersion(MalformedPacket):
    """A CONNECT with a protocol level this codec does not speak (answer with CONNACK rc 1)."""

    def __init__(self, level: int) -> None:
        super().__init__(f"unsupported MQTT protocol level {level}")
        self.level = level


_FIXED_FLAGS = {
    PacketType.PUBREL: 0x02,
    PacketType.SUBSCRIBE: 0x02,
    PacketType.UNSUBSCRIBE: 0x02,
}


def check_fixed_header(header: int) -> None:
    """Reject reserved packet type 0 and reserved flag values, before reading the body."""
    ptype = header >> 4
    if ptype == 0:
        raise MalformedPacket("reserved packet type 0")
    if ptype == PacketType.PUBLISH:
        if (header >> 1) & 0x03 == 3:
            raise MalformedPacket("PUBLISH with QoS 3")
    elif header & 0x0F != _FIXED_FLAGS.get(PacketType(ptype), 0):
        raise MalformedPacket(f"reserved flags set on {PacketType(ptype).name}")


async def read_packet(reader: asyncio.StreamReader, max_size: int = DEFAULT_MAX_SIZE) -> tuple[int, bytes]:
    """Read one packet: (fixed header byte, body). EOF raises ``asyncio.IncompleteReadError``.

    A packet over ``max_size`` raises :class:`PacketTooLarge` before its body is read; the body is
    then still on the stream (``unread`` bytes), for :func:`skip_bytes` if the caller drops it.
    """
    header = (await reader.readexactly(1))[0]
    check_fixed_header(header)
    length = 0
    for i in range(4):
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            break
    else:
        raise MalformedPacket("remaining length longer than 4 bytes")
    size = 2 + i + length  # the whole packet: header byte, i + 1 length bytes, body
    if size > max_size:
        raise PacketTooLarge(size, max_size, length)
    body = await reader.readexactly(length) if length else b""
    return header, body


async def skip_bytes(reader: asyncio.StreamReader, n: int, chunk: int = 64 * 1024) -> None:
    """Read and discard ``n`` bytes, holding at most ``chunk`` of them at a time."""
    while n > 0:
        data = await reader.read(min(n, chunk))
        if not data:
            raise asyncio.IncompleteReadError(b"", n)
        n -= len(data)


def _header_ok(header: int) -> bool:
    try:
        check_fixed_header(header)
    except MalformedPacket:
        return False
    return True


# Per first-byte value, precomputed: the relay checks every packet, and a table lookup is what
# keeps that cheap at tens of thousands of packets a second.
_HEADER_OK = tuple(_header_ok(h) for h in range(256))
_IS_PUBLISH = tuple(h >> 4 == PacketType.PUBLISH for h in range(256))


class FrameScanner:
    """Follows packet boundaries in a relayed byte stream, enforcing the cheap checks.

    ``feed`` is called with each chunk before it is forwarded; it raises on a bad fixed header or
    an oversized packet and returns how many PUBLISH packets started in the chunk. ``filter`` is
    the variant for a stream whose oversized packets are dropped rather than fatal.
    """

    __slots__ = ("_dropping", "_max_size", "_partial", "_skip", "dropped", "last_dropped")

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self._max_size = max_size
        self._skip = 0  # body bytes of the current packet still to pass
        self._partial = b""  # a fixed header split across chunks
        self._dropping = False  # (filter) the current packet is being cut out
        self.dropped = 0  # (filter) oversized packets cut out so far
        self.last_dropped = 0  # (filter) the size of the latest one

    @property
    def max_size(self) -> int:
        return self._max_size

    def at_boundary(self) -> bool:
        """True between packets: bytes of another origin may be inserted into the stream here."""
        return not self._skip and not self._partial

    def feed(self, chunk: bytes) -> int:
        if self._partial:  # rare: the previous chunk ended inside a fixed header
            chunk, self._partial = self._partial + chunk, b""
        publishes = 0
        pos, end, skip = 0, len(chunk), self._skip
        while True:
            if skip:
                if skip >= end - pos:
                    self._skip = skip - (end - pos)
                    return publishes
                pos += skip
                skip = 0
            if pos >= end:
                self._skip = 0
                return publishes
            header = chunk[pos]
            if not _HEADER_OK[header]:
                check_fixed_header(header)  # raises, naming what is wrong
            i, length, shift = pos + 1, 0, 0
            while True:
                if i >= end:  # the remaining length continues in the next chunk
                    self._partial, self._skip = chunk[pos:], 0
                    return publishes
                byte = chunk[i]
                i += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
                shift += 7
                if shift == 28:
                    raise MalformedPacket("remaining length longer than 4 bytes")
            if i - pos + length > self._max_size:
                raise PacketTooLarge(i - pos + length, self._max_size)
            publishes += _IS_PUBLISH[header]
            pos, skip = i, length

    def filter(self, chunk: bytes) -> tuple[int, bytes]:
        """Like ``feed``, but an oversized packet is cut out instead of raising.

        Returns (PUBLISH packets started, the bytes to forward). A fixed header split across chunks
        is held back until it is complete, so that no packet is begun and then found too large.
        """
        if self._partial:
            chunk, self._partial = self._partial + chunk, b""
        kept: list[bytes] = []
        keep_from = 0  # start of the bytes not yet either kept or cut
        publishes = 0
        pos, end, skip, dropping = 0, len(chunk), self._skip, self._dropping
        while True:
            if skip:
                n = min(skip, end - pos)
                if dropping:
                    kept.append(chunk[keep_from:pos])
                    keep_from = pos + n
                pos, skip = pos + n, skip - n
                if skip:  # the chunk ends inside this packet
                    self._skip, self._dropping = skip, dropping
                    return publishes, _joined(chunk, kept, keep_from, end)
                dropping = False
            if pos >= end:
                self._skip, self._dropping = 0, False
                return publishes, _joined(chunk, kept, keep_from, end)
            header = chunk[pos]
            if not _HEADER_OK[header]:
                check_fixed_header(header)
            i, length, shift = pos + 1, 0, 0
            while True:
                if i >= end:
                    self._partial, self._skip, self._dropping = chunk[pos:], 0, False
                    return publishes, _joined(chunk, kept, keep_from, pos)
                byte = chunk[i]
                i += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
                shift += 7
                if shift == 28:
                    raise MalformedPacket("remaining length longer than 4 bytes")
            if i - pos + length > self._max_size:
                self.dropped += 1
                self.last_dropped = i - pos + length
                kept.append(chunk[keep_from:pos])
                keep_from, dropping = i, length > 0  # cut the fixed header, then the body
            else:
                publishes += _IS_PUBLISH[header]
            pos, skip = i, length


def _joined(chunk: bytes, kept: list[bytes], keep_from: int, stop: int) -> bytes:
    if not kept and keep_from == 0 and stop == len(chunk):
        return chunk  # the common case: nothing cut, nothing held back
    kept.append(chunk[keep_from:stop])
    return b"".join(kept)


# ---------------------------------------------------------------- decoding


def _props(cur: Cursor, version: int) -> bytes:
    if version != MQTT_5:
        return b""
    raw = cur.properties()
    if raw:
        parse_properties(raw)  # validates ids, types and UTF-8; the raw bytes are what we keep
    return raw


def _packet_id(cur: Cursor) -> int:
    pid = cur.u16()
    if pid == 0:
        raise MalformedPacket("packet identifier 0")
    return pid


def _decode_connect(cur: Cursor) -> Connect:
    name = cur.string()
    level = cur.byte()
    if (name, level) not in (("MQTT", MQTT_311), ("MQTT", MQTT_5), ("MQIsdp", MQTT_31)):
        if name in ("MQTT", "MQIsdp"):
            raise UnsupportedVersion(level)
        raise MalformedPacket(f"unknown protocol name {name!r}")
    flags = cur.byte()
    if flags & 0x01:
        raise MalformedPacket("CONNECT reserved flag set")
    keep_alive = cur.u16()
    properties = _props(cur, level)
    client_id = cur.string()
    will = None
    will_qos = (flags >> 3) & 0x03
    if flags & 0x04:
        if will_qos == 3:
            raise MalformedPacket("will QoS 3")
        will_props = _props(cur, level)
        will = Will(cur.string(), cur.binary(), will_qos, bool(flags & 0x20), will_props)
    elif flags & 0x38:
        raise MalformedPacket("will QoS or retain set without a will")
    username = cur.string() if flags & 0x80 else None
    if flags & 0x40 and username is None and level != MQTT_5:
        raise MalformedPacket("password without user name")
    password = cur.binary() if flags & 0x40 else None
    return Connect(client_id, level, bool(flags & 0x02), keep_alive, username, password, will, properties)


def _decode_publish(header: int, cur: Cursor, version: int) -> Publish:
    qos = (header >> 1) & 0x03
    topic = cur.string()
    if "+" in topic or "#" in topic:
        raise MalformedPacket("wildcard in a PUBLISH topic")
    if not topic and version != MQTT_5:
        raise MalformedPacket("empty PUBLISH topic")
    packet_id = _packet_id(cur) if qos else None
    if not qos and header & 0x08:
        raise MalformedPacket("DUP set on a QoS 0 PUBLISH")
    properties = _props(cur, version)
    return Publish(topic, cur.rest(), qos, bool(header & 0x01), bool(header & 0x08), packet_id, properties)


_ACKS: dict[int, type[Puback | Pubrec | Pubrel | Pubcomp]] = {
    PacketType.PUBACK: Puback,
    PacketType.PUBREC: Pubrec,
    PacketType.PUBREL: Pubrel,
    PacketType.PUBCOMP: Pubcomp,
}


def _decode_ack(ptype: int, cur: Cursor, version: int) -> Packet:
    packet_id = _packet_id(cur)
    code, props = 0, b""
    if version == MQTT_5 and not cur.done():
        code = cur.byte()
        if not cur.done():
            props = _props(cur, version)
    return _ACKS[ptype](packet_id, code, props)


def _decode_subscribe(cur: Cursor, version: int) -> Subscribe:
    packet_id = _packet_id(cur)
    props = _props(cur, version)
    subs: list[Subscription] = []
    while not cur.done():
        topic_filter = cur.string()
        options = cur.byte()
        reserved = 0xC0 if version == MQTT_5 else 0xFC
        if options & reserved or options & 0x03 == 3 or (options >> 4) & 0x03 == 3:
            raise MalformedPacket("invalid subscription options")
        if not topic_filter:
            raise MalformedPacket("empty topic filter")
        subs.append(Subscription(topic_filter, options))
    if not subs:
        raise MalformedPacket("SUBSCRIBE without a topic filter")
    return Subscribe(packet_id, tuple(subs), props)


def _decode_unsubscribe(cur: Cursor, version: int) -> Unsubscribe:
    packet_id = _packet_id(cur)
    props = _props(cur, version)
    filters: list[str] = []
    while not cur.done():
        filters.append(cur.string())
    if not filters:
        raise MalformedPacket("UNSUBSCRIBE without a topic filter")
    return Unsubscribe(packet_id, tuple(filters), props)


def _decode_reason_only(cls: type[Disconnect | Auth], cur: Cursor, version: int) -> Packet:
    code, props = 0, b""
    if version == MQTT_5 and not cur.done():
        code = cur.byte()
        if not cur.done():
            props = _props(cur, version)
    return cls(code, props)


def decode(header: int, body: bytes, version: int = MQTT_311) -> Packet:
    """Decode one packet; ``version`` is the connection's protocol level (CONNECT carries its own)."""
    check_fixed_header(header)
    ptype = header >> 4
    cur = Cursor(body)
    packet: Packet
    if ptype == PacketType.CONNECT:
        packet = _decode_connect(cur)
    elif ptype == PacketType.CONNACK:
        flags = cur.byte()
        if flags & 0xFE:
            raise MalformedPacket("CONNACK reserved flags set")
        code = cur.byte()
        packet = Connack(code, bool(flags & 0x01), _props(cur, version))
    elif ptype == PacketType.PUBLISH:
        packet = _decode_publish(header, cur, version)
    elif ptype in _ACKS:
        packet = _decode_ack(ptype, cur, version)
    elif ptype == PacketType.SUBSCRIBE:
        packet = _decode_subscribe(cur, version)
    elif ptype == PacketType.SUBACK:
        packet_id = _packet_id(cur)
        props = _props(cur, version)
        packet = Suback(packet_id, tuple(cur.rest()), props)
    elif ptype == PacketType.UNSUBSCRIBE:
        packet = _decode_unsubscribe(cur, version)
    elif ptype == PacketType.UNSUBACK:
        packet_id = _packet_id(cur)
        props = _props(cur, version)
        codes = tuple(cur.rest()) if version == MQTT_5 else ()
        packet = Unsuback(packet_id, codes, props)
    elif ptype == PacketType.PINGREQ:
        packet = Pingreq()
    elif ptype == PacketType.PINGRESP:
        packet = Pingresp()
    elif ptype == PacketType.DISCONNECT:
        packet = _decode_reason_only(Disconnect, cur, version)
    else:  # AUTH
        if version != MQTT_5:
            raise MalformedPacket("AUTH before MQTT 5")
        packet = _decode_reason_only(Auth, cur, version)
    if not cur.done():
        raise MalformedPacket(f"{type(packet).__name__} has {cur.remaining()} trailing bytes")
    return packet


# ---------------------------------------------------------------- encoding


def _frame(header: int, body: bytes) -> bytes:
    return bytes((header,)) + encode_varint(len(body)) + body


def _eprops(props: bytes, version: int) -> bytes:
    return encode_varint(len(props)) + props if version == MQTT_5 else b""


def _encode_connect(p: Connect) -> bytes:
    level = p.protocol_level
    flags = 0x02 if p.clean_start else 0
    tail = [encode_string(p.client_id)]
    if p.will is not None:
        flags |= 0x04 | (p.will.qos << 3) | (0x20 if p.will.retain else 0)
        tail += [
            _eprops(p.will.properties, level),
            encode_string(p.will.topic),
            encode_binary(p.will.payload),
        ]
    if p.username is not None:
        flags |= 0x80
        tail.append(encode_string(p.username))
    if p.password is not None:
        flags |= 0x40
        tail.append(encode_binary(p.password))
    head = encode_string(p.protocol_name) + bytes((level, flags)) + struct.pack("!H", p.keep_alive)
    return _frame(0x10, head + _eprops(p.properties, level) + b"".join(tail))


def _encode_ack(ptype: int, flags: int, p: Puback | Pubrec | Pubrel | Pubcomp, version: int) -> bytes:
    body = struct.pack("!H", p.packet_id)
    if version == MQTT_5 and (p.reason_code or p.properties):
        body += bytes((p.reason_code,))
        if p.properties:
            body += _eprops(p.properties, version)
    return _frame((ptype << 4) | flags, body)


def _encode_reason_only(ptype: int, p: Disconnect | Auth, version: int) -> bytes:
    body = b""
    if version == MQTT_5 and (p.reason_code or p.properties):
        body = bytes((p.reason_code,)) + (_eprops(p.properties, version) if p.properties else b"")
    return _frame(ptype << 4, body)


def _encode_publish(p: Publish, version: int) -> bytes:
    if p.qos and not p.packet_id:
        raise ValueError("a QoS 1/2 PUBLISH needs a packet id")
    header = 0x30 | (p.qos << 1) | (0x08 if p.dup else 0) | (0x01 if p.retain else 0)
    pid = struct.pack("!H", p.packet_id) if p.qos and p.packet_id else b""
    return _frame(header, encode_string(p.topic) + pid + _eprops(p.properties, version) + p.payload)


def encode(packet: Packet, version: int = MQTT_311) -> bytes:
    """The wire bytes of ``packet`` for a connection at protocol level ``version``.

    5.0-only fields (properties, reason codes on acks) are dropped when encoding for 3.1.1.
    """
    encoder = _ENCODERS.get(type(packet))
    if encoder is None:
        raise TypeError(f"not an MQTT packet: {type(packet).__name__}")
    return encoder(packet, version)


def _enc_connack(p: Connack, v: int) -> bytes:
    return _frame(0x20, bytes((int(p.session_present), p.reason_code)) + _eprops(p.properties, v))


def _enc_subscribe(p: Subscribe, v: int) -> bytes:
    subs = b"".join(encode_string(s.topic_filter) + bytes((s.options,)) for s in p.subscriptions)
    return _frame(0x82, struct.pack("!H", p.packet_id) + _eprops(p.properties, v) + subs)


def _enc_suback(p: Suback, v: int) -> bytes:
    return _frame(0x90, struct.pack("!H", p.packet_id) + _eprops(p.properties, v) + bytes(p.reason_codes))


def _enc_unsubscribe(p: Unsubscribe, v: int) -> bytes:
    filters = b"".join(encode_string(f) for f in p.topic_filters)
    return _frame(0xA2, struct.pack("!H", p.packet_id) + _eprops(p.properties, v) + filters)


def _enc_unsuback(p: Unsuback, v: int) -> bytes:
    codes = bytes(p.reason_codes) if v == MQTT_5 else b""
    return _frame(0xB0, struct.pack("!H", p.packet_id) + _eprops(p.properties, v) + codes)


_ENCODERS: dict[type, Callable[..., bytes]] = {
    Connect: lambda p, v: _encode_connect(p),
    Connack: _enc_connack,
    Publish: _encode_publish,
    Puback: lambda p, v: _encode_ack(PacketType.PUBACK, 0, p, v),
    Pubrec: lambda p, v: _encode_ack(PacketType.PUBREC, 0, p, v),
    Pubrel: lambda p, v: _encode_ack(PacketType.PUBREL, 2, p, v),
    Pubcomp: lambda p, v: _encode_ack(PacketType.PUBCOMP, 0, p, v),
    Subscribe: _enc_subscribe,
    Suback: _enc_suback,
    Unsubscribe: _enc_unsubscribe,
    Unsuback: _enc_unsuback,
    Pingreq: lambda p, v: b"\xc0\x00",
    Pingresp: lambda p, v: b"\xd0\x00",
    Disconnect: lambda p, v: _encode_reason_only(PacketType.DISCONNECT, p, v),
    Auth: lambda p, v: _encode_reason_only(PacketType.AUTH, p, v),
}
