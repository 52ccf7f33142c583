"""kopf delete handlers that keep a Group or an Endpoint while Devices use it (core/in_use.py).

Having a non-optional delete handler is what makes kopf put its finalizer on every Group and
Endpoint. While Devices hold the object, the handler records the ``Terminating`` condition,
posts one event, and asks kopf to look again after the status interval; the holders are listed
from the API itself, not from the indexes, which trail it by a watch event.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from cloudconnector import api
from cloudconnector.core import conditions as cond
from cloudconnector.core.in_use import TERMINATING, endpoint_holders, group_holders, mark_terminating
from cloudconnector.errors import InvalidSpec
from cloudconnector.kube import Resource
from cloudconnector.model import parse_endpoint
from cloudconnector.operator.handlers import CONFIG, ENDPOINT_KIND, GROUP_KIND, _runtime
from cloudconnector.operator.logs import about
from cloudconnector.operator.runtime import DEVICES, ENDPOINTS, GROUPS, Runtime

logger = logging.getLogger(__name__)


async def _wait_for(
    rt: Runtime, res: Resource, kind: str, namespace: str, name: str, holders: list[str]
) -> None:
    """Record that deletion waits, once per change of holders, and have kopf retry later."""
    async with rt.lock(kind.lower(), namespace, name):
        body = await rt.fresh(res, namespace, name)
        if body is None:
            return
        status = body.get("status") or {}
        generation = int((body.get("metadata") or {}).get("generation") or 0)
        new = mark_terminating(status, kind, holders, generation)
        await rt.saver(res, namespace, name, status)(new)
    message = (cond.find(new.get("conditions"), TERMINATING) or {}).get("message", "")
    if not cond.is_true(status, TERMINATING):
        kopf.warn(body, reason="DeletionWaits", message=message)
    # kopf logs this (once per new message: repeats are DEBUG, see logs.py) and retries later.
    raise kopf.TemporaryError(message, delay=CONFIG.status_interval)


@kopf.on.delete(*GROUP_KIND)
async def group_deleted(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    with about(api.KIND_GROUP, namespace, name):
        rt = _runtime(memo)
        holders = group_holders(name, await rt.kube.list(DEVICES, namespace))
        if holders:
            await _wait_for(rt, GROUPS, api.KIND_GROUP, namespace, name, holders)
        logger.info("no Device uses the Group any more: it goes")


@kopf.on.delete(*ENDPOINT_KIND)
async def endpoint_deleted(namespace: str, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    with about(api.KIND_ENDPOINT, namespace, name):
        rt = _runtime(memo)
        groups = await rt.kube.list(GROUPS, namespace)
        holders = endpoint_holders(name, groups, await rt.kube.list(DEVICES, namespace))
        if holders:
            await _wait_for(rt, ENDPOINTS, api.KIND_ENDPOINT, namespace, name, holders)
        logger.info("no cloud identity is left at the Endpoint and no Device is on its way there: it goes")
        try:
            endpoint = parse_endpoint(dict(body))
        except InvalidSpec:
            return
        await rt.pool.forget(endpoint)
