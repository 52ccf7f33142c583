"""Client ids through the proxy, which replaces each with the device's cloud identity: an empty id
(MQTT 5: the id given is returned; 3.1.1 without a clean session: refused with return code 2), and
two clients behind one device address, which share that identity: the second replaces the first."""

from __future__ import annotations

import logging

import paho.mqtt.client as mqtt
import pytest

from cloudconnector.mqtt.packets import MQTT_5, MQTT_311
from cloudconnector.mqtt.properties import Prop
from tests.proxy.conftest import Client, ProxyThread, World, recv_all
from tests.proxy.mqtt_raw import connect, metric, props

ATTEMPTS = "cloudconnector_proxy_connections_total"


@pytest.mark.parametrize("clean", [True, False])
def test_mqtt5_empty_client_id_is_told_the_id_it_was_given(
    world: World, proxy: ProxyThread, clean: bool
) -> None:
    route = world.add()
    s, connack = connect(proxy.port, route.ip or "", MQTT_5, client_id="", clean_start=clean)
    with s:
        assert connack.reason_code == 0
        assert props(connack.properties)[Prop.ASSIGNED_CLIENT_ID] == route.client_id


def test_mqtt5_named_client_gets_no_assigned_id(world: World, proxy: ProxyThread) -> None:
    route = world.add()
    s, connack = connect(proxy.port, route.ip or "", MQTT_5, client_id="named")
    with s:
        assert connack.reason_code == 0
        assert Prop.ASSIGNED_CLIENT_ID not in props(connack.properties)


def test_mqtt311_empty_client_id_without_clean_session_is_rejected(world: World, proxy: ProxyThread) -> None:
    route = world.add()
    reads = world.keys.reads
    s, connack = connect(proxy.port, route.ip or "", MQTT_311, client_id="", clean_start=False)
    with s:
        assert (connack.reason_code, connack.session_present) == (2, False)  # identifier rejected
        assert recv_all(s) == b""
    assert world.keys.reads == reads  # refused before any credentials were read
    assert metric(proxy, ATTEMPTS, result="identifier_rejected") == 1


def test_mqtt311_empty_client_id_with_clean_session_relays(
    world: World, proxy: ProxyThread, admin: Client, clients: list[Client]
) -> None:
    route = world.add()
    admin.subscribe(f"{route.client_id}/#", 1)
    dev = Client("", bind=route.ip or "")  # paho sends clean session with an empty id
    clients.append(dev)
    assert dev.connect(proxy.port) == 0
    dev.publish(f"{route.client_id}/up", b"anonymous but known", 1)
    assert admin.expect().payload == b"anonymous but known"


@pytest.mark.parametrize("version", [mqtt.MQTTv311, mqtt.MQTTv5])
def test_second_client_behind_one_address_replaces_the_first_and_is_logged(
    world: World,
    proxy: ProxyThread,
    admin: Client,
    clients: list[Client],
    caplog: pytest.LogCaptureFixture,
    version: int,
) -> None:
    route = world.add()
    admin.subscribe(f"{route.client_id}/#", 1)
    first = Client("app-a", bind=route.ip or "", version=version)
    second = Client("app-b", bind=route.ip or "", version=version)
    clients += [first, second]
    assert first.connect(proxy.port) == 0
    with caplog.at_level(logging.INFO, "cloudconnector.proxy"):
        assert second.connect(proxy.port) == 0
        first.disconnects.get(timeout=10)  # the cloud knows one client per identity
    replaced = [r for r in caplog.records if r.getMessage().startswith("second session for one device")]
    assert len(replaced) == 1
    assert replaced[0].levelno == logging.WARNING
    assert replaced[0].device == str(route.device) and replaced[0].peer == route.ip  # type: ignore[attr-defined]
    second.publish(f"{route.client_id}/up", b"from the second", 1)
    assert admin.expect().payload == b"from the second"
