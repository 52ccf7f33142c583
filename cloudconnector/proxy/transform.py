"""The hook through which a cloud may rewrite the MQTT conversation of one device session.

AWS IoT Core and plain MQTT brokers need only the CONNECT rewritten (client id, credentials); the
rest is relayed as raw bytes. Azure IoT Hub needs every packet mapped, so its transform (in
``proxy/azure.py``) asks for packet-level relay. A transform is made per device session, so it may
keep state (subscriptions to map back, QoS 2 handshakes it completes itself).

Contract for a :class:`SessionTransform`:

- :meth:`connect` gets the device's CONNECT and returns the CONNECT to send upstream, or a
  CONNACK to refuse the device with (no upstream connection is kept). Its ``protocol_level`` is
  the level spoken upstream; the device keeps its own level on its side.
- :meth:`from_cloud` gets every packet from the cloud, the CONNACK first; :meth:`from_device`
  every packet from the device after CONNECT. Each returns a :class:`Relay`: packets to send
  upstream and packets to send back to the device (answer locally, drop, or split).
- With ``packet_relay`` False, only CONNECT and CONNACK pass through the transform; after that
  the proxy copies bytes, except for the packet types in ``divert``, which it cuts out of the
  byte stream and hands to :meth:`from_device` / :meth:`from_cloud` (``proxy/divert.py``).
- A transform raises :class:`TransformError` to end the session (the reason is logged).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.model import EndpointType
from cloudconnector.mqtt.packets import Connack, Connect, Packet, PacketType
from cloudconnector.routes import Route


class TransformError(Exception):
    """The session cannot go on (e.g. a packet the cloud cannot express); ends that session only."""


@dataclass(frozen=True)
class Relay:
    """The outcome of one packet: what goes to the cloud and what goes back to the device."""

    to_cloud: tuple[Packet, ...] = ()
    to_device: tuple[Packet, ...] = ()


class SessionTransform(Protocol):
    packet_relay: bool
    divert: frozenset[int]  # PacketType values seen on the byte relay (packet_relay False)

    def connect(self, packet: Connect, credentials: KeyMaterial) -> Connect | Connack: ...

    def from_device(self, packet: Packet) -> Relay: ...

    def from_cloud(self, packet: Packet) -> Relay: ...


TransformFactory = Callable[[Route], SessionTransform]


class Passthrough:
    """AWS IoT Core and generic MQTT: the client id becomes the cloud identity, nothing else changes.

    For an MQTT broker, a user name and password stored with the device's credentials replace the
    device's own; otherwise the device's are relayed (the broker then sees them as sent).
    """

    packet_relay = False
    divert: frozenset[int] = frozenset()

    def __init__(self, route: Route) -> None:
        self.route = route

    def connect(self, packet: Connect, credentials: KeyMaterial) -> Connect | Connack:
        out = replace(packet, client_id=self.route.client_id)
        if self.route.endpoint_type is EndpointType.MQTT and credentials.username is not None:
            password = credentials.password.encode() if credentials.password is not None else None
            out = replace(out, username=credentials.username, password=password)
        return out

    def from_device(self, packet: Packet) -> Relay:
        return Relay(to_cloud=(packet,))

    def from_cloud(self, packet: Packet) -> Relay:
        return Relay(to_device=(packet,))


_FACTORIES: dict[EndpointType, TransformFactory] = {}
# Modules that register a transform for an endpoint type when imported.
_PROVIDERS = {EndpointType.AZURE: "cloudconnector.proxy.azure"}


def register(endpoint_type: EndpointType, factory: TransformFactory) -> None:
    """Use ``factory`` for every new session to an endpoint of ``endpoint_type``."""
    _FACTORIES[endpoint_type] = factory


def transform_for(route: Route) -> SessionTransform:
    """The cloud's transform, behind the device's topic template and the cloud's subscription
    limits when those apply; the cloud's alone otherwise (for AWS and MQTT brokers: the byte relay)."""
    factory = _FACTORIES.get(route.endpoint_type)
    if factory is None and route.endpoint_type in _PROVIDERS:
        with contextlib.suppress(ModuleNotFoundError):  # not written yet: passthrough
            importlib.import_module(_PROVIDERS[route.endpoint_type])
        factory = _FACTORIES.get(route.endpoint_type)
    base = (factory or Passthrough)(route)
    # Imported here: both layers build on this module's Relay.
    from cloudconnector.proxy.subscriptions import SubscriptionLimits, limits_for
    from cloudconnector.proxy.topics import TopicLayer

    layers: list[SessionTransform] = []
    if route.topic_prefix or route.topic_error:
        layers.append(TopicLayer(route))
    if (limits := limits_for(route)) is not None:
        layers.append(SubscriptionLimits(route, limits))
    return Chain((*layers, base)) if layers else base


class Chain:
    """Transforms stacked between device and cloud, the device's side first.

    A packet from the device enters the first layer; what a layer sends towards the cloud enters
    the next one (or leaves for the cloud after the last), what it sends back towards the device
    enters the previous one's :meth:`from_cloud` (or leaves for the device). CONNECT passes every
    layer's :meth:`connect` in order, and the first CONNACK (a refusal) ends it.
    """

    def __init__(self, layers: tuple[SessionTransform, ...]) -> None:
        self.layers = layers
        self.packet_relay = any(t.packet_relay for t in layers)
        self.divert: frozenset[int] = frozenset().union(*(getattr(t, "divert", ()) for t in layers))

    def raw_publish(self, header: int, body: bytes, up: bool, level: int) -> bytes | None:
        """The byte-level PUBLISH rewrite of the one layer that takes PUBLISH on the byte relay
        (the others never see PUBLISH there), or None: decode and go through every layer."""
        takers = [t for t in self.layers if t.packet_relay or PacketType.PUBLISH in getattr(t, "divert", ())]
        raw = getattr(takers[0], "raw_publish", None) if len(takers) == 1 else None
        return raw(header, body, up, level) if raw is not None else None

    def connect(self, packet: Connect, credentials: KeyMaterial) -> Connect | Connack:
        for layer in self.layers:
            out = layer.connect(packet, credentials)
            if isinstance(out, Connack):
                return out
            packet = out
        return packet

    def from_device(self, packet: Packet) -> Relay:
        return self._run(packet, 0, up=True)

    def from_cloud(self, packet: Packet) -> Relay:
        return self._run(packet, len(self.layers) - 1, up=False)

    def _run(self, packet: Packet, at: int, up: bool) -> Relay:
        to_cloud: list[Packet] = []
        to_device: list[Packet] = []

        def enter(p: Packet, i: int, going_up: bool) -> None:
            if i == len(self.layers):
                to_cloud.append(p)
                return
            if i < 0:
                to_device.append(p)
                return
            layer = self.layers[i]
            relay = layer.from_device(p) if going_up else layer.from_cloud(p)
            for q in relay.to_cloud:
                enter(q, i + 1, True)
            for q in relay.to_device:
                enter(q, i - 1, False)

        enter(packet, at, up)
        return Relay(tuple(to_cloud), tuple(to_device))
