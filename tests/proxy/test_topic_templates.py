"""Topic templates (spec.topicTemplate): identical firmware, each device below its own prefix.

The broker here is shaped like AWS IoT Core with the default policy following the template
``fleet/{cloudId}/``: a device may only use ``fleet/<its thing name>/...`` (and its own ``$aws``
topics), which the ACL enforces by the certificate's CN, as AWS does by the thing name.
"""

from __future__ import annotations

import re
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloudconnector import schema, topic_template
from cloudconnector.clouds.aws_policy import policy_document
from cloudconnector.errors import InvalidSpec
from cloudconnector.model import AwsSpec, EndpointType, ObjectRef, parse_endpoint, parse_group
from cloudconnector.mqtt import codec
from cloudconnector.mqtt.packets import (
    MQTT_5,
    MQTT_311,
    Disconnect,
    PacketType,
    Publish,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
)
from cloudconnector.mqtt.properties import Prop, build_properties
from cloudconnector.proxy.topics import TopicPrefix
from cloudconnector.proxy.transform import Chain, Passthrough, transform_for
from cloudconnector.routes import Route, build_route
from tests.proxy.conftest import (
    ADMIN,
    Client,
    Pki,
    ProxyThread,
    World,
    broker_config,
    client_tls,
    proxy_config,
)
from tests.proxy.mqtt_raw import connect, props, read_one, send
from tests.support.kube import ApiError, Kube
from tests.support.procs import Mosquitto, free_port, run_mosquitto

TEMPLATE = "fleet/{cloudId}/"

ACL = f"""\
user {ADMIN}
topic readwrite #
topic readwrite $aws/#

pattern readwrite fleet/%u/#
pattern readwrite $aws/things/%u/#
"""


# ---------------------------------------------------------------- the syntax


@pytest.mark.parametrize(
    ("template", "fault"),
    [
        ("fleet/{cloudId}/", None),
        ("", None),
        ("{iccid}/", None),
        ("t/{namespace}/{group}/{device}/{imsi}/{thingName}/", None),
        ("fleet/{cloudId}", "must end with '/'"),
        ("/fleet/", "must not start with '/' or '$'"),
        ("$aws/things/{cloudId}/", "must not start with '/' or '$'"),
        ("fleet/+/", "must not contain '+'"),
        ("fleet/#/", "must not contain '#'"),
        ("fleet/{serial}/", "unknown placeholder {serial}"),
        ("fleet/{cloudId/", "unmatched"),
        ("a" * 200 + "/", "at most 200"),
    ],
)
def test_template_syntax_and_the_crd_pattern_agree(template: str, fault: str | None) -> None:
    matches = re.fullmatch(topic_template.CRD_PATTERN, template) is not None and len(template) <= 200
    if fault is None:
        assert topic_template.check(template) == template
        assert matches
    else:
        with pytest.raises(topic_template.TemplateError, match=re.escape(fault)):
            topic_template.check(template)
        assert not matches


def test_crd_pattern_is_the_one_in_both_crds() -> None:
    for kind in ("endpoints", "groups"):
        text = (Path(__file__).parents[2] / "crds" / f"{kind}.yaml").read_text()
        assert f"pattern: '{topic_template.CRD_PATTERN}'" in text


def _endpoint(template: str | None = TEMPLATE, etype: str = "AwsIotCore") -> dict[str, Any]:
    spec: dict[str, Any] = {"type": etype}
    if etype == "AwsIotCore":
        spec["aws"] = {"region": "eu-west-1", "dataEndpoint": "iot.example.com"}
    else:
        spec["mqtt"] = {"host": "mqtt.example.com"}
    if template is not None:
        spec["topicTemplate"] = template
    return {
        "apiVersion": "cloudconnector.io/v1alpha1",
        "kind": "Endpoint",
        "metadata": {"name": "ep", "namespace": "default"},
        "spec": spec,
        "status": {"phase": "Ready", "host": "iot.example.com", "port": 8883},
    }


def _group(template: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"endpointRef": {"name": "ep"}}
    if template is not None:
        spec["topicTemplate"] = template
    return {"apiVersion": "cloudconnector.io/v1alpha1", "kind": "Group", "metadata": {"name": "meters",
            "namespace": "plant"}, "spec": spec}  # fmt: skip


def _device(imsi: str | None = "262011234567890") -> dict[str, Any]:
    sim = {"iccid": "89353010000000000011"} | ({"imsi": imsi} if imsi else {})
    return {
        "metadata": {"name": "meter-7", "namespace": "plant"},
        "spec": {"group": "meters", "sim": sim, "ip": "10.0.0.5"},
        "status": {"phase": "Ready", "endpoint": "ep", "cloudId": "plant_meter-7"},
    }


def test_route_carries_the_expanded_prefix_group_overriding_endpoint() -> None:
    ep = _endpoint("t/{namespace}/{group}/{device}/{iccid}/{imsi}/{cloudId}/")
    route = build_route(_device(), _group(), ep)
    assert route is not None
    assert route.topic_prefix == "t/plant/meters/meter-7/89353010000000000011/262011234567890/plant_meter-7/"
    assert route.topic_error == ""
    overridden = build_route(_device(), _group("g/{thingName}/"), ep)
    assert overridden is not None and overridden.topic_prefix == "g/plant_meter-7/"
    off = build_route(_device(), _group(""), ep)
    assert off is not None and off.topic_prefix == "" and off.topic_error == ""
    plain = build_route(_device(), _group(), _endpoint(None))
    assert plain is not None and plain.topic_prefix == "" and plain.topic_error == ""
    # A placeholder the device has no value for: it is refused with that reason, not sent elsewhere.
    no_imsi = build_route(_device(imsi=None), _group(), _endpoint("f/{imsi}/"))
    assert no_imsi is not None and no_imsi.topic_prefix == ""
    assert no_imsi.topic_error == "topic template 'f/{imsi}/' uses {imsi}, which this device does not have"


def test_parsers_name_the_field() -> None:
    with pytest.raises(InvalidSpec, match=r"spec\.topicTemplate.*unknown placeholder \{sn\}"):
        parse_endpoint(_endpoint("x/{sn}/"))
    with pytest.raises(InvalidSpec, match=r"spec\.topicTemplate.*must end with '/'"):
        parse_group(_group("x"))
    assert parse_group(_group("")).topic_template == ""
    assert parse_group(_group()).topic_template is None


def test_api_server_validates_the_field(kube: Kube) -> None:
    ns = "default"
    for body in (_endpoint(TEMPLATE), _group(TEMPLATE), _group("")):
        body = {k: v for k, v in body.items() if k != "status"}
        body["metadata"] = {"name": "tt", "namespace": ns}
        kube.create(body, dry_run=True)
    for bad in ("fleet/{cloudId}", "/fleet/", "fleet/#/", "fleet/{serial}/", "$aws/x/"):
        for body in (_endpoint(bad), _group(bad)):
            body = {k: v for k, v in body.items() if k != "status"}
            body["metadata"] = {"name": "tt", "namespace": ns}
            with pytest.raises(ApiError) as refused:
                kube.create(body, dry_run=True)
            assert "spec.topicTemplate" in refused.value.message


def test_default_aws_policy_follows_the_template() -> None:
    arn = "arn:aws:iot:eu-west-1:123456789012:thing/plant_meter-7"
    base = "arn:aws:iot:eu-west-1:123456789012"

    def resources(spec: AwsSpec) -> dict[str, list[str]]:
        doc = policy_document(spec, arn)
        return {s["Action"]: s["Resource"] for s in doc["Statement"] if s["Action"] != "iot:Connect"}

    spec = parse_endpoint(_endpoint("fleet/{group}/{cloudId}/")).aws
    assert spec is not None and spec.topic_template == "fleet/{group}/{cloudId}/"
    below = "fleet/*/${iot:Connection.Thing.ThingName}/*"
    assert resources(spec) == {
        "iot:Publish": [f"{base}:topic/{below}"],
        "iot:Subscribe": [f"{base}:topicfilter/{below}"],
        "iot:Receive": [f"{base}:topic/{below}"],
    }
    # No template: the thing's own tree, as before; explicit topics: as written.
    plain = parse_endpoint(_endpoint(None)).aws
    assert plain is not None
    assert resources(plain)["iot:Publish"] == [f"{base}:topic/${{iot:Connection.Thing.ThingName}}/*"]
    explicit = replace(spec, publish_topics=("data/*",))
    assert resources(explicit)["iot:Publish"] == [f"{base}:topic/data/*"]
    assert resources(explicit)["iot:Subscribe"] == [f"{base}:topicfilter/{below}"]


# ---------------------------------------------------------------- which relay


def test_which_relay_each_session_gets() -> None:
    route = Route(
        device=ObjectRef("f", "d"),
        iccid="89353010000000000011",
        imsi=None,
        ip="10.0.0.9",
        endpoint_type=EndpointType.MQTT,
        host="h",
        port=8883,
        ca_pem=None,
        client_id="d",
        certificate_id="c",
    )
    assert isinstance(transform_for(route), Passthrough)  # plain broker: bytes only
    aws = transform_for(replace(route, endpoint_type=EndpointType.AWS))
    assert not aws.packet_relay and aws.divert  # bytes, SUBSCRIBEs aside (subscription limits)
    templated = transform_for(replace(route, topic_prefix="fleet/d/"))
    assert isinstance(templated, Chain) and not templated.packet_relay  # bytes framed, topics rewritten
    assert {PacketType.PUBLISH, PacketType.SUBSCRIBE, PacketType.UNSUBSCRIBE} <= templated.divert
    # Azure maps every packet itself: the template goes first, and no byte splice skips the mapping.
    azure = transform_for(replace(route, endpoint_type=EndpointType.AZURE, topic_prefix="fleet/d/"))
    assert isinstance(azure, Chain) and azure.packet_relay
    publish = codec.encode(Publish("telemetry", b"1"))
    assert azure.raw_publish(publish[0], publish[2:], True, MQTT_311) is None


def test_alias_only_publishes_keep_their_empty_topic_both_ways() -> None:
    route = Route(
        device=ObjectRef("f", "d"),
        iccid="89353010000000000011",
        imsi=None,
        ip=None,
        endpoint_type=EndpointType.MQTT,
        host="h",
        port=8883,
        ca_pem=None,
        client_id="d",
        certificate_id="c",
        topic_prefix="fleet/d/",
    )
    t = transform_for(route)
    alias = build_properties([(Prop.TOPIC_ALIAS, 3)])
    first = t.from_device(Publish("telemetry", b"1", properties=alias)).to_cloud[0]
    again = t.from_device(Publish("", b"2", properties=alias)).to_cloud[0]
    assert (first.topic, again.topic) == ("fleet/d/telemetry", "")  # type: ignore[union-attr]
    down = t.from_cloud(Publish("fleet/d/cmd", b"x", properties=alias)).to_device[0]
    down_again = t.from_cloud(Publish("", b"y", properties=alias)).to_device[0]
    assert (down.topic, down_again.topic) == ("cmd", "")  # type: ignore[union-attr]
    assert down.properties == alias  # type: ignore[union-attr]
    # Not below the prefix (left from another template, or a $ topic): delivered as it is.
    assert t.from_cloud(Publish("other/cmd")).to_device[0].topic == "other/cmd"  # type: ignore[union-attr]


# ---------------------------------------------------------------- through the proxy


@pytest.fixture(scope="module")
def fleet_broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    d = tmp_path_factory.mktemp("template-broker")
    for f in ("ca.crt", "broker.crt", "broker.key"):
        shutil.copy(pki.dir / f, d / f)
    (d / "acl").write_text(ACL)
    port = free_port()
    with run_mosquitto(broker_config(port, d), port) as broker:
        yield broker


@pytest.fixture
def fleet(pki: Pki, fleet_broker: Mosquitto) -> World:
    return World(pki, fleet_broker.port)


@pytest.fixture
def fleet_proxy(pki: Pki, fleet: World) -> Iterator[ProxyThread]:
    pt = ProxyThread(proxy_config(pki), fleet)
    try:
        yield pt
    finally:
        pt.close()


@pytest.fixture
def backend(pki: Pki, fleet_broker: Mosquitto) -> Iterator[Client]:
    c = Client(f"backend-{time.monotonic_ns()}", tls=client_tls(pki, pki.admin, "admin"), version=mqtt.MQTTv5)
    assert c.connect(fleet_broker.port, host="localhost") == 0
    try:
        yield c
    finally:
        c.close()


def templated(pt: ProxyThread, world: World, template: str = TEMPLATE) -> Route:
    route = world.add()
    route = replace(route, topic_prefix=template.replace("{cloudId}", route.client_id))
    pt.run(lambda: world.directory.put(route))
    return route


@pytest.mark.parametrize("version", [mqtt.MQTTv311, mqtt.MQTTv5], ids=["3.1.1", "5"])
def test_identical_firmware_lands_below_each_devices_prefix(
    fleet: World, fleet_proxy: ProxyThread, backend: Client, clients: list[Client], version: int
) -> None:
    routes = [templated(fleet_proxy, fleet) for _ in range(2)]
    backend.subscribe("fleet/+/telemetry", 1)
    devices = []
    for route in routes:
        device = Client("firmware-1.0", bind=route.ip or "", version=version)  # the same on every meter
        clients.append(device)
        assert device.connect(fleet_proxy.port) == 0
        assert device.subscribe("cmd", 1) == [1]
        assert device.subscribe("config/#", 1) == [1]
        devices.append(device)
    for n, device in enumerate(devices):
        device.publish("telemetry", f"reading {n}".encode())
    topics = {backend.expect().topic for _ in routes}
    assert topics == {f"fleet/{r.client_id}/telemetry" for r in routes}
    # Cloud to device: each on its own tree, delivered without the prefix, to that device only.
    backend.publish(f"fleet/{routes[1].client_id}/cmd", b"reboot")
    message = devices[1].expect()
    assert (message.topic, message.payload) == ("cmd", b"reboot")
    backend.publish(f"fleet/{routes[0].client_id}/config/interval", b"60")
    message = devices[0].expect()
    assert (message.topic, message.payload) == ("config/interval", b"60")
    assert devices[0].nothing() and devices[1].nothing()
    # UNSUBSCRIBE is rewritten the same way, so it really ends the subscription upstream.
    devices[1].c.unsubscribe("cmd")
    time.sleep(0.3)
    backend.publish(f"fleet/{routes[1].client_id}/cmd", b"again")
    assert devices[1].nothing()


def test_dollar_topics_pass_unchanged(
    fleet: World, fleet_proxy: ProxyThread, backend: Client, clients: list[Client]
) -> None:
    route = templated(fleet_proxy, fleet)
    shadow = f"$aws/things/{route.client_id}/shadow/update"
    backend.subscribe(shadow, 1)
    device = Client("firmware", bind=route.ip or "")
    clients.append(device)
    assert device.connect(fleet_proxy.port) == 0
    assert device.subscribe(f"$aws/things/{route.client_id}/shadow/update/accepted", 1) == [1]
    device.publish(shadow, b"{}")
    assert backend.expect().topic == shadow
    backend.publish(f"$aws/things/{route.client_id}/shadow/update/accepted", b"ok")
    assert device.expect().topic == f"$aws/things/{route.client_id}/shadow/update/accepted"


@pytest.mark.parametrize("version", [MQTT_311, MQTT_5], ids=["3.1.1", "5"])
def test_will_topic_is_rewritten(
    fleet: World, fleet_proxy: ProxyThread, backend: Client, version: int
) -> None:
    route = templated(fleet_proxy, fleet)
    backend.subscribe(f"fleet/{route.client_id}/#", 1)
    will_props = build_properties([(Prop.RESPONSE_TOPIC, "lwt/ack")]) if version == MQTT_5 else b""
    will = Will("status", b"gone", qos=1, properties=will_props)
    s, connack = connect(fleet_proxy.port, route.ip or "", version, "fw", will=will)
    assert connack.reason_code == 0
    s.shutdown(socket.SHUT_RDWR)  # no DISCONNECT: the broker publishes the Will
    s.close()
    got = backend.expect()
    assert (got.topic, got.payload) == (f"fleet/{route.client_id}/status", b"gone")
    if version == MQTT_5:
        assert got.properties.ResponseTopic == f"fleet/{route.client_id}/lwt/ack"


def test_mqtt5_response_topics_and_topic_aliases(
    fleet: World, fleet_proxy: ProxyThread, backend: Client
) -> None:
    route = templated(fleet_proxy, fleet)
    prefix = f"fleet/{route.client_id}/"
    backend.subscribe(prefix + "#", 1)
    s, connack = connect(fleet_proxy.port, route.ip or "", MQTT_5, "fw")
    assert connack.reason_code == 0
    assert props(connack.properties).get(Prop.TOPIC_ALIAS_MAXIMUM, 0) >= 1  # mosquitto takes aliases
    # A request with a Response Topic, then two PUBLISHes naming the topic only by alias.
    request = build_properties([(Prop.TOPIC_ALIAS, 1), (Prop.RESPONSE_TOPIC, "replies")])
    send(s, Publish("telemetry", b"first", qos=1, packet_id=1, properties=request))
    send(s, Publish("", b"second", qos=1, packet_id=2, properties=build_properties([(Prop.TOPIC_ALIAS, 1)])))
    send(s, Publish("", b"third", qos=0, properties=build_properties([(Prop.TOPIC_ALIAS, 1)])))
    acks = {read_one(s, MQTT_5).packet_id for _ in range(2)}  # type: ignore[union-attr]
    assert acks == {1, 2}
    first, second, third = backend.expect(), backend.expect(), backend.expect()
    assert [m.topic for m in (first, second, third)] == [prefix + "telemetry"] * 3
    assert [m.payload for m in (first, second, third)] == [b"first", b"second", b"third"]
    assert first.properties.ResponseTopic == prefix + "replies"
    # The cloud's request names a reply topic below the prefix: the device sees it without.
    send(s, Subscribe(3, (Subscription("cmd", 1),)))
    suback = read_one(s, MQTT_5)
    assert isinstance(suback, Suback) and suback.reason_codes == (1,)
    request_props = Properties(PacketTypes.PUBLISH)
    request_props.ResponseTopic = prefix + "answers"
    backend.c.publish(prefix + "cmd", b"ping", 1, properties=request_props)
    delivered = read_one(s, MQTT_5)
    assert isinstance(delivered, Publish) and delivered.topic == "cmd" and delivered.payload == b"ping"
    assert props(delivered.properties)[Prop.RESPONSE_TOPIC] == "answers"
    send(s, Unsubscribe(4, ("cmd",)))
    unsuback = read_one(s, MQTT_5)
    assert isinstance(unsuback, Unsuback) and unsuback.reason_codes == (0,)  # it existed upstream
    s.close()


def test_device_the_template_cannot_be_expanded_for_is_refused(
    fleet: World, fleet_proxy: ProxyThread, caplog: pytest.LogCaptureFixture
) -> None:
    route = fleet.add()
    why = "topic template 'f/{imsi}/' uses {imsi}, which this device does not have"
    route = replace(route, topic_error=why)
    fleet_proxy.run(lambda: fleet.directory.put(route))
    s, connack = connect(fleet_proxy.port, route.ip or "", MQTT_311, "fw")
    assert connack.reason_code == 5  # not authorized
    s.close()
    assert any("uses {imsi}, which this device does not have" in r.getMessage() for r in caplog.records)


def test_subscribe_split_and_template_compose(
    fleet: World, fleet_proxy: ProxyThread, backend: Client
) -> None:
    route = templated(fleet_proxy, fleet)
    s, connack = connect(fleet_proxy.port, route.ip or "", MQTT_311, "fw")
    assert connack.reason_code == 0
    send(s, Subscribe(9, tuple(Subscription(f"t/{i}", 1) for i in range(12))), MQTT_311)
    suback = read_one(s, MQTT_311)
    assert isinstance(suback, Suback) and suback.packet_id == 9 and suback.reason_codes == (1,) * 12
    backend.publish(f"fleet/{route.client_id}/t/11", b"last")
    got = read_one(s, MQTT_311)
    assert isinstance(got, Publish) and got.topic == "t/11"
    send(s, Disconnect(), MQTT_311)
    s.close()


def test_a_changed_template_ends_the_live_session(
    fleet: World, fleet_proxy: ProxyThread, backend: Client, clients: list[Client]
) -> None:
    route = templated(fleet_proxy, fleet)
    device = Client("firmware", bind=route.ip or "")
    clients.append(device)
    assert device.connect(fleet_proxy.port) == 0
    changed = replace(route, topic_prefix=f"fleet/{route.client_id}/v2/")
    fleet_proxy.run(lambda: fleet.directory.put(changed))
    device.disconnects.get(timeout=10)  # the session is ended; a reconnect gets the new prefix
    backend.subscribe(f"fleet/{route.client_id}/v2/#", 1)
    device.close()
    device = Client("firmware", bind=route.ip or "")
    clients.append(device)
    assert device.connect(fleet_proxy.port) == 0
    device.publish("telemetry", b"v2")
    assert backend.expect().topic == f"fleet/{route.client_id}/v2/telemetry"


def test_standalone_validation_explains_the_template_in_words() -> None:
    # What cloud-connector run and validate say for a manifest no API server checked.
    for body in (_endpoint("fleet/{serial}/"), _group("fleet")):
        body = {k: v for k, v in body.items() if k != "status"}
        errors = {e.path: e.message for e in schema.validate(body)}
        assert errors["spec.topicTemplate"].startswith("must be a topic prefix ending in '/'")
    assert schema.validate({k: v for k, v in _endpoint().items() if k != "status"}) == []


@pytest.mark.parametrize("level", [MQTT_311, MQTT_5], ids=["3.1.1", "5"])
def test_the_byte_splice_agrees_with_decoding(level: int) -> None:
    route = Route(
        device=ObjectRef("f", "d"),
        iccid="89353010000000000011",
        imsi=None,
        ip=None,
        endpoint_type=EndpointType.AWS,
        host="h",
        port=8883,
        ca_pem=None,
        client_id="d",
        certificate_id="c",
        topic_prefix="fleet/dévice/",  # not ASCII: lengths are bytes
    )
    t = transform_for(route)
    assert isinstance(t, Chain)
    cases = [
        (True, Publish("telemetry", b"x" * 200, 0)),
        (True, Publish("a/b", b"", 1, retain=True, packet_id=7)),
        (True, Publish("$aws/things/d/shadow/update", b"{}", 1, packet_id=8)),
        (False, Publish("fleet/dévice/cmd", b"go", 1, dup=True, packet_id=9)),
        (False, Publish("other/cmd", b"as is", 0)),
        (False, Publish("fleet/dévice/", b"the prefix alone stays", 0)),
    ]
    for up, packet in cases:
        raw = codec.encode(packet, level)
        spliced = t.raw_publish(raw[0], codec_body(raw), up, level)
        relay = t.from_device(packet) if up else t.from_cloud(packet)
        decoded = relay.to_cloud if up else relay.to_device
        assert spliced == codec.encode(decoded[0], level), packet
    # With MQTT 5 properties (a Response Topic may be among them) only decoding will do.
    with_props = codec.encode(
        Publish("t", b"", 0, properties=build_properties([(Prop.TOPIC_ALIAS, 1)])), MQTT_5
    )
    assert t.raw_publish(with_props[0], codec_body(with_props), True, MQTT_5) is None


def codec_body(raw: bytes) -> bytes:
    """The body of one encoded packet (after the fixed header and its remaining length)."""
    i = 1
    while raw[i] & 0x80:
        i += 1
    return raw[i + 1 :]


def test_filters_are_rewritten_shared_subscriptions_by_their_filter_part() -> None:
    t = TopicPrefix("fleet/d/")
    assert [t.up_filter(f) for f in ("#", "+/cmd", "$share/g/cmd/#", "$aws/things/d/#", "$share/bad")] == [
        "fleet/d/#",
        "fleet/d/+/cmd",
        "$share/g/fleet/d/cmd/#",
        "$aws/things/d/#",
        "$share/bad",
    ]
    assert t.down("fleet/d/cmd") == "cmd" and t.down("fleet/d/") == "fleet/d/" and t.down("x") == "x"
