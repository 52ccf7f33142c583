"""AWS IoT Core's subscription limits kept by the proxy: 8 filters per SUBSCRIBE, 50 per connection.

Through the proxy to the AWS-shaped mosquitto of conftest.py (which has neither limit, so what it
receives shows what the proxy sent: its log lists every SUBSCRIBE with its filters).
"""

from __future__ import annotations

import logging
import re
import socket
import time

import pytest

from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.model import EndpointType
from cloudconnector.mqtt import codec
from cloudconnector.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    Connect,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
)
from cloudconnector.proxy.divert import DivertScanner
from cloudconnector.proxy.subscriptions import LIMITS, SubscriptionLimits
from cloudconnector.routes import Route
from tests.proxy.conftest import Client, ProxyThread, World, broker_log
from tests.proxy.mqtt_raw import connect, metric, read_one, send
from tests.support.procs import Mosquitto

QUOTA_EXCEEDED = 0x97
MESSAGES = "cloudconnector_proxy_messages_total"


def log_mark(broker: Mosquitto) -> int:
    return len(broker_log(broker).splitlines())


def subscribes_received(broker: Mosquitto, client_id: str, since: int) -> list[list[str]]:
    """The filters of each SUBSCRIBE the broker got from ``client_id`` after line ``since``."""
    out: list[list[str]] = []
    lines = broker_log(broker).splitlines()[since:]
    for i, line in enumerate(lines):
        if line.endswith(f"Received SUBSCRIBE from {client_id}"):
            filters = []
            for follow in lines[i + 1 :]:
                if m := re.search(r"\t(\S+) \(QoS \d\)$", follow):
                    filters.append(m.group(1))
                elif not re.search(rf": {re.escape(client_id)} \d+ ", follow):
                    break  # mosquitto logs each granted filter on a line of its own
            out.append(filters)
    return out


def open_device(proxy: ProxyThread, route: Route, version: int) -> socket.socket:
    s, connack = connect(proxy.port, route.ip or "", version, "firmware")
    assert connack.reason_code == 0
    return s


def subscribe(s: socket.socket, pid: int, filters: list[str], version: int) -> Suback:
    send(s, Subscribe(pid, tuple(Subscription(f, 1) for f in filters)), version)
    answer = read_one(s, version)
    assert isinstance(answer, Suback)
    return answer


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5], ids=["3.1.1", "5"])
def test_a_wide_subscribe_is_split_and_answered_once(
    world: World, proxy: ProxyThread, broker: Mosquitto, admin: Client, version: int
) -> None:
    route = world.add()
    mark = log_mark(broker)
    s = open_device(proxy, route, version)
    filters = [f"{route.client_id}/t/{i}" for i in range(20)]
    suback = subscribe(s, 77, filters, version)
    assert suback.packet_id == 77 and suback.reason_codes == (1,) * 20
    time.sleep(0.2)  # the broker's log line is written after its SUBACK
    assert subscribes_received(broker, route.client_id, mark) == [filters[:8], filters[8:16], filters[16:]]
    admin.publish(f"{route.client_id}/t/19", b"to the last filter")
    got = read_one(s, version)
    assert isinstance(got, Publish) and got.payload == b"to the last filter"
    # UNSUBSCRIBE is split the same way; MQTT 5 gets one code per filter in one UNSUBACK.
    send(s, Unsubscribe(78, tuple(filters)), version)
    unsuback = read_one(s, version)
    assert isinstance(unsuback, Unsuback) and unsuback.packet_id == 78
    assert unsuback.reason_codes == ((0,) * 20 if version == MQTT_5 else ())
    admin.publish(f"{route.client_id}/t/19", b"nobody")
    send(s, Publish(f"{route.client_id}/x", b"p", 1, packet_id=79), version)
    ack = read_one(s, version)  # the PUBACK, and no message on an unsubscribed filter before it
    assert isinstance(ack, Puback) and ack.packet_id == 79
    s.close()


@pytest.mark.parametrize(
    ("version", "refused"), [(MQTT_311, 0x80), (MQTT_5, QUOTA_EXCEEDED)], ids=["3.1.1", "5"]
)
def test_the_51st_subscription_is_refused_and_logged(
    world: World,
    proxy: ProxyThread,
    broker: Mosquitto,
    version: int,
    refused: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    route = world.add()
    mark = log_mark(broker)
    s = open_device(proxy, route, version)
    filters = [f"{route.client_id}/f/{i}" for i in range(50)]
    assert subscribe(s, 1, filters, version).reason_codes == (1,) * 50
    caplog.set_level(logging.INFO, "cloudconnector.proxy")
    # Subscribing again to a held filter replaces it; a new one would be the 51st.
    again = subscribe(s, 2, [filters[0], f"{route.client_id}/f/new"], version)
    assert again.packet_id == 2 and again.reason_codes == (1, refused)
    only_new = subscribe(s, 3, [f"{route.client_id}/f/new"], version)
    assert only_new.reason_codes == (refused,)
    lines = [r for r in caplog.records if getattr(r, "result", "") == "subscription_refused"]
    assert len(lines) == 2 and lines[0].getMessage() == (
        "refused 1 of 2 subscriptions: the cloud allows 50 per connection"
    )
    assert getattr(lines[0], "device", "") == str(route.device)
    time.sleep(0.2)
    sent = [f for sub in subscribes_received(broker, route.client_id, mark) for f in sub]
    assert len(sent) == 51  # the 50, and the first again
    assert f"{route.client_id}/f/new" not in sent  # never reached the cloud
    # An UNSUBSCRIBE frees a place.
    send(s, Unsubscribe(4, (filters[49],)), version)
    assert isinstance(read_one(s, version), Unsuback)
    assert subscribe(s, 5, [f"{route.client_id}/f/new"], version).reason_codes == (1,)
    s.close()


def test_a_filter_the_cloud_refuses_does_not_count(world: World) -> None:
    # mosquitto grants what its ACL forbids, so the cloud's refusal is played here at packet level.
    limits = SubscriptionLimits(world.add(ready=False), LIMITS[EndpointType.AWS])
    limits.connect(Connect("d", MQTT_311), KeyMaterial("", b""))
    up = limits.from_device(Subscribe(1, (Subscription("ok", 1), Subscription("forbidden", 1))))
    assert up.to_cloud == (Subscribe(1, (Subscription("ok", 1), Subscription("forbidden", 1))),)
    down = limits.from_cloud(Suback(1, (1, 0x80)))
    assert down.to_device == (Suback(1, (1, 0x80)),)
    assert limits.filters == {"ok"}
    limits.from_device(Subscribe(2, tuple(Subscription(f"f/{i}", 1) for i in range(49))))
    for part in range(7):  # 49 filters: 6 parts of 8 and one of 1, one after the other
        relay = limits.from_cloud(Suback(2, (1,) * (8 if part < 6 else 1)))
    assert relay.to_device == (Suback(2, (1,) * 49),)
    refused = limits.from_device(Subscribe(3, (Subscription("one-more", 1),)))
    assert refused.to_device == (Suback(3, (0x80,)),) and not refused.to_cloud


def test_publishes_around_a_split_subscribe_stay_in_order(
    world: World, proxy: ProxyThread, admin: Client
) -> None:
    route = world.add()
    admin.subscribe(f"{route.client_id}/#", 1)
    s = open_device(proxy, route, MQTT_311)
    stream = b"".join(
        [
            codec.encode(Publish(f"{route.client_id}/before", b"1", 1, packet_id=1)),
            codec.encode(Subscribe(2, tuple(Subscription(f"{route.client_id}/s/{i}", 1) for i in range(10)))),
            codec.encode(Publish(f"{route.client_id}/after", b"2", 1, packet_id=3)),
        ]
    )
    for i in range(len(stream)):  # one byte at a time: every split of headers and bodies
        s.sendall(stream[i : i + 1])
    answers = [read_one(s, MQTT_311) for _ in range(3)]
    by_id = {a.packet_id: a for a in answers}  # type: ignore[union-attr]
    assert isinstance(by_id[1], Puback) and isinstance(by_id[3], Puback)
    assert isinstance(by_id[2], Suback) and by_id[2].reason_codes == (1,) * 10
    assert [admin.expect().topic for _ in range(2)] == [
        f"{route.client_id}/before",
        f"{route.client_id}/after",
    ]
    s.close()


@pytest.mark.parametrize("step", [1, 7, 10_000], ids=["bytes", "chunks", "whole"])
def test_scanner_cuts_out_only_the_diverted_packets(step: int) -> None:
    seen: list[tuple[int, bytes]] = []

    def handle(header: int, body: bytes) -> tuple[list[bytes], list[bytes]]:
        seen.append((header, bytes(body)))
        return [b"<own>"], [b"<other>"]

    scanner = DivertScanner(1000, frozenset({8}), handle, drop_oversized=True)
    other = DivertScanner(1000, frozenset(), handle, drop_oversized=True)
    scanner.other = other
    publish = codec.encode(Publish("t", b"x" * 300, 0))
    sub = codec.encode(Subscribe(5, (Subscription("a", 1),)))
    big = codec.encode(Publish("t", b"y" * 2000, 0))
    stream = publish + sub + big + publish + sub
    out = b""
    count = 0
    for i in range(0, len(stream), step):
        n, data = scanner.feed(stream[i : i + step])
        count += n
        out += data
    assert out == publish + b"<own>" + publish + b"<own>"
    assert count == 2 and scanner.dropped == 1 and scanner.last_dropped == len(big)
    assert seen == [(sub[0], sub[2:])] * 2
    assert other.pending == [b"<other>"] * 2


def test_counters_of_a_live_session_are_flushed(world: World, proxy: ProxyThread, admin: Client) -> None:
    # The AWS relay counts like the byte relay: PUBLISH both ways, at least once a second while live.
    route = world.add()
    admin.subscribe(f"{route.client_id}/#", 1)
    s = open_device(proxy, route, MQTT_311)
    assert subscribe(s, 1, [f"{route.client_id}/in"], MQTT_311).reason_codes == (1,)
    before_up = metric(proxy, MESSAGES, direction="device_to_cloud")
    before_down = metric(proxy, MESSAGES, direction="cloud_to_device")
    send(s, Publish(f"{route.client_id}/out", b"1", 1, packet_id=2), MQTT_311)
    assert isinstance(read_one(s, MQTT_311), Puback)
    admin.publish(f"{route.client_id}/in", b"2")
    assert isinstance(read_one(s, MQTT_311), Publish)
    time.sleep(1.1)  # past the flush interval; the next chunk each way flushes
    send(s, Publish(f"{route.client_id}/out", b"3", 0), MQTT_311)
    admin.publish(f"{route.client_id}/in", b"4", qos=0)
    assert isinstance(read_one(s, MQTT_311), Publish)
    time.sleep(0.2)
    assert metric(proxy, MESSAGES, direction="device_to_cloud") - before_up >= 2
    assert metric(proxy, MESSAGES, direction="cloud_to_device") - before_down >= 2
    s.close()
