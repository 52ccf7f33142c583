"""Topic templates composed with IoT Hub's topic mapping, and IoT Hub's subscription limit, through
the proxy to the hub-shaped mosquitto of test_end_to_end.py."""

# ruff: noqa: F811  (fixtures imported from test_end_to_end.py are parameters here)
from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from cloudconnector.model import TopicMapping
from tests.azure.test_end_to_end import (  # noqa: F401  (fixtures)
    AzureWorld,
    Peer,
    Provisioned,
    _call,
    backend,
    device_peer,
    peers,
    world,
)


def templated(world: AzureWorld, prefix: str, mapping: TopicMapping = TopicMapping.FLATTEN) -> Provisioned:
    dev = world.add(mapping)
    route = replace(dev.route, topic_prefix=prefix)
    world.loop.run(_call(lambda: world.directory.put(route)))
    return replace(dev, route=route)


@pytest.mark.parametrize("mapping", [TopicMapping.FLATTEN, TopicMapping.PROPERTY])
def test_template_then_hub_mapping_both_ways(
    world: AzureWorld, backend: Peer, peers: list[Peer], mapping: TopicMapping
) -> None:
    dev = templated(world, "site/plant-1/", mapping)
    did = dev.route.client_id
    assert backend.subscribe(f"devices/{did}/messages/events/#", 1) == [1]
    device = device_peer(world, dev, peers)
    assert device.connect(world.proxy.ports["mqtt"]) == 0
    device.publish("telemetry", b"21.5")
    got = backend.receive()
    events = f"devices/{did}/messages/events/"
    expected = (
        "site-plant-1-telemetry"
        if mapping is TopicMapping.FLATTEN
        else "mqtt-topic=site%2Fplant-1%2Ftelemetry"
    )
    assert (got.topic, got.payload) == (events + expected, b"21.5")
    assert device.subscribe("cmd", 1) == [1]
    suffix = "site-plant-1-cmd" if mapping is TopicMapping.FLATTEN else "mqtt-topic=site%2Fplant-1%2Fcmd"
    backend.publish(f"devices/{did}/messages/devicebound/{suffix}", b"reboot")
    got = device.receive()
    assert (got.topic, got.payload) == ("cmd", b"reboot")
    # IoT Hub's own topics are the hub's: no prefix.
    assert device.subscribe("$iothub/twin/res/#", 0) == [0]
    device.publish("$iothub/twin/GET/?$rid=7", b"", qos=0)
    backend.publish("$iothub/twin/res/200/?$rid=7", b"{}", qos=0)
    assert device.receive().topic == "$iothub/twin/res/200/?$rid=7"


def test_a_sixth_hub_subscription_is_refused_and_logged(
    world: AzureWorld, backend: Peer, peers: list[Peer], caplog: pytest.LogCaptureFixture
) -> None:
    dev = world.add()
    did = dev.route.client_id
    device = device_peer(world, dev, peers)
    assert device.connect(world.proxy.ports["mqtt"]) == 0
    caplog.set_level(logging.INFO, "cloudconnector.proxy.azure")
    # Five distinct upstream filters, then a sixth; a wildcard shares devicebound/# with nobody yet.
    device.c.subscribe([(f"/c/{i}", 1) for i in range(6)])
    assert device.subacks.get(timeout=10) == [1, 1, 1, 1, 1, 0x80]
    refused = [r for r in caplog.records if getattr(r, "result", "") == "subscription_refused"]
    assert [r.getMessage() for r in refused] == ["refused 1 of 6 subscriptions: IoT Hub allows 5 at a time"]
    backend.publish(f"devices/{did}/messages/devicebound/c-4", b"fifth")
    assert device.receive().topic == "/c/4"
    # Subscribing again to one held, and unsubscribing, keep within the five.
    assert device.subscribe("/c/0", 1) == [1]
    device.c.unsubscribe("/c/0")
    assert device.subscribe("/c/5", 1) == [1]
