"""One logged-in conversation with Vault, over two transports that share one token.

- :meth:`VaultSession.read` is the proxy's path (a device's KV record and its transit decrypt, at
  every new connection): sent natively on the event loop by
  :class:`~cloudconnector.keystore.vault_http.VaultHttp` over a kept aiohttp session, logging in
  the same way;
- :meth:`VaultSession.request` is everything else (the operator's writes, metadata and deletes):
  hvac on requests, synchronous, so each request runs in a worker thread (``asyncio.to_thread``)
  and a semaphore bounds how many run at once. hvac is imported on first use, so a process that
  only reads never loads it.

Both map Vault's answers to :mod:`cloudconnector.errors` classes the same way (see
:mod:`~cloudconnector.keystore.vault_http`); messages name the method and path, never the payload,
the response body or the token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cloudconnector.errors import TransientError
from cloudconnector.keystore.vault_config import AuthMethod, VaultConfig
from cloudconnector.keystore.vault_http import (
    RENEW_AT,
    Token,
    Tokens,
    VaultHttp,
    VaultRequestError,
    forbidden,
    login_answer,
    login_request,
    outcome,
    static_token,
)

if TYPE_CHECKING:
    import hvac

__all__ = ["RENEW_AT", "VaultRequestError", "VaultSession"]

log = logging.getLogger(__name__)


class VaultSession:
    """Authenticated access to one Vault server; safe to share between tasks."""

    def __init__(self, config: VaultConfig, *, max_concurrency: int = 16) -> None:
        self.config = config
        self._tokens = Tokens()
        self._native = VaultHttp(config, self._tokens)
        self._client: hvac.Client | None = None
        self._login_lock = threading.Lock()  # one hvac login at a time among the worker threads
        self._max_concurrency = max_concurrency
        # A semaphore belongs to one event loop; keep one per loop that uses this session.
        self._limits: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:
        return f"<VaultSession {self.config.address} auth={self.config.auth.value}>"

    @property
    def logins(self) -> int:
        """How many times this session has logged in (or re-read its token), on either transport."""
        return self._tokens.logins

    def close(self) -> None:
        self._native.close()
        if self._client is not None:
            self._client.adapter.close()

    async def aclose(self) -> None:
        await self._native.aclose()
        self.close()

    async def read(
        self, method: str, path: str, payload: Mapping[str, Any] | None = None
    ) -> Mapping[str, Any] | None:
        """The proxy's credential reads, natively on the event loop; same answers as :meth:`request`."""
        return await self._native.request(method, path, payload)

    async def request(
        self, method: str, path: str, payload: Mapping[str, Any] | None = None
    ) -> Mapping[str, Any] | None:
        """Send ``method`` to ``/v1/{path}`` through hvac; the parsed JSON body, or None for 204 and 404."""
        loop = asyncio.get_running_loop()
        limit = self._limits.get(loop)
        if limit is None:
            limit = self._limits[loop] = asyncio.Semaphore(self._max_concurrency)
        async with limit:
            return await asyncio.to_thread(self._request, method, path, payload)

    # Everything below runs in worker threads.

    def _request(self, method: str, path: str, payload: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        token = self._current()
        status, raw = self._send(method, path, payload, token.value)
        if status in (401, 403):
            # An expired or revoked token looks like a permission problem: log in again once.
            log.info("Vault denied %s %s; logging in again and retrying once", method, path)
            token = self._current(stale=token)
            status, raw = self._send(method, path, payload, token.value)
            if status in (401, 403):
                raise forbidden(method, path, status)
        return outcome(method, path, status, raw)

    def _hvac(self) -> hvac.Client:
        if self._client is None:
            import hvac
            import hvac.adapters

            client = hvac.Client(
                url=self.config.address,
                verify=self.config.verify,
                timeout=self.config.timeout,
                adapter=hvac.adapters.RawAdapter,
            )
            # hvac silently picks up VAULT_TOKEN or ~/.vault-token; this session sends only its own token.
            client.token = None
            self._client = client
        return self._client

    def _send(
        self, method: str, path: str, payload: Mapping[str, Any] | None, token: str | None
    ) -> tuple[int, bytes]:
        import requests

        headers = {"X-Vault-Token": token} if token else {}
        kwargs: dict[str, Any] = {} if payload is None else {"json": dict(payload)}
        try:
            response: requests.Response = self._hvac().adapter.request(
                method, f"/v1/{path}", headers=headers, raise_exception=False, **kwargs
            )
        except requests.exceptions.SSLError as e:
            # Usually a wrong VAULT_CACERT; transient because a remounted bundle can fix it.
            raise TransientError(
                f"TLS with Vault failed for {method} {path}: check the CA bundle", reason="VaultTLSFailed"
            ) from e
        except requests.RequestException as e:
            raise TransientError(
                f"Vault unreachable for {method} {path}: {type(e).__name__}", reason="VaultUnavailable"
            ) from e
        return response.status_code, response.content

    def _current(self, stale: Token | None = None) -> Token:
        """The token to use, logging in when there is none, it is near expiry, or ``stale`` failed."""
        token = self._tokens.usable(stale)
        if token is not None:
            return token
        with self._login_lock:
            token = self._tokens.usable(stale)
            if token is not None:
                return token
            return self._tokens.keep(self._login())

    def _login(self) -> Token:
        generation = self._tokens.next_login()
        if self.config.auth is AuthMethod.TOKEN:
            return static_token(self.config, generation)
        path, body = login_request(self.config)
        status, raw = self._send("POST", path, body, None)
        return login_answer(self.config, path, status, raw, generation)
