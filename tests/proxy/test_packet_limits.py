"""Packet size limits through the proxy, against mosquitto: the limit follows the Endpoint, MQTT 5
peers are told it both ways, a device over it is cut once with a reason, and a message over it
from the cloud is dropped without touching the device's session."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloudconnector.errors import InvalidSpec
from cloudconnector.model import EndpointType, parse_endpoint
from cloudconnector.mqtt import codec
from cloudconnector.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    MQTT_MAX_PACKET_SIZE,
    Connect,
    Disconnect,
    Publish,
    Subscribe,
    Subscription,
)
from cloudconnector.mqtt.properties import Prop
from cloudconnector.mqtt.wire import encode_string, encode_varint
from cloudconnector.proxy import transform
from cloudconnector.proxy.limits import endpoint_limit
from cloudconnector.routes import Route, build_route
from tests.proxy.conftest import Client, Pki, ProxyThread, World, proxy_config, raw_connect, recv_all
from tests.proxy.mqtt_raw import connect, metric, props, read_one
from tests.proxy.test_packet_relay import PrefixTransform
from tests.support.kube import ApiError, Kube

AWS_LIMIT = 128 * 1024 + 16 * 1024
OVERSIZED = "cloudconnector_proxy_oversized_packets_total"


def put(pt: ProxyThread, world: World, route: Route) -> Route:
    pt.run(lambda: world.directory.put(route))
    return route


def publish_head(topic: str, payload_size: int, qos: int = 1) -> bytes:
    """The start of a PUBLISH announcing ``payload_size`` bytes, without the payload: what the proxy
    needs to see to refuse it (and nothing left unread that would turn its close into a reset)."""
    body = encode_string(topic) + (b"\x00\x01" if qos else b"")
    return bytes((0x30 | qos << 1,)) + encode_varint(len(body) + payload_size) + body


# ---------------------------------------------------------------- the limit follows the Endpoint


def test_limit_per_endpoint_type(world: World) -> None:
    aws = world.add(ready=False)
    assert endpoint_limit(aws, None) == AWS_LIMIT
    assert endpoint_limit(replace(aws, endpoint_type=EndpointType.AZURE), None) == 256 * 1024 + 16 * 1024
    broker = replace(aws, endpoint_type=EndpointType.MQTT)
    assert endpoint_limit(broker, None) == MQTT_MAX_PACKET_SIZE  # what mosquitto takes by default
    assert endpoint_limit(replace(broker, max_packet_size=4096), None) == 4096
    assert endpoint_limit(broker, 100_000) == 100_000  # CC_PROXY_MAX_PACKET_SIZE caps every Endpoint


def mqtt_endpoint(**mqtt: Any) -> dict[str, Any]:
    return {
        "apiVersion": "cloudconnector.io/v1alpha1",
        "kind": "Endpoint",
        "metadata": {"name": "broker", "namespace": "default"},
        "spec": {"type": "MqttBroker", "mqtt": {"host": "mqtt.example.com", **mqtt}},
    }


def test_endpoint_setting_parsed_into_the_route() -> None:
    assert parse_endpoint(mqtt_endpoint()).mqtt.max_packet_size == MQTT_MAX_PACKET_SIZE  # type: ignore[union-attr]
    endpoint = mqtt_endpoint(maxPacketSize=1_048_576)
    endpoint["status"] = {"phase": "Ready", "host": "mqtt.example.com", "port": 8883}
    device = {
        "metadata": {"name": "m1", "namespace": "default"},
        "spec": {"group": "g", "sim": {"iccid": "89353010000000000011"}, "ip": "10.0.0.5"},
        "status": {"phase": "Ready", "endpoint": "broker", "cloudId": "m1"},
    }
    group = {"metadata": {"name": "g", "namespace": "default"}, "spec": {"endpointRef": {"name": "broker"}}}
    route = build_route(device, group, endpoint)
    assert route is not None and route.max_packet_size == 1_048_576
    for bad in (100, MQTT_MAX_PACKET_SIZE + 1, "1MB", True):
        with pytest.raises(InvalidSpec, match=r"spec\.mqtt\.maxPacketSize"):
            parse_endpoint(mqtt_endpoint(maxPacketSize=bad))


def test_api_server_takes_the_setting_within_bounds(kube: Kube) -> None:
    path = kube.path("Endpoint", "default") + "?dryRun=All&fieldValidation=Strict"
    kube.request("POST", path, mqtt_endpoint(maxPacketSize=1_048_576))
    kube.request("POST", path, mqtt_endpoint(maxPacketSize=MQTT_MAX_PACKET_SIZE))
    for bad in (100, MQTT_MAX_PACKET_SIZE + 1, "1MB"):
        with pytest.raises(ApiError) as refused:
            kube.request("POST", path, mqtt_endpoint(maxPacketSize=bad))
        assert "maxPacketSize" in refused.value.message


# ---------------------------------------------------------------- device to cloud


@pytest.mark.parametrize("whole", [False, True], ids=["header-only", "whole-packet"])
def test_mqtt5_device_is_told_the_limit_and_cut_with_0x95(
    world: World, proxy: ProxyThread, admin: Client, whole: bool
) -> None:
    route = world.add()
    admin.subscribe(f"{route.client_id}/#", 1)
    s, connack = connect(proxy.port, route.ip or "", MQTT_5)
    assert connack.reason_code == 0
    assert props(connack.properties)[Prop.MAXIMUM_PACKET_SIZE] == AWS_LIMIT
    s.sendall(codec.encode(Publish(f"{route.client_id}/ok", b"fits", 1, packet_id=1), MQTT_5))
    assert read_one(s, MQTT_5).packet_id == 1  # type: ignore[union-attr]  # the broker's PUBACK
    assert admin.expect().payload == b"fits"
    # The whole packet, as a client sends it, or only its start (nothing left unread by the proxy).
    s.sendall(publish_head(f"{route.client_id}/big", 200_000) + (b"b" * 200_000 if whole else b""))
    disconnect = read_one(s, MQTT_5)
    assert isinstance(disconnect, Disconnect) and disconnect.reason_code == 0x95
    reason = props(disconnect.properties)[Prop.REASON_STRING]
    assert str(AWS_LIMIT) in reason and "exceeds the maximum packet size" in reason
    assert recv_all(s) == b""
    assert metric(proxy, OVERSIZED, direction="device_to_cloud") == 1
    assert admin.nothing()


def test_mqtt311_device_over_the_limit_is_closed_once_logged_and_counted(
    world: World, proxy: ProxyThread, admin: Client, caplog: pytest.LogCaptureFixture
) -> None:
    route = world.add()
    s, connack = connect(proxy.port, route.ip or "", MQTT_311)
    assert connack.reason_code == 0
    with caplog.at_level(logging.INFO, "cloudconnector.proxy"):
        s.sendall(publish_head(f"{route.client_id}/big", 200_000))
        assert recv_all(s) == b""  # 3.1.1 has no way to say why: closed
        time.sleep(0.2)  # the session's end is logged just after the close
    ended = [r for r in caplog.records if r.getMessage().startswith("session ended: device sent a packet")]
    assert len(ended) == 1
    size = 1 + 3 + len(publish_head(f"{route.client_id}/big", 0)) - 2 + 200_000  # header, length, body
    assert f"{size} bytes, over the limit of {AWS_LIMIT}" in ended[0].getMessage()
    assert metric(proxy, OVERSIZED, direction="device_to_cloud") == 1


def test_generic_broker_default_carries_a_megabyte_both_ways(
    world: World, proxy: ProxyThread, admin: Client, clients: list[Client]
) -> None:
    route = put(proxy, world, replace(world.add(), endpoint_type=EndpointType.MQTT))
    admin.subscribe(f"{route.client_id}/up", 1)
    dev = Client("big", bind=route.ip or "")
    clients.append(dev)
    assert dev.connect(proxy.port) == 0
    dev.subscribe(f"{route.client_id}/down", 1)
    payload = bytes(range(256)) * 4096  # 1 MiB
    dev.publish(f"{route.client_id}/up", payload, 1)
    assert admin.expect().payload == payload
    admin.publish(f"{route.client_id}/down", payload, 1)
    assert dev.expect().payload == payload
    assert dev.disconnects.empty()


def test_generic_broker_limit_from_the_endpoint(world: World, proxy: ProxyThread) -> None:
    route = put(proxy, world, replace(world.add(), endpoint_type=EndpointType.MQTT, max_packet_size=4096))
    s, connack = connect(proxy.port, route.ip or "", MQTT_5)
    assert props(connack.properties)[Prop.MAXIMUM_PACKET_SIZE] == 4096
    s.sendall(codec.encode(Publish(f"{route.client_id}/t", b"x" * 5000), MQTT_5))
    disconnect = read_one(s, MQTT_5)
    assert isinstance(disconnect, Disconnect) and disconnect.reason_code == 0x95


# ---------------------------------------------------------------- cloud to device


def test_too_large_from_the_cloud_is_dropped_and_the_device_stays(
    world: World, proxy: ProxyThread, admin: Client, clients: list[Client]
) -> None:
    route = world.add()
    topic = f"{route.client_id}/retained-big"
    admin.publish(topic, b"r" * 200_000, 1, retain=True)  # over AWS's limit, delivered on every subscribe
    try:
        for attempt in range(2):  # the retained message comes again after a reconnect: dropped again
            dev = Client(f"small-{attempt}", bind=route.ip or "")
            clients.append(dev)
            assert dev.connect(proxy.port) == 0
            dev.subscribe(f"{route.client_id}/#", 1)
            admin.publish(f"{route.client_id}/small", b"fits", 1)
            got = dev.expect()
            assert (got.topic, got.payload) == (f"{route.client_id}/small", b"fits")
            assert dev.nothing(0.3) and dev.disconnects.empty()
            assert metric(proxy, OVERSIZED, direction="cloud_to_device") == attempt + 1
            dev.close()
    finally:
        admin.publish(topic, b"", 1, retain=True)


def v5_client(client_id: str, max_packet: int | None = None) -> tuple[mqtt.Client, list[bytes], Any]:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    got: list[bytes] = []
    c.on_message = lambda c_, u, m: got.append(m.payload)
    connect_props = None
    if max_packet is not None:
        connect_props = Properties(PacketTypes.CONNECT)
        connect_props.MaximumPacketSize = max_packet
    return c, got, connect_props


@pytest.mark.parametrize("device_max", [None, 4096], ids=["endpoint-limit", "device-own-limit"])
def test_mqtt5_broker_is_told_the_limit_and_skips_what_the_device_cannot_take(
    world: World, proxy: ProxyThread, admin: Client, device_max: int | None
) -> None:
    route = world.add()
    c, got, connect_props = v5_client("v5", device_max)
    too_big = 200_000 if device_max is None else 5000
    c.connect("127.0.0.1", proxy.port, bind_address=route.ip or "", properties=connect_props)
    c.loop_start()
    try:
        subscribed: list[int] = []
        c.on_subscribe = lambda c_, u, mid, rcs, p: subscribed.append(mid)
        c.subscribe(f"{route.client_id}/#", 1)
        deadline = time.monotonic() + 10
        while not subscribed and time.monotonic() < deadline:
            time.sleep(0.05)
        admin.publish(f"{route.client_id}/big", b"b" * too_big, 1)
        admin.publish(f"{route.client_id}/small", b"fits", 1)
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got == [b"fits"]
        # Nothing reached the proxy to drop: the broker itself skipped the message.
        assert metric(proxy, OVERSIZED, direction="cloud_to_device") == 0
    finally:
        c.disconnect()
        c.loop_stop()


# ---------------------------------------------------------------- the packet-by-packet relay


@pytest.fixture
def prefixing() -> Iterator[None]:
    before = transform._FACTORIES.get(EndpointType.MQTT)
    transform.register(EndpointType.MQTT, PrefixTransform)
    yield
    if before is None:
        transform._FACTORIES.pop(EndpointType.MQTT, None)
    else:
        transform.register(EndpointType.MQTT, before)


def test_packet_relay_drops_from_the_cloud_and_cuts_the_device(
    prefixing: None, world: World, proxy: ProxyThread, admin: Client
) -> None:
    route = put(proxy, world, replace(world.add(), endpoint_type=EndpointType.MQTT, max_packet_size=4096))
    s = raw_connect(proxy.port, route.ip or "", codec.encode(Connect("pk")))
    assert read_one(s, MQTT_311).reason_code == 0  # type: ignore[union-attr]
    s.sendall(codec.encode(Subscribe(1, (Subscription("cmd", 1),))))
    assert read_one(s, MQTT_311).packet_id == 1  # type: ignore[union-attr]  # SUBACK
    admin.publish(f"{route.client_id}/cmd", b"x" * 5000, 0)  # over 4096: dropped by the proxy
    admin.publish(f"{route.client_id}/cmd", b"fits", 0)
    got = read_one(s, MQTT_311)
    assert isinstance(got, Publish) and (got.topic, got.payload) == ("cmd", b"fits")
    assert metric(proxy, OVERSIZED, direction="cloud_to_device") == 1
    s.sendall(publish_head("t", 5000, qos=0))
    assert recv_all(s) == b""
    assert metric(proxy, OVERSIZED, direction="device_to_cloud") == 1


def test_ceiling_from_the_environment_applies(pki: Pki, world: World) -> None:
    pt = ProxyThread(proxy_config(pki, max_packet_size=2048), world)
    try:
        route = world.add()
        s, connack = connect(pt.port, route.ip or "", MQTT_5)
        s.close()
        assert props(connack.properties)[Prop.MAXIMUM_PACKET_SIZE] == 2048
    finally:
        pt.close()
