"""One logged-in conversation with Vault: login, token renewal, and the mapping of HTTP outcomes.

hvac is synchronous, so every request runs in a worker thread (``asyncio.to_thread``) and a
semaphore bounds how many run at once. All failures leave this module as
:mod:`cloudconnector.errors` classes whose messages name the method and path, never the payload,
the response body or the token:

- unreachable, timeouts, 412/429/5xx (sealed, standby, overloaded) -> ``TransientError``: the caller
  waits and retries with nothing lost;
- 401/403 -> one re-login and retry, then ``PermanentError(reason="VaultForbidden")``;
- other 4xx -> :class:`VaultRequestError` (a ``PermanentError``) carrying the server's error words
  as an attribute, so callers can recognise "not found" without parsing messages;
- 404 -> ``None`` to the caller, which decides what missing means.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

import hvac
import hvac.adapters
import requests

from cloudconnector.errors import PermanentError, TransientError, short
from cloudconnector.keystore.vault_config import AuthMethod, VaultConfig

log = logging.getLogger(__name__)

# Re-login when this share of a login token's TTL has passed, well before Vault expires it.
RENEW_AT = 0.75


class VaultRequestError(PermanentError):
    """Vault refused the request as invalid (HTTP 4xx other than 401/403/404/412/429)."""

    reason = "VaultInvalidRequest"

    def __init__(self, message: str, *, status: int, server_errors: tuple[str, ...]) -> None:
        super().__init__(message)
        self.status = status
        self.server_errors = server_errors

    def mentions(self, *words: str) -> bool:
        return any(w in e.lower() for e in self.server_errors for w in words)


class _Token:
    """The current token, kept out of every repr and log."""

    __slots__ = ("deadline", "generation", "value")

    def __init__(self, value: str, deadline: float | None, generation: int) -> None:
        self.value = value
        self.deadline = deadline
        self.generation = generation

    def __repr__(self) -> str:
        return f"<vault token #{self.generation}>"


class VaultSession:
    """Authenticated access to one Vault server; safe to share between tasks."""

    def __init__(self, config: VaultConfig, *, max_concurrency: int = 16) -> None:
        self.config = config
        self._client = hvac.Client(
            url=config.address,
            verify=config.verify,
            timeout=config.timeout,
            adapter=hvac.adapters.RawAdapter,
        )
        # hvac silently picks up VAULT_TOKEN or ~/.vault-token; this session sends only its own token.
        self._client.token = None
        self._lock = threading.Lock()
        self._token: _Token | None = None
        self._logins = 0
        self._max_concurrency = max_concurrency
        # A semaphore belongs to one event loop; keep one per loop that uses this session.
        self._limits: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    def __repr__(self) -> str:
        return f"<VaultSession {self.config.address} auth={self.config.auth.value}>"

    @property
    def logins(self) -> int:
        """How many times this session has logged in (or re-read its token)."""
        return self._logins

    def close(self) -> None:
        self._client.adapter.close()

    async def request(
        self, method: str, path: str, payload: Mapping[str, Any] | None = None
    ) -> Mapping[str, Any] | None:
        """Send ``method`` to ``/v1/{path}``; the parsed JSON body, or None for 204 and 404."""
        loop = asyncio.get_running_loop()
        limit = self._limits.get(loop)
        if limit is None:
            limit = self._limits[loop] = asyncio.Semaphore(self._max_concurrency)
        async with limit:
            return await asyncio.to_thread(self._request, method, path, payload)

    # Everything below runs in worker threads.

    def _request(self, method: str, path: str, payload: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        token = self._current()
        response = self._send(method, path, payload, token.value)
        if response.status_code in (401, 403):
            # An expired or revoked token looks like a permission problem: log in again once.
            log.info("Vault denied %s %s; logging in again and retrying once", method, path)
            token = self._current(stale=token)
            response = self._send(method, path, payload, token.value)
            if response.status_code in (401, 403):
                raise PermanentError(
                    f"Vault denied {method} {path} (HTTP {response.status_code}): "
                    "the policy of this role does not allow it",
                    reason="VaultForbidden",
                )
        return _outcome(method, path, response)

    def _send(
        self, method: str, path: str, payload: Mapping[str, Any] | None, token: str | None
    ) -> requests.Response:
        headers = {"X-Vault-Token": token} if token else {}
        kwargs: dict[str, Any] = {} if payload is None else {"json": dict(payload)}
        try:
            response: requests.Response = self._client.adapter.request(
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
        return response

    def _current(self, stale: _Token | None = None) -> _Token:
        """The token to use, logging in when there is none, it is near expiry, or ``stale`` failed."""
        with self._lock:
            token = self._token
            fresh = token is not None and (token.deadline is None or time.monotonic() < token.deadline)
            if token is not None and fresh and (stale is None or token.generation != stale.generation):
                return token
            self._token = self._login()
            return self._token

    def _login(self) -> _Token:
        self._logins += 1
        cfg = self.config
        if cfg.auth is AuthMethod.TOKEN:
            value = cfg.token
            if cfg.token_file is not None:
                value = _read_secret_file(cfg.token_file, "token file")
            if not value:
                raise PermanentError("no Vault token configured", reason="VaultLoginFailed")
            return _Token(value, None, self._logins)
        jwt = _read_secret_file(cfg.jwt_file, "JWT file")
        path = f"auth/{cfg.login_mount}/login"
        response = self._send("POST", path, {"role": cfg.role, "jwt": jwt}, None)
        if response.status_code in (400, 401, 403, 404):
            # Vault's words here ("service account name not authorized", ...) say what to fix
            # and never echo the JWT.
            words = "; ".join(_errors(response)) or "no detail"
            raise PermanentError(
                f"Vault login at {path} with role {cfg.role!r} was refused "
                f"(HTTP {response.status_code}: {short(words, 200)})",
                reason="VaultLoginFailed",
            )
        body = _outcome("POST", path, response) or {}
        auth = body.get("auth") or {}
        value = auth.get("client_token")
        if not value:
            raise TransientError(f"Vault login at {path} returned no token", reason="VaultUnavailable")
        ttl = float(auth.get("lease_duration") or 0)
        deadline = time.monotonic() + ttl * RENEW_AT if ttl > 0 else None
        log.info("Logged in to Vault at %s as role %r (ttl %ss)", path, cfg.role, int(ttl))
        return _Token(value, deadline, self._logins)


def _read_secret_file(path: Any, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as e:
        # Name the file, not its content; a missing projected token may appear later.
        raise TransientError(
            f"cannot read the Vault {what} {path}: {e.strerror}", reason="VaultLoginFailed"
        ) from e


def _outcome(method: str, path: str, response: requests.Response) -> Mapping[str, Any] | None:
    status = response.status_code
    if status == 204 or status == 404:
        return None
    if 200 <= status < 300:
        try:
            body = response.json()
        except ValueError as e:
            raise TransientError(
                f"Vault answered {method} {path} with no JSON", reason="VaultUnavailable"
            ) from e
        return body if isinstance(body, dict) else None
    if status in (412, 429) or status >= 500:
        raise TransientError(
            f"Vault cannot serve {method} {path} now (HTTP {status})",
            reason="VaultSealed" if status == 503 else "VaultUnavailable",
        )
    raise VaultRequestError(
        f"Vault rejected {method} {path} (HTTP {status})", status=status, server_errors=_errors(response)
    )


def _errors(response: requests.Response) -> tuple[str, ...]:
    try:
        errors = response.json().get("errors") or []
    except (ValueError, AttributeError):
        return ()
    return tuple(short(e, 200) for e in errors if isinstance(e, str))
