"""kopf indexes: in-memory views of Endpoints, Groups and Devices that every handler can consult
without an API call (and that are complete before the first handler runs)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import kopf

from cloudconnector import api
from cloudconnector.core.conditions import working_copy
from cloudconnector.core.conflicts import Peer
from cloudconnector.core.inventory import endpoint_name
from cloudconnector.identity import Claim, claims
from cloudconnector.model import Device, ObjectRef

Body = dict[str, Any]


@kopf.index(api.GROUP, api.VERSION, api.ENDPOINTS)
def endpoints_idx(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], Body]:
    return {(namespace, name): working_copy(body)}


@kopf.index(api.GROUP, api.VERSION, api.GROUPS)
def groups_idx(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], Body]:
    return {(namespace, name): working_copy(body)}


@kopf.index(api.GROUP, api.VERSION, api.DEVICES)
def devices_by_group(
    namespace: str, name: str, spec: kopf.Spec, status: kopf.Status, **_: Any
) -> dict[tuple[str, str], tuple[str, str | None]]:
    group = spec.get("group")
    return {(namespace, group): (name, status.get("phase"))} if group else {}


@kopf.index(api.GROUP, api.VERSION, api.DEVICES)
def devices_connected(
    namespace: str, name: str, spec: kopf.Spec, status: kopf.Status, **_: Any
) -> dict[tuple[str, str], str]:
    """Devices the proxy shows connected now (``status.connection``), by Group."""
    group = spec.get("group")
    connected = bool((status.get("connection") or {}).get("connected"))
    return {(namespace, group): name} if group and connected else {}


@kopf.index(api.GROUP, api.VERSION, api.DEVICES)
def device_peers(namespace: str, name: str, spec: kopf.Spec, meta: kopf.Meta, **_: Any) -> dict[Claim, Peer]:
    """Devices by identity key, across every namespace the operator watches: that is the scope
    the proxy serves (:class:`cloudconnector.identity.Scope`), so it is where a key must be unique."""
    if meta.get("deletionTimestamp"):
        return {}  # a device on its way out no longer blocks its IP or SIM
    sim = spec.get("sim") or {}
    ip = spec.get("ip")
    peer = Peer(ObjectRef(namespace, name), ip if isinstance(ip, str) else None, str(sim.get("iccid") or ""))
    return {claim: peer for claim in peer.claims}


def peers_of(device_peers: Mapping[Any, Any], device: Device) -> list[Peer]:
    """Every Device (the device itself included) that claims one of ``device``'s identity keys."""
    return [peer for claim in claims(device.ip, device.iccid) for peer in all_of(device_peers, claim)]


def one(index: Mapping[Any, Any], key: Any) -> Any:
    """The single value stored under ``key`` (objects are unique per namespace/name), or None."""
    store = index.get(key)
    return next(iter(store), None) if store else None


def all_of(index: Mapping[Any, Any], key: Any) -> Iterator[Any]:
    yield from index.get(key) or ()


def groups_on(groups: Mapping[Any, Any], namespace: str, endpoint: str) -> list[str]:
    names = []
    for (ns, name), store in groups.items():
        for body in store:
            if ns == namespace and endpoint_name(body) == endpoint:
                names.append(name)
    return names


class IndexInventory:
    """The :class:`~cloudconnector.core.inventory.Inventory` over kopf's indexes: Groups and
    Endpoints of every watched namespace, without an API call."""

    def __init__(self, groups_idx: Mapping[Any, Any], endpoints_idx: Mapping[Any, Any]) -> None:
        self._groups = groups_idx
        self._endpoints = endpoints_idx

    def group(self, namespace: str, name: str) -> Body | None:
        found: Body | None = one(self._groups, (namespace, name))
        return found

    def endpoint(self, namespace: str, name: str) -> Body | None:
        found: Body | None = one(self._endpoints, (namespace, name))
        return found
