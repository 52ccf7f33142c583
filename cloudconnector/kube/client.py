"""A small asyncio Kubernetes client: just what the operator needs outside kopf's own calls.

kopf watches and patches through its own client; this one serves the reconcilers' immediate status
checkpoints (``status.progress`` must be stored before the next cloud call, not when the handler
returns), Secret reads, re-triggering objects, and events. HTTP failures become
:class:`KubeError` (with the status code) carrying the method and path, never a request body.
"""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from cloudconnector.errors import TransientError, short
from cloudconnector.kube.config import KubeConfig

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
        super().__init__(
            f"{method} {path}: HTTP {status} {short(detail, 160)}".rstrip(), reason="KubeApiError"
        )
        self.status = status


class KubeClient:
    def __init__(self, config: KubeConfig, *, timeout: float = 30.0) -> None:
        self.config = config
        self._timeout = timeout
        self._files = ExitStack()
        self._ssl = self._ssl_context()
        self._session: aiohttp.ClientSession | None = None

    def _ssl_context(self) -> ssl.SSLContext | bool:
        cfg = self.config
        if not cfg.server.startswith("https://"):
            return False
        if cfg.insecure:
            return False
        ctx = ssl.create_default_context(cafile=str(cfg.ca_path) if cfg.ca_path else None, cadata=cfg.ca_data)
        if cfg.cert_data and cfg.key_data:
            # ssl wants files for a client pair; they live only as long as this client.
            tmp = Path(self._files.enter_context(tempfile.TemporaryDirectory(prefix="kube-")))
            (tmp / "tls.crt").write_text(cfg.cert_data)
            key = tmp / "tls.key"
            key.touch(mode=0o600)
            key.write_text(cfg.key_data)
            ctx.load_cert_chain(tmp / "tls.crt", key)
        return ctx

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
        self._files.close()

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self.config.bearer()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> Any:
        url = self.config.server + path
        data = json.dumps(body) if body is not None else None
        try:
            async with self._http().request(
                method,
                url,
                data=data,
                params=params,
                headers=self._headers(content_type if data is not None else None),
                ssl=self._ssl,
            ) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise KubeError(method, path, resp.status, _reason(text))
                return json.loads(text) if text else None
        except (aiohttp.ClientError, TimeoutError) as e:
            raise KubeError(method, path, 0, type(e).__name__) from e

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
        url = self.config.server + res.path(namespace)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        try:
            async with self._http().get(
                url, params=params, headers=self._headers(), ssl=self._ssl, timeout=timeout
            ) as resp:
                if resp.status >= 400:
                    raise KubeError("WATCH", res.path(namespace), resp.status, _reason(await resp.text()))
                async for line in resp.content:
                    if line.strip():
                        yield json.loads(line)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise KubeError("WATCH", res.path(namespace), 0, type(e).__name__) from e

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


def _reason(text: str) -> str:
    try:
        doc = json.loads(text)
    except ValueError:
        return short(text, 160)
    if isinstance(doc, dict):
        return str(doc.get("reason") or doc.get("message") or "")
    return ""
