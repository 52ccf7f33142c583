"""The kopf handlers: thin adapters from kopf's causes to the reconcile core.

Each handler reads the indexes, takes the object's lock, re-reads the object (kopf's body may be
older than our own last status write), calls the core and maps its errors onto kopf's retry
semantics. Waiting for another object (a missing Group, an Endpoint not Ready yet) is not an
error: the Device stays Pending and is re-triggered when that object changes, with a slow timer
as a safety net.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from cloudconnector import api
from cloudconnector.core import device as dev
from cloudconnector.core.conditions import find
from cloudconnector.core.conflicts import find_clashes
from cloudconnector.core.endpoint import Usage, check_endpoint, credentials_rejected, set_revocable
from cloudconnector.core.group import group_status
from cloudconnector.core.in_use import hold_message
from cloudconnector.errors import (
    CredentialsError,
    InvalidSpec,
    PermanentError,
    TransientError,
)
from cloudconnector.model import Endpoint, Group, parse_device, parse_endpoint, parse_group
from cloudconnector.operator.config import OperatorConfig
from cloudconnector.operator.indexes import all_of, groups_on, one, peers_of
from cloudconnector.operator.logs import about
from cloudconnector.operator.runtime import DEVICES, ENDPOINTS, GROUPS, Runtime

logger = logging.getLogger(__name__)

CONFIG = OperatorConfig.from_env()
ENDPOINT_KIND = (api.GROUP, api.VERSION, api.ENDPOINTS)
GROUP_KIND = (api.GROUP, api.VERSION, api.GROUPS)
DEVICE_KIND = (api.GROUP, api.VERSION, api.DEVICES)
WAITING_PHASES = (dev.PENDING, dev.CONFLICT)
GROUP_FAILURES = ("EndpointNotFound", "DevicesFailed")  # Group Ready reasons that need attention


class KopfReporter:
    """Core reports become Kubernetes events on the object, and log lines (the reconcilers report
    a problem once, when it appears, so each is logged once)."""

    def __init__(self, body: Mapping[str, Any]) -> None:
        self._body = body

    def info(self, reason: str, message: str) -> None:
        kopf.info(self._body, reason=reason, message=message)
        logger.info("%s: %s", reason, message)

    def warn(self, reason: str, message: str) -> None:
        kopf.warn(self._body, reason=reason, message=message)
        logger.warning("%s: %s", reason, message)


def _runtime(memo: kopf.Memo) -> Runtime:
    return memo["runtime"]  # type: ignore[no-any-return]


def _endpoint_of(group: Group | None, endpoints: Mapping[Any, Any]) -> tuple[Endpoint | None, bool]:
    if group is None:
        return None, False
    body = one(endpoints, (group.ref.namespace, group.endpoint))
    if body is None:
        return None, False
    return parse_endpoint(body), (body.get("status") or {}).get("phase") == "Ready"


def _lookup(endpoints: Mapping[Any, Any]) -> dev.EndpointLookup:
    def lookup(namespace: str, name: str) -> Endpoint | None:
        body = one(endpoints, (namespace, name))
        return parse_endpoint(body) if body is not None else None

    return lookup


def _raise_for_kopf(e: Exception, *, delay: float | None = None) -> None:
    if isinstance(e, CredentialsError):
        raise kopf.TemporaryError(str(e), delay=CONFIG.credentials_retry) from e
    if isinstance(e, TransientError):
        raise kopf.TemporaryError(str(e), delay=delay if delay is not None else e.delay) from e
    if isinstance(e, PermanentError):
        raise kopf.PermanentError(str(e)) from e
    raise e


# -- Devices ---------------------------------------------------------------------------------


def _terminating(body: Mapping[str, Any] | None) -> bool:
    return bool(body and (body.get("metadata") or {}).get("deletionTimestamp"))


def _hold(group_body: Mapping[str, Any] | None, endpoint_body: Mapping[str, Any] | None) -> dev.Hold | None:
    """Why no new identity can be made now: the Group or Endpoint is being deleted (core/in_use.py),
    or the Endpoint is not Ready, saying why (its keys, say), so the device tells the cause too."""
    for kind, body in (("Group", group_body), ("Endpoint", endpoint_body)):
        if body is not None and _terminating(body):
            name = str((body.get("metadata") or {}).get("name"))
            return dev.Hold(f"{kind}Terminating", hold_message(kind, name))
    status = (endpoint_body or {}).get("status") or {}
    ready = find(status.get("conditions"), "Ready") or {}
    if endpoint_body is not None and status.get("phase") != "Ready" and ready.get("message"):
        name = str((endpoint_body.get("metadata") or {}).get("name"))
        return dev.Hold("EndpointNotReady", f"Endpoint {name!r} is not Ready: {ready['message']}")
    return None


async def _credentials_failed(rt: Runtime, namespace: str, name: str, error: CredentialsError) -> None:
    """A device found the Endpoint's keys rejected: the Endpoint says so now, not at its recheck."""
    async with rt.lock("endpoint", namespace, name):
        body = await rt.fresh(ENDPOINTS, namespace, name)
        if body is None or (body.get("status") or {}).get("phase") != "Ready":
            return
        status = body.get("status") or {}
        new = credentials_rejected(status, int(body["metadata"].get("generation") or 0), error)
        await rt.saver(ENDPOINTS, namespace, name, status)(new)
    with about("Endpoint", namespace, name):
        ready = find(new.get("conditions"), "Ready") or {}
        KopfReporter(body).warn(error.reason, str(ready.get("message")))


async def _reconcile_device(
    namespace: str,
    name: str,
    memo: kopf.Memo,
    endpoints_idx: kopf.Index[Any, Any],
    groups_idx: kopf.Index[Any, Any],
    device_peers: kopf.Index[Any, Any],
) -> None:
    with about("Device", namespace, name):
        await _reconcile_device_here(namespace, name, memo, endpoints_idx, groups_idx, device_peers)


async def _reconcile_device_here(
    namespace: str,
    name: str,
    memo: kopf.Memo,
    endpoints_idx: kopf.Index[Any, Any],
    groups_idx: kopf.Index[Any, Any],
    device_peers: kopf.Index[Any, Any],
) -> None:
    rt = _runtime(memo)
    async with rt.lock("device", namespace, name):
        body = await rt.fresh(DEVICES, namespace, name)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            return
        status = body.get("status") or {}
        save = rt.saver(DEVICES, namespace, name, status)
        report = KopfReporter(body)
        group_name = (body.get("spec") or {}).get("group")
        group_body = one(groups_idx, (namespace, group_name)) if group_name else None
        if group_name and group_body is None:
            # The indexes trail the API by one watch event; before waiting, ask the API itself.
            group_body = await rt.fresh(GROUPS, namespace, group_name)
        try:
            group = parse_group(group_body) if group_body is not None else None
            endpoint, ready = _endpoint_of(group, endpoints_idx)
            endpoint_body = one(endpoints_idx, (namespace, group.endpoint)) if group is not None else None
            if group is not None and not ready:
                endpoint_body = await rt.fresh(ENDPOINTS, namespace, group.endpoint)
                if endpoint_body is not None:
                    endpoint = parse_endpoint(endpoint_body)
                    ready = (endpoint_body.get("status") or {}).get("phase") == "Ready"
            prefix = endpoint.aws.thing_prefix if endpoint is not None and endpoint.aws else ""
            device = parse_device(body, thing_prefix=prefix)
        except InvalidSpec as e:
            await save({**status, "phase": dev.FAILED, "message": str(e)})
            report.warn(e.reason, str(e))
            raise kopf.PermanentError(str(e)) from e
        reconciler = rt.device_reconciler(_lookup(endpoints_idx))
        # Peers from every watched namespace: an identity is unique across the proxy's scope.
        clashes = find_clashes(device, peers_of(device_peers, device))
        try:
            await reconciler.reconcile(
                device,
                group,
                endpoint,
                status,
                save,
                endpoint_ready=ready,
                hold=_hold(group_body, endpoint_body),
                clashes=clashes,
                report=report,
            )
        except dev.WaitingError:
            return  # Pending: re-triggered when the awaited object changes
        except CredentialsError as e:
            # The status now names the Endpoint the failing work was for (the old one while moving).
            after = (await rt.fresh(DEVICES, namespace, name) or {}).get("status") or {}
            where = after.get("endpoint") or (group.endpoint if group is not None else None)
            if where:
                await _credentials_failed(rt, namespace, where, e)
            _raise_for_kopf(e)
        except Exception as e:
            _raise_for_kopf(e)
    if clashes and status.get("phase") != dev.CONFLICT:
        # A newly found clash concerns the other side too (it may be Ready and unaware).
        for other in {ref for clash in clashes for ref in clash.others}:
            await rt.retrigger(DEVICES, other.namespace, other.name, "conflict")


@kopf.on.resume(*DEVICE_KIND)
@kopf.on.create(*DEVICE_KIND)
@kopf.on.update(*DEVICE_KIND)
async def device_changed(
    namespace: str,
    name: str,
    memo: kopf.Memo,
    endpoints_idx: kopf.Index[Any, Any],
    groups_idx: kopf.Index[Any, Any],
    device_peers: kopf.Index[Any, Any],
    **_: Any,
) -> None:
    await _reconcile_device(namespace, name, memo, endpoints_idx, groups_idx, device_peers)


@kopf.timer(
    *DEVICE_KIND,
    interval=CONFIG.conflict_recheck,
    idle=CONFIG.conflict_recheck,
    when=lambda status, **_: status.get("phase") in WAITING_PHASES,
)
async def device_waiting(
    namespace: str,
    name: str,
    memo: kopf.Memo,
    endpoints_idx: kopf.Index[Any, Any],
    groups_idx: kopf.Index[Any, Any],
    device_peers: kopf.Index[Any, Any],
    **_: Any,
) -> None:
    """Safety net for Pending and Conflict devices: the clash may be gone, the Group may be back."""
    # The status says why it failed; the change handlers own the retries.
    with contextlib.suppress(kopf.TemporaryError, kopf.PermanentError):
        await _reconcile_device(namespace, name, memo, endpoints_idx, groups_idx, device_peers)


def _renews(status: Mapping[str, Any]) -> bool:
    progress = status.get("progress")
    return isinstance(progress, Mapping) and bool(progress.get("renewAfter"))


@kopf.timer(
    *DEVICE_KIND,
    interval=CONFIG.renewal_check,
    idle=CONFIG.renewal_check,
    when=lambda status, **_: status.get("phase") == dev.READY and _renews(status),
)
async def device_renewal(
    namespace: str,
    name: str,
    status: kopf.Status,
    memo: kopf.Memo,
    endpoints_idx: kopf.Index[Any, Any],
    groups_idx: kopf.Index[Any, Any],
    device_peers: kopf.Index[Any, Any],
    **_: Any,
) -> None:
    """Short-lived certificates (Azure) are renewed by the core once their renewAfter has passed."""
    if dev.renewal_due(status):
        await _reconcile_device(namespace, name, memo, endpoints_idx, groups_idx, device_peers)


@kopf.on.delete(*DEVICE_KIND)
async def device_deleted(
    namespace: str,
    name: str,
    body: kopf.Body,
    memo: kopf.Memo,
    retry: int,
    endpoints_idx: kopf.Index[Any, Any],
    **_: Any,
) -> None:
    with about("Device", namespace, name):
        await _finalize_device(namespace, name, body, memo, retry, endpoints_idx)


async def _finalize_device(
    namespace: str,
    name: str,
    body: kopf.Body,
    memo: kopf.Memo,
    retry: int,
    endpoints_idx: kopf.Index[Any, Any],
) -> None:
    rt = _runtime(memo)
    async with rt.lock("device", namespace, name):
        fresh = await rt.fresh(DEVICES, namespace, name) or dict(body)
        status = fresh.get("status") or {}
        lookup = _lookup(endpoints_idx)
        holder = lookup(namespace, status["endpoint"]) if status.get("endpoint") else None
        prefix = holder.aws.thing_prefix if holder is not None and holder.aws else ""
        try:
            device = parse_device(fresh, thing_prefix=prefix)
        except InvalidSpec:
            # Never provisioned (the spec never parsed): nothing at the cloud, nothing stored.
            logger.info("device %s/%s had an invalid spec; nothing to clean", namespace, name)
            return
        save = rt.saver(DEVICES, namespace, name, status)
        try:
            await rt.device_reconciler(lookup).finalize(device, status, save, report=KopfReporter(fresh))
        except Exception as e:
            # Cleaning up retries with exponential backoff until the cloud side is clean.
            delay = min(300.0, 2.0 * 2 ** min(retry, 8))
            _raise_for_kopf(e, delay=delay)


# -- Groups ----------------------------------------------------------------------------------


async def _refresh_group(
    namespace: str,
    name: str,
    memo: kopf.Memo,
    endpoints_idx: kopf.Index[Any, Any],
    devices_by_group: kopf.Index[Any, Any],
    *,
    retrigger: bool,
    connected: int = 0,
) -> None:
    with about("Group", namespace, name):
        await _refresh_group_here(
            namespace, name, memo, endpoints_idx, devices_by_group, retrigger=retrigger, connected=connected
        )


async def _refresh_group_here(
    namespace: str,
    name: str,
    memo: kopf.Memo,
    endpoints_idx: kopf.Index[Any, Any],
    devices_by_group: kopf.Index[Any, Any],
    *,
    retrigger: bool,
    connected: int = 0,
) -> None:
    rt = _runtime(memo)
    async with rt.lock("group", namespace, name):
        body = await rt.fresh(GROUPS, namespace, name)
        if body is None:
            return
        group = parse_group(body)
        status = body.get("status") or {}
        members = list(all_of(devices_by_group, (namespace, name)))
        exists = one(endpoints_idx, (namespace, group.endpoint)) is not None
        phases = ({"phase": phase} for _, phase in members)
        new = group_status(group, status, phases, endpoint_exists=exists, connected=connected)
        await rt.saver(GROUPS, namespace, name, status)(new)
        moved = bool(status.get("endpoint")) and status.get("endpoint") != group.endpoint
    before, after = find(status.get("conditions"), "Ready") or {}, find(new.get("conditions"), "Ready") or {}
    if after.get("reason") in GROUP_FAILURES and after.get("reason") != before.get("reason"):
        logger.warning("%s: %s", after.get("reason"), after.get("message"))  # once per new problem
    if moved:
        KopfReporter(body).info("EndpointChanged", f"devices move to Endpoint {group.endpoint}")
    if retrigger or moved:
        for device_name, phase in members:
            if moved or phase != dev.READY:
                await rt.retrigger(DEVICES, namespace, device_name, "group")


@kopf.on.resume(*GROUP_KIND)
@kopf.on.create(*GROUP_KIND)
@kopf.on.update(*GROUP_KIND)
async def group_changed(
    namespace: str,
    name: str,
    memo: kopf.Memo,
    endpoints_idx: kopf.Index[Any, Any],
    devices_by_group: kopf.Index[Any, Any],
    devices_connected: kopf.Index[Any, Any],
    **_: Any,
) -> None:
    connected = len(list(all_of(devices_connected, (namespace, name))))
    try:
        await _refresh_group(
            namespace, name, memo, endpoints_idx, devices_by_group, retrigger=True, connected=connected
        )
    except InvalidSpec as e:
        raise kopf.PermanentError(str(e)) from e


# Status timers retry a failure (e.g. the API server briefly unreachable) at their own interval,
# not after kopf's default 60 s backoff, which would leave the counts stale long after recovery.
@kopf.timer(*GROUP_KIND, interval=CONFIG.status_interval, backoff=CONFIG.status_interval)
async def group_counts(
    namespace: str,
    name: str,
    memo: kopf.Memo,
    endpoints_idx: kopf.Index[Any, Any],
    devices_by_group: kopf.Index[Any, Any],
    devices_connected: kopf.Index[Any, Any],
    **_: Any,
) -> None:
    connected = len(list(all_of(devices_connected, (namespace, name))))
    with contextlib.suppress(InvalidSpec):  # reported by group_changed
        await _refresh_group(
            namespace, name, memo, endpoints_idx, devices_by_group, retrigger=False, connected=connected
        )


# -- Endpoints -------------------------------------------------------------------------------


def _usage(
    namespace: str, name: str, groups_idx: kopf.Index[Any, Any], devices_by_group: kopf.Index[Any, Any]
) -> tuple[Usage, list[str]]:
    total = provisioned = 0
    waiting: list[str] = []
    for group in groups_on(groups_idx, namespace, name):
        for device_name, phase in all_of(devices_by_group, (namespace, group)):
            total += 1
            if phase == dev.READY:
                provisioned += 1
            else:
                waiting.append(device_name)
    return Usage(total, provisioned), waiting


async def _check_endpoint(
    namespace: str,
    name: str,
    memo: kopf.Memo,
    groups_idx: kopf.Index[Any, Any],
    devices_by_group: kopf.Index[Any, Any],
) -> None:
    with about("Endpoint", namespace, name):
        await _check_endpoint_here(namespace, name, memo, groups_idx, devices_by_group)


async def _check_endpoint_here(
    namespace: str,
    name: str,
    memo: kopf.Memo,
    groups_idx: kopf.Index[Any, Any],
    devices_by_group: kopf.Index[Any, Any],
) -> None:
    rt = _runtime(memo)
    async with rt.lock("endpoint", namespace, name):
        body = await rt.fresh(ENDPOINTS, namespace, name)
        if body is None:
            return
        status = body.get("status") or {}
        save = rt.saver(ENDPOINTS, namespace, name, status)
        try:
            endpoint = parse_endpoint(body)
        except InvalidSpec as e:
            await save({**status, "phase": "Error"})
            kopf.warn(body, reason=e.reason, message=str(e))
            raise kopf.PermanentError(str(e)) from e
        usage, waiting = _usage(namespace, name, groups_idx, devices_by_group)
        new = await check_endpoint(endpoint, rt.pool, status, usage, report=KopfReporter(body))
        await save(new)
    if new.get("phase") == "Ready" and status.get("phase") != "Ready":
        for device_name in waiting:  # devices that waited for this Endpoint (or its keys)
            await rt.retrigger(DEVICES, namespace, device_name, "endpoint")


@kopf.on.resume(*ENDPOINT_KIND)
@kopf.on.create(*ENDPOINT_KIND)
@kopf.on.update(*ENDPOINT_KIND)
async def endpoint_changed(
    namespace: str,
    name: str,
    memo: kopf.Memo,
    groups_idx: kopf.Index[Any, Any],
    devices_by_group: kopf.Index[Any, Any],
    **_: Any,
) -> None:
    await _check_endpoint(namespace, name, memo, groups_idx, devices_by_group)


@kopf.timer(
    *ENDPOINT_KIND,
    interval=CONFIG.endpoint_recheck,
    initial_delay=CONFIG.endpoint_recheck,
    backoff=CONFIG.status_interval,  # the recheck interval (300 s) would be longer than kopf's own
)
async def endpoint_recheck(
    namespace: str,
    name: str,
    memo: kopf.Memo,
    groups_idx: kopf.Index[Any, Any],
    devices_by_group: kopf.Index[Any, Any],
    **_: Any,
) -> None:
    """Keys get revoked or rotated without the Endpoint changing: look again from time to time."""
    with contextlib.suppress(kopf.PermanentError):
        await _check_endpoint(namespace, name, memo, groups_idx, devices_by_group)


@kopf.timer(
    *ENDPOINT_KIND,
    interval=CONFIG.credentials_retry,
    idle=CONFIG.credentials_retry,
    when=lambda status, **_: status.get("phase") == "Error",
)
async def endpoint_error_recheck(
    namespace: str,
    name: str,
    memo: kopf.Memo,
    groups_idx: kopf.Index[Any, Any],
    devices_by_group: kopf.Index[Any, Any],
    **_: Any,
) -> None:
    """An Endpoint in Error is looked at as often as its devices retry, so that restored keys
    bring it (and the devices waiting for it) back without waiting for the slow recheck."""
    with contextlib.suppress(kopf.PermanentError):
        await _check_endpoint(namespace, name, memo, groups_idx, devices_by_group)


@kopf.timer(*ENDPOINT_KIND, interval=CONFIG.status_interval, backoff=CONFIG.status_interval)
async def endpoint_usage(
    namespace: str,
    name: str,
    memo: kopf.Memo,
    groups_idx: kopf.Index[Any, Any],
    devices_by_group: kopf.Index[Any, Any],
    **_: Any,
) -> None:
    """Keep the CredentialsRevocable condition current without calling the cloud."""
    with about("Endpoint", namespace, name):
        await _endpoint_usage_here(namespace, name, memo, groups_idx, devices_by_group)


async def _endpoint_usage_here(
    namespace: str,
    name: str,
    memo: kopf.Memo,
    groups_idx: kopf.Index[Any, Any],
    devices_by_group: kopf.Index[Any, Any],
) -> None:
    rt = _runtime(memo)
    async with rt.lock("endpoint", namespace, name):
        body = await rt.fresh(ENDPOINTS, namespace, name)
        if body is None:
            return
        try:
            endpoint = parse_endpoint(body)
        except InvalidSpec:
            return
        status = body.get("status") or {}
        new = dict(status)
        usage, _waiting = _usage(namespace, name, groups_idx, devices_by_group)
        set_revocable(new, endpoint, usage)
        await rt.saver(ENDPOINTS, namespace, name, status)(new)


# Deleting Groups and Endpoints: cloudconnector/operator/protection.py (in-use protection).
