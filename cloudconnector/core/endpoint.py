"""An Endpoint's status: are its cloud API credentials good, where do devices connect, and may
the credentials be revoked now (IAM hygiene: keys are only needed while devices are provisioned).

A failed check keeps the last known data-plane host and port in the status: devices already
provisioned keep working through the proxy even while the API keys are revoked.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cloudconnector.core import conditions as cond
from cloudconnector.core.conditions import Condition
from cloudconnector.core.provisioners import ProvisionerSource
from cloudconnector.core.reporting import LogReporter, Reporter
from cloudconnector.errors import ConnectorError, CredentialsError, short
from cloudconnector.model import Endpoint

logger = logging.getLogger(__name__)

READY = "Ready"
ERROR = "Error"
PENDING = "Pending"


@dataclass(frozen=True)
class Usage:
    """How many devices (over all Groups pointing at the Endpoint) exist and are Ready."""

    devices: int
    provisioned: int


async def check_endpoint(
    endpoint: Endpoint,
    provisioners: ProvisionerSource,
    status: Mapping[str, Any] | None,
    usage: Usage | None = None,
    *,
    report: Reporter | None = None,
) -> dict[str, Any]:
    """Check the credentials and resolve the data endpoint; returns the new status (never raises
    for cloud errors: they become the Ready condition)."""
    st = cond.working_copy(status)
    report = report or LogReporter()
    gen = endpoint.generation
    was = st.get("phase")
    st["observedGeneration"] = gen
    try:
        provisioner = await provisioners.get(endpoint)
        info = await provisioner.check()
    except ConnectorError as e:
        st["phase"] = ERROR
        reason = e.reason
        message = _failure_message(e)
        cond.set_condition(st, Condition(cond.READY, cond.FALSE, reason, message), gen)
        if was != ERROR:
            report.warn(reason, message)
    else:
        st["phase"] = READY
        st["host"] = info.host
        st["port"] = info.port
        message = f"data endpoint {info.host}:{info.port}"
        cond.set_condition(st, Condition(cond.READY, cond.TRUE, "CredentialsValid", message), gen)
        if was != READY:
            report.info("Ready", message)
    if usage is not None:
        set_revocable(st, endpoint, usage)
    return st


def _failure_message(e: ConnectorError) -> str:
    message = short(e)
    if isinstance(e, CredentialsError):
        message += "; provisioned devices keep working, new work waits for valid credentials"
    return message


def credentials_rejected(
    status: Mapping[str, Any] | None, generation: int, error: CredentialsError
) -> dict[str, Any]:
    """The status of an Endpoint whose keys a device's cloud call just found rejected: not Ready
    from now on, rather than from its next scheduled check."""
    st = cond.working_copy(status)
    st["phase"] = ERROR
    message = f"during device work: {_failure_message(error)}"
    cond.set_condition(st, Condition(cond.READY, cond.FALSE, error.reason, message), generation)
    return st


def set_revocable(st: dict[str, Any], endpoint: Endpoint, usage: Usage) -> None:
    gen = endpoint.generation
    if usage.devices and usage.provisioned == usage.devices:
        secret = _secret_name(endpoint)
        where = f" in Secret {secret}" if secret else ""
        revocable = Condition(
            cond.CREDENTIALS_REVOCABLE,
            cond.TRUE,
            "AllDevicesProvisioned",
            f"all {usage.devices} devices are provisioned: the cloud API keys{where} can be revoked "
            "until new devices, rotations or deletions need them",
        )
    elif usage.devices:
        revocable = Condition(
            cond.CREDENTIALS_REVOCABLE,
            cond.FALSE,
            "ProvisioningPending",
            f"{usage.devices - usage.provisioned} of {usage.devices} devices still need the cloud API keys",
        )
    else:
        revocable = Condition(
            cond.CREDENTIALS_REVOCABLE, cond.FALSE, "NoDevices", "no devices use this Endpoint"
        )
    cond.set_condition(st, revocable, gen)


def _secret_name(endpoint: Endpoint) -> str | None:
    if endpoint.aws is not None:
        return endpoint.aws.credentials_secret
    if endpoint.azure is not None:
        return endpoint.azure.credentials_secret
    return None
