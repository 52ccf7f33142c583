"""Operator settings from the environment (the Helm chart sets these; tests set them too).

``CLOUDCONNECTOR_NAMESPACES``
    Comma-separated namespaces (or kopf globs) to watch; empty: the whole cluster.
``CLOUDCONNECTOR_PEERING``
    kopf peering object name for an active/standby pair (the chart's ``operator.peering``); unset
    or ``off`` (the default) runs one operator alone, needing no kopf.dev CRDs.
``CLOUDCONNECTOR_NAMESPACE_SCANNING``
    ``off`` disables kopf's dynamic namespace/CRD scanning (needs no cluster-wide list rights).
    Default: off when ``CLOUDCONNECTOR_NAMESPACES`` names plain namespaces only (nothing to
    resolve, and a namespaced install may not list namespaces), else on.
``CLOUDCONNECTOR_ENDPOINT_RECHECK``
    Seconds between credential checks of each Endpoint (default 300).
``CLOUDCONNECTOR_STATUS_INTERVAL``
    Seconds between Group/Endpoint count refreshes (default 10).
``CLOUDCONNECTOR_CONFLICT_RECHECK``
    Seconds between re-checks of Devices in phase Conflict (default 15).
``CLOUDCONNECTOR_RENEWAL_CHECK``
    Seconds between checks whether a Ready device's certificate is due for renewal (default 3600).
``CLOUDCONNECTOR_CREDENTIALS_RETRY``
    Seconds before a device retries after its Endpoint's keys were rejected (default 120).
``CLOUDCONNECTOR_RATE_BURST``
    Token-bucket burst per Endpoint (default 1: never above the configured rate).
``CLOUDCONNECTOR_CONSISTENCY_TIMEOUT``
    kopf's wait for its own patch to come back in the watch stream (default 5).
``CLOUDCONNECTOR_LOG_LEVEL``
    Python log level of the operator process (default ``INFO``).
``CLOUDCONNECTOR_LOG_JSON``
    One JSON object per log line (default ``true``); ``false`` for plain text at a terminal.
``CLOUDCONNECTOR_LIVENESS``
    kopf liveness endpoint URL, e.g. ``http://0.0.0.0:8080/healthz`` (default: none).
Vault: see :mod:`cloudconnector.keystore.vault_config`. Kubernetes: :mod:`cloudconnector.kube.config`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from cloudconnector.errors import InvalidSpec

OFF = ("", "off", "false", "no", "0")


@dataclass(frozen=True)
class OperatorConfig:
    namespaces: tuple[str, ...] = ()
    peering: str | None = None
    namespace_scanning: bool = True
    endpoint_recheck: float = 300.0
    status_interval: float = 10.0
    conflict_recheck: float = 15.0
    credentials_retry: float = 120.0
    renewal_check: float = 3600.0
    rate_burst: float = 1.0
    consistency_timeout: float = 5.0
    liveness: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if env is None else env
        peering = env.get("CLOUDCONNECTOR_PEERING", "off").strip()
        listed = env.get("CLOUDCONNECTOR_NAMESPACES", "").split(",")
        namespaces = tuple(n.strip() for n in listed if n.strip())
        globs = not namespaces or any(c in n for n in namespaces for c in "*?[!")
        scanning = env.get("CLOUDCONNECTOR_NAMESPACE_SCANNING", "on" if globs else "off")
        return cls(
            namespaces=namespaces,
            peering=None if peering.lower() in OFF else peering,
            namespace_scanning=scanning.strip().lower() not in OFF,
            endpoint_recheck=_seconds(env, "CLOUDCONNECTOR_ENDPOINT_RECHECK", 300.0),
            status_interval=_seconds(env, "CLOUDCONNECTOR_STATUS_INTERVAL", 10.0),
            conflict_recheck=_seconds(env, "CLOUDCONNECTOR_CONFLICT_RECHECK", 15.0),
            credentials_retry=_seconds(env, "CLOUDCONNECTOR_CREDENTIALS_RETRY", 120.0),
            renewal_check=_seconds(env, "CLOUDCONNECTOR_RENEWAL_CHECK", 3600.0),
            rate_burst=_seconds(env, "CLOUDCONNECTOR_RATE_BURST", 1.0),
            consistency_timeout=_seconds(env, "CLOUDCONNECTOR_CONSISTENCY_TIMEOUT", 5.0),
            liveness=env.get("CLOUDCONNECTOR_LIVENESS") or None,
        )


def _seconds(env: Mapping[str, str], key: str, default: float) -> float:
    text = env.get(key)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise InvalidSpec(key, "must be a number") from None
    if value < 0:
        raise InvalidSpec(key, "must not be negative")
    return value
