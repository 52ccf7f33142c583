"""The operator's long-lived parts, built once at startup and shared by all handlers.

Also the glue between kopf's world (raw bodies, indexes) and the core (parsed models, a ``save``
coroutine): status writes go straight to the API as merge patches so that checkpoints are stored
before the next cloud call, and every reconcile of one object runs under that object's lock with
a freshly read status, because kopf may run a timer and a change handler for it at the same time.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cloudconnector import api
from cloudconnector.core.conditions import status_patch, working_copy
from cloudconnector.core.device import DeviceReconciler, EndpointLookup, WaitingError
from cloudconnector.core.provisioners import Factory, ProvisionerPool
from cloudconnector.errors import CredentialsError
from cloudconnector.keystore.base import KeyWriter
from cloudconnector.kube import KubeClient, KubeError, Resource
from cloudconnector.model import Endpoint
from cloudconnector.operator.config import OperatorConfig

logger = logging.getLogger(__name__)


class Forbidden(Exception):
    """The operator's account may not read a Secret (the chart's secretAccess does not cover it)."""


ENDPOINTS = Resource(api.GROUP, api.VERSION, api.ENDPOINTS)
GROUPS = Resource(api.GROUP, api.VERSION, api.GROUPS)
DEVICES = Resource(api.GROUP, api.VERSION, api.DEVICES)
RETRIGGER_ANNOTATION = f"{api.GROUP}/reconcile-request"


def _forbidden(namespace: str, name: str) -> str:
    return (
        f"the operator may not read Secret {namespace}/{name}: add {namespace} to the Helm value "
        "operator.secretAccess.namespaces (and the name to operator.secretAccess.resourceNames if "
        "that list is set)"
    )


class SecretAccess:
    """Secret reads for manual device credentials and Endpoint API keys (values never logged)."""

    def __init__(self, kube: KubeClient) -> None:
        self._kube = kube

    async def _read(self, namespace: str, name: str) -> Mapping[str, bytes] | None:
        try:
            return await self._kube.read_secret(namespace, name)
        except KubeError as e:
            if e.status == 403:
                raise Forbidden(_forbidden(namespace, name)) from None
            raise

    async def read(self, namespace: str, name: str) -> Mapping[str, bytes] | None:
        try:
            return await self._read(namespace, name)
        except Forbidden as e:
            raise WaitingError("SecretForbidden", str(e)) from None

    async def endpoint_credentials(self, endpoint: Endpoint) -> dict[str, str]:
        spec = endpoint.aws or endpoint.azure
        secret = spec.credentials_secret if spec is not None else None
        if not secret:
            return {}  # the SDK's default chain (IRSA, workload identity)
        try:
            data = await self._read(endpoint.ref.namespace, secret)
        except Forbidden as e:
            raise CredentialsError(str(e), reason="SecretForbidden") from None
        if data is None:
            raise CredentialsError(f"credentials Secret {secret!r} does not exist", reason="SecretNotFound")
        try:
            return {k: v.decode() for k, v in data.items()}
        except UnicodeDecodeError:
            raise CredentialsError(f"credentials Secret {secret!r} holds non-text data") from None


@dataclass
class Runtime:
    config: OperatorConfig
    kube: KubeClient
    keys: KeyWriter
    pool: ProvisionerPool
    secrets: SecretAccess
    _locks: weakref.WeakValueDictionary[tuple[str, str, str], asyncio.Lock] = field(
        default_factory=weakref.WeakValueDictionary
    )

    def lock(self, kind: str, namespace: str, name: str) -> asyncio.Lock:
        key = (kind, namespace, name)
        lock = self._locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[key] = lock
        return lock

    def device_reconciler(self, lookup: EndpointLookup) -> DeviceReconciler:
        return DeviceReconciler(self.pool, self.keys, lookup, self.secrets)

    async def fresh(self, res: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.kube.get(res, namespace, name)

    def saver(
        self, res: Resource, namespace: str, name: str, stored: Mapping[str, Any] | None
    ) -> Callable[[dict[str, Any]], Awaitable[None]]:
        last = working_copy(stored)

        async def save(status: dict[str, Any]) -> None:
            nonlocal last
            patch = status_patch(last, status)
            if patch:
                await self.kube.patch(res, namespace, name, {"status": patch}, status=True)
                last = working_copy(status)

        return save

    async def retrigger(self, res: Resource, namespace: str, name: str, why: str) -> None:
        """Make kopf see a change on the object so its change handlers run again now."""
        stamp = f"{asyncio.get_running_loop().time():.3f}:{why}"
        patch = {"metadata": {"annotations": {RETRIGGER_ANNOTATION: stamp}}}
        try:
            await self.kube.patch(res, namespace, name, patch)
        except Exception as e:  # the object may be gone; the next change triggers it anyway
            logger.debug("could not re-trigger %s/%s: %s", namespace, name, type(e).__name__)


def build_pool(config: OperatorConfig, factory: Factory, secrets: SecretAccess) -> ProvisionerPool:
    return ProvisionerPool(factory, secrets.endpoint_credentials, burst=config.rate_burst)
