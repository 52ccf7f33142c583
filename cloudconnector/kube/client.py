"""A small asyncio Kubernetes client: just what the operator needs outside kopf's own calls.

kopf watches and patches through its own client; this one serves the reconcilers' immediate status
checkpoints (``status.progress`` must be stored before the next cloud call, not when the handler
returns), Secret reads, re-triggering objects, events, and the proxy's list-and-watch of the
directory. It is kept (rather than kubernetes_asyncio's generated API classes) because it speaks
to custom resources as plain JSON on one shared aiohttp session; how to log in comes from
:class:`KubeConfig`, which uses kubernetes_asyncio's loader. HTTP failures become
:class:`KubeError` (with the status code) carrying the method and path, never a request body; a
401 makes the client log in afresh and retry once (rotated tokens, expired exec credentials).
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

from cloudconnector.errors import ConnectorError, TransientError, short
from cloudconnector.kube.config import Connection, KubeConfig

MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if namespace is not None:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{name}"
        if sub is not None:
            base += f"/{sub}"
        return base


SECRETS = Resource("", "v1", "secrets")
EVENTS = Resource("", "v1", "events")


class KubeError(TransientError):
    """An API call failed; ``status`` is the HTTP code (0 for a network failure)."""

    def __init__(self, method: str, path: str, status: int, detail: str = "") -> None:
        said = f"HTTP {status} {short(detail, 320)}" if status else short(detail, 320) or "no answer"
        super().__init__(f"{method} {path}: {said}".rstrip(), reason="KubeApiError")
        self.status = status


class KubeClient:
    def __init__(self, config: KubeConfig, *, timeout: float = 30.0) -> None:
        self.config = config
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _connect(self, method: str, path: str, *, fresh: bool = False) -> Connection:
        try:
            return await self.config.connection(fresh=fresh)
        except ConnectorError as e:  # no credentials to be had: say why, as any other API failure
            raise KubeError(method, path, 0, str(e)) from None

    @staticmethod
    def _options(conn: Connection, content_type: str | None = None) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if conn.authorization:
            headers["Authorization"] = conn.authorization
        if content_type:
            headers["Content-Type"] = content_type
        options: dict[str, Any] = {"headers": headers, "ssl": conn.ssl}
        if conn.tls_server_name:
            options["server_hostname"] = conn.tls_server_name
        return options

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> Any:
        data = json.dumps(body) if body is not None else None
        for attempt in (1, 2):
            conn = await self._connect(method, path, fresh=attempt == 2)
            options = self._options(conn, content_type if data is not None else None)
            try:
                async with self._http().request(
                    method, conn.server + path, data=data, params=params, **options
                ) as resp:
                    text = await resp.text()
                    if resp.status == 401 and attempt == 1:
                        continue  # log in afresh: the token rotated or expired
                    if resp.status >= 400:
                        raise KubeError(method, path, resp.status, _reason(resp.status, text))
                    return json.loads(text) if text else None
            except (aiohttp.ClientError, TimeoutError) as e:
                raise KubeError(method, path, 0, type(e).__name__) from e
        raise AssertionError("unreachable")

    async def get(self, res: Resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", res.path(namespace, name))  # type: ignore[no-any-return]
        except KubeError as e:
            if e.status == 404:
                return None
            raise

    async def list(
        self, res: Resource, namespace: str | None = None, *, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else None
        result = await self.request("GET", res.path(namespace), params=params)
        return list((result or {}).get("items") or [])

    async def patch(
        self,
        res: Resource,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        *,
        status: bool = False,
    ) -> dict[str, Any]:
        path = res.path(namespace, name, "status" if status else None)
        return await self.request("PATCH", path, body=patch, content_type=MERGE_PATCH)  # type: ignore[no-any-return]

    async def create(self, res: Resource, namespace: str | None, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self.request("POST", res.path(namespace), body=body)  # type: ignore[no-any-return]

    async def watch(
        self, res: Resource, namespace: str | None = None, *, resource_version: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield raw watch events ({type, object}) until the server ends the stream."""
        params = {"watch": "true"}
        if resource_version:
            params["resourceVersion"] = resource_version
        path = res.path(namespace)
        conn = await self._connect("WATCH", path)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        try:
            async with self._http().get(
                conn.server + path, params=params, timeout=timeout, **self._options(conn)
            ) as resp:
                if resp.status == 401:
                    await self._connect("WATCH", path, fresh=True)  # the caller's next watch logs in afresh
                if resp.status >= 400:
                    raise KubeError("WATCH", path, resp.status, _reason(resp.status, await resp.text()))
                async for line in resp.content:
                    if line.strip():
                        yield json.loads(line)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise KubeError("WATCH", path, 0, type(e).__name__) from e

    async def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """The Secret's data, decoded; None if it does not exist. Never logged."""
        obj = await self.get(SECRETS, namespace, name)
        if obj is None:
            return None
        data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        for key, value in (obj.get("stringData") or {}).items():
            data.setdefault(key, str(value).encode())
        return data

    async def post_event(
        self, involved: Mapping[str, Any], *, kind: str, reason: str, message: str, warning: bool = False
    ) -> None:
        """A core/v1 Event about ``involved`` (a full object body); best effort."""
        meta = involved.get("metadata") or {}
        namespace = meta.get("namespace") or self.config.default_namespace or "default"
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": "cloudconnector-", "namespace": namespace},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": kind,
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
            },
            "reason": reason,
            "message": short(message, 1000),
            "type": "Warning" if warning else "Normal",
            "source": {"component": "cloud-connector"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self.create(EVENTS, namespace, body)


def _reason(status: int, text: str) -> str:
    """The Status object's reason; for 401/403 also its message, which names the user and the
    permission it lacks (never a credential), so that the log says what to grant."""
    try:
        doc = json.loads(text)
    except ValueError:
        return short(text, 160)
    if not isinstance(doc, dict):
        return ""
    reason, message = str(doc.get("reason") or ""), str(doc.get("message") or "")
    if status in (401, 403) and message:
        return short(f"{reason}: {message}" if reason else message, 300)
    return reason or message
