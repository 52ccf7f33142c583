"""Status conditions in the cert-manager style, as plain functions over status dicts.

Every condition carries ``type``, ``status`` ("True"/"False"/"Unknown"), a machine-word
``reason``, a ``message`` for people, ``observedGeneration`` and a ``lastTransitionTime`` that
moves only when ``status`` flips, so ``kubectl describe`` shows since when a thing has been true.
Reconcilers build a new status and write it only when it differs from the stored one.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cloudconnector.errors import short

TRUE = "True"
FALSE = "False"
UNKNOWN = "Unknown"

# Condition types used across the three resources.
READY = "Ready"
CONFLICT = "Conflict"
CREDENTIALS_REVOCABLE = "CredentialsRevocable"
ROTATING = "Rotating"


@dataclass(frozen=True)
class Condition:
    type: str
    status: str
    reason: str
    message: str = ""


def now_rfc3339() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def find(conditions: Sequence[Mapping[str, Any]] | None, ctype: str) -> Mapping[str, Any] | None:
    for cond in conditions or ():
        if cond.get("type") == ctype:
            return cond
    return None


def is_true(status: Mapping[str, Any], ctype: str) -> bool:
    cond = find(status.get("conditions"), ctype)
    return cond is not None and cond.get("status") == TRUE


def set_condition(status: dict[str, Any], cond: Condition, generation: int) -> None:
    """Put ``cond`` into ``status["conditions"]``, keeping the transition time if status is unchanged."""
    conditions = [dict(c) for c in status.get("conditions") or ()]
    old = find(conditions, cond.type)
    stamp = old.get("lastTransitionTime") if old and old.get("status") == cond.status else None
    new = {
        "type": cond.type,
        "status": cond.status,
        "reason": cond.reason,
        "message": short(cond.message),
        "observedGeneration": generation,
        "lastTransitionTime": stamp or now_rfc3339(),
    }
    if old is None:
        conditions.append(new)
    else:
        conditions[conditions.index(old)] = new
    status["conditions"] = conditions


def drop_condition(status: dict[str, Any], ctype: str) -> None:
    conditions = [dict(c) for c in status.get("conditions") or () if c.get("type") != ctype]
    status["conditions"] = conditions


def working_copy(status: Mapping[str, Any] | None) -> dict[str, Any]:
    """A deep, mutable copy of a stored status (kopf hands out read-only views)."""
    return copy.deepcopy(_plain(status or {}))


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386) turning ``old`` into ``new``; None deletes a field.

    Nested objects are diffed recursively, because a merge patch merges them: a key dropped from
    ``status.progress`` must be sent as None or the server would keep it.
    """
    patch: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            sub = status_patch(before, value)
            if sub:
                patch[key] = sub
        elif key not in old or before != value:
            patch[key] = _plain(value)
    for key in old:
        if key not in new:
            patch[key] = None
    return patch
