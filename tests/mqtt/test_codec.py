"""Codec round trips and the malformed inputs it must refuse."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudconnector.mqtt import codec
from cloudconnector.mqtt.codec import FrameScanner, MalformedPacket, PacketTooLarge, UnsupportedVersion
from cloudconnector.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    Auth,
    Connack,
    Connect,
    Disconnect,
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
from cloudconnector.mqtt.properties import Prop, build_properties, get_property, parse_properties

PROPS = build_properties(
    [(Prop.SESSION_EXPIRY, 3600), (Prop.USER_PROPERTY, ("k", "v")), (Prop.CONTENT_TYPE, "text/plain")]
)


def split(raw: bytes, max_size: int = codec.DEFAULT_MAX_SIZE, eof: bool = True) -> tuple[int, bytes]:
    async def read() -> tuple[int, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        if eof:
            reader.feed_eof()
        return await codec.read_packet(reader, max_size)

    return asyncio.run(read())


def roundtrip(packet: object, version: int) -> object:
    header, body = split(codec.encode(packet, version))  # type: ignore[arg-type]
    return codec.decode(header, body, version)


PACKETS_311 = [
    Connect("dev-1", MQTT_311, True, 30, "user", b"secret", Will("w/t", b"bye", 1, True)),
    Connect("", MQTT_311, False, 0),
    Connack(5, False),
    Connack(0, True),
    Publish("a/b", b"payload", 0),
    Publish("a/b", b"x" * 300, 1, True, True, 7),
    Publish("a/b", b"", 2, False, False, 65535),
    Puback(1),
    Pubrec(2),
    Pubrel(3),
    Pubcomp(4),
    Subscribe(9, (Subscription("a/+", 1), Subscription("b/#", 2))),
    Suback(9, (1, 0x80)),
    Unsubscribe(10, ("a/+", "b/#")),
    Unsuback(10),
    Pingreq(),
    Pingresp(),
    Disconnect(),
]

PACKETS_5 = [
    Connect("dev-5", MQTT_5, True, 60, None, b"pw-only", Will("w", b"x", 2, False, PROPS), PROPS),
    Connack(0x87, False, PROPS),
    Publish("t", b"p", 1, False, False, 3, PROPS),
    Publish("", b"alias", 0, properties=build_properties([(Prop.TOPIC_ALIAS, 4)])),
    Puback(1, 0x10, PROPS),
    Pubrec(1, 0x80),
    Pubrel(1, 0x92),
    Pubcomp(1),
    Subscribe(2, (Subscription("a/#", 0x2E),), PROPS),
    Suback(2, (2, 0x87), PROPS),
    Unsubscribe(3, ("a/#",), PROPS),
    Unsuback(3, (0, 0x11), PROPS),
    Disconnect(0x8E, PROPS),
    Disconnect(0x04),
    Auth(0x18, build_properties([(Prop.AUTH_METHOD, "SCRAM"), (Prop.AUTH_DATA, b"\x00\x01")])),
]


@pytest.mark.parametrize("packet", PACKETS_311, ids=lambda p: type(p).__name__)
def test_roundtrip_311(packet: object) -> None:
    assert roundtrip(packet, MQTT_311) == packet


@pytest.mark.parametrize("packet", PACKETS_5, ids=lambda p: type(p).__name__)
def test_roundtrip_5(packet: object) -> None:
    assert roundtrip(packet, MQTT_5) == packet


def test_known_bytes_connect_311() -> None:
    # Written out by hand from the 3.1.1 specification's CONNECT layout.
    raw = b"\x10\x13\x00\x04MQTT\x04\x02\x00\x3c\x00\x07client1"
    assert codec.encode(Connect("client1", MQTT_311, True, 60)) == raw


def test_v5_fields_dropped_for_311() -> None:
    raw = codec.encode(Puback(1, 0x10, PROPS), MQTT_311)
    assert raw == b"\x40\x02\x00\x01"


def test_properties_roundtrip() -> None:
    assert parse_properties(PROPS) == [
        (Prop.SESSION_EXPIRY, 3600),
        (Prop.USER_PROPERTY, ("k", "v")),
        (Prop.CONTENT_TYPE, "text/plain"),
    ]
    assert get_property(PROPS, Prop.SESSION_EXPIRY) == 3600
    assert get_property(PROPS, Prop.REASON_STRING) is None


def test_large_remaining_length() -> None:
    packet = Publish("big", b"z" * 200_000, 1, packet_id=1)
    raw = codec.encode(packet)
    assert raw[1] & 0x80 and raw[2] & 0x80  # three-byte remaining length
    assert roundtrip(packet, MQTT_311) == packet


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\x30\xff\xff\xff\xff\x7f", "longer than 4 bytes"),
        (b"\x00\x00", "reserved packet type"),
        (b"\x36\x00", "QoS 3"),
        (b"\x62\x02\x00\x01", None),  # PUBREL with its mandatory flags is fine
        (b"\x60\x02\x00\x01", "reserved flags"),
        (b"\x80\x00", "reserved flags"),  # SUBSCRIBE without 0b0010
        (b"\xc1\x00", "reserved flags"),
    ],
)
def test_fixed_header_checks(raw: bytes, why: str | None) -> None:
    if why is None:
        split(raw)
        return
    with pytest.raises(MalformedPacket, match=why):
        split(raw)


def test_oversized_rejected_before_body() -> None:
    with pytest.raises(PacketTooLarge):  # announces 262144 bytes but sends none, and no EOF
        split(b"\x30\x80\x80\x10", max_size=1000, eof=False)


def test_truncated_stream() -> None:
    with pytest.raises(asyncio.IncompleteReadError):
        split(b"\x30\x05ab")


def connect_body(client_id: bytes, flags: int = 0x02, name: bytes = b"MQTT", level: int = 4) -> bytes:
    body = len(name).to_bytes(2, "big") + name + bytes((level, flags)) + b"\x00\x3c"
    return body + len(client_id).to_bytes(2, "big") + client_id


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (connect_body(b"\xff\xfe"), "UTF-8"),
        (connect_body(b"a\x00b"), "U\\+0000"),
        (connect_body(b"\xed\xa0\x80"), "UTF-8"),  # an encoded surrogate
        (connect_body(b"x", flags=0x03), "reserved flag"),
        (connect_body(b"x", flags=0x18), "without a will"),
        (connect_body(b"x", flags=0x42), "password without user name"),
        (connect_body(b"x", name=b"HTTP"), "protocol name"),
        (connect_body(b"x") + b"junk", "trailing"),
        (connect_body(b"x")[:-1], "truncated"),
    ],
)
def test_bad_connect(body: bytes, why: str) -> None:
    with pytest.raises(MalformedPacket, match=why):
        codec.decode(0x10, body)


def test_unsupported_level() -> None:
    with pytest.raises(UnsupportedVersion) as info:
        codec.decode(0x10, connect_body(b"x", level=6))
    assert info.value.level == 6


@pytest.mark.parametrize(
    ("header", "body", "why"),
    [
        (0x30, b"\x00\x03a/+x", "wildcard"),
        (0x32, b"\x00\x01a\x00\x00", "identifier 0"),
        (0x38, b"\x00\x01a", "DUP"),
        (0x30, b"\x00\x00", "empty"),
        (0x82, b"\x00\x01", "without a topic filter"),
        (0x82, b"\x00\x01\x00\x01a\x03", "options"),
        (0x82, b"\x00\x01\x00\x01a\x04", "options"),  # 3.1.1: upper bits reserved
        (0xA2, b"\x00\x01", "without a topic filter"),
        (0x20, b"\x02\x00", "CONNACK reserved"),
        (0xF0, b"", "AUTH before MQTT 5"),
        (0xC0, b"\x00", "trailing"),
    ],
)
def test_bad_packets(header: int, body: bytes, why: str) -> None:
    with pytest.raises(MalformedPacket, match=why):
        codec.decode(header, body)


def test_unknown_property_rejected() -> None:
    with pytest.raises(MalformedPacket, match="unknown property"):
        codec.decode(0x30, b"\x00\x01t\x02\x7f\x00", MQTT_5)


def test_frame_scanner_follows_boundaries() -> None:
    stream = b"".join(
        codec.encode(p)
        for p in [Publish("a", b"1"), Pingreq(), Publish("b", b"x" * 500, 1, packet_id=2), Puback(2)]
    )
    for size in (1, 2, 3, 7, 64, len(stream)):
        scanner = FrameScanner(max_size=1024)
        seen = sum(scanner.feed(stream[i : i + size]) for i in range(0, len(stream), size))
        assert seen == 2


def test_frame_scanner_rejects() -> None:
    with pytest.raises(PacketTooLarge):
        FrameScanner(max_size=100).feed(codec.encode(Publish("a", b"x" * 200)))
    with pytest.raises(MalformedPacket):
        FrameScanner().feed(codec.encode(Pingreq()) + b"\x61\x00")
    with pytest.raises(MalformedPacket, match="4 bytes"):
        scanner = FrameScanner()
        scanner.feed(b"\x30\xff\xff")
        scanner.feed(b"\xff\xff\x01")


topics = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#"), min_size=1)


@given(
    topic=topics,
    payload=st.binary(max_size=2000),
    qos=st.integers(0, 2),
    retain=st.booleans(),
    pid=st.integers(1, 65535),
    version=st.sampled_from([MQTT_311, MQTT_5]),
)
def test_publish_roundtrip_property(
    topic: str, payload: bytes, qos: int, retain: bool, pid: int, version: int
) -> None:
    packet = Publish(topic, payload, qos, retain, bool(qos) and retain, pid if qos else None)
    assert roundtrip(packet, version) == packet


@given(st.binary(max_size=64), st.integers(0, 255), st.sampled_from([MQTT_311, MQTT_5]))
def test_random_bodies_only_raise_malformed(body: bytes, header: int, version: int) -> None:
    with contextlib.suppress(MalformedPacket):
        codec.decode(header, body, version)


packets_st = st.one_of(
    st.builds(Publish, topics, st.binary(max_size=300)),
    st.builds(
        lambda t, p, i: Publish(t, p, 1, packet_id=i), topics, st.binary(max_size=300), st.integers(1, 9)
    ),
    st.builds(Puback, st.integers(1, 65535)),
    st.builds(Pubrel, st.integers(1, 65535)),
    st.just(Pingreq()),
    st.builds(lambda f: Subscribe(1, (Subscription(f, 1),)), topics),
)


@given(st.lists(packets_st, max_size=12), st.lists(st.integers(1, 64), min_size=1, max_size=20))
def test_frame_scanner_agrees_with_read_packet(packets: list[object], cuts: list[int]) -> None:
    stream = b"".join(codec.encode(p) for p in packets)  # type: ignore[arg-type]
    scanner = FrameScanner()
    pos, seen, i = 0, 0, 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        seen += scanner.feed(stream[pos : pos + step])
        pos, i = pos + step, i + 1
    assert seen == sum(isinstance(p, Publish) for p in packets)
    rest = stream
    for p in packets:  # and the same bytes frame one by one into the same packets
        header, body = split(rest[: len(codec.encode(p))])  # type: ignore[arg-type]
        assert codec.decode(header, body) == p
        rest = rest[len(codec.encode(p)) :]  # type: ignore[arg-type]


@settings(deadline=None)  # one-byte chunks over a 2 KB packet: slow on a loaded machine, not wrong
@given(
    st.lists(st.tuples(packets_st, st.booleans()), max_size=10),
    st.lists(st.integers(1, 700), min_size=1, max_size=20),
)
def test_frame_scanner_filter_cuts_exactly_the_oversized(
    items: list[tuple[object, bool]], cuts: list[int]
) -> None:
    limit = 400
    big = [Publish("big", b"x" * 600, 1, packet_id=7), Publish("big", b"x" * 2_000)]  # 2-byte lengths
    packets = [big[n % 2] if over else p for n, (p, over) in enumerate(items)]
    encoded = [codec.encode(p) for p in packets]  # type: ignore[arg-type]
    stream = b"".join(encoded)
    scanner = FrameScanner(max_size=limit)
    pos, seen, out, i = 0, 0, b"", 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        count, kept = scanner.filter(stream[pos : pos + step])
        seen, out = seen + count, out + kept
        pos, i = pos + step, i + 1
    fits = [e for e in encoded if len(e) <= limit]
    assert out == b"".join(fits)
    assert seen == sum(
        isinstance(p, Publish) for p, e in zip(packets, encoded, strict=True) if len(e) <= limit
    )
    assert scanner.dropped == len(encoded) - len(fits) and scanner.at_boundary()


def test_read_packet_too_large_leaves_the_body_to_skip() -> None:
    async def run() -> tuple[int, int, int, bytes]:
        reader = asyncio.StreamReader()
        big, after = codec.encode(Publish("t", b"x" * 5000)), codec.encode(Pingreq())
        reader.feed_data(big + after)
        reader.feed_eof()
        with pytest.raises(PacketTooLarge) as e:
            await codec.read_packet(reader, 1000)
        await codec.skip_bytes(reader, e.value.unread, chunk=512)
        header, body = await codec.read_packet(reader, 1000)
        return e.value.size, e.value.limit, len(big), bytes((header,)) + body

    size, limit, whole, rest = asyncio.run(run())
    assert (size, limit) == (whole, 1000)  # the whole packet, fixed header included
    assert rest == b"\xc0"  # and the stream goes on at the next packet
