"""The Device life cycle: provision, adopt, rotate, migrate and finalize one cloud identity.

Plain asyncio over parsed model objects, a status dict and a ``save(status)`` coroutine, so the
kopf operator and the standalone mode share it. Every step that changes something outside
(cloud, key store) is preceded by a status write: the provisioner's resumable record goes to
``status.progress`` through its checkpoint, and ``status.endpoint`` names where that record lives
before the first cloud call, so a process killed anywhere resumes at the same Endpoint.

Errors leave the status describing what went wrong and are re-raised for the caller's retry
policy: :class:`TransientError` (retry after its delay), :class:`CredentialsError` (the Endpoint's
keys were rejected; retry slowly), any other :class:`PermanentError` (phase Failed, no retry).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from cloudconnector.clouds.base import CloudIdentity, Progress
from cloudconnector.clouds.certs import validate_material
from cloudconnector.core import conditions as cond
from cloudconnector.core.conditions import Condition
from cloudconnector.core.conflicts import Clash
from cloudconnector.core.provisioners import ProvisionerSource
from cloudconnector.core.reporting import LogReporter, Reporter
from cloudconnector.core.steps import new_steps
from cloudconnector.errors import (
    ConnectorError,
    CredentialsError,
    PermanentError,
    TransientError,
    short,
)
from cloudconnector.keystore.base import KeyMaterial, KeyWriter
from cloudconnector.model import Device, Endpoint, EndpointType, Group

logger = logging.getLogger(__name__)

PENDING = "Pending"
PROVISIONING = "Provisioning"
READY = "Ready"
FAILED = "Failed"
CONFLICT = "Conflict"
DELETING = "Deleting"

IDENTITY_FIELDS = (
    "cloudId",
    "certificateId",
    "certificateArn",
    "thumbprint",
    "notAfter",
    "keyLocation",
    "policyName",
)

Status = dict[str, Any]
Save = Callable[[Status], Awaitable[None]]
EndpointLookup = Callable[[str, str], Endpoint | None]
"""(namespace, name) -> the parsed Endpoint, or None if it does not exist (any more)."""

# Waiting for something another object must change: not an error, so a slow, quiet retry.
WAIT_DELAY = 30.0


@dataclass(frozen=True)
class Hold:
    """Why no new cloud work may start for a device now (its Group or Endpoint is being deleted,
    or the Endpoint is not Ready and says why): an identity it already has stays in service, and
    removing one is always allowed."""

    reason: str
    message: str


class SecretReader(Protocol):
    """Reads a Secret's data (already base64-decoded) for manual provisioning; None if missing."""

    async def read(self, namespace: str, name: str) -> Mapping[str, bytes] | None: ...


class _Writer:
    """Writes the status only when it differs from what was last written."""

    def __init__(self, stored: Mapping[str, Any], save: Save) -> None:
        self._last = copy.deepcopy(dict(stored))
        self._save = save

    async def __call__(self, status: Status) -> None:
        if status != self._last:
            await self._save(copy.deepcopy(status))
            self._last = copy.deepcopy(status)


def has_identity(status: Mapping[str, Any]) -> bool:
    """Whether provisioning completed at ``status.endpoint`` (the certificate id is set last)."""
    return bool(status.get("certificateId") and status.get("endpoint"))


class DeviceReconciler:
    def __init__(
        self,
        provisioners: ProvisionerSource,
        keys: KeyWriter,
        lookup_endpoint: EndpointLookup,
        secrets: SecretReader | None = None,
    ) -> None:
        self._provisioners = provisioners
        self._keys = keys
        self._lookup = lookup_endpoint
        self._secrets = secrets

    async def reconcile(
        self,
        device: Device,
        group: Group | None,
        endpoint: Endpoint | None,
        status: Mapping[str, Any] | None,
        save: Save,
        *,
        endpoint_ready: bool = True,
        hold: Hold | None = None,
        clashes: Sequence[Clash] = (),
        report: Reporter | None = None,
    ) -> Status:
        """Bring the device's cloud identity in line with its spec; returns the new status."""
        if group is not None and group.topic_template is not None:
            device = dataclasses.replace(device, topic_template=group.topic_template)
        st = cond.working_copy(status)
        write = _Writer(st, save)
        report = report or LogReporter()
        gen = device.generation
        st["observedGeneration"] = gen

        if clashes:
            was = st.get("phase")
            message = "; ".join(c.describe() for c in clashes)
            if has_identity(st):
                message += " (existing identity kept, not routed until resolved)"
            st["phase"] = CONFLICT
            st["message"] = message
            cond.set_condition(st, Condition(cond.CONFLICT, cond.TRUE, clashes[0].reason, message), gen)
            cond.set_condition(st, Condition(cond.READY, cond.FALSE, "Conflict", message), gen)
            await write(st)
            if was != CONFLICT:
                report.warn("Conflict", message)
            return st
        cond.drop_condition(st, cond.CONFLICT)

        failure = _Failure()
        with _outcome(st, gen, report, failure):
            if group is None:
                raise WaitingError("GroupNotFound", f"Group {device.group!r} does not exist")
            if endpoint is None:
                raise WaitingError("EndpointNotFound", f"Endpoint {group.endpoint!r} does not exist")
            previous = st.get("endpoint")
            moving = bool(previous and previous != endpoint.ref.name)
            rotating = device.rotate_token is not None and _handled_token(st) != device.rotate_token
            renewing = has_identity(st) and renewal_due(st)
            # A finished identity keeps working while its Endpoint is not Ready (for instance after
            # its API keys were revoked on purpose): only new work waits for the Endpoint.
            new_work = moving or rotating or renewing or not has_identity(st)
            if new_work and hold is not None:
                raise WaitingError(hold.reason, hold.message)
            if new_work and not endpoint_ready:
                raise WaitingError("EndpointNotReady", f"Endpoint {endpoint.ref.name!r} is not Ready")
            if moving:
                assert previous is not None
                await self._move_away(device, previous, st, write, report)
            if not has_identity(st):
                if device.credentials_secret:
                    await self._adopt(device, endpoint, st, write, report)
                else:
                    await self._provision(device, endpoint, st, write, report)
            elif rotating or renewing:
                await self._rotate(device, endpoint, st, write, report, renewal=not rotating)
            self._mark_ready(device, st)
        await write(st)
        if failure.error is not None:
            raise failure.error
        return st

    async def finalize(
        self,
        device: Device,
        status: Mapping[str, Any] | None,
        save: Save,
        *,
        report: Reporter | None = None,
    ) -> Status:
        """Remove the cloud identity and the stored keys; raises while anything is left."""
        st = cond.working_copy(status)
        write = _Writer(st, save)
        report = report or LogReporter()
        gen = device.generation
        st["phase"] = DELETING
        failure = _Failure()
        with _outcome(st, gen, report, failure, deleting=True):
            if st.get("endpoint") and (st.get("progress") or has_identity(st)):
                await self._deprovision_at(device, st["endpoint"], st, write, report)
            await self._keys.delete(device.ref)
            report.info("Deprovisioned", "cloud identity and stored credentials removed")
        await write(st)
        if failure.error is not None:
            raise failure.error
        return st

    # -- steps -----------------------------------------------------------------------------

    async def _provision(
        self, device: Device, endpoint: Endpoint, st: Status, write: _Writer, report: Reporter
    ) -> None:
        st["endpoint"] = endpoint.ref.name
        st["endpointType"] = endpoint.type.value
        st.setdefault("progress", {})
        if st.get("phase") != PROVISIONING:
            st["phase"] = PROVISIONING
            st["message"] = f"creating cloud identity at Endpoint {endpoint.ref.name}"
            report.info("Provisioning", st["message"])
        await write(st)
        provisioner = await self._provisioners.get(endpoint)
        identity = await provisioner.provision(
            device, st["progress"], _checkpoint(st, write, report), self._keys
        )
        _record(st, identity)
        if device.rotate_token:
            st["rotation"] = {"token": device.rotate_token, "rotatedAt": cond.now_rfc3339()}
        report.info("Provisioned", f"{_sim(device)} is {identity.cloud_id} at {endpoint.ref.name}")

    async def _manual_material(self, device: Device) -> tuple[KeyMaterial, str]:
        """The device's own certificate and key from its Secret, checked; and its SHA-256."""
        assert device.credentials_secret is not None
        if self._secrets is None:
            raise PermanentError("manual provisioning is not available here", reason="ManualUnsupported")
        data = await self._secrets.read(device.ref.namespace, device.credentials_secret)
        if data is None:
            raise WaitingError("SecretNotFound", f"Secret {device.credentials_secret!r} does not exist")
        try:
            cert_pem, key_pem = data["tls.crt"].decode(), data["tls.key"]
        except (KeyError, UnicodeDecodeError):
            raise PermanentError(
                f"Secret {device.credentials_secret!r} must hold tls.crt and tls.key",
                reason="InvalidCredentials",
            ) from None
        info = validate_material(cert_pem, key_pem)  # raises PermanentError naming the problem
        ca = data.get("ca.crt")
        return KeyMaterial(cert_pem, key_pem, ca.decode() if ca else None), info.sha256

    async def _adopt(
        self, device: Device, endpoint: Endpoint, st: Status, write: _Writer, report: Reporter
    ) -> None:
        material, sha256 = await self._manual_material(device)
        st["endpoint"] = endpoint.ref.name
        st["endpointType"] = endpoint.type.value
        st.setdefault("progress", {})
        st["phase"] = PROVISIONING
        st["message"] = f"adopting the certificate from Secret {device.credentials_secret}"
        await write(st)
        report.info("Adopting", st["message"])
        provisioner = await self._provisioners.get(endpoint)
        identity = await provisioner.adopt(
            device, material, st["progress"], _checkpoint(st, write, report), self._keys
        )
        _record(st, identity)
        st["manualSecret"] = (
            f"credentials stored in the key store; delete Secret {device.ref.namespace}/"
            f"{device.credentials_secret} (thumbprint {sha256[:16]}...)"
        )
        report.info("Adopted", f"{_sim(device)} is {identity.cloud_id} at {endpoint.ref.name}")
        report.warn("DeleteSecret", f"Secret {device.credentials_secret} is no longer needed: delete it")

    async def _rotate(
        self,
        device: Device,
        endpoint: Endpoint,
        st: Status,
        write: _Writer,
        report: Reporter,
        *,
        renewal: bool = False,
    ) -> None:
        # A renewal keeps the handled token, so the annotation does not count as seen before it was.
        token = _handled_token(st) if renewal else device.rotate_token
        if not cond.is_true(st, cond.ROTATING):
            reason, why = (
                ("RenewalDue", f"certificate expires {st.get('notAfter')}")
                if renewal
                else ("RotationRequested", f"token {token}")
            )
            cond.set_condition(st, Condition(cond.ROTATING, cond.TRUE, reason, why), device.generation)
            await write(st)
            report.info("Rotating", f"new certificate requested: {why}")
        provisioner = await self._provisioners.get(endpoint)
        if device.credentials_secret and endpoint.type is EndpointType.MQTT and not renewal:
            # A broker's device brings its own certificate: rotating stores the one now in its
            # Secret (the user replaced it there), which the proxy then uses from the next session.
            material, _ = await self._manual_material(device)
            progress = st.setdefault("progress", {})
            identity = await provisioner.adopt(
                device, material, progress, _checkpoint(st, write, report), self._keys
            )
        else:
            identity = await provisioner.rotate(
                device, st.setdefault("progress", {}), _checkpoint(st, write, report), self._keys
            )
        _record(st, identity)
        st["rotation"] = {"token": token, "rotatedAt": cond.now_rfc3339()}
        cond.drop_condition(st, cond.ROTATING)
        report.info("Rotated", f"certificate {identity.certificate_id[:16]} now active")

    async def _move_away(
        self, device: Device, previous: str, st: Status, write: _Writer, report: Reporter
    ) -> None:
        report.info("Migrating", f"removing the identity at Endpoint {previous}")
        st["phase"] = PROVISIONING
        st["message"] = f"migrating from Endpoint {previous}"
        await write(st)
        if st.get("progress") or has_identity(st):
            await self._deprovision_at(device, previous, st, write, report)
        for key in ("endpoint", "endpointType", "progress", "manualSecret", *IDENTITY_FIELDS):
            st.pop(key, None)
        await write(st)
        report.info("Migrated", f"identity at Endpoint {previous} removed")

    async def _deprovision_at(
        self, device: Device, name: str, st: Status, write: _Writer, report: Reporter
    ) -> None:
        old = self._lookup(device.ref.namespace, name)
        if old is None:
            raise WaitingError("EndpointNotFound", f"Endpoint {name!r} holding the identity does not exist")
        provisioner = await self._provisioners.get(old, removal=True)
        await provisioner.deprovision(device, st.setdefault("progress", {}), _checkpoint(st, write, report))

    def _mark_ready(self, device: Device, st: Status) -> None:
        st["phase"] = READY
        st.pop("step", None)
        message = f"{_sim(device)} is {st.get('cloudId')} at Endpoint {st.get('endpoint')}"
        st["message"] = message
        cond.set_condition(st, Condition(cond.READY, cond.TRUE, "Provisioned", message), device.generation)


class WaitingError(TransientError):
    """Something another object must change first (a Group, an Endpoint, a Secret)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, reason=reason, delay=WAIT_DELAY)


class _Failure:
    """Holds the error of a failed step until the status describing it has been written."""

    error: ConnectorError | None = None


@contextmanager
def _outcome(
    st: Status, gen: int, report: Reporter, failure: _Failure, *, deleting: bool = False
) -> Iterator[None]:
    """Turn a step's failure into phase, message, condition and event."""
    try:
        yield
    except ConnectorError as e:
        failure.error = e
    except Exception as e:  # a bug or an unwrapped library error: retry, but say what it was
        logger.exception("unexpected error while reconciling")
        failure.error = TransientError(f"internal error: {type(e).__name__}", reason="InternalError")
    error = failure.error
    if error is None:
        return
    message = short(error)
    if deleting:
        phase = DELETING
    elif isinstance(error, WaitingError | CredentialsError):
        # Keys revoked or their Secret gone: someone restores them and the device carries on by
        # itself, so this is waiting, not Failed (which means only a person editing it can help).
        phase = PENDING
    elif isinstance(error, TransientError):
        phase = st.get("phase") if st.get("phase") == PROVISIONING else PENDING
    else:
        phase = FAILED
    if not deleting and cond.is_true(st, cond.ROTATING) and has_identity(st):
        # A failed rotation leaves the old, still valid certificate in service.
        phase = READY
        cond.set_condition(st, Condition(cond.ROTATING, cond.FALSE, error.reason, message), gen)
    else:
        cond.set_condition(st, Condition(cond.READY, cond.FALSE, error.reason, message), gen)
    changed = st.get("message") != message
    st["phase"] = phase
    st["message"] = message
    if changed:  # one event per new problem, not one per retry
        (report.info if isinstance(error, WaitingError) else report.warn)(error.reason, message)


def _checkpoint(st: Status, write: _Writer, report: Reporter) -> Callable[[Progress], Awaitable[None]]:
    # Provisioners change the progress dict they were given in place: compare with a copy.
    seen = copy.deepcopy(st.get("progress"))

    async def checkpoint(progress: Progress) -> None:
        nonlocal seen
        done = new_steps(seen, progress) if st.get("phase") == PROVISIONING else []
        seen = copy.deepcopy(dict(progress))
        st["progress"] = copy.deepcopy(dict(progress))
        if done:
            st["step"] = done[-1][0]  # a printed column: each checkpoint row says what it did
        await write(st)
        for reason, message in done:  # after the write: an event never runs ahead of the status
            report.info(reason, message)

    return checkpoint


def _record(st: Status, identity: CloudIdentity) -> None:
    st["cloudId"] = identity.cloud_id
    st["certificateId"] = identity.certificate_id
    st["thumbprint"] = identity.thumbprint
    st["notAfter"] = identity.not_after.isoformat().replace("+00:00", "Z")
    st["keyLocation"] = identity.key_location
    for key, value in (("certificateArn", identity.certificate_arn), ("policyName", identity.policy_name)):
        if value:
            st[key] = value
        else:
            st.pop(key, None)


def renewal_due(st: Mapping[str, Any], now: dt.datetime | None = None) -> bool:
    """True once the time the provisioner recorded in ``progress.renewAfter`` has passed.

    Provisioners that issue short-lived certificates (Azure: self-signed, renewed at two thirds of
    their lifetime) record it; AWS's certificates outlive any fleet and record none.
    """
    progress = st.get("progress")
    when = progress.get("renewAfter") if isinstance(progress, Mapping) else None
    if not isinstance(when, str):
        return False
    try:
        due = dt.datetime.fromisoformat(when.replace("Z", "+00:00"))
    except ValueError:
        return False
    if due.tzinfo is None:
        due = due.replace(tzinfo=dt.UTC)
    return (now or dt.datetime.now(dt.UTC)) >= due


def _handled_token(st: Mapping[str, Any]) -> str | None:
    rotation = st.get("rotation") or {}
    return rotation.get("token") if isinstance(rotation, Mapping) else None


def _sim(device: Device) -> str:
    return f"SIM {device.iccid}" + (f" (IMSI {device.imsi})" if device.imsi else "")


__all__ = [
    "CONFLICT",
    "DELETING",
    "FAILED",
    "PENDING",
    "PROVISIONING",
    "READY",
    "CredentialsError",
    "DeviceReconciler",
    "EndpointLookup",
    "Save",
    "SecretReader",
    "has_identity",
]
