"""The few IoT Hub identity-registry calls the provisioner makes, over the registry's REST API.

Four requests on ``/devices/{id}`` (GET, PUT without or with If-Match, DELETE) are all the
provisioner needs, so they go straight over aiohttp with a service SAS token rather than through
azure-iot-hub, whose uamqp dependency needs cmake to build and has no wheels for aarch64 or newer
Pythons. Each call takes a token from the Endpoint's rate limiter first (IoT Hub budgets registry
operations per hub, not per device), and throttling (HTTP 429) and server faults are retried with
jittered backoff. HTTP outcomes become :mod:`cloudconnector.errors` classes here; messages carry
the status and IoT Hub's error code, never the token, the key or a request body.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, quote_plus

import aiohttp
import yarl

from cloudconnector.clouds.azure_credentials import RegistryCredentials
from cloudconnector.errors import ConnectorError, CredentialsError, PermanentError, TransientError, short
from cloudconnector.ratelimit import RateLimiter, with_backoff

T = TypeVar("T")

API_VERSION = "2021-04-12"
TOKEN_TTL = 3600  # seconds a SAS token is valid; a new one is signed a minute before it expires


class DeviceExists(ConnectorError):
    """409: create without If-Match over an existing device."""


class EtagMismatch(ConnectorError):
    """412: the device changed since it was read."""


class NotFound(ConnectorError):
    """404 on a read, an update or a delete."""


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


def _hub_device(raw: Mapping[str, Any]) -> HubDevice:
    auth = raw.get("authentication") or {}
    x509 = auth.get("x509Thumbprint") or {}
    return HubDevice(
        device_id=str(raw.get("deviceId")),
        etag=str(raw.get("etag") or ""),
        auth_type=auth.get("type"),
        primary=x509.get("primaryThumbprint"),
        secondary=x509.get("secondaryThumbprint"),
        status=raw.get("status"),
    )


def sas_token(creds: RegistryCredentials, expiry: int) -> str:
    """A service SAS token for the whole hub: HMAC-SHA256 of ``{url-encoded host}\\n{expiry}``."""
    resource = quote_plus(creds.host_name)
    digest = hmac.new(base64.b64decode(creds.key), f"{resource}\n{expiry}".encode(), hashlib.sha256).digest()
    signature = quote_plus(base64.b64encode(digest).decode())
    return f"SharedAccessSignature sr={resource}&sig={signature}&se={expiry}&skn={creds.key_name}"


def _error_code(body: str) -> str:
    """IoT Hub's ``ErrorCode:Name;...`` prefix, which names the fault without any payload."""
    try:
        message = str(json.loads(body).get("Message", ""))
    except (ValueError, AttributeError):
        return ""
    head = message.split(";", 1)[0]
    return head.removeprefix("ErrorCode:") if head.startswith("ErrorCode:") else ""


def _error(op: str, status: int, code: str) -> ConnectorError:
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


def _retryable(e: BaseException) -> bool:
    return isinstance(e, TransientError)


def _x509_body(device_id: str, primary: str, secondary: str) -> dict[str, Any]:
    return {
        "deviceId": device_id,
        "status": "enabled",
        "authentication": {
            "type": "selfSigned",
            "x509Thumbprint": {"primaryThumbprint": primary, "secondaryThumbprint": secondary},
        },
        "capabilities": {"iotEdge": False},
    }


class Registry:
    """IoT Hub registry calls for one Endpoint; close with :meth:`aclose`."""

    def __init__(
        self,
        creds: RegistryCredentials,
        *,
        limiter: RateLimiter | None = None,
        base_url: str | None = None,
        ca_pem: str | None = None,
        attempts: int = 6,
        timeout: float = 30.0,
    ) -> None:
        self.host_name = creds.host_name
        self._creds = creds
        self._limiter = limiter
        self._attempts = attempts
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._base = (base_url or f"https://{creds.host_name}").rstrip("/")
        # The Endpoint's caCertificate, if given, replaces the system trust store (a private hub
        # front or a test double); the context is built once and holds no secret.
        self._ssl = ssl.create_default_context(cadata=ca_pem) if ca_pem else True
        self._token = ""
        self._token_expiry = 0.0
        self._session: aiohttp.ClientSession | None = None

    def _authorization(self) -> str:
        now = time.time()
        if now > self._token_expiry - 60:
            expiry = int(now) + TOKEN_TTL
            self._token, self._token_expiry = sas_token(self._creds, expiry), float(expiry)
        return self._token

    def _url(self, device_id: str) -> yarl.URL:
        # Device ids may hold characters that mean something in a URL ('#', '?', '%'): quote all.
        path = f"{self._base}/devices/{quote(device_id, safe='')}?api-version={API_VERSION}"
        return yarl.URL(path, encoded=True)

    async def _request(
        self, op: str, method: str, device_id: str, *, body: Any = None, if_match: str | None = None
    ) -> Any:
        headers = {"Authorization": self._authorization(), "Accept": "application/json"}
        if if_match is not None:
            headers["If-Match"] = if_match
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body)
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.request(
                method, self._url(device_id), data=data, headers=headers, ssl=self._ssl
            ) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise _error(op, resp.status, _error_code(text))
                return json.loads(text) if text else None
        except (aiohttp.ClientError, TimeoutError) as e:
            raise TransientError(f"IoT Hub registry {op}: {short(type(e).__name__)}") from e

    async def _call(self, op: str, request: Callable[[], Awaitable[T]]) -> T:
        async def once() -> T:
            if self._limiter is not None:
                await self._limiter.acquire()
            return await request()

        return await with_backoff(once, retry_on=_retryable, attempts=self._attempts)

    async def get(self, device_id: str) -> HubDevice | None:
        try:
            raw = await self._call("get", lambda: self._request("get", "GET", device_id))
        except NotFound:
            return None
        return _hub_device(raw)

    async def create(self, device_id: str, primary: str, secondary: str) -> HubDevice:
        body = _x509_body(device_id, primary, secondary)
        raw = await self._call("create", lambda: self._request("create", "PUT", device_id, body=body))
        return _hub_device(raw)

    async def update(self, device_id: str, etag: str, primary: str, secondary: str) -> HubDevice:
        body = _x509_body(device_id, primary, secondary)
        match = f'"{etag}"'
        raw = await self._call(
            "update", lambda: self._request("update", "PUT", device_id, body=body, if_match=match)
        )
        return _hub_device(raw)

    async def delete(self, device_id: str, etag: str | None = None) -> bool:
        """Delete; False when it was already gone."""
        match = f'"{etag}"' if etag else "*"
        try:
            await self._call("delete", lambda: self._request("delete", "DELETE", device_id, if_match=match))
        except NotFound:
            return False
        return True

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
