"""MQTT 5 properties: parse the raw property block into (id, value) pairs and build one back.

Packets keep properties as raw bytes so that the proxy relays them byte for byte; this module is
for the few rules that must read or add one (user properties for Azure's topic mapping, the
session expiry of a CONNECT, a reason string on a refusal).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable

from cloudconnector.mqtt.wire import Cursor, MalformedPacket, encode_binary, encode_string, encode_varint


class Prop(enum.IntEnum):
    PAYLOAD_FORMAT = 0x01
    MESSAGE_EXPIRY = 0x02
    CONTENT_TYPE = 0x03
    RESPONSE_TOPIC = 0x08
    CORRELATION_DATA = 0x09
    SUBSCRIPTION_ID = 0x0B
    SESSION_EXPIRY = 0x11
    ASSIGNED_CLIENT_ID = 0x12
    SERVER_KEEP_ALIVE = 0x13
    AUTH_METHOD = 0x15
    AUTH_DATA = 0x16
    REQUEST_PROBLEM_INFO = 0x17
    WILL_DELAY = 0x18
    REQUEST_RESPONSE_INFO = 0x19
    RESPONSE_INFO = 0x1A
    SERVER_REFERENCE = 0x1C
    REASON_STRING = 0x1F
    RECEIVE_MAXIMUM = 0x21
    TOPIC_ALIAS_MAXIMUM = 0x22
    TOPIC_ALIAS = 0x23
    MAXIMUM_QOS = 0x24
    RETAIN_AVAILABLE = 0x25
    USER_PROPERTY = 0x26
    MAXIMUM_PACKET_SIZE = 0x27
    WILDCARD_SUB_AVAILABLE = 0x28
    SUB_ID_AVAILABLE = 0x29
    SHARED_SUB_AVAILABLE = 0x2A


# Wire type of each property: byte, 2/4-byte integer, varint, UTF-8 string, binary, string pair.
_BYTE = {0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A}
_U16 = {0x13, 0x21, 0x22, 0x23}
_U32 = {0x02, 0x11, 0x18, 0x27}
_VARINT = {0x0B}
_STRING = {0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F}
_BINARY = {0x09, 0x16}
_PAIR = {0x26}

PropValue = int | str | bytes | tuple[str, str]


def parse_properties(raw: bytes) -> list[tuple[int, PropValue]]:
    """Decode a property block (without its length prefix); order and repeats are preserved."""
    cur = Cursor(raw)
    out: list[tuple[int, PropValue]] = []
    while not cur.done():
        pid = cur.varint()
        value: PropValue
        if pid in _BYTE:
            value = cur.byte()
        elif pid in _U16:
            value = cur.u16()
        elif pid in _U32:
            value = cur.u32()
        elif pid in _VARINT:
            value = cur.varint()
        elif pid in _STRING:
            value = cur.string()
        elif pid in _BINARY:
            value = cur.binary()
        elif pid in _PAIR:
            value = (cur.string(), cur.string())
        else:
            raise MalformedPacket(f"unknown property 0x{pid:02x}")
        out.append((pid, value))
    return out


def build_properties(props: Iterable[tuple[int, PropValue]]) -> bytes:
    """Encode (id, value) pairs into a property block (without its length prefix)."""
    parts: list[bytes] = []
    for pid, value in props:
        parts.append(encode_varint(pid))
        if pid in _BYTE and isinstance(value, int):
            parts.append(bytes((value,)))
        elif pid in _U16 and isinstance(value, int):
            parts.append(struct.pack("!H", value))
        elif pid in _U32 and isinstance(value, int):
            parts.append(struct.pack("!I", value))
        elif pid in _VARINT and isinstance(value, int):
            parts.append(encode_varint(value))
        elif pid in _STRING and isinstance(value, str):
            parts.append(encode_string(value))
        elif pid in _BINARY and isinstance(value, bytes):
            parts.append(encode_binary(value))
        elif pid in _PAIR and isinstance(value, tuple):
            parts.append(encode_string(value[0]) + encode_string(value[1]))
        else:
            raise ValueError(f"property 0x{pid:02x} cannot hold a {type(value).__name__}")
    return b"".join(parts)


def get_property(raw: bytes, pid: int) -> PropValue | None:
    """The first value of property ``pid`` in a raw block, or None."""
    for key, value in parse_properties(raw):
        if key == pid:
            return value
    return None


def user_properties(raw: bytes) -> list[tuple[str, str]]:
    return [v for k, v in parse_properties(raw) if k == Prop.USER_PROPERTY and isinstance(v, tuple)]
