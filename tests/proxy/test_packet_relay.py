"""The transform hook's packet-level path, driven by a small test transform (the Azure one lives
in proxy/azure.py): topics rewritten both ways, packets answered locally, CONNECT refused."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import paho.mqtt.client as mqtt
import pytest

from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.model import EndpointType
from cloudconnector.mqtt import codec
from cloudconnector.mqtt.packets import (
    Connack,
    Connect,
    Packet,
    Pingreq,
    Pingresp,
    Publish,
    Subscribe,
    Subscription,
    Unsubscribe,
)
from cloudconnector.proxy import transform
from cloudconnector.proxy.transform import Relay
from cloudconnector.routes import Route
from tests.proxy.conftest import Client, ProxyThread, World, raw_connect, recv_all

REFUSED_CLIENT = "please-refuse"


class PrefixTransform:
    """Devices speak short topics; the cloud sees them under the device's own prefix."""

    packet_relay = True

    def __init__(self, route: Route) -> None:
        self.route = route
        self.prefix = f"{route.client_id}/"

    def connect(self, packet: Connect, credentials: KeyMaterial) -> Connect | Connack:
        if packet.client_id == REFUSED_CLIENT:
            return Connack(reason_code=2)  # identifier rejected
        return replace(packet, client_id=self.route.client_id)

    def from_device(self, packet: Packet) -> Relay:
        if isinstance(packet, Publish):
            return Relay(to_cloud=(replace(packet, topic=self.prefix + packet.topic),))
        if isinstance(packet, Subscribe):
            subs = tuple(Subscription(self.prefix + s.topic_filter, s.options) for s in packet.subscriptions)
            return Relay(to_cloud=(replace(packet, subscriptions=subs),))
        if isinstance(packet, Unsubscribe):
            filters = tuple(self.prefix + f for f in packet.topic_filters)
            return Relay(to_cloud=(replace(packet, topic_filters=filters),))
        if isinstance(packet, Pingreq):
            return Relay(to_device=(Pingresp(),))  # answered here, never sent upstream
        return Relay(to_cloud=(packet,))

    def from_cloud(self, packet: Packet) -> Relay:
        if isinstance(packet, Publish) and packet.topic.startswith(self.prefix):
            return Relay(to_device=(replace(packet, topic=packet.topic[len(self.prefix) :]),))
        return Relay(to_device=(packet,))


@pytest.fixture
def prefixing() -> Iterator[None]:
    before = transform._FACTORIES.get(EndpointType.MQTT)
    transform.register(EndpointType.MQTT, PrefixTransform)
    yield
    if before is None:
        transform._FACTORIES.pop(EndpointType.MQTT, None)
    else:
        transform.register(EndpointType.MQTT, before)


def mqtt_route(world: World, proxy: ProxyThread) -> Route:
    route = replace(world.add(), endpoint_type=EndpointType.MQTT)
    proxy.run(lambda: world.directory.put(route))
    return route


@pytest.mark.parametrize("version", [mqtt.MQTTv311, mqtt.MQTTv5])
@pytest.mark.parametrize("qos", [1, 2])
def test_topics_rewritten_both_ways(
    prefixing: None,
    world: World,
    proxy: ProxyThread,
    admin: Client,
    clients: list[Client],
    qos: int,
    version: int,
) -> None:
    route = mqtt_route(world, proxy)
    admin.subscribe(f"{route.client_id}/#", 2)
    dev = Client("d", bind=route.ip or "", version=version)
    clients.append(dev)
    assert dev.connect(proxy.port) == 0
    assert dev.subscribe("cmd", qos) == [qos]
    dev.publish("telemetry", b"short topic", qos)
    got = admin.expect()
    assert (got.topic, got.payload, got.qos) == (f"{route.client_id}/telemetry", b"short topic", qos)
    admin.publish(f"{route.client_id}/cmd", b"do it", qos)
    got = dev.expect()
    assert (got.topic, got.payload, got.qos) == ("cmd", b"do it", qos)


def test_local_answers_and_refusal(prefixing: None, world: World, proxy: ProxyThread) -> None:
    route = mqtt_route(world, proxy)
    s = raw_connect(proxy.port, route.ip or "", codec.encode(Connect("x")))
    assert s.recv(4) == b"\x20\x02\x00\x00"
    s.sendall(codec.encode(Pingreq()))
    assert s.recv(2) == b"\xd0\x00"
    s.sendall(b"\x30\x03\x00\x01")  # a truncated PUBLISH body claims more than it has...
    s.sendall(b"+")  # ...and a wildcard topic: decoded, refused, connection closed
    assert recv_all(s) == b""
    s = raw_connect(proxy.port, route.ip or "", codec.encode(Connect(REFUSED_CLIENT)))
    assert recv_all(s) == b"\x20\x02\x00\x02"
