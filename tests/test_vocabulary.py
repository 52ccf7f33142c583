"""The shared vocabulary says what the CRDs say: every status field the CRDs define has its key in
the status TypedDicts and no other, the phase enums are the CRDs' phase enums, and the constants
the core modules still carry are the same words."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from cloudconnector import api
from cloudconnector.core import conditions, device, endpoint
from cloudconnector.model import parse_device
from cloudconnector.schema import crds_dir
from cloudconnector.vocabulary import (
    ROTATE_ANNOTATION,
    ConditionRecord,
    ConditionStatus,
    ConditionType,
    DevicePhase,
    DeviceStatus,
    EndpointPhase,
    EndpointStatus,
    GroupStatus,
    RotationRecord,
)


def status_schema(plural: str) -> dict[str, Any]:
    doc = yaml.safe_load((crds_dir() / f"{plural}.yaml").read_text())
    (version,) = doc["spec"]["versions"]
    return dict(version["schema"]["openAPIV3Schema"]["properties"]["status"])


@pytest.mark.parametrize(
    ("plural", "typed"),
    [(api.DEVICES, DeviceStatus), (api.ENDPOINTS, EndpointStatus), (api.GROUPS, GroupStatus)],
)
def test_status_typed_dicts_are_the_crd_status(plural: str, typed: type) -> None:
    schema = status_schema(plural)
    assert set(typed.__annotations__) == set(schema["properties"])
    condition = schema["properties"]["conditions"]["items"]["properties"]
    assert set(ConditionRecord.__annotations__) == set(condition)


def test_rotation_record_is_the_crd_one() -> None:
    rotation = status_schema(api.DEVICES)["properties"]["rotation"]["properties"]
    assert set(RotationRecord.__annotations__) == set(rotation)


def test_phases_are_the_crd_enums() -> None:
    assert [p.value for p in DevicePhase] == status_schema(api.DEVICES)["properties"]["phase"]["enum"]
    assert [p.value for p in EndpointPhase] == status_schema(api.ENDPOINTS)["properties"]["phase"]["enum"]


def test_core_constants_are_the_same_words() -> None:
    assert tuple(DevicePhase) == (
        device.PENDING,
        device.PROVISIONING,
        device.READY,
        device.FAILED,
        device.CONFLICT,
        device.DELETING,
    )
    assert tuple(EndpointPhase) == (endpoint.PENDING, endpoint.READY, endpoint.ERROR)
    assert tuple(ConditionStatus) == (conditions.TRUE, conditions.FALSE, conditions.UNKNOWN)
    assert {
        conditions.READY,
        conditions.CONFLICT,
        conditions.ROTATING,
        conditions.CREDENTIALS_REVOCABLE,
    } < set(ConditionType)


def test_rotate_annotation_is_read_by_its_one_name() -> None:
    body = {
        "metadata": {"name": "d", "namespace": "n", "annotations": {ROTATE_ANNOTATION: "2026-01"}},
        "spec": {"group": "g", "sim": {"iccid": "893530000000000001"}},
    }
    assert ROTATE_ANNOTATION == "cloudconnector.io/rotate"
    assert parse_device(body).rotate_token == "2026-01"
