"""The device <-> IoT Hub topic mapping, as a table and as round-trip properties."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloudconnector.model import TopicMapping
from cloudconnector.proxy.azure_topics import (
    MAX_TOPIC_BYTES,
    HubNames,
    Subscriptions,
    TopicError,
    d2c_topic,
    flatten,
    parse_property_bag,
    subscribe_filter,
    topic_matches,
)

HUB = HubNames("my-iot-hub.azure-devices.net", "4601234567890")
EV = "devices/4601234567890/messages/events/"
DB = "devices/4601234567890/messages/devicebound/"
F, P = TopicMapping.FLATTEN, TopicMapping.PROPERTY


def test_connect_names() -> None:
    assert HUB.username == "my-iot-hub.azure-devices.net/4601234567890/?api-version=2021-04-12"


@pytest.mark.parametrize(
    ("device", "mapping", "upstream"),
    [
        ("/my/desired/topic", F, EV + "my-desired-topic"),
        ("my/desired/topic", F, EV + "my-desired-topic"),
        ("/a//b/", F, EV + "a--b-"),
        ("sensor.temp_1", F, EV + "sensor.temp_1"),
        ("/my/desired/topic", P, EV + "mqtt-topic=%2Fmy%2Fdesired%2Ftopic"),
        ("/ä b&c=d", P, EV + "mqtt-topic=" + quote("/ä b&c=d", safe="")),
        ("$iothub/twin/GET/?$rid=1", F, "$iothub/twin/GET/?$rid=1"),
        ("$iothub/methods/res/200/?$rid=7", P, "$iothub/methods/res/200/?$rid=7"),
    ],
)
def test_publish_table(device: str, mapping: TopicMapping, upstream: str) -> None:
    assert d2c_topic(HUB, device, mapping) == upstream


@pytest.mark.parametrize(
    ("device", "mapping", "upstream"),
    [
        ("/my/cmd", F, DB + "my-cmd"),
        ("/my/+/cmd", F, DB + "#"),
        ("/my/#", F, DB + "#"),
        ("#", P, DB + "#"),
        ("/my/cmd", P, DB + "mqtt-topic=%2Fmy%2Fcmd"),
        ("$iothub/twin/res/#", F, "$iothub/twin/res/#"),
        ("$iothub/methods/POST/#", F, "$iothub/methods/POST/#"),
    ],
)
def test_subscribe_table(device: str, mapping: TopicMapping, upstream: str) -> None:
    assert subscribe_filter(HUB, device, mapping) == upstream


@pytest.mark.parametrize(
    ("topic", "why"),
    [
        ("", "empty"),
        ("/", "no name"),
        ("/a b", "characters"),
        ("/a&b", "characters"),
        ("/a=b", "characters"),
        ("/a%b", "characters"),
        ("/naïve", "characters"),
        ("/" + "x" * MAX_TOPIC_BYTES, "longer"),
        ("/a/+", "wildcards"),
        ("/a/#", "wildcards"),
    ],
)
def test_publish_refusals(topic: str, why: str) -> None:
    with pytest.raises(TopicError, match=why):
        d2c_topic(HUB, topic, F)


def test_property_mapping_refuses_only_length() -> None:
    with pytest.raises(TopicError, match="longer"):
        d2c_topic(HUB, "/" + "é" * (MAX_TOPIC_BYTES // 3), P)


@pytest.mark.parametrize("bad", ["/a/#/b", "/a/b+", "/a#"])
def test_bad_filters(bad: str) -> None:
    with pytest.raises(TopicError):
        subscribe_filter(HUB, bad, F)


def test_property_bag() -> None:
    assert parse_property_bag("a=1&b&%24.to=%2Fx&c=a+b") == [
        ("a", "1"),
        ("b", None),
        ("$.to", "/x"),
        ("c", "a+b"),
    ]


def test_reverse_exact_and_wildcard() -> None:
    subs = Subscriptions(HUB, F)
    assert subs.add("/my/cmd", 2) == DB + "my-cmd"
    assert subs.granted("/my/cmd") == 1
    assert subs.add("/cfg/#", 1) == DB + "#"
    assert subs.device_topic(DB + "my-cmd") == "/my/cmd"
    assert subs.device_topic(DB + "cfg-led") == "/cfg/led"
    assert subs.device_topic(DB + "other") is None
    assert subs.device_topic("devices/someone-else/messages/devicebound/my-cmd") is None
    # a message from the hub's own senders names no topic: the first exact subscription gets it
    assert subs.device_topic(DB + "%24.to=%2Fdevices%2F4601234567890%2Fmessages%2Fdevicebound") == "/my/cmd"


def test_reverse_property_and_passthrough() -> None:
    subs = Subscriptions(HUB, P)
    subs.add("/a/#", 0)
    subs.add("$iothub/methods/POST/#", 0)
    assert subs.device_topic(DB + "mqtt-topic=%2Fa%2Fb-c&x=1") == "/a/b-c"
    assert subs.device_topic(DB + "mqtt-topic=%2Fz") is None
    assert subs.device_topic("$iothub/methods/POST/reboot/?$rid=1") == "$iothub/methods/POST/reboot/?$rid=1"
    assert subs.device_topic("$iothub/twin/res/200/?$rid=1") is None


def test_unsubscribe_keeps_shared_upstream() -> None:
    subs = Subscriptions(HUB, F)
    subs.add("/a/#", 1)
    subs.add("/b/+", 1)
    subs.add("/c", 1)
    assert subs.remove("/a/#") is None  # /b/+ still needs devicebound/#
    assert subs.remove("/b/+") == DB + "#"
    assert subs.remove("/c") == DB + "c"
    assert subs.remove("/c") is None
    assert list(subs) == []


@pytest.mark.parametrize(
    ("f", "t", "expected"),
    [
        ("a/#", "a", True),
        ("a/+", "a/b", True),
        ("+/b", "/b", True),
        ("#", "$iothub/x", False),
        ("a/+", "a/b/c", False),
    ],
)
def test_topic_matches(f: str, t: str, expected: bool) -> None:
    assert topic_matches(f, t) is expected


_LEVEL = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00/+#"), max_size=12)
_TOPIC = st.lists(_LEVEL, min_size=1, max_size=6).map("/".join).filter(lambda t: t and not t.startswith("$"))
_FLAT_LEVEL = st.text(alphabet="abcXYZ019._~!*", min_size=1, max_size=8)


@given(_TOPIC)
def test_property_mapping_round_trips(topic: str) -> None:
    subs = Subscriptions(HUB, P)
    subs.add("#", 1)
    up = d2c_topic(HUB, topic, P)
    assert up.startswith(EV)
    # the same suffix under devicebound comes back as the device's topic
    assert subs.device_topic(DB + up[len(EV) :]) == topic


@given(st.lists(_FLAT_LEVEL, min_size=1, max_size=5), st.booleans())
def test_flatten_round_trips_without_dashes(levels: list[str], slash: bool) -> None:
    topic = ("/" if slash else "") + "/".join(levels)
    subs = Subscriptions(HUB, F)
    subs.add(topic, 1)
    assert flatten(topic) == "-".join(levels)
    assert subs.device_topic(d2c_topic(HUB, topic, F).replace(EV, DB)) == topic
