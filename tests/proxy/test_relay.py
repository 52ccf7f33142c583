"""Devices reach the mosquitto "cloud" through the proxy, each under its own certificate."""

from __future__ import annotations

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloudconnector.mqtt import codec
from cloudconnector.mqtt.packets import MQTT_5, Connect
from tests.proxy.conftest import (
    Client,
    Pki,
    ProxyThread,
    World,
    broker_log,
    client_tls,
    raw_connect,
    recv_all,
)
from tests.support.procs import Mosquitto, free_port


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_publish_and_subscribe_both_ways(
    world: World, proxy: ProxyThread, admin: Client, clients: list[Client], qos: int
) -> None:
    route = world.add()
    admin.subscribe(f"{route.client_id}/up/#", 2)
    dev = Client("whatever-the-device-says", bind=route.ip or "")
    clients.append(dev)
    assert dev.connect(proxy.port) == 0
    assert dev.subscribe(f"{route.client_id}/down", qos) == [qos]

    dev.publish(f"{route.client_id}/up/telemetry", b"hello %d" % qos, qos)
    got = admin.expect()
    assert (got.topic, got.payload, got.qos) == (
        f"{route.client_id}/up/telemetry",
        b"hello 0" if not qos else b"hello %d" % qos,
        qos,
    )

    admin.publish(f"{route.client_id}/down", b"command", qos)
    got = dev.expect()
    assert (got.topic, got.payload, got.qos) == (f"{route.client_id}/down", b"command", qos)


def test_client_id_becomes_thing_name_and_acl_holds(
    world: World, proxy: ProxyThread, admin: Client, clients: list[Client], broker: Mosquitto
) -> None:
    mine, other = world.add(), world.add()
    admin.subscribe("#", 1)
    dev = Client("spoofed-" + other.client_id, bind=mine.ip or "")
    clients.append(dev)
    assert dev.connect(proxy.port) == 0
    dev.publish(f"{other.client_id}/up", b"not mine", 1)  # the ACL must drop this
    dev.publish(f"{mine.client_id}/up", b"mine", 1)
    got = admin.expect()
    assert (got.topic, got.payload) == (f"{mine.client_id}/up", b"mine")
    assert admin.nothing()
    log = broker_log(broker)
    assert f"as {mine.client_id} " in log and f"u'{mine.client_id}'" in log


def test_retained_and_will_relayed(
    world: World, proxy: ProxyThread, admin: Client, clients: list[Client]
) -> None:
    route = world.add()
    dev = Client("d", bind=route.ip or "")
    clients.append(dev)
    dev.c.will_set(f"{route.client_id}/status", b"gone", 1, retain=False)
    assert dev.connect(proxy.port) == 0
    dev.publish(f"{route.client_id}/state", b"on", 1, retain=True)
    admin.subscribe(f"{route.client_id}/#", 1)
    got = admin.expect()
    assert (got.payload, got.retain) == (b"on", True)
    dev.c.socket().close()  # vanish without DISCONNECT: the broker publishes the will
    got = admin.expect()
    assert (got.topic, got.payload) == (f"{route.client_id}/status", b"gone")
    admin.publish(f"{route.client_id}/state", b"", 1, retain=True)  # clear the retained message


def test_mqtt5_device(
    world: World, proxy: ProxyThread, pki: Pki, broker: Mosquitto, clients: list[Client]
) -> None:
    route = world.add()
    watcher = Client("admin5", version=mqtt.MQTTv5, tls=client_tls(pki, pki.admin, "admin5"))
    clients.append(watcher)
    assert watcher.connect(broker.port, host="localhost") == 0
    watcher.subscribe(f"{route.client_id}/#", 1)
    dev = Client("d5", bind=route.ip or "", version=mqtt.MQTTv5)
    clients.append(dev)
    assert dev.connect(proxy.port) == 0
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("source", "sim")]
    props.ContentType = "text/plain"
    dev.publish(f"{route.client_id}/up", b"v5", 1, properties=props)
    got = watcher.expect()
    assert got.payload == b"v5"
    assert got.properties.ContentType == "text/plain"
    assert ("source", "sim") in got.properties.UserProperty


def test_tls_listener(
    world: World, proxy: ProxyThread, pki: Pki, admin: Client, clients: list[Client]
) -> None:
    route = world.add()
    admin.subscribe(f"{route.client_id}/#", 1)
    dev = Client("t", bind=route.ip or "", tls=client_tls(pki, None, ""))
    clients.append(dev)
    assert dev.connect(proxy.tls_port, host="localhost") == 0
    dev.publish(f"{route.client_id}/up", b"over tls", 1)
    assert admin.expect().payload == b"over tls"


def test_unknown_device_refused_without_upstream(world: World, proxy: ProxyThread, broker: Mosquitto) -> None:
    world.add()
    before = broker_log(broker).count("New connection from")
    s = raw_connect(proxy.port, "127.0.9.9", codec.encode(Connect("x")))
    assert recv_all(s) == b"\x20\x02\x00\x05"  # CONNACK "not authorized", then close
    s = raw_connect(proxy.port, "127.0.9.9", codec.encode(Connect("x", MQTT_5), MQTT_5))
    assert recv_all(s) == b"\x20\x03\x00\x87\x00"
    assert broker_log(broker).count("New connection from") == before


def test_device_without_credentials_refused(world: World, proxy: ProxyThread) -> None:
    route = world.add(ready=False)
    world.directory.put(route)  # in the directory, but nothing in the key store
    s = raw_connect(proxy.port, route.ip or "", codec.encode(Connect("x")))
    assert recv_all(s) == b"\x20\x02\x00\x05"


def test_upstream_down_gives_server_unavailable(world: World, proxy: ProxyThread) -> None:
    route = world.add(port=free_port())
    s = raw_connect(proxy.port, route.ip or "", codec.encode(Connect("x")))
    assert recv_all(s) == b"\x20\x02\x00\x03"
    s = raw_connect(proxy.port, route.ip or "", codec.encode(Connect("x", MQTT_5), MQTT_5))
    assert recv_all(s) == b"\x20\x03\x00\x88\x00"
