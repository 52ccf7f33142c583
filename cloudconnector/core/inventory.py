"""The Device → Group → Endpoint join, written once.

A Device names its Group (``spec.group``), the Group names its Endpoint (``spec.endpointRef.name``),
both in the Device's namespace. The operator (over kopf's indexes), the standalone reconciler (over
its state store) and the proxy (over its watch of the API) each hold the objects differently; they
expose them through :class:`Inventory`, and :func:`place` does the join for all of them, so "which
Endpoint serves this Device, and is it Ready" has one answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from cloudconnector.vocabulary import EndpointPhase

Body = Mapping[str, Any]
Key = tuple[str, str]  # namespace, name


class Inventory(Protocol):
    """Groups and Endpoints of one scope by namespace and name (raw bodies with their status)."""

    def group(self, namespace: str, name: str) -> Body | None: ...

    def endpoint(self, namespace: str, name: str) -> Body | None: ...


def namespace_of(body: Body) -> str:
    return str((body.get("metadata") or {}).get("namespace") or "default")


def group_name(device: Body) -> str | None:
    name = (device.get("spec") or {}).get("group")
    return str(name) if name else None


def endpoint_name(group: Body | None) -> str | None:
    """The name of the Endpoint a Group body points at, or None."""
    if group is None:
        return None
    name = ((group.get("spec") or {}).get("endpointRef") or {}).get("name")
    return str(name) if name else None


@dataclass(frozen=True)
class Placement:
    """Where a Device stands: its Group and that Group's Endpoint, as the inventory holds them."""

    device: Body
    group: Body | None
    endpoint: Body | None

    @property
    def endpoint_ready(self) -> bool:
        return (
            self.endpoint is not None
            and (self.endpoint.get("status") or {}).get("phase") == EndpointPhase.READY
        )


def place(inventory: Inventory, device: Body) -> Placement:
    """Join ``device`` with its Group and Endpoint (either may be missing)."""
    namespace = namespace_of(device)
    name = group_name(device)
    group = inventory.group(namespace, name) if name else None
    ep_name = endpoint_name(group)
    endpoint = inventory.endpoint(namespace, ep_name) if ep_name else None
    return Placement(device, group, endpoint)


class MemoryInventory:
    """An :class:`Inventory` over bodies already in memory, keyed by (namespace, name)."""

    def __init__(self, groups: Mapping[Key, Body], endpoints: Mapping[Key, Body]) -> None:
        self.groups = groups
        self.endpoints = endpoints

    @classmethod
    def of(cls, groups: Iterable[Body], endpoints: Iterable[Body]) -> MemoryInventory:
        def key(body: Body) -> Key:
            return namespace_of(body), str((body.get("metadata") or {}).get("name") or "")

        return cls({key(g): g for g in groups}, {key(e): e for e in endpoints})

    def group(self, namespace: str, name: str) -> Body | None:
        return self.groups.get((namespace, name))

    def endpoint(self, namespace: str, name: str) -> Body | None:
        return self.endpoints.get((namespace, name))
