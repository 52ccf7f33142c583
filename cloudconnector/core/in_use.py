"""In-use protection for Groups and Endpoints, as Kubernetes protects a PVC a Pod still mounts.

Deleting a Group or an Endpoint that Devices still use waits: the object keeps its finalizer,
shows the condition ``Terminating`` saying how many Devices hold it and how to release them, and
goes once the last one has moved away or been deleted. While it waits, nothing new is made in it
(a Device that joins gets no identity there), but identities already made stay in service and
removing them always works: a Device deleted meanwhile is deprovisioned with the Endpoint's
credentials as usual.

* A **Group** is held by every Device whose ``spec.group`` names it.
* An **Endpoint** is held by every Device whose identity (or a half-made one) is there
  (``status.endpoint``), and by every Device not being deleted in a Group that points at it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from cloudconnector.core import conditions as cond
from cloudconnector.core.conditions import Condition

TERMINATING = "Terminating"
SHOWN = 5  # names listed in a message; the count says how many there are


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def group_holders(group: str, devices: Iterable[Mapping[str, Any]]) -> list[str]:
    return sorted(str(_meta(d).get("name")) for d in devices if (d.get("spec") or {}).get("group") == group)


def endpoint_holders(
    endpoint: str, groups: Iterable[Mapping[str, Any]], devices: Iterable[Mapping[str, Any]]
) -> list[str]:
    pointing = {
        _meta(g).get("name")
        for g in groups
        if ((g.get("spec") or {}).get("endpointRef") or {}).get("name") == endpoint
    }
    holders = []
    for d in devices:
        at_endpoint = (d.get("status") or {}).get("endpoint") == endpoint
        joining = (d.get("spec") or {}).get("group") in pointing and not _meta(d).get("deletionTimestamp")
        if at_endpoint or joining:
            holders.append(str(_meta(d).get("name")))
    return sorted(holders)


def _names(holders: list[str]) -> str:
    shown = ", ".join(holders[:SHOWN])
    return shown + (f" and {len(holders) - SHOWN} more" if len(holders) > SHOWN else "")


def waiting_message(kind: str, holders: list[str]) -> str:
    n = len(holders)
    devices = f"{n} Device{'s' if n != 1 else ''}"
    if kind == "Group":
        return (
            f"deletion waits for {devices} in this Group ({_names(holders)}): move them to another "
            "Group or delete them"
        )
    return (
        f"deletion waits for {devices} with a cloud identity at this Endpoint or in a Group that points "
        f"at it ({_names(holders)}): delete them or point their Groups at another Endpoint; its "
        "credentials stay in use until then"
    )


def mark_terminating(
    status: Mapping[str, Any] | None, kind: str, holders: list[str], generation: int
) -> dict[str, Any]:
    """The status of a Group or Endpoint whose deletion waits for ``holders``."""
    st = cond.working_copy(status)
    cond.set_condition(
        st, Condition(TERMINATING, cond.TRUE, "InUse", waiting_message(kind, holders)), generation
    )
    return st


def hold_message(kind: str, name: str) -> str:
    """Why a Device gets no new identity in a Group or at an Endpoint being deleted."""
    return f"{kind} {name!r} is being deleted: no new cloud identity is made there"
