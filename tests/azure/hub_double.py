"""A test double of the IoT Hub identity registry REST API (devices only), served over HTTPS.

Faithful to the documented behaviour the provisioner depends on:
- ``PUT/GET/DELETE /devices/{id}?api-version=...``; api-version is required;
- a service SAS token in ``Authorization`` (``sr``, ``sig``, ``se``, ``skn``): the signature is
  HMAC-SHA256 over ``{url-encoded sr}\\n{se}`` with the named policy's key, ``se`` must lie in the
  future, ``sr`` must name this hub, and the policy needs RegistryRead / RegistryWrite rights;
- etags: PUT without If-Match over an existing device is 409 DeviceAlreadyExists, If-Match that
  does not match is 412 PreconditionFailed, ``*`` matches any existing device;
- selfSigned authentication needs a primary thumbprint, hex SHA-1 (40) or SHA-256 (64), and a
  secondary one, if given, of the same length;
- errors carry IoT Hub's ``{"Message": "ErrorCode:Name;text", "ExceptionMessage": ...}`` body;
- :meth:`HubDouble.throttle` makes the next N requests answer 429 ThrottlingException.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import ssl
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus, unquote

from aiohttp import web

from tests.support.pki import CA
from tests.support.procs import free_port

_DEVICE_ID = re.compile(r"^[A-Za-z0-9\-:.+%_#*?!(),=@$']{1,128}$")
_HEX = re.compile(r"^[0-9A-Fa-f]+$")


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@dataclass
class Policy:
    key: str = field(default_factory=new_key, repr=False)
    rights: frozenset[str] = frozenset({"RegistryRead", "RegistryWrite"})


@dataclass
class Call:
    method: str
    device_id: str
    status: int
    if_match: str | None


class HubDouble:
    def __init__(self, host_name: str, ca: CA) -> None:
        self.host_name = host_name
        self.policies: dict[str, Policy] = {"registryReadWrite": Policy()}
        self.devices: dict[str, dict[str, Any]] = {}
        self.calls: list[Call] = []
        self._throttle = 0
        self._changed_behind: set[str] = set()
        self._etag_counter = 0
        self._server_cert = ca.issue("localhost", hosts=("127.0.0.1", "localhost"))
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"

    def connection_string(self, policy: str = "registryReadWrite", key: str | None = None) -> str:
        key = key if key is not None else self.policies[policy].key
        return f"HostName={self.host_name};SharedAccessKeyName={policy};SharedAccessKey={key}"

    def throttle(self, count: int) -> None:
        self._throttle = count

    def change_behind_the_back(self, device_id: str) -> None:
        """Another writer updates the device just before our next If-Match write reaches it."""
        self._changed_behind.add(device_id)

    def thumbprints(self, device_id: str) -> tuple[str | None, str | None]:
        x509 = self.devices[device_id]["authentication"]["x509Thumbprint"]
        return x509["primaryThumbprint"], x509["secondaryThumbprint"]

    # -- serving -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[HubDouble]:
        app = web.Application()
        app.router.add_route("*", "/devices/{id}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        with tempfile.TemporaryDirectory(prefix="hub-double-") as tmp:
            cert, key = self._server_cert.write(Path(tmp), "server")
            tls.load_cert_chain(cert, key)
        site = web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=tls)
        await site.start()
        try:
            yield self
        finally:
            await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        device_id = request.match_info["id"]
        if_match = request.headers.get("If-Match")
        response = await self._respond(request, device_id, if_match)
        self.calls.append(Call(request.method, device_id, response.status, if_match))
        return response

    async def _respond(self, request: web.Request, device_id: str, if_match: str | None) -> web.Response:
        if not request.query.get("api-version"):
            return _error(400, "InvalidProtocolVersion", "api-version is required")
        write = request.method in ("PUT", "DELETE")
        denied = self._authorize(request.headers.get("Authorization", ""), write)
        if denied is not None:
            return denied
        if self._throttle > 0:
            self._throttle -= 1
            return _error(429, "ThrottlingException", "registry operations are throttled")
        if not _DEVICE_ID.match(device_id):
            return _error(400, "ArgumentInvalid", "device id is invalid")
        current = self.devices.get(device_id)
        if request.method == "GET":
            if current is None:
                return _error(404, "DeviceNotFound", f"device {device_id} not found")
            return _device_response(current)
        if request.method == "DELETE":
            if current is None:
                return _error(404, "DeviceNotFound", f"device {device_id} not found")
            if if_match is not None and not _etag_matches(if_match, current["etag"]):
                return _error(412, "PreconditionFailed", "etag mismatch")
            del self.devices[device_id]
            return web.Response(status=204)
        if request.method == "PUT":
            return await self._put(request, device_id, current, if_match)
        return _error(405, "MethodNotAllowed", "method not allowed")

    async def _put(
        self, request: web.Request, device_id: str, current: dict[str, Any] | None, if_match: str | None
    ) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "ArgumentInvalid", "body is not JSON")
        if body.get("deviceId") != device_id:
            return _error(400, "ArgumentInvalid", "deviceId in the body does not match the URL")
        if current is None and if_match is not None and if_match.strip() != "":
            # RFC 7232: If-Match fails when there is no current representation.
            return _error(412, "PreconditionFailed", "device does not exist")
        if current is not None and if_match is None:
            return _error(409, "DeviceAlreadyExists", f"a device with id {device_id} already exists")
        if current is not None and device_id in self._changed_behind:
            self._changed_behind.discard(device_id)
            self._etag_counter += 1
            current["etag"] = base64.b64encode(f"{self._etag_counter}".encode()).decode()
        if current is not None and not _etag_matches(if_match or "", current["etag"]):
            return _error(412, "PreconditionFailed", "etag mismatch")
        auth = body.get("authentication") or {}
        problem = _check_auth(auth)
        if problem:
            return _error(400, "ArgumentInvalid", problem)
        now = _now()
        x509 = auth.get("x509Thumbprint") or {}
        self._etag_counter += 1
        stored = {
            "deviceId": device_id,
            "generationId": current["generationId"] if current else str(int(time.time() * 1e6)),
            "etag": base64.b64encode(f"{self._etag_counter}".encode()).decode(),
            "connectionState": "Disconnected",
            "status": body.get("status") or "enabled",
            "statusReason": body.get("statusReason"),
            "connectionStateUpdatedTime": "0001-01-01T00:00:00Z",
            "statusUpdatedTime": now,
            "lastActivityTime": "0001-01-01T00:00:00Z",
            "cloudToDeviceMessageCount": 0,
            "authentication": {
                "symmetricKey": {"primaryKey": None, "secondaryKey": None},
                "x509Thumbprint": {
                    "primaryThumbprint": x509.get("primaryThumbprint"),
                    "secondaryThumbprint": x509.get("secondaryThumbprint"),
                },
                "type": auth.get("type"),
            },
            "capabilities": {"iotEdge": bool((body.get("capabilities") or {}).get("iotEdge"))},
        }
        self.devices[device_id] = stored
        return _device_response(stored)

    def _authorize(self, header: str, write: bool) -> web.Response | None:
        scheme, _, token = header.partition(" ")
        if scheme != "SharedAccessSignature" or not token:
            return _error(401, "IotHubUnauthorizedAccess", "missing SharedAccessSignature")
        fields: dict[str, str] = {}
        for part in token.split("&"):
            name, _, value = part.partition("=")
            fields[name] = value
        if not all(fields.get(k) for k in ("sr", "sig", "se", "skn")):
            return _error(401, "IotHubUnauthorizedAccess", "malformed token")
        policy = self.policies.get(fields["skn"])
        if policy is None:
            return _error(401, "IotHubUnauthorizedAccess", "unknown policy")
        resource = unquote(fields["sr"]).lower()
        if resource != self.host_name.lower() and not resource.startswith(self.host_name.lower() + "/"):
            return _error(401, "IotHubUnauthorizedAccess", "token is for another resource")
        try:
            expiry = int(fields["se"])
        except ValueError:
            return _error(401, "IotHubUnauthorizedAccess", "malformed expiry")
        if expiry <= time.time():
            return _error(401, "IotHubUnauthorizedAccess", "token expired")
        to_sign = f"{quote_plus(unquote(fields['sr']))}\n{expiry}".encode()
        expected = hmac.new(base64.b64decode(policy.key), to_sign, hashlib.sha256).digest()
        try:
            given = base64.b64decode(unquote(fields["sig"]), validate=True)
        except ValueError:
            return _error(401, "IotHubUnauthorizedAccess", "malformed signature")
        if not hmac.compare_digest(expected, given):
            return _error(401, "IotHubUnauthorizedAccess", "signature mismatch")
        needed = "RegistryWrite" if write else "RegistryRead"
        if needed not in policy.rights:
            return _error(401, "IotHubUnauthorizedAccess", f"policy lacks {needed}")
        return None


def _check_auth(auth: dict[str, Any]) -> str | None:
    kind = auth.get("type")
    if kind != "selfSigned":
        return None if kind in ("sas", "certificateAuthority", "none") else "unknown authentication type"
    x509 = auth.get("x509Thumbprint") or {}
    primary, secondary = x509.get("primaryThumbprint"), x509.get("secondaryThumbprint")
    if not primary:
        return "selfSigned authentication needs a primary thumbprint"
    for value in (primary, secondary):
        if value is not None and (not _HEX.match(value) or len(value) not in (40, 64)):
            return "a thumbprint must be 40 or 64 hex digits"
    if secondary is not None and len(secondary) != len(primary):
        return "primary and secondary thumbprints must have the same length"
    return None


def _etag_matches(if_match: str, etag: str) -> bool:
    value = if_match.strip()
    return value == "*" or value.strip('"') == etag


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


def _device_response(device: dict[str, Any]) -> web.Response:
    return web.json_response(device, headers={"ETag": f'"{device["etag"]}"'})


def _error(status: int, code: str, text: str) -> web.Response:
    body = {"Message": f"ErrorCode:{code};{text}", "ExceptionMessage": f"Tracking ID:{os.urandom(8).hex()}"}
    return web.json_response(body, status=status)
