"""The CRD files themselves: valid apiextensions objects, structural, self-documenting, and true to
the status/spec field contract the operator, proxy and standalone mode code against."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from cloudconnector import api
from tests.crds.conftest import crd_documents, root_schema, walk

DOCS = crd_documents()
KINDS = sorted(DOCS)

CONDITION_FIELDS = {"type", "status", "reason", "message", "observedGeneration", "lastTransitionTime"}

# The contract from the project's shared design: every component reads and writes these names.
SPEC_FIELDS = {
    "Device": {
        "group",
        "sim",
        "sim.iccid",
        "sim.imsi",
        "ip",
        "cloudId",
        "credentialsSecretRef",
        "credentialsSecretRef.name",
        "registerCertificate",
    },
    "Group": {"endpointRef", "endpointRef.name", "topicTemplate"},
    "Endpoint": {
        "type",
        "port",
        "rateLimit",
        "rateLimit.devicesPerSecond",
        "caCertificate",
        "aws",
        "aws.region",
        "aws.credentialsSecretRef",
        "aws.credentialsSecretRef.name",
        "aws.endpointUrl",
        "aws.dataEndpoint",
        "aws.thingPrefix",
        "aws.policy",
        "aws.policy.mode",
        "aws.policy.publishTopics",
        "aws.policy.publishTopics[]",
        "aws.policy.subscribeTopics",
        "aws.policy.subscribeTopics[]",
        "azure",
        "azure.hostName",
        "azure.credentialsSecretRef",
        "azure.credentialsSecretRef.name",
        "azure.registryUrl",
        "azure.certificateValidityDays",
        "azure.topicMapping",
        "mqtt",
        "mqtt.host",
        "mqtt.maxPacketSize",
        "topicTemplate",
    },
}
STATUS_FIELDS = {
    "Device": {
        "phase",
        "endpoint",
        "endpointType",
        "cloudId",
        "certificateId",
        "certificateArn",
        "thumbprint",
        "notAfter",
        "keyLocation",
        "policyName",
        "observedGeneration",
        "message",
        "step",
        "conditions",
        "progress",
        "rotation",
        "manualSecret",
        "connection",
    },
    "Endpoint": {"phase", "host", "port", "conditions", "observedGeneration"},
    "Group": {
        "endpoint",
        "total",
        "provisioned",
        "failed",
        "pending",
        "connected",
        "conditions",
        "observedGeneration",
    },
}
PHASES = {
    "Device": ["Pending", "Provisioning", "Ready", "Failed", "Conflict", "Deleting"],
    "Endpoint": ["Pending", "Ready", "Error"],
}
PRINTER_COLUMNS = {
    "Device": [
        ("Phase", ".status.phase", 0),
        ("Group", ".spec.group", 0),
        ("Endpoint", ".status.endpoint", 0),
        ("Cloud ID", ".status.cloudId", 0),
        ("Step", ".status.step", 0),
        ("Connected", ".status.connection.connected", 0),
        ("Last Seen", ".status.connection.lastSeen", 0),
        ("IP", ".spec.ip", 1),
        ("ICCID", ".spec.sim.iccid", 1),
        ("Age", ".metadata.creationTimestamp", 0),
    ],
    "Endpoint": [
        ("Type", ".spec.type", 0),
        ("Host", ".status.host", 0),
        ("Phase", ".status.phase", 0),
        ("Age", ".metadata.creationTimestamp", 0),
    ],
    "Group": [
        ("Endpoint", ".spec.endpointRef.name", 0),
        ("Total", ".status.total", 0),
        ("Provisioned", ".status.provisioned", 0),
        ("Failed", ".status.failed", 0),
        ("Pending", ".status.pending", 0),
        ("Connected", ".status.connected", 0),
        ("Age", ".metadata.creationTimestamp", 0),
    ],
}
SHORT_NAMES = {"Endpoint": ["cce"], "Group": ["ccg"], "Device": ["ccd"]}


def _fields(schema: dict[str, Any]) -> set[str]:
    return {path for path, _ in walk(schema) if path}


def test_one_crd_per_kind() -> None:
    assert set(DOCS) == set(api.PLURALS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k8s", ["1.30", kubernetes_validate.latest_version()])
def test_crd_is_a_valid_apiextensions_object(kind: str, k8s: str) -> None:
    kubernetes_validate.validate(DOCS[kind], k8s, strict=True)


@pytest.mark.parametrize("kind", KINDS)
def test_names_group_and_version(kind: str) -> None:
    doc = DOCS[kind]
    spec = doc["spec"]
    plural = api.PLURALS[kind]
    assert doc["metadata"]["name"] == f"{plural}.{api.GROUP}"
    assert spec["group"] == api.GROUP
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["plural"] == plural
    assert spec["names"]["singular"] == kind.lower()
    assert spec["names"]["shortNames"] == SHORT_NAMES[kind]
    assert "cloudconnector" in spec["names"]["categories"]
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == (api.VERSION, True, True)
    assert version["subresources"] == {"status": {}}


@pytest.mark.parametrize("kind", KINDS)
def test_every_field_has_a_description(kind: str) -> None:
    # The root metadata node is the exception: the API server refuses anything but its type there.
    undocumented = [
        path or "(root)"
        for path, node in walk(root_schema(DOCS[kind]))
        if not node.get("description") and path != "metadata"
    ]
    assert undocumented == []


@pytest.mark.parametrize("kind", KINDS)
def test_schema_is_structural(kind: str) -> None:
    root = root_schema(DOCS[kind])
    assert root["type"] == "object"
    # Exactly this: a description (or anything else) here is refused by every API server version.
    assert root["properties"]["metadata"] == {"type": "object"}
    for path, node in walk(root):
        untyped = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
        assert node.get("type") or untyped, f"{path} has no type"
        if node.get("type") == "object" and not untyped:
            assert "properties" in node or path == "metadata", f"{path}: an object without properties"
        for junctor in ("anyOf", "allOf", "oneOf"):
            for branch in node.get(junctor, ()):
                forbidden = {"type", "description", "default", "additionalProperties", "nullable"} & set(
                    branch
                )
                assert not forbidden, f"{path}.{junctor} sets {forbidden}"


@pytest.mark.parametrize("kind", KINDS)
def test_lengths_and_list_sizes_are_bounded(kind: str) -> None:
    # Bounds keep CEL cost estimates low and stop absurd input at the door.
    for path, node in walk(root_schema(DOCS[kind])):
        if path in ("apiVersion", "kind"):
            continue
        if node.get("type") == "string" and "enum" not in node and node.get("format") != "date-time":
            assert "maxLength" in node, f"{path} has no maxLength"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path} has no maxItems"


@pytest.mark.parametrize("kind", KINDS)
def test_spec_and_status_follow_the_field_contract(kind: str) -> None:
    props = root_schema(DOCS[kind])["properties"]
    assert _fields(props["spec"]) == SPEC_FIELDS[kind]
    status = props["status"]["properties"]
    assert set(status) == STATUS_FIELDS[kind]
    if kind in PHASES:
        assert status["phase"]["enum"] == PHASES[kind]
    assert status["observedGeneration"]["type"] == "integer"


@pytest.mark.parametrize("kind", KINDS)
def test_conditions_have_the_standard_shape(kind: str) -> None:
    conditions = root_schema(DOCS[kind])["properties"]["status"]["properties"]["conditions"]
    assert conditions["type"] == "array"
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert set(item["properties"]) == CONDITION_FIELDS
    assert "type" in item["required"]  # a list-map key must be required
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert item["properties"]["lastTransitionTime"]["format"] == "date-time"


def test_progress_is_free_form_and_the_only_such_field() -> None:
    for kind in KINDS:
        free = [p for p, n in walk(root_schema(DOCS[kind])) if n.get("x-kubernetes-preserve-unknown-fields")]
        assert free == (["status.progress"] if kind == "Device" else [])
    progress = root_schema(DOCS["Device"])["properties"]["status"]["properties"]["progress"]
    assert progress["type"] == "object"


def _node_at(schema: dict[str, Any], json_path: str) -> dict[str, Any] | None:
    node: dict[str, Any] | None = schema
    for part in json_path.lstrip(".").split("."):
        node = (node or {}).get("properties", {}).get(part)
    return node


@pytest.mark.parametrize("kind", KINDS)
def test_printer_columns(kind: str) -> None:
    (version,) = DOCS[kind]["spec"]["versions"]
    columns = version["additionalPrinterColumns"]
    assert [(c["name"], c["jsonPath"], c.get("priority", 0)) for c in columns] == PRINTER_COLUMNS[kind]
    root = root_schema(DOCS[kind])
    for column in columns:
        if column["jsonPath"] == ".metadata.creationTimestamp":
            assert column["type"] == "date"
            continue
        node = _node_at(root, column["jsonPath"])
        assert node is not None, f"column {column['name']} points at {column['jsonPath']}, not in the schema"
        if column["type"] == "date":  # a date column shows an RFC 3339 string as an age
            assert (node["type"], node.get("format")) == ("string", "date-time"), column["name"]
        else:
            assert node["type"] == column["type"], column["name"]


def test_endpoint_type_enum_matches_the_model() -> None:
    from cloudconnector.model import EndpointType, PolicyMode, TopicMapping

    spec = root_schema(DOCS["Endpoint"])["properties"]["spec"]["properties"]
    assert spec["type"]["enum"] == [t.value for t in EndpointType]
    assert spec["aws"]["properties"]["policy"]["properties"]["mode"]["enum"] == [m.value for m in PolicyMode]
    assert spec["azure"]["properties"]["topicMapping"]["enum"] == [m.value for m in TopicMapping]
