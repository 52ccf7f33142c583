"""Shared helpers for the CRD tests: the CRD documents as loaded from crds/, and valid base objects
that each counter-example breaks in exactly one way."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudconnector import api
from cloudconnector.schema import crds_dir

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
DELETE = object()  # marks a field to remove in ``changed``


def crd_documents() -> dict[str, dict[str, Any]]:
    """Kind -> the CRD document, read straight from the YAML files."""
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(crds_dir().glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[doc["spec"]["names"]["kind"]] = doc
    return docs


def root_schema(doc: Mapping[str, Any]) -> dict[str, Any]:
    (version,) = doc["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def walk(schema: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every schema node below (and including) ``schema``, with a readable path; junctor branches
    (anyOf, ...) are not nodes of their own."""
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from walk(sub, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), Mapping):
        yield from walk(schema["items"], f"{path}[]")


def changed(obj: Mapping[str, Any], path: str, value: object) -> dict[str, Any]:
    """A deep copy of ``obj`` with the dotted ``path`` set to ``value`` (or removed: DELETE)."""
    new = copy.deepcopy(dict(obj))
    *parents, last = path.split(".")
    node = new
    for part in parents:
        node = node.setdefault(part, {})
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return new


def _obj(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": kind,
        "metadata": {"name": name, "namespace": "fleet"},
        "spec": spec,
    }


@pytest.fixture
def aws_endpoint() -> dict[str, Any]:
    return _obj("Endpoint", "aws-prod", {"type": "AwsIotCore", "aws": {"region": "eu-west-1"}})


@pytest.fixture
def azure_endpoint() -> dict[str, Any]:
    return _obj(
        "Endpoint", "azure-hub", {"type": "AzureIotHub", "azure": {"hostName": "hub.azure-devices.net"}}
    )


@pytest.fixture
def mqtt_endpoint() -> dict[str, Any]:
    return _obj("Endpoint", "broker", {"type": "MqttBroker", "mqtt": {"host": "mqtt.example.com"}})


@pytest.fixture
def group() -> dict[str, Any]:
    return _obj("Group", "meters", {"endpointRef": {"name": "aws-prod"}})


@pytest.fixture
def device() -> dict[str, Any]:
    return _obj(
        "Device",
        "meter-0001",
        {
            "group": "meters",
            "sim": {"iccid": "8935301234567890123", "imsi": "234301234567890"},
            "ip": "10.64.0.17",
        },
    )
