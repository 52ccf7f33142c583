"""A Group's status: which Endpoint it resolves to and how far its devices have come."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from cloudconnector.core import conditions as cond
from cloudconnector.core.conditions import Condition
from cloudconnector.core.device import FAILED, READY
from cloudconnector.model import Group


def count(device_statuses: Iterable[Mapping[str, Any] | None]) -> dict[str, int]:
    """total / provisioned / failed / pending over the devices of one group."""
    total = provisioned = failed = 0
    for status in device_statuses:
        total += 1
        phase = (status or {}).get("phase")
        if phase == READY:
            provisioned += 1
        elif phase == FAILED:
            failed += 1
    return {
        "total": total,
        "provisioned": provisioned,
        "failed": failed,
        "pending": total - provisioned - failed,
    }


def group_status(
    group: Group,
    status: Mapping[str, Any] | None,
    device_statuses: Iterable[Mapping[str, Any] | None],
    *,
    endpoint_exists: bool,
    connected: int | None = None,
) -> dict[str, Any]:
    """``connected``: how many devices the proxy shows connected (the operator counts them from
    its index); None counts ``status.connection`` of ``device_statuses`` (the standalone mode)."""
    st = cond.working_copy(status)
    statuses = list(device_statuses)
    st.update(count(statuses))
    st["connected"] = (
        connected
        if connected is not None
        else sum(bool(((s or {}).get("connection") or {}).get("connected")) for s in statuses)
    )
    st["endpoint"] = group.endpoint
    st["observedGeneration"] = group.generation
    if not endpoint_exists:
        ready = Condition(
            cond.READY, cond.FALSE, "EndpointNotFound", f"Endpoint {group.endpoint!r} does not exist"
        )
    elif st["failed"]:
        ready = Condition(
            cond.READY, cond.FALSE, "DevicesFailed", f"{st['failed']} of {st['total']} devices failed"
        )
    elif st["pending"]:
        ready = Condition(
            cond.READY, cond.FALSE, "Provisioning", f"{st['pending']} of {st['total']} devices pending"
        )
    else:
        ready = Condition(cond.READY, cond.TRUE, "AllProvisioned", f"{st['total']} devices provisioned")
    cond.set_condition(st, ready, group.generation)
    return st
