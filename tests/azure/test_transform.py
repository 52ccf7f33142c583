"""AzureTransform packet by packet: every rule of issue 4 on the proxy's transform hook."""

from __future__ import annotations

import pytest

from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.model import EndpointType, ObjectRef, TopicMapping
from cloudconnector.mqtt.packets import (
    MQTT_5,
    MQTT_31,
    MQTT_311,
    Connack,
    Connect,
    Disconnect,
    Pingreq,
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
    Will,
)
from cloudconnector.proxy.azure import AzureTransform
from cloudconnector.proxy.transform import Relay, TransformError, transform_for
from cloudconnector.routes import Route

HOST, DEV = "my-iot-hub.azure-devices.net", "4601234567890"
EV, DB = f"devices/{DEV}/messages/events/", f"devices/{DEV}/messages/devicebound/"
NO_KEY = KeyMaterial("cert", b"", None)


def route(mapping: TopicMapping = TopicMapping.FLATTEN) -> Route:
    return Route(
        device=ObjectRef("ns", "dev"),
        iccid="8946000000000000001",
        imsi=None,
        ip="127.0.0.9",
        endpoint_type=EndpointType.AZURE,
        host=HOST,
        port=8883,
        ca_pem=None,
        client_id=DEV,
        certificate_id="t1",
        topic_mapping=mapping,
    )


@pytest.fixture
def tx() -> AzureTransform:
    return AzureTransform(route())


def test_registered_for_azure_routes() -> None:
    assert isinstance(transform_for(route()), AzureTransform)


def test_connect_rewritten(tx: AzureTransform) -> None:
    out = tx.connect(
        Connect("whatever", MQTT_311, clean_start=False, keep_alive=300, username="u", password=b"p"), NO_KEY
    )
    assert out == Connect(
        DEV,
        MQTT_311,
        clean_start=False,
        keep_alive=300,
        username=f"{HOST}/{DEV}/?api-version=2021-04-12",
        password=None,
    )


def test_connect_31_goes_up_as_311(tx: AzureTransform) -> None:
    out = tx.connect(Connect("x", MQTT_31), NO_KEY)
    assert isinstance(out, Connect) and out.protocol_level == MQTT_311


def test_mqtt5_refused(tx: AzureTransform) -> None:
    assert tx.connect(Connect("x", MQTT_5), NO_KEY) == Connack(reason_code=0x84)


def test_will_mapped_to_events(tx: AzureTransform) -> None:
    out = tx.connect(Connect("x", will=Will("/last/words", b"bye", qos=2, retain=True)), NO_KEY)
    assert isinstance(out, Connect)
    assert out.will == Will(EV + "last-words", b"bye", qos=1, retain=False)
    refused = tx.connect(Connect("x", will=Will("/bad topic", b"")), NO_KEY)
    assert refused == Connack(reason_code=5)


def test_publish_qos0_1_and_retain(tx: AzureTransform) -> None:
    r = tx.from_device(Publish("/my/desired/topic", b"\x00payload", qos=1, retain=True, packet_id=7))
    assert r == Relay(to_cloud=(Publish(EV + "my-desired-topic", b"\x00payload", qos=1, packet_id=7),))
    # the hub's PUBACK goes back as is
    assert tx.from_cloud(Puback(7)) == Relay(to_device=(Puback(7),))


def test_publish_property_mapping() -> None:
    tx = AzureTransform(route(TopicMapping.PROPERTY))
    r = tx.from_device(Publish("/a b/c", b"x"))
    assert r.to_cloud == (Publish(EV + "mqtt-topic=%2Fa%20b%2Fc", b"x"),)


def test_qos2_completed_by_the_proxy(tx: AzureTransform) -> None:
    up = tx.from_device(Publish("/t", b"x", qos=2, packet_id=42))
    assert up == Relay(to_cloud=(Publish(EV + "t", b"x", qos=1, packet_id=42),))
    # PUBREC only once the hub has the message
    assert tx.from_cloud(Puback(42)) == Relay(to_device=(Pubrec(42),))
    assert tx.from_device(Pubrel(42)) == Relay(to_device=(Pubcomp(42),))
    assert tx.from_cloud(Puback(42)) == Relay(to_device=(Puback(42),))  # id free again


def test_bad_topics_end_the_session(tx: AzureTransform) -> None:
    with pytest.raises(TransformError, match="characters"):
        tx.from_device(Publish("/a&b", b""))
    with pytest.raises(TransformError, match="longer"):
        tx.from_device(Publish("/" + "x" * 5000, b""))
    with pytest.raises(TransformError):
        tx.from_device(Connect("again"))


def test_subscribe_maps_and_downgrades(tx: AzureTransform) -> None:
    sub = Subscribe(
        5,
        (
            Subscription("/my/cmd", 2),
            Subscription("/cfg/#", 1),
            Subscription("/x/+/y", 0),
            Subscription("/bad topic", 1),
            Subscription("$iothub/methods/POST/#", 0),
        ),
    )
    r = tx.from_device(sub)
    assert r.to_cloud == (
        Subscribe(
            5,
            (
                Subscription(DB + "my-cmd", 1),
                Subscription(DB + "#", 1),
                Subscription("$iothub/methods/POST/#", 0),
            ),
        ),
    )
    back = tx.from_cloud(Suback(5, (1, 1, 0)))
    assert back == Relay(to_device=(Suback(5, (1, 1, 0, 0x80, 0)),))


def test_subscribe_failure_from_the_hub(tx: AzureTransform) -> None:
    tx.from_device(Subscribe(1, (Subscription("/a", 1),)))
    assert tx.from_cloud(Suback(1, (0x80,))) == Relay(to_device=(Suback(1, (0x80,)),))
    assert list(tx.subs) == []


def test_subscribe_all_refused_locally(tx: AzureTransform) -> None:
    r = tx.from_device(Subscribe(2, (Subscription("/a=b", 0),)))
    assert r == Relay(to_device=(Suback(2, (0x80,)),))


def test_c2d_reverse_mapping_and_qos(tx: AzureTransform) -> None:
    tx.from_device(Subscribe(1, (Subscription("/my/cmd", 1), Subscription("/cfg/#", 0))))
    tx.from_cloud(Suback(1, (1, 0)))
    r = tx.from_cloud(Publish(DB + "my-cmd", b"go", qos=1, packet_id=9))
    assert r == Relay(to_device=(Publish("/my/cmd", b"go", qos=1, packet_id=9),))
    assert tx.from_device(Puback(9)) == Relay(to_cloud=(Puback(9),))
    r = tx.from_cloud(Publish(DB + "cfg-led", b"on"))
    assert r == Relay(to_device=(Publish("/cfg/led", b"on"),))
    # nobody wants it: acked upstream (no redelivery), not delivered
    assert tx.from_cloud(Publish(DB + "zzz", b"", qos=1, packet_id=3)) == Relay(to_cloud=(Puback(3),))


def test_twin_and_methods_pass_through(tx: AzureTransform) -> None:
    tx.from_device(Subscribe(1, (Subscription("$iothub/twin/res/#", 0),)))
    tx.from_cloud(Suback(1, (0,)))
    get = Publish("$iothub/twin/GET/?$rid=1", b"")
    assert tx.from_device(get) == Relay(to_cloud=(get,))
    res = Publish("$iothub/twin/res/200/?$rid=1", b"{}")
    assert tx.from_cloud(res) == Relay(to_device=(res,))


def test_unsubscribe(tx: AzureTransform) -> None:
    tx.from_device(Subscribe(1, (Subscription("/a/#", 1), Subscription("/b/+", 1), Subscription("/c", 1))))
    tx.from_cloud(Suback(1, (1, 1)))
    assert tx.from_device(Unsubscribe(2, ("/a/#",))) == Relay(to_device=(Unsuback(2),))
    assert tx.from_device(Unsubscribe(3, ("/b/+", "/c"))) == Relay(
        to_cloud=(Unsubscribe(3, (DB + "#", DB + "c")),)
    )
    assert tx.from_cloud(Unsuback(3)) == Relay(to_device=(Unsuback(3),))


def test_other_packets_relayed(tx: AzureTransform) -> None:
    assert tx.from_device(Pingreq()) == Relay(to_cloud=(Pingreq(),))
    assert tx.from_device(Disconnect()) == Relay(to_cloud=(Disconnect(),))
    assert tx.from_cloud(Connack()) == Relay(to_device=(Connack(),))
