"""What the CRD schemas accept and reject, as seen through cloudconnector.schema.validate: the
examples pass, each counter-example is rejected naming the right field, and the CEL rules (run by a
real CEL interpreter) agree with their Python mirrors."""

from __future__ import annotations

import copy
from typing import Any

import celpy
import pytest

from cloudconnector import api, schema
from cloudconnector.errors import InvalidSpec
from cloudconnector.model import parse_device, parse_endpoint, parse_group
from tests.crds.conftest import DELETE, EXAMPLES, changed, crd_documents, root_schema
from tests.support.kube import ApiError, Kube

PARSERS = {"Endpoint": parse_endpoint, "Group": parse_group, "Device": parse_device}

# (case id, base fixture, field to change, new value, field the error must name)
COUNTER_EXAMPLES: list[tuple[str, str, str, object, str]] = [
    # Device
    ("iccid too short", "device", "spec.sim.iccid", "89353012345678", "spec.sim.iccid"),
    ("iccid too long", "device", "spec.sim.iccid", "8" * 23, "spec.sim.iccid"),
    ("iccid with letters", "device", "spec.sim.iccid", "89353012345678901AB", "spec.sim.iccid"),
    ("iccid as a YAML number", "device", "spec.sim.iccid", 8935301234567890123, "spec.sim.iccid"),
    ("missing iccid", "device", "spec.sim.iccid", DELETE, "spec.sim.iccid"),
    ("missing sim", "device", "spec.sim", DELETE, "spec.sim"),
    ("imsi of 14 digits", "device", "spec.sim.imsi", "23430123456789", "spec.sim.imsi"),
    ("imsi of 16 digits", "device", "spec.sim.imsi", "2343012345678901", "spec.sim.imsi"),
    ("ip out of range", "device", "spec.ip", "10.64.0.300", "spec.ip"),
    ("ip with a prefix length", "device", "spec.ip", "10.64.0.0/24", "spec.ip"),
    ("ip is a host name", "device", "spec.ip", "meter.local", "spec.ip"),
    ("ipv6 with two ::", "device", "spec.ip", "fd00::64::19", "spec.ip"),
    ("ipv4 with leading zeros", "device", "spec.ip", "010.064.000.017", "spec.ip"),
    ("one ipv4 octet with a leading zero", "device", "spec.ip", "10.64.0.017", "spec.ip"),
    ("missing group", "device", "spec.group", DELETE, "spec.group"),
    ("empty group", "device", "spec.group", "", "spec.group"),
    ("group not a DNS name", "device", "spec.group", "Meters_A", "spec.group"),
    ("cloudId too long", "device", "spec.cloudId", "m" * 129, "spec.cloudId"),
    ("cloudId with a slash", "device", "spec.cloudId", "fleet/meter", "spec.cloudId"),
    ("cloudId empty", "device", "spec.cloudId", "", "spec.cloudId"),
    ("secret ref without name", "device", "spec.credentialsSecretRef", {}, "spec.credentialsSecretRef.name"),
    (
        "secret ref not a DNS name",
        "device",
        "spec.credentialsSecretRef",
        {"name": "My Secret"},
        "spec.credentialsSecretRef.name",
    ),
    (
        "registerCertificate without a Secret",
        "device",
        "spec.registerCertificate",
        False,
        "spec.registerCertificate",
    ),
    (
        "registerCertificate as text",
        "device",
        "spec.registerCertificate",
        "yes please",
        "spec.registerCertificate",
    ),
    ("unknown spec field", "device", "spec.iccid", "8935301234567890123", "spec.iccid"),
    ("misspelt sim field", "device", "spec.sim.iccd", "8935301234567890123", "spec.sim.iccd"),
    ("missing spec", "device", "spec", DELETE, "spec"),
    ("bad status phase", "device", "status", {"phase": "Done"}, "status.phase"),
    ("bad status time", "device", "status", {"notAfter": "next tuesday"}, "status.notAfter"),
    ("name not a DNS name", "device", "metadata.name", "Meter_0001", "metadata.name"),
    ("missing name", "device", "metadata.name", DELETE, "metadata.name"),
    ("namespace not a DNS label", "device", "metadata.namespace", "fleet.eu", "metadata.namespace"),
    ("wrong apiVersion", "device", "apiVersion", "cloudconnector.io/v1", "apiVersion"),
    ("wrong kind", "device", "kind", "Thing", "kind"),
    # Group
    ("missing endpointRef", "group", "spec.endpointRef", DELETE, "spec.endpointRef"),
    ("endpointRef without name", "group", "spec.endpointRef", {}, "spec.endpointRef.name"),
    ("endpointRef name too long", "group", "spec.endpointRef", {"name": "e" * 254}, "spec.endpointRef.name"),
    ("negative total", "group", "status", {"total": -1}, "status.total"),
    # Endpoint
    ("unknown type", "aws_endpoint", "spec.type", "GoogleCloudIot", "spec.type"),
    ("missing type", "aws_endpoint", "spec.type", DELETE, "spec.type"),
    ("type lower case", "aws_endpoint", "spec.type", "awsiotcore", "spec.type"),
    ("AWS without aws section", "aws_endpoint", "spec.aws", DELETE, "spec.aws"),
    ("AWS with an azure section", "aws_endpoint", "spec.azure", {"hostName": "h.example"}, "spec.azure"),
    ("Azure with an aws section", "azure_endpoint", "spec.aws", {"region": "eu-west-1"}, "spec.aws"),
    ("Azure without azure section", "azure_endpoint", "spec.azure", DELETE, "spec.azure"),
    ("MQTT without mqtt section", "mqtt_endpoint", "spec.mqtt", DELETE, "spec.mqtt"),
    ("MQTT with an aws section", "mqtt_endpoint", "spec.aws", {"region": "eu-west-1"}, "spec.aws"),
    ("port 0", "aws_endpoint", "spec.port", 0, "spec.port"),
    ("port 65536", "aws_endpoint", "spec.port", 65536, "spec.port"),
    ("port as text", "aws_endpoint", "spec.port", "8883", "spec.port"),
    (
        "negative rate",
        "aws_endpoint",
        "spec.rateLimit",
        {"devicesPerSecond": -5},
        "spec.rateLimit.devicesPerSecond",
    ),
    (
        "zero rate",
        "aws_endpoint",
        "spec.rateLimit",
        {"devicesPerSecond": 0},
        "spec.rateLimit.devicesPerSecond",
    ),
    (
        "rate above 1000",
        "aws_endpoint",
        "spec.rateLimit",
        {"devicesPerSecond": 1001},
        "spec.rateLimit.devicesPerSecond",
    ),
    ("missing region", "aws_endpoint", "spec.aws", {}, "spec.aws.region"),
    ("region with spaces", "aws_endpoint", "spec.aws", {"region": "EU West"}, "spec.aws.region"),
    (
        "aws secret ref not a DNS name",
        "aws_endpoint",
        "spec.aws",
        {"region": "eu-west-1", "credentialsSecretRef": {"name": "AWS_KEYS"}},
        "spec.aws.credentialsSecretRef.name",
    ),
    (
        "thingPrefix with a slash",
        "aws_endpoint",
        "spec.aws",
        {"region": "eu-west-1", "thingPrefix": "a/b"},
        "spec.aws.thingPrefix",
    ),
    (
        "endpointUrl not a URL",
        "aws_endpoint",
        "spec.aws",
        {"region": "eu-west-1", "endpointUrl": "iot.eu-west-1"},
        "spec.aws.endpointUrl",
    ),
    (
        "unknown policy mode",
        "aws_endpoint",
        "spec.aws",
        {"region": "eu-west-1", "policy": {"mode": "Everything"}},
        "spec.aws.policy.mode",
    ),
    (
        "empty publish topic",
        "aws_endpoint",
        "spec.aws",
        {"region": "eu-west-1", "policy": {"publishTopics": [""]}},
        "spec.aws.policy.publishTopics[0]",
    ),
    (
        "too many publish topics",
        "aws_endpoint",
        "spec.aws",
        {"region": "eu-west-1", "policy": {"publishTopics": [f"t/{i}" for i in range(51)]}},
        "spec.aws.policy.publishTopics",
    ),
    ("missing hostName", "azure_endpoint", "spec.azure", {}, "spec.azure.hostName"),
    (
        "hostName with a path",
        "azure_endpoint",
        "spec.azure",
        {"hostName": "hub.azure-devices.net/x"},
        "spec.azure.hostName",
    ),
    (
        "validity 0 days",
        "azure_endpoint",
        "spec.azure",
        {"hostName": "hub.azure-devices.net", "certificateValidityDays": 0},
        "spec.azure.certificateValidityDays",
    ),
    (
        "validity over ten years",
        "azure_endpoint",
        "spec.azure",
        {"hostName": "hub.azure-devices.net", "certificateValidityDays": 3651},
        "spec.azure.certificateValidityDays",
    ),
    (
        "unknown topic mapping",
        "azure_endpoint",
        "spec.azure",
        {"hostName": "hub.azure-devices.net", "topicMapping": "Slashes"},
        "spec.azure.topicMapping",
    ),
    ("missing mqtt host", "mqtt_endpoint", "spec.mqtt", {}, "spec.mqtt.host"),
    ("ca certificate too large", "mqtt_endpoint", "spec.caCertificate", "x" * 65537, "spec.caCertificate"),
    ("bad endpoint phase", "aws_endpoint", "status", {"phase": "Ready!"}, "status.phase"),
    (
        "bad condition status",
        "aws_endpoint",
        "status",
        {"conditions": [{"type": "Ready", "status": "Yes"}]},
        "status.conditions[0].status",
    ),
    (
        "condition without type",
        "aws_endpoint",
        "status",
        {"conditions": [{"status": "True"}]},
        "status.conditions[0].type",
    ),
]


def _example_objects() -> list[tuple[str, dict[str, Any]]]:
    manifests, errors = schema.read_manifests(EXAMPLES)
    assert errors == []
    return [(f"{m.file.name}:{m}", dict(m.obj)) for m in manifests]


EXAMPLE_OBJECTS = _example_objects()
CUSTOM_EXAMPLES = [(label, obj) for label, obj in EXAMPLE_OBJECTS if obj["kind"] in api.PLURALS]


def test_examples_cover_every_kind_and_endpoint_type() -> None:
    kinds = {obj["kind"] for _, obj in EXAMPLE_OBJECTS}
    assert kinds == {"Endpoint", "Group", "Device", "Secret"}
    types = {obj["spec"]["type"] for _, obj in EXAMPLE_OBJECTS if obj["kind"] == "Endpoint"}
    assert types == {"AwsIotCore", "AzureIotHub", "MqttBroker"}
    assert any("credentialsSecretRef" in obj["spec"] for _, obj in EXAMPLE_OBJECTS if obj["kind"] == "Device")


@pytest.mark.parametrize(("label", "obj"), CUSTOM_EXAMPLES, ids=[label for label, _ in CUSTOM_EXAMPLES])
def test_example_is_valid_and_parses(label: str, obj: dict[str, Any]) -> None:
    assert schema.validate(obj) == []
    schema.check(obj)
    PARSERS[obj["kind"]](obj)


def test_example_references_resolve() -> None:
    """Groups name Endpoints and Devices name Groups that the examples define."""
    names = {(obj["kind"], obj["metadata"]["name"]) for _, obj in EXAMPLE_OBJECTS}
    for _, obj in CUSTOM_EXAMPLES:
        if obj["kind"] == "Group":
            assert ("Endpoint", obj["spec"]["endpointRef"]["name"]) in names
        if obj["kind"] == "Device":
            assert ("Group", obj["spec"]["group"]) in names


def test_example_devices_have_unique_sim_identities() -> None:
    devices = [obj["spec"] for _, obj in CUSTOM_EXAMPLES if obj["kind"] == "Device"]
    iccids = [d["sim"]["iccid"] for d in devices]
    ips = [d["ip"] for d in devices if "ip" in d]
    assert len(set(iccids)) == len(iccids)
    assert len(set(ips)) == len(ips)


def test_example_secrets_hold_placeholders_only() -> None:
    secrets = [obj for _, obj in EXAMPLE_OBJECTS if obj["kind"] == "Secret"]
    assert {s["metadata"]["name"] for s in secrets} >= {"aws-iam", "azure-registry", "meter-0100-tls"}
    for secret in secrets:
        assert "data" not in secret  # plain stringData, so a reader sees that nothing real is in it
        for key, value in secret["stringData"].items():
            assert "REPLACE-WITH" in value, f"{secret['metadata']['name']}.{key} looks like a real value"
    for path in EXAMPLES.iterdir():
        assert "-----BEGIN" not in path.read_text(), f"{path.name} holds a PEM block"


@pytest.mark.parametrize(
    ("case", "base", "field", "value", "expected"),
    COUNTER_EXAMPLES,
    ids=[c[0] for c in COUNTER_EXAMPLES],
)
def test_counter_example_is_rejected_naming_the_field(
    request: pytest.FixtureRequest, case: str, base: str, field: str, value: object, expected: str
) -> None:
    good = request.getfixturevalue(base)
    assert schema.validate(good) == []
    errors = schema.validate(changed(good, field, value))
    assert errors, f"{case}: accepted"
    assert expected in {e.path for e in errors}, [str(e) for e in errors]
    for error in errors:
        assert error.message and "\n" not in error.message
    with pytest.raises(InvalidSpec) as raised:
        schema.check(changed(good, field, value))
    assert raised.value.field == errors[0].path


def test_messages_are_in_plain_words(device: dict[str, Any]) -> None:
    bad = changed(changed(device, "spec.sim.iccid", "123"), "spec.ip", "10.64.0.300")
    messages = {e.path: e.message for e in schema.validate(bad)}
    assert messages["spec.sim.iccid"].startswith("must be 18 to 22 digits")
    assert messages["spec.ip"].startswith("must be an IPv4 address or an IPv6 address")
    quoted = schema.validate(changed(device, "spec.sim.iccid", 8935301234567890123))
    assert "quote" in quoted[0].message


def test_good_variants_are_accepted(device: dict[str, Any], aws_endpoint: dict[str, Any]) -> None:
    variants = [
        changed(device, "spec.ip", "fd00:64::19"),
        changed(device, "spec.ip", DELETE),
        changed(device, "spec.sim.imsi", DELETE),
        changed(device, "spec.sim.iccid", "8" * 18),
        changed(device, "spec.sim.iccid", "8" * 22),
        changed(device, "spec.cloudId", "a:b_c-d" + "x" * 121),
        changed(device, "spec.credentialsSecretRef", {"name": "meter-0001.tls"}),
        changed(
            changed(device, "spec.credentialsSecretRef", {"name": "meter-tls"}),
            "spec.registerCertificate",
            False,
        ),
        changed(device, "metadata.annotations", {api.ROTATE_ANNOTATION: "2026-11-28"}),
        changed(
            device,
            "status",
            {
                "phase": "Ready",
                "notAfter": "2027-11-28T09:30:00Z",
                "progress": {"step": "stored", "anything": [1, {"goes": True}]},
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "Provisioned",
                        "message": "",
                        "observedGeneration": 3,
                        "lastTransitionTime": "2026-11-28T09:30:00+00:00",
                    }
                ],
            },
        ),
        changed(aws_endpoint, "spec.rateLimit", {"devicesPerSecond": 0.5}),
        changed(aws_endpoint, "spec.rateLimit", {"devicesPerSecond": 1000}),
        changed(aws_endpoint, "spec.port", 443),
        changed(aws_endpoint, "metadata.namespace", DELETE),
    ]
    for obj in variants:
        assert schema.validate(obj) == [], obj


# --- the CEL rules, run by a CEL interpreter ---------------------------------------------------

CEL = celpy.Environment()


def _all_rules() -> list[tuple[str, dict[str, Any]]]:
    rules = []
    for kind, doc in crd_documents().items():
        for path, node in _nodes_with_rules(root_schema(doc)):
            rules.extend((f"{kind} {path}", rule) for rule in node["x-kubernetes-validations"])
    return rules


def _nodes_with_rules(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)] if "x-kubernetes-validations" in node else []
    for name, sub in (node.get("properties") or {}).items():
        found += _nodes_with_rules(sub, f"{path}.{name}".lstrip("."))
    return found


def _cel(rule: str, value: Any) -> bool:
    program = CEL.program(CEL.compile(rule))
    return bool(program.evaluate({"self": celpy.json_to_cel(value)}))


def test_every_cel_rule_compiles_and_has_a_python_mirror() -> None:
    rules = _all_rules()
    assert len(rules) >= 4
    for where, rule in rules:
        CEL.compile(rule["rule"])
        mirrored = rule["rule"] in schema.CEL_MIRRORS or rule["rule"] in schema.TRANSITION_RULES
        assert mirrored, f"{where}: no Python mirror for {rule['rule']}"
        assert rule.get("message"), where
        # Only what Kubernetes 1.25 knows: reason, fieldPath and messageExpression came later.
        assert set(rule) <= {"rule", "message"}, f"{where}: {sorted(rule)}"
        if rule["rule"] in schema.CEL_FIELDS:
            assert f"spec.{schema.CEL_FIELDS[rule['rule']]}" in rule["message"], where


def _cel_cases(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    objs = [obj for _, obj in CUSTOM_EXAMPLES]
    for _case, base, field, value, _ in COUNTER_EXAMPLES:
        objs.append(changed(request.getfixturevalue(base), field, value))
    return objs


def test_cel_rules_and_python_mirrors_agree(request: pytest.FixtureRequest) -> None:
    rule_messages = {rule["message"] for _, rule in _all_rules()}
    verdicts = {True: 0, False: 0}
    for obj in _cel_cases(request):
        if obj.get("kind") not in api.PLURALS or obj.get("apiVersion") != api.API_VERSION:
            continue
        # The API server runs CEL on objects that pass the rest of the schema; compare there.
        if any(e.message not in rule_messages for e in schema.validate(obj)):
            continue
        kind_schema = schema.crd_schemas()[obj["kind"]]
        for path, rule, value in schema.cel_rules(kind_schema, obj, ""):
            if rule["rule"] in schema.TRANSITION_RULES:
                continue  # needs the stored object: see the transition tests below
            expected = _cel(rule["rule"], value)
            assert schema.CEL_MIRRORS[rule["rule"]](value) == expected, (path, rule["rule"], value)
            verdicts[expected] += 1
    # Both outcomes were exercised, so the agreement means something.
    assert verdicts[True] > 0
    assert verdicts[False] > 0


# --- transition rules: fields that may not change once the Endpoint exists -------------------


def _cel_transition(rule: str, old: Any, new: Any) -> bool:
    program = CEL.program(CEL.compile(rule))
    return bool(program.evaluate({"self": celpy.json_to_cel(new), "oldSelf": celpy.json_to_cel(old)}))


@pytest.mark.parametrize(
    ("field", "old", "new"),
    [
        ("spec.aws.region", "eu-west-1", "us-east-1"),
        ("spec.type", "AwsIotCore", "MqttBroker"),
    ],
)
def test_where_an_endpoint_lives_is_immutable(
    aws_endpoint: dict[str, Any], field: str, old: Any, new: Any
) -> None:
    before = changed(aws_endpoint, field, old)
    after = changed(aws_endpoint, field, new)
    errors = schema.validate_update(before, after)
    assert [e.path for e in errors] == [field]
    assert "immutable" in errors[0].message and repr(old) in errors[0].message
    # The API server's CEL agrees, for both the change and the unchanged update.
    assert _cel_transition("self == oldSelf", old, new) is False
    assert _cel_transition("self == oldSelf", old, old) is True
    assert schema.validate_update(before, before) == []


def test_azure_hub_host_is_immutable_but_other_fields_are_not(azure_endpoint: dict[str, Any]) -> None:
    moved = changed(azure_endpoint, "spec.azure.hostName", "other-hub.azure-devices.net")
    assert [e.path for e in schema.validate_update(azure_endpoint, moved)] == ["spec.azure.hostName"]
    slower = changed(azure_endpoint, "spec.rateLimit.devicesPerSecond", 0.5)
    assert schema.validate_update(azure_endpoint, slower) == []


# Adding or removing a field that names the identity changes it as much as editing it does, so
# these rules sit on the parent, where oldSelf exists in every case.
@pytest.mark.parametrize(
    ("base", "parent", "key", "old", "new"),
    [
        ("device", "spec", "cloudId", "meter-a", "meter-b"),
        ("device", "spec", "cloudId", DELETE, "meter-b"),
        ("device", "spec", "cloudId", "meter-a", DELETE),
        ("aws_endpoint", "spec.aws", "thingPrefix", "site1-", "site2-"),
        ("aws_endpoint", "spec.aws", "thingPrefix", DELETE, "site2-"),
        ("aws_endpoint", "spec.aws", "thingPrefix", "site1-", DELETE),
    ],
)
def test_identity_naming_fields_cannot_drift(
    request: pytest.FixtureRequest, base: str, parent: str, key: str, old: Any, new: Any
) -> None:
    obj = request.getfixturevalue(base)
    before = changed(obj, f"{parent}.{key}", old)
    after = changed(obj, f"{parent}.{key}", new)
    errors = schema.validate_update(before, after)
    assert [e.path for e in errors] == [f"{parent}.{key}"]
    assert f"{parent}.{key} cannot be added, changed or removed" in errors[0].message
    assert schema.validate_update(before, before) == []
    # The API server's CEL agrees, on the parent node the rule stands on.
    (rule,) = [r for r in schema.TRANSITION_RULES if f"self.{key}" in r]
    old_parent = before
    new_parent = after
    for part in parent.split("."):
        old_parent, new_parent = old_parent[part], new_parent[part]
    assert _cel_transition(rule, old_parent, new_parent) is False
    assert _cel_transition(rule, old_parent, old_parent) is True


def test_an_empty_thing_prefix_is_the_same_as_none(aws_endpoint: dict[str, Any]) -> None:
    before = changed(aws_endpoint, "spec.aws.thingPrefix", "")
    after = changed(aws_endpoint, "spec.aws.thingPrefix", DELETE)
    assert schema.validate_update(before, after) == []


# --- the same verdicts from a real API server ---------------------------------------------------

# Cases about where an object is sent, not what it holds: the server routes them elsewhere (another
# URL, namespace or kind) instead of validating them against these CRDs.
ROUTING_CASES = {"wrong apiVersion", "wrong kind", "namespace not a DNS label"}
SERVER_COUNTER_EXAMPLES = [c for c in COUNTER_EXAMPLES if c[0] not in ROUTING_CASES]


def _server_verdict(kube: Kube, obj: dict[str, Any]) -> str | None:
    """None if the real API server accepts ``obj`` (dry run), else its message. Status is only
    written through the status subresource, so a status is checked there, on a stored object."""
    status = obj.pop("status", None)
    ns = kube.namespace() if status is not None else "default"
    obj = changed(obj, "metadata.namespace", ns)
    path = kube.path(obj["kind"], ns)
    try:
        if status is None:
            kube.request("POST", path + "?dryRun=All&fieldValidation=Strict", obj)
            return None
        stored = kube.request("POST", path, obj)
        name = stored["metadata"]["name"]
        kube.request(
            "PATCH",
            kube.path(obj["kind"], ns, name) + "/status?dryRun=All&fieldValidation=Strict",
            {"status": status},
            content_type="application/merge-patch+json",
        )
        return None
    except ApiError as e:
        return e.message


@pytest.mark.parametrize(
    ("case", "base", "field", "value", "expected"),
    SERVER_COUNTER_EXAMPLES,
    ids=[c[0] for c in SERVER_COUNTER_EXAMPLES],
)
def test_the_api_server_refuses_the_counter_example_naming_the_field(
    request: pytest.FixtureRequest, kube: Kube, case: str, base: str, field: str, value: object, expected: str
) -> None:
    good = request.getfixturevalue(base)
    bad = changed(good, field, value)
    message = _server_verdict(kube, bad)
    assert message is not None, f"{case}: the API server accepted it"
    assert expected in message, message


def test_the_api_server_accepts_what_validate_accepts(
    kube: Kube, device: dict[str, Any], aws_endpoint: dict[str, Any], group: dict[str, Any]
) -> None:
    for label, obj in CUSTOM_EXAMPLES:
        assert _server_verdict(kube, copy.deepcopy(obj)) is None, label
    for obj in (device, aws_endpoint, group, changed(device, "spec.ip", "fd00:64::19")):
        assert _server_verdict(kube, obj) is None, obj


@pytest.mark.parametrize(
    ("base", "field", "new"),
    [
        ("aws_endpoint", "spec.aws.region", "us-east-1"),
        ("aws_endpoint", "spec.type", "MqttBroker"),
        ("azure_endpoint", "spec.azure.hostName", "other-hub.azure-devices.net"),
    ],
)
def test_the_api_server_keeps_immutable_fields(
    request: pytest.FixtureRequest, kube: Kube, base: str, field: str, new: str
) -> None:
    obj = changed(request.getfixturevalue(base), "metadata.namespace", kube.namespace())
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    kube.create(obj)
    *parents, last = field.split(".")
    patch: dict[str, Any] = {last: new}
    for part in reversed(parents):
        patch = {part: patch}
    if field == "spec.type":  # the section must follow the type, or the section rule answers first
        patch["spec"].update({"aws": None, "mqtt": {"host": "broker.example.com"}})
    with pytest.raises(ApiError) as refused:
        kube.merge_patch("Endpoint", ns, name, patch)
    assert refused.value.status == 422
    assert field in refused.value.message and "immutable" in refused.value.message
    # The same update that leaves the field alone is accepted.
    kube.merge_patch("Endpoint", ns, name, {"spec": {"rateLimit": {"devicesPerSecond": 5}}})
