"""``cloud-connector status``: the same columns ``kubectl get`` shows, read from the state store.

The columns mirror the CRDs' printer columns so that a user moving between the standalone mode
and a cluster reads the same table. Only names, ids and phases appear here; key material is
never in the store, so it cannot leak through this view.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from cloudconnector import api
from cloudconnector.standalone.store import StoredObject

Column = tuple[str, str]  # header, dotted path into the object

COLUMNS: Mapping[str, Sequence[Column]] = {
    api.KIND_ENDPOINT: (
        ("NAME", "metadata.name"),
        ("TYPE", "spec.type"),
        ("HOST", "status.host"),
        ("PHASE", "status.phase"),
        ("AGE", "metadata.creationTimestamp"),
    ),
    api.KIND_GROUP: (
        ("NAME", "metadata.name"),
        ("ENDPOINT", "spec.endpointRef.name"),
        ("TOTAL", "status.total"),
        ("PROVISIONED", "status.provisioned"),
        ("FAILED", "status.failed"),
        ("PENDING", "status.pending"),
        ("CONNECTED", "status.connected"),
        ("AGE", "metadata.creationTimestamp"),
    ),
    api.KIND_DEVICE: (
        ("NAME", "metadata.name"),
        ("PHASE", "status.phase"),
        ("GROUP", "spec.group"),
        ("ENDPOINT", "status.endpoint"),
        ("CLOUD ID", "status.cloudId"),
        ("CONNECTED", "status.connection.connected"),
        ("LAST SEEN", "status.connection.lastSeen"),
        ("AGE", "metadata.creationTimestamp"),
    ),
}


def _lookup(obj: Mapping[str, Any], path: str) -> Any:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(part)
    return cur


def age(stamp: str | None, now: datetime | None = None) -> str:
    """kubectl's short age: 45s, 12m, 5h, 3d."""
    if not stamp:
        return "<unknown>"
    try:
        then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return "<unknown>"
    seconds = max(0, int(((now or datetime.now(UTC)) - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size or (unit == "d" and seconds >= size):
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def with_connection(obj: StoredObject, connection: Mapping[str, Any] | None) -> StoredObject:
    """``obj`` with ``status.connection`` filled in from the store's connections table."""
    if not connection:
        return obj
    body = {**obj.body, "status": {**obj.status, "connection": dict(connection)}}
    return StoredObject(obj.kind, obj.ref, obj.source, body)


def render(kind: str, objects: Iterable[StoredObject], *, namespace_column: bool = False) -> str:
    columns = list(COLUMNS[kind])
    if namespace_column:
        columns.insert(0, ("NAMESPACE", "metadata.namespace"))
    rows = [[header for header, _ in columns]]
    for obj in objects:
        row = []
        for header, path in columns:
            value = _lookup(obj.body, path)
            if header in ("AGE", "LAST SEEN"):
                row.append(age(value) if value else "")
            elif isinstance(value, bool):
                row.append(str(value).lower())  # as kubectl prints a boolean column
            else:
                row.append("" if value is None else str(value))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    return "\n".join(
        "   ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
