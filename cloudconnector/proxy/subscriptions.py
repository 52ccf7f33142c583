"""A cloud's subscription limits, kept at the edge so the device gets a clear answer.

AWS IoT Core takes at most 8 topic filters in one SUBSCRIBE and 50 subscriptions per connection
(``../shared/notes/cloud-facts.md``); beyond that it refuses or disconnects, which a device can only
read as a broken network. Here:

- a SUBSCRIBE with more filters than the cloud takes at once goes upstream as several SUBSCRIBEs,
  one after the other, each under the device's own packet id: the device cannot reuse that id
  before it has its SUBACK, so no id the device may use for something else is ever taken. Their
  SUBACKs are merged into one for the device, with one code per filter in the device's order
  (MQTT 5: the first part's properties). UNSUBSCRIBE is split and merged the same way;
- a filter that would be subscription number ``limit + 1`` is refused in the SUBACK without
  reaching the cloud (MQTT 5: 0x97 Quota exceeded, 3.1.1: 0x80) and logged. A filter counts from
  its SUBSCRIBE until the cloud refuses it or the device unsubscribes; subscribing to a filter
  again does not count twice (MQTT replaces the subscription).

Only SUBSCRIBE, UNSUBSCRIBE, SUBACK and UNSUBACK are looked at (``divert``): with no topic
template, PUBLISH stays on the byte relay (``proxy/divert.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.model import EndpointType
from cloudconnector.mqtt.packets import (
    MQTT_5,
    Connack,
    Connect,
    Packet,
    PacketType,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
)
from cloudconnector.proxy.transform import Relay, TransformError
from cloudconnector.routes import Route

log = logging.getLogger("cloudconnector.proxy")

FAILURE = 0x80  # SUBACK "failure" (3.1.1), "unspecified error" (5)
QUOTA_EXCEEDED = 0x97  # MQTT 5


@dataclass(frozen=True)
class CloudLimits:
    filters_per_subscribe: int
    subscriptions: int


LIMITS = {EndpointType.AWS: CloudLimits(filters_per_subscribe=8, subscriptions=50)}


@dataclass
class _Pending:
    """A SUBSCRIBE or UNSUBSCRIBE going upstream in parts, and the codes gathered so far."""

    parts: list[list[int]]  # indexes into the device's filters, one list per upstream packet
    filters: tuple[str, ...]
    properties: bytes
    codes: list[int | None]  # per device filter; None until its part is answered (or 3.1.1 UNSUBACK)
    new: set[str] = field(default_factory=set)  # filters this SUBSCRIBE added to the count
    subscriptions: tuple[Subscription, ...] = ()  # a SUBSCRIBE's, with their options
    answer_props: bytes | None = None


class SubscriptionLimits:
    """One session's subscriptions, within ``limits``; a layer of ``transform.Chain``."""

    packet_relay = False
    divert = frozenset({PacketType.SUBSCRIBE, PacketType.SUBACK, PacketType.UNSUBSCRIBE, PacketType.UNSUBACK})

    def __init__(self, route: Route, limits: CloudLimits) -> None:
        self.route = route
        self.limits = limits
        self.level = MQTT_5
        self.filters: set[str] = set()  # counted against the limit
        self._subscribing: dict[int, _Pending] = {}
        self._unsubscribing: dict[int, _Pending] = {}

    def connect(self, packet: Connect, credentials: KeyMaterial) -> Connect | Connack:
        self.level = packet.protocol_level
        return packet

    # -- device -> cloud ----------------------------------------------------------------------

    def from_device(self, packet: Packet) -> Relay:
        if isinstance(packet, Subscribe):
            return self._subscribe(packet)
        if isinstance(packet, Unsubscribe):
            return self._unsubscribe(packet)
        return Relay(to_cloud=(packet,))

    def _subscribe(self, packet: Subscribe) -> Relay:
        pid = packet.packet_id
        if pid in self._subscribing or pid in self._unsubscribing:
            raise TransformError(f"packet id {pid} reused before its acknowledgement")
        refused = QUOTA_EXCEEDED if self.level == MQTT_5 else FAILURE
        codes: list[int | None] = []
        accepted: list[int] = []
        new: set[str] = set()
        for i, sub in enumerate(packet.subscriptions):
            f = sub.topic_filter
            if f not in self.filters and len(self.filters) >= self.limits.subscriptions:
                codes.append(refused)
                continue
            if f not in self.filters:
                self.filters.add(f)
                new.add(f)
            codes.append(None)
            accepted.append(i)
        if len(accepted) < len(codes):
            limit = self.limits.subscriptions
            log.warning(
                "refused %d of %d subscriptions: the cloud allows %d per connection",
                len(codes) - len(accepted),
                len(codes),
                limit,
                extra={"device": str(self.route.device), "result": "subscription_refused", "limit": limit},
            )
        if not accepted:
            return Relay(to_device=(Suback(pid, tuple(c or refused for c in codes)),))
        step = self.limits.filters_per_subscribe
        parts = [accepted[i : i + step] for i in range(0, len(accepted), step)]
        filters = tuple(s.topic_filter for s in packet.subscriptions)
        pending = _Pending(parts, filters, packet.properties, codes, new, packet.subscriptions)
        self._subscribing[pid] = pending
        return Relay(to_cloud=(self._next_subscribe(pid, pending),))

    def _next_subscribe(self, pid: int, p: _Pending) -> Subscribe:
        return Subscribe(pid, tuple(p.subscriptions[i] for i in p.parts[0]), p.properties)

    def _unsubscribe(self, packet: Unsubscribe) -> Relay:
        pid = packet.packet_id
        if pid in self._subscribing or pid in self._unsubscribing:
            raise TransformError(f"packet id {pid} reused before its acknowledgement")
        self.filters.difference_update(packet.topic_filters)
        filters = packet.topic_filters
        step = self.limits.filters_per_subscribe
        if len(filters) <= step:
            return Relay(to_cloud=(packet,))
        parts = [list(range(i, min(i + step, len(filters)))) for i in range(0, len(filters), step)]
        pending = _Pending(parts, filters, packet.properties, [None] * len(filters))
        self._unsubscribing[pid] = pending
        return Relay(to_cloud=(Unsubscribe(pid, tuple(filters[i] for i in parts[0]), packet.properties),))

    # -- cloud -> device ----------------------------------------------------------------------

    def from_cloud(self, packet: Packet) -> Relay:
        if isinstance(packet, Suback) and packet.packet_id in self._subscribing:
            return self._suback(packet)
        if isinstance(packet, Unsuback) and packet.packet_id in self._unsubscribing:
            return self._unsuback(packet)
        return Relay(to_device=(packet,))

    def _suback(self, packet: Suback) -> Relay:
        pid = packet.packet_id
        p = self._subscribing[pid]
        part = p.parts.pop(0)
        if p.answer_props is None:
            p.answer_props = packet.properties
        for n, i in enumerate(part):
            code = packet.reason_codes[n] if n < len(packet.reason_codes) else FAILURE
            p.codes[i] = code
            f = p.filters[i]
            if code >= FAILURE and f in p.new:
                self.filters.discard(f)  # refused upstream: it does not count
        if p.parts:
            return Relay(to_cloud=(self._next_subscribe(pid, p),))
        del self._subscribing[pid]
        codes = tuple(FAILURE if c is None else c for c in p.codes)
        return Relay(to_device=(Suback(pid, codes, p.answer_props or b""),))

    def _unsuback(self, packet: Unsuback) -> Relay:
        pid = packet.packet_id
        p = self._unsubscribing[pid]
        part = p.parts.pop(0)
        if p.answer_props is None:
            p.answer_props = packet.properties
        for n, i in enumerate(part):
            p.codes[i] = packet.reason_codes[n] if n < len(packet.reason_codes) else None
        if p.parts:
            filters = tuple(p.filters[i] for i in p.parts[0])
            return Relay(to_cloud=(Unsubscribe(pid, filters, p.properties),))
        del self._unsubscribing[pid]
        # 3.1.1 UNSUBACKs carry no codes; MQTT 5 ones carry one per filter.
        codes = () if self.level != MQTT_5 else tuple(0 if c is None else c for c in p.codes)
        return Relay(to_device=(Unsuback(pid, codes, p.answer_props or b""),))


def limits_for(route: Route) -> CloudLimits | None:
    return LIMITS.get(route.endpoint_type)
