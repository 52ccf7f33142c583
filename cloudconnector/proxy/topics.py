"""The topic template applied to one device session (the syntax: :mod:`cloudconnector.topic_template`).

Up (device to cloud) the device's prefix goes in front of: PUBLISH topics, SUBSCRIBE and
UNSUBSCRIBE filters (the filter of a shared subscription ``$share/{name}/{filter}``), the Will
topic, and MQTT 5 Response Topics (on PUBLISH and in the Will). Down (cloud to device) it comes off
PUBLISH topics and Response Topics.

What passes unchanged, by rule:

- topics and filters starting with ``$`` (``$aws/things/...`` shadows and jobs, ``$iothub/...``):
  they belong to the cloud, which names them per device already;
- an empty PUBLISH topic (MQTT 5 topic alias only): the alias was set by an earlier PUBLISH whose
  topic was rewritten, so it already stands for the rewritten topic, on either side of the proxy;
- a message from the cloud whose topic does not start with the prefix (a ``$`` topic, or one left
  subscribed by an earlier session under another template): delivered on its topic as it is, since
  the device subscribed to it in some form and the prefix cannot be taken off what does not carry it.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.mqtt.packets import (
    MQTT_5,
    NOT_AUTHORIZED,
    Connack,
    Connect,
    Packet,
    PacketType,
    Publish,
    Subscribe,
    Subscription,
    Unsubscribe,
    refusal,
)
from cloudconnector.mqtt.properties import Prop, build_properties, parse_properties
from cloudconnector.mqtt.wire import encode_varint
from cloudconnector.proxy.transform import Relay
from cloudconnector.routes import Route

log = logging.getLogger("cloudconnector.proxy")

SHARED = "$share/"


class TopicPrefix:
    """Adds and takes off one device's prefix."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def up(self, topic: str) -> str:
        if not topic or topic[0] == "$":
            return topic
        return self.prefix + topic

    def up_filter(self, topic_filter: str) -> str:
        if topic_filter.startswith(SHARED):
            parts = topic_filter.split("/", 2)
            if len(parts) == 3:
                return f"{SHARED}{parts[1]}/{self.up(parts[2])}"
            return topic_filter  # malformed: the cloud answers it
        return self.up(topic_filter)

    def down(self, topic: str) -> str:
        if len(topic) > len(self.prefix) and topic.startswith(self.prefix):
            return topic[len(self.prefix) :]
        return topic

    def properties(self, raw: bytes, up: bool) -> bytes:
        """An MQTT 5 property block with its Response Topic rewritten (the rest byte for byte)."""
        if not raw or Prop.RESPONSE_TOPIC not in _ids(raw):
            return raw
        out = []
        for pid, value in parse_properties(raw):
            if pid == Prop.RESPONSE_TOPIC and isinstance(value, str):
                value = self.up(value) if up else self.down(value)
            out.append((pid, value))
        return build_properties(out)


def _ids(raw: bytes) -> set[int]:
    return {pid for pid, _ in parse_properties(raw)}


def _has_properties(header: int, body: bytes, at: int) -> bool:
    """Whether an MQTT 5 PUBLISH's property block (after topic and packet id) is not empty."""
    at += 2 if header & 0x06 else 0
    return at >= len(body) or body[at] != 0


def _frame(header: int, body: bytes) -> bytes:
    return bytes((header,)) + encode_varint(len(body)) + body


class TopicLayer:
    """One session's template layer, composed in front of the cloud's transform (``transform.Chain``)."""

    # Every PUBLISH is rewritten, but on the byte relay's framing (proxy/divert.py): only the packets
    # that carry topics are decoded, and no coroutine runs per packet.
    packet_relay = False
    divert = frozenset({PacketType.PUBLISH, PacketType.SUBSCRIBE, PacketType.UNSUBSCRIBE})

    def __init__(self, route: Route) -> None:
        self.route = route
        self.topics = TopicPrefix(route.topic_prefix)
        self._prefix_bytes = route.topic_prefix.encode()

    def connect(self, packet: Connect, credentials: KeyMaterial) -> Connect | Connack:
        if self.route.topic_error:
            fields = {"device": str(self.route.device), "result": "topic_template"}
            log.warning("device refused: %s", self.route.topic_error, extra=fields)
            return refusal(NOT_AUTHORIZED, packet.protocol_level)
        will = packet.will
        if will is None:
            return packet
        t = self.topics
        will = replace(will, topic=t.up(will.topic), properties=t.properties(will.properties, up=True))
        return replace(packet, will=will)

    def from_device(self, packet: Packet) -> Relay:
        t = self.topics
        if isinstance(packet, Publish):
            props = t.properties(packet.properties, up=True)
            return Relay(to_cloud=(replace(packet, topic=t.up(packet.topic), properties=props),))
        if isinstance(packet, Subscribe):
            subs = tuple(Subscription(t.up_filter(s.topic_filter), s.options) for s in packet.subscriptions)
            return Relay(to_cloud=(replace(packet, subscriptions=subs),))
        if isinstance(packet, Unsubscribe):
            filters = tuple(t.up_filter(f) for f in packet.topic_filters)
            return Relay(to_cloud=(replace(packet, topic_filters=filters),))
        return Relay(to_cloud=(packet,))

    def raw_publish(self, header: int, body: bytes, up: bool, level: int) -> bytes | None:
        """A PUBLISH rewritten on its bytes (the whole packet), or None where only decoding will do.

        The topic is the first field of PUBLISH, so adding or taking off the prefix is a splice;
        what the splice cannot see (an MQTT 5 property block, where a Response Topic may be) and
        anything not well-formed go the decoding way, which also reports the errors.
        """
        n = len(body)
        if n < 2:
            return None
        tlen = body[0] << 8 | body[1]
        end = 2 + tlen
        if end > n or (level == MQTT_5 and _has_properties(header, body, end)):
            return None
        prefix = self._prefix_bytes
        if up:
            if tlen == 0 or body[2] == 0x24:  # empty (alias only) or "$": as it is
                return _frame(header, body)
            tlen += len(prefix)
            if tlen > 0xFFFF:
                return None
            body = tlen.to_bytes(2, "big") + prefix + body[2:]
        elif tlen > len(prefix) and body.startswith(prefix, 2):
            body = (tlen - len(prefix)).to_bytes(2, "big") + body[2 + len(prefix) :]
        return _frame(header, body)

    def from_cloud(self, packet: Packet) -> Relay:
        if isinstance(packet, Publish):
            t = self.topics
            props = t.properties(packet.properties, up=False)
            return Relay(to_device=(replace(packet, topic=t.down(packet.topic), properties=props),))
        return Relay(to_device=(packet,))
