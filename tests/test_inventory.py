"""The Device → Group → Endpoint join (cloudconnector/core/inventory.py) gives the same answer over
every way the objects are held: bodies in memory (the proxy's watch), kopf's indexes (the operator)
and the standalone state store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cloudconnector import api
from cloudconnector.core.inventory import Inventory, MemoryInventory, Placement, endpoint_name, place
from cloudconnector.operator.indexes import IndexInventory
from cloudconnector.routes import route_of
from cloudconnector.standalone.store import StateStore

API = api.API_VERSION


def obj(kind: str, ns: str, name: str, spec: dict[str, Any], status: dict[str, Any] | None = None) -> dict:
    return {
        "apiVersion": API,
        "kind": kind,
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
        "status": status or {},
    }


ENDPOINT_SPEC = {"type": "AwsIotCore", "aws": {"region": "eu-west-1", "dataEndpoint": "iot.example"}}
GROUPS = [
    obj("Group", "a", "meters", {"endpointRef": {"name": "aws"}}),
    obj("Group", "a", "orphans", {"endpointRef": {"name": "missing"}}),
    obj("Group", "b", "meters", {"endpointRef": {"name": "aws"}}),
]
ENDPOINTS = [
    obj("Endpoint", "a", "aws", ENDPOINT_SPEC, {"phase": "Ready", "host": "iot.example", "port": 8883}),
    obj("Endpoint", "b", "aws", ENDPOINT_SPEC, {"phase": "Error"}),
]


def device(ns: str, group: str, phase: str = "Ready") -> dict:
    status = {
        "phase": phase,
        "endpoint": "aws",
        "cloudId": "t",
        "certificateId": "c",
        "keyLocation": "vault:x/y",
    }
    return obj("Device", ns, "d", {"group": group, "sim": {"iccid": "893530000000000001"}}, status)


def as_kopf_index(bodies: list[dict]) -> dict[tuple[str, str], list[dict]]:
    return {(b["metadata"]["namespace"], b["metadata"]["name"]): [b] for b in bodies}


def memory() -> Inventory:
    return MemoryInventory.of(GROUPS, ENDPOINTS)


def kopf_indexes() -> Inventory:
    return IndexInventory(as_kopf_index(GROUPS), as_kopf_index(ENDPOINTS))


def store(tmp: Path) -> Inventory:
    state = StateStore(tmp / "state.db")
    for body in GROUPS + ENDPOINTS:
        stored = state.apply(body["kind"], body, "test.yaml")
        state.set_status(body["kind"], stored.ref, body["status"])
    return MemoryInventory.of(
        (o.body for o in state.list(api.KIND_GROUP)), (o.body for o in state.list(api.KIND_ENDPOINT))
    )


@pytest.mark.parametrize("make", [memory, kopf_indexes, store])
def test_the_join_is_the_same_everywhere(make: Any, tmp_path: Path) -> None:
    inventory = make(tmp_path) if make is store else make()

    def summary(placed: Placement) -> tuple[str | None, str | None, bool]:
        group = placed.group["metadata"]["name"] if placed.group else None
        ep = placed.endpoint["metadata"]["name"] if placed.endpoint else None
        return group, ep, placed.endpoint_ready

    assert summary(place(inventory, device("a", "meters"))) == ("meters", "aws", True)
    assert summary(place(inventory, device("b", "meters"))) == ("meters", "aws", False)  # Error
    assert summary(place(inventory, device("a", "orphans"))) == ("orphans", None, False)
    assert summary(place(inventory, device("a", "nowhere"))) == (None, None, False)
    assert summary(place(inventory, device("c", "meters"))) == (None, None, False)  # namespaces never mix

    route = route_of(inventory, device("a", "meters"))
    assert route is not None and (route.host, route.port, route.key_location) == (
        "iot.example",
        8883,
        "vault:x/y",
    )
    assert route_of(inventory, device("a", "meters", phase="Conflict")) is None
    assert route_of(inventory, device("a", "orphans")) is None


def test_endpoint_name() -> None:
    assert endpoint_name(GROUPS[0]) == "aws"
    assert endpoint_name(None) is None
    assert endpoint_name({"spec": {}}) is None
