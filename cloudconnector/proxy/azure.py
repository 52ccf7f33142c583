"""The proxy's Azure IoT Hub transform: plain MQTT on the device side, IoT Hub's dialect upstream.

Per session, on top of the topic mapping in :mod:`cloudconnector.proxy.azure_topics`:

- CONNECT: client id = device id, username = ``{hub}/{device id}/?api-version=...``, no password
  (the X.509 certificate authenticates); an MQTT 5 device is refused with "unsupported protocol
  version" (IoT Hub speaks 3.1.1 only), a pre-standard 3.1 device is carried over 3.1.1.
- PUBLISH from the device: topic mapped, RETAIN dropped (the hub does not store it), QoS 2 is
  completed here: it goes up as QoS 1 and the device gets PUBREC only once the hub has acked it,
  so the device cannot reuse the packet id while the upstream QoS 1 is still in flight.
- SUBSCRIBE: filters mapped, QoS 2 asked and granted as 1; a filter that cannot be mapped fails
  in the SUBACK (0x80) without reaching the hub, and so does one that would need a sixth upstream
  subscription (IoT Hub documents at most 5 at a time; logged); UNSUBSCRIBE drops an upstream filter only when
  no other device filter shares it.
- Cloud-to-device PUBLISH: delivered on the topic the device subscribed to; a message no
  subscription wants is acked upstream and dropped (otherwise the hub would redeliver it).

A device topic that IoT Hub cannot take ends the session with the reason logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.model import EndpointType
from cloudconnector.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    NOT_AUTHORIZED,
    UNSUPPORTED_VERSION,
    Connack,
    Connect,
    Packet,
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
    refusal,
)
from cloudconnector.proxy.azure_topics import HubNames, Subscriptions, TopicError, d2c_topic
from cloudconnector.proxy.transform import Relay, TransformError, register
from cloudconnector.routes import Route

log = logging.getLogger(__name__)

SUBACK_FAILURE = 0x80
MAX_SUBSCRIPTIONS = 5  # upstream filters at a time, per IoT Hub's documentation


@dataclass(frozen=True)
class _PendingSubscribe:
    filters: tuple[str, ...]
    upstream_index: tuple[int | None, ...]  # per device filter: its slot in the upstream SUBSCRIBE


class AzureTransform:
    """One device session towards IoT Hub (see the module docstring for the rules)."""

    packet_relay = True
    divert: frozenset[int] = frozenset()

    def __init__(self, route: Route) -> None:
        self.route = route
        self.names = HubNames(route.host, route.client_id)
        self.subs = Subscriptions(self.names, route.topic_mapping)
        self._qos2_in_flight: set[int] = set()  # device QoS 2 ids forwarded as QoS 1
        self._pending_subscribe: dict[int, _PendingSubscribe] = {}

    # -- CONNECT ------------------------------------------------------------------------------

    def connect(self, packet: Connect, credentials: KeyMaterial) -> Connect | Connack:
        if packet.protocol_level == MQTT_5:
            log.info("refusing MQTT 5 device %s: IoT Hub speaks MQTT 3.1.1", self.names.device_id)
            return refusal(UNSUPPORTED_VERSION, MQTT_5)
        will = packet.will
        if will is not None:
            try:
                will = replace(
                    will, topic=self._map_publish_topic(will.topic), qos=min(will.qos, 1), retain=False
                )
            except TransformError as e:
                log.info("refusing device %s: its Will %s", self.names.device_id, e)
                return refusal(NOT_AUTHORIZED, packet.protocol_level)
        return Connect(
            client_id=self.names.device_id,
            protocol_level=MQTT_311,
            clean_start=packet.clean_start,
            keep_alive=packet.keep_alive,
            username=self.names.username,
            password=None,
            will=will,
        )

    # -- device -> cloud ----------------------------------------------------------------------

    def from_device(self, packet: Packet) -> Relay:
        if isinstance(packet, Publish):
            return self._device_publish(packet)
        if isinstance(packet, Pubrel):
            # the second half of a QoS 2 exchange this proxy completes itself
            self._qos2_in_flight.discard(packet.packet_id)
            return Relay(to_device=(Pubcomp(packet.packet_id),))
        if isinstance(packet, Subscribe):
            return self._subscribe(packet)
        if isinstance(packet, Unsubscribe):
            return self._unsubscribe(packet)
        if isinstance(packet, Connect):
            raise TransformError("a second CONNECT in one session")
        return Relay(to_cloud=(packet,))

    def _map_publish_topic(self, topic: str) -> str:
        try:
            return d2c_topic(self.names, topic, self.route.topic_mapping)
        except TopicError as e:
            raise TransformError(f"topic refused for IoT Hub: {e}") from e

    def _device_publish(self, packet: Publish) -> Relay:
        topic = self._map_publish_topic(packet.topic)
        qos = packet.qos
        if qos == 2:
            assert packet.packet_id is not None
            self._qos2_in_flight.add(packet.packet_id)
            qos = 1
        return Relay(to_cloud=(replace(packet, topic=topic, qos=qos, retain=False, properties=b""),))

    def _subscribe(self, packet: Subscribe) -> Relay:
        upstream: list[Subscription] = []
        slots: list[int | None] = []
        over_limit = 0
        for sub in packet.subscriptions:
            try:
                if self.subs.would_add_upstream(sub.topic_filter, MAX_SUBSCRIPTIONS):
                    over_limit += 1
                    slots.append(None)
                    continue
                mapped = self.subs.add(sub.topic_filter, sub.qos)
            except TopicError as e:
                log.info("device %s: subscription refused: %s", self.names.device_id, e)
                slots.append(None)
                continue
            qos = min(sub.qos, 1)
            for i, existing in enumerate(upstream):
                if existing.topic_filter == mapped:
                    upstream[i] = Subscription(mapped, max(existing.qos, qos))
                    slots.append(i)
                    break
            else:
                slots.append(len(upstream))
                upstream.append(Subscription(mapped, qos))
        if over_limit:
            log.warning(
                "refused %d of %d subscriptions: IoT Hub allows %d at a time",
                over_limit,
                len(packet.subscriptions),
                MAX_SUBSCRIPTIONS,
                extra={"device": str(self.route.device), "result": "subscription_refused"},
            )
        filters = tuple(s.topic_filter for s in packet.subscriptions)
        if not upstream:
            return Relay(to_device=(Suback(packet.packet_id, (SUBACK_FAILURE,) * len(filters)),))
        self._pending_subscribe[packet.packet_id] = _PendingSubscribe(filters, tuple(slots))
        return Relay(to_cloud=(Subscribe(packet.packet_id, tuple(upstream)),))

    def _unsubscribe(self, packet: Unsubscribe) -> Relay:
        upstream: list[str] = []
        for f in packet.topic_filters:
            mapped = self.subs.remove(f)
            if mapped is not None and mapped not in upstream:
                upstream.append(mapped)
        if not upstream:
            return Relay(to_device=(Unsuback(packet.packet_id),))
        return Relay(to_cloud=(Unsubscribe(packet.packet_id, tuple(upstream)),))

    # -- cloud -> device ----------------------------------------------------------------------

    def from_cloud(self, packet: Packet) -> Relay:
        if isinstance(packet, Publish):
            return self._cloud_publish(packet)
        if isinstance(packet, Puback) and packet.packet_id in self._qos2_in_flight:
            return Relay(to_device=(Pubrec(packet.packet_id),))
        if isinstance(packet, Suback):
            return self._suback(packet)
        return Relay(to_device=(packet,))

    def _cloud_publish(self, packet: Publish) -> Relay:
        topic = self.subs.device_topic(packet.topic)
        if topic is None:
            log.info("device %s: dropped a cloud message no subscription wants", self.names.device_id)
            if packet.qos == 1 and packet.packet_id is not None:
                return Relay(to_cloud=(Puback(packet.packet_id),))
            return Relay()
        return Relay(to_device=(replace(packet, topic=topic, retain=False, properties=b""),))

    def _suback(self, packet: Suback) -> Relay:
        pending = self._pending_subscribe.pop(packet.packet_id, None)
        if pending is None:
            return Relay(to_device=(packet,))
        codes: list[int] = []
        for f, slot in zip(pending.filters, pending.upstream_index, strict=True):
            code = packet.reason_codes[slot] if slot is not None and slot < len(packet.reason_codes) else None
            if code is None or code >= SUBACK_FAILURE:
                if slot is not None:
                    self.subs.remove(f)
                codes.append(SUBACK_FAILURE)
            else:
                codes.append(min(code, 1, self.subs.granted(f)))
        return Relay(to_device=(Suback(packet.packet_id, tuple(codes)),))


register(EndpointType.AZURE, AzureTransform)
