"""The few IoT Hub identity-registry calls the provisioner makes, over the azure-iot-hub SDK.

The SDK is synchronous (msrest + requests); each call runs in a worker thread, takes a token
from the Endpoint's rate limiter first (IoT Hub budgets registry operations per hub, not per
device), and retries throttling (HTTP 429) and server faults with jittered backoff. SDK
exceptions become :mod:`cloudconnector.errors` classes here, so nothing above this module knows
msrest. The SDK's own urllib3 retries are turned off: one retry policy, ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from azure.iot.hub import IoTHubRegistryManager
from msrest.exceptions import ClientRequestError, HttpOperationError

from cloudconnector.clouds.azure_credentials import RegistryCredentials
from cloudconnector.errors import ConnectorError, CredentialsError, PermanentError, TransientError, short
from cloudconnector.ratelimit import RateLimiter, with_backoff

log = logging.getLogger(__name__)
T = TypeVar("T")


class DeviceExists(ConnectorError):
    """409: create without If-Match over an existing device."""


class EtagMismatch(ConnectorError):
    """412: the device changed since it was read."""


class NotFound(ConnectorError):
    """404 on an update or delete."""


@dataclass(frozen=True)
class HubDevice:
    """A registry entry, as much as the provisioner needs."""

    device_id: str
    etag: str
    auth_type: str | None
    primary: str | None
    secondary: str | None
    status: str | None

    def has_thumbprint(self, thumbprint: str) -> bool:
        t = thumbprint.lower()
        return t in {(self.primary or "").lower(), (self.secondary or "").lower()}


def _hub_device(raw: Any) -> HubDevice:
    auth = getattr(raw, "authentication", None)
    x509 = getattr(auth, "x509_thumbprint", None)
    return HubDevice(
        device_id=raw.device_id,
        etag=raw.etag,
        auth_type=getattr(auth, "type", None),
        primary=getattr(x509, "primary_thumbprint", None),
        secondary=getattr(x509, "secondary_thumbprint", None),
        status=raw.status,
    )


def _status_of(e: HttpOperationError) -> int:
    return int(getattr(e.response, "status_code", 0) or 0)


def _error_code(e: HttpOperationError) -> str:
    """IoT Hub's ``ErrorCode:Name;...`` prefix, which names the fault without any payload."""
    try:
        message = str(e.response.json().get("Message", ""))
    except Exception:
        return ""
    head = message.split(";", 1)[0]
    return head.removeprefix("ErrorCode:") if head.startswith("ErrorCode:") else ""


def _translate(op: str, e: Exception) -> Exception:
    if isinstance(e, HttpOperationError):
        status, code = _status_of(e), _error_code(e)
        what = f"IoT Hub registry {op}: HTTP {status}{' ' + code if code else ''}"
        if status in (401, 403):
            return CredentialsError(f"{what} (the hub rejected the registry credentials)")
        if status == 404:
            return NotFound(what)
        if status == 409:
            return DeviceExists(what)
        if status == 412:
            return EtagMismatch(what)
        if status == 429:
            return TransientError(what, reason="Throttled", delay=10.0)
        if status >= 500 or status == 408:
            return TransientError(what)
        return PermanentError(what, reason="RegistryRejected")
    if isinstance(e, ClientRequestError):
        return TransientError(f"IoT Hub registry {op}: {short(type(e.inner_exception or e).__name__)}")
    return e


def _retryable(e: BaseException) -> bool:
    return isinstance(e, TransientError)


class Registry:
    """IoT Hub registry calls for one Endpoint; close with :meth:`close`."""

    def __init__(
        self,
        creds: RegistryCredentials,
        *,
        limiter: RateLimiter | None = None,
        base_url: str | None = None,
        ca_pem: str | None = None,
        attempts: int = 6,
    ) -> None:
        self.host_name = creds.host_name
        self._limiter = limiter
        self._attempts = attempts
        self._stack = contextlib.ExitStack()
        self._manager = IoTHubRegistryManager.from_connection_string(creds.connection_string)
        config = self._manager.protocol.config
        if base_url:
            config.base_url = base_url.rstrip("/")
        config.retry_policy.retries = 0
        config.connection.timeout = 30
        if ca_pem:
            # requests wants a path; a CA bundle is public, and the file lives only as long as we do.
            tmp = self._stack.enter_context(tempfile.TemporaryDirectory(prefix="cc-azure-ca-"))
            path = Path(tmp) / "ca.pem"
            path.write_text(ca_pem)
            config.connection.verify = str(path)

    async def _call(self, op: str, fn: Callable[[], T]) -> T:
        async def once() -> T:
            if self._limiter is not None:
                await self._limiter.acquire()
            try:
                return await asyncio.to_thread(fn)
            except Exception as e:
                raise _translate(op, e) from e

        return await with_backoff(once, retry_on=_retryable, attempts=self._attempts)

    async def get(self, device_id: str) -> HubDevice | None:
        try:
            raw = await self._call("get", lambda: self._manager.get_device(device_id))
        except NotFound:
            return None
        return _hub_device(raw)

    async def create(self, device_id: str, primary: str, secondary: str) -> HubDevice:
        raw = await self._call(
            "create",
            lambda: self._manager.create_device_with_x509(device_id, primary, secondary, "enabled"),
        )
        return _hub_device(raw)

    async def update(self, device_id: str, etag: str, primary: str, secondary: str) -> HubDevice:
        raw = await self._call(
            "update",
            lambda: self._manager.update_device_with_x509(device_id, etag, primary, secondary, "enabled"),
        )
        return _hub_device(raw)

    async def delete(self, device_id: str, etag: str | None = None) -> bool:
        """Delete; False when it was already gone."""
        try:
            await self._call("delete", lambda: self._manager.delete_device(device_id, etag))
        except NotFound:
            return False
        return True

    def close(self) -> None:
        amqp = getattr(self._manager, "amqp_svc_client", None)
        with contextlib.suppress(Exception):
            if amqp is not None:
                amqp.disconnect_sync()
        self._stack.close()
