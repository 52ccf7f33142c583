"""Vault's HTTP API natively on the event loop: the proxy's credential reads and their login.

Every new device connection fetches its credentials (a KV v2 read and a transit decrypt), so this
path sends them over one kept aiohttp session per event loop (keep-alive, at most
:data:`MAX_CONNECTIONS` at once) instead of a worker thread per request; docs/benchmarks.md
section 9 has the measurement behind the choice. hvac stays for setup and the operator's writes
(:mod:`cloudconnector.keystore.vault_session`); both share this module's token state, status
mapping and login rules, so a fetch fails the same way whichever side sent it:

- unreachable, timeouts, 412/429/5xx (sealed, standby, overloaded) -> ``TransientError``;
- 401/403 -> one re-login and retry, then ``PermanentError(reason="VaultForbidden")``;
- other 4xx -> :class:`VaultRequestError` carrying the server's error words;
- 404 -> ``None`` to the caller, which decides what missing means.

Messages name the method and path, never a payload, a response body or a token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from cloudconnector.errors import PermanentError, TransientError, short
from cloudconnector.keystore.vault_config import AuthMethod, VaultConfig

log = logging.getLogger(__name__)

# Re-login when this share of a login token's TTL has passed, well before Vault expires it.
RENEW_AT = 0.75
# Connections kept to Vault per event loop; more fetches at once wait for one of them.
MAX_CONNECTIONS = 64


class VaultRequestError(PermanentError):
    """Vault refused the request as invalid (HTTP 4xx other than 401/403/404/412/429)."""

    reason = "VaultInvalidRequest"

    def __init__(self, message: str, *, status: int, server_errors: tuple[str, ...]) -> None:
        super().__init__(message)
        self.status = status
        self.server_errors = server_errors

    def mentions(self, *words: str) -> bool:
        return any(w in e.lower() for e in self.server_errors for w in words)


class Token:
    """A token, kept out of every repr and log."""

    __slots__ = ("deadline", "generation", "value")

    def __init__(self, value: str, deadline: float | None, generation: int) -> None:
        self.value = value
        self.deadline = deadline
        self.generation = generation

    def __repr__(self) -> str:
        return f"<vault token #{self.generation}>"


class Tokens:
    """The current token of one session, shared by its worker threads and its event loops.

    The lock guards only these few fields, never a network call, so the event loop never waits
    behind a thread that is logging in.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._token: Token | None = None
        self.logins = 0

    def __repr__(self) -> str:
        return f"<vault tokens, {self.logins} logins>"

    def usable(self, stale: Token | None = None) -> Token | None:
        """The current token unless there is none, it is due for renewal, or it is ``stale``."""
        with self._lock:
            token = self._token
            if token is None or (token.deadline is not None and time.monotonic() >= token.deadline):
                return None
            if stale is not None and token.generation == stale.generation:
                return None
            return token

    def next_login(self) -> int:
        with self._lock:
            self.logins += 1
            return self.logins

    def keep(self, token: Token) -> Token:
        with self._lock:
            if self._token is None or token.generation > self._token.generation:
                self._token = token
            return self._token


# The login, shared by both transports: what to send, and what the answer means.


def static_token(config: VaultConfig, generation: int) -> Token:
    """The ``token`` method: the configured token, or the file's content read again each time."""
    value = config.token
    if config.token_file is not None:
        value = read_secret_file(config.token_file, "token file")
    if not value:
        raise PermanentError("no Vault token configured", reason="VaultLoginFailed")
    return Token(value, None, generation)


def login_request(config: VaultConfig) -> tuple[str, dict[str, Any]]:
    """Path and body of a ``kubernetes`` or ``jwt`` login."""
    jwt = read_secret_file(config.jwt_file, "JWT file")
    return f"auth/{config.login_mount}/login", {"role": config.role, "jwt": jwt}


def login_answer(config: VaultConfig, path: str, status: int, raw: bytes, generation: int) -> Token:
    if status in (400, 401, 403, 404):
        # Vault's words here ("service account name not authorized", ...) say what to fix
        # and never echo the JWT.
        words = "; ".join(server_errors(raw)) or "no detail"
        raise PermanentError(
            f"Vault login at {path} with role {config.role!r} was refused "
            f"(HTTP {status}: {short(words, 200)})",
            reason="VaultLoginFailed",
        )
    body = outcome("POST", path, status, raw) or {}
    auth = body.get("auth") or {}
    value = auth.get("client_token")
    if not value:
        raise TransientError(f"Vault login at {path} returned no token", reason="VaultUnavailable")
    ttl = float(auth.get("lease_duration") or 0)
    deadline = time.monotonic() + ttl * RENEW_AT if ttl > 0 else None
    log.info("Logged in to Vault at %s as role %r (ttl %ss)", path, config.role, int(ttl))
    return Token(value, deadline, generation)


def read_secret_file(path: Path, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as e:
        # Name the file, not its content; a missing projected token may appear later.
        raise TransientError(
            f"cannot read the Vault {what} {path}: {e.strerror}", reason="VaultLoginFailed"
        ) from e


def forbidden(method: str, path: str, status: int) -> PermanentError:
    return PermanentError(
        f"Vault denied {method} {path} (HTTP {status}): the policy of this role does not allow it",
        reason="VaultForbidden",
    )


def outcome(method: str, path: str, status: int, raw: bytes) -> Mapping[str, Any] | None:
    """The parsed body of a successful answer, None for 204 and 404, or the error it means."""
    if status == 204 or status == 404:
        return None
    if 200 <= status < 300:
        try:
            body = json.loads(raw)
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
        f"Vault rejected {method} {path} (HTTP {status})", status=status, server_errors=server_errors(raw)
    )


def server_errors(raw: bytes) -> tuple[str, ...]:
    try:
        errors = json.loads(raw).get("errors") or []
    except (ValueError, AttributeError):
        return ()
    return tuple(short(e, 200) for e in errors if isinstance(e, str))


@dataclass
class _Kept:
    """What one event loop keeps: its HTTP session and the lock that makes its logins one at a time."""

    http: aiohttp.ClientSession
    login: asyncio.Lock


class VaultHttp:
    """Requests to one Vault server on the running event loop, logged in; safe to share between tasks.

    aiohttp sessions belong to one loop, so one is kept per loop that uses this object (the proxy
    has one; tests have many).
    """

    def __init__(self, config: VaultConfig, tokens: Tokens | None = None) -> None:
        self.config = config
        self.tokens = tokens or Tokens()
        self._kept: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Kept] = weakref.WeakKeyDictionary()
        self._closing: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<VaultHttp {self.config.address} auth={self.config.auth.value}>"

    async def request(
        self, method: str, path: str, payload: Mapping[str, Any] | None = None
    ) -> Mapping[str, Any] | None:
        """Send ``method`` to ``/v1/{path}``; the parsed JSON body, or None for 204 and 404."""
        token = await self._current()
        status, raw = await self._send(method, path, payload, token.value)
        if status in (401, 403):
            # An expired or revoked token looks like a permission problem: log in again once.
            log.info("Vault denied %s %s; logging in again and retrying once", method, path)
            token = await self._current(stale=token)
            status, raw = await self._send(method, path, payload, token.value)
            if status in (401, 403):
                raise forbidden(method, path, status)
        return outcome(method, path, status, raw)

    async def _current(self, stale: Token | None = None) -> Token:
        token = self.tokens.usable(stale)
        if token is not None:
            return token
        async with self._here().login:
            # Another task of this loop may have logged in while this one waited.
            token = self.tokens.usable(stale)
            if token is not None:
                return token
            return self.tokens.keep(await self._login())

    async def _login(self) -> Token:
        generation = self.tokens.next_login()
        if self.config.auth is AuthMethod.TOKEN:
            return static_token(self.config, generation)
        path, body = login_request(self.config)
        status, raw = await self._send("POST", path, body, None)
        return login_answer(self.config, path, status, raw, generation)

    async def _send(
        self, method: str, path: str, payload: Mapping[str, Any] | None, token: str | None
    ) -> tuple[int, bytes]:
        headers = {"X-Vault-Token": token} if token else {}
        body = None if payload is None else dict(payload)
        url = f"{self.config.address}/v1/{path}"
        for attempt in (1, 2):
            http = self._here().http
            try:
                async with http.request(method, url, json=body, headers=headers) as response:
                    return response.status, await response.read()
            except aiohttp.ServerDisconnectedError as e:
                # A kept connection that Vault closed while idle (or a restarted server): every
                # request of this path is a read, so sending it once more on a new one is safe.
                if attempt == 1:
                    continue
                raise _unreachable(method, path, e) from e
            except (aiohttp.ClientSSLError, ssl.SSLError) as e:
                # Usually a wrong VAULT_CACERT; transient because a remounted bundle can fix it,
                # and the next request builds a new session that reads the bundle again.
                await self._forget(http)
                raise TransientError(
                    f"TLS with Vault failed for {method} {path}: check the CA bundle", reason="VaultTLSFailed"
                ) from e
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                raise _unreachable(method, path, e) from e
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _here(self) -> _Kept:
        loop = asyncio.get_running_loop()
        kept = self._kept.get(loop)
        if kept is None or kept.http.closed:
            kept = self._kept[loop] = _Kept(self._open(), asyncio.Lock())
        return kept

    def _open(self) -> aiohttp.ClientSession:
        tls: ssl.SSLContext | bool = True  # the system trust store
        if self.config.ca_bundle is not None:
            try:
                tls = ssl.create_default_context(cafile=str(self.config.ca_bundle))
            except (OSError, ssl.SSLError) as e:
                raise TransientError(
                    f"cannot load the Vault CA bundle {self.config.ca_bundle}: {type(e).__name__}",
                    reason="VaultTLSFailed",
                ) from e
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, ssl=tls),
            timeout=aiohttp.ClientTimeout(total=self.config.timeout),
            # Vault's answers are small JSON documents; no cookies to keep between them.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def _forget(self, http: aiohttp.ClientSession) -> None:
        loop = asyncio.get_running_loop()
        kept = self._kept.get(loop)
        if kept is not None and kept.http is http:
            del self._kept[loop]
        await http.close()

    async def aclose(self) -> None:
        """Close the session of the running loop and, as far as possible, those of other loops."""
        here = asyncio.get_running_loop()
        kept = self._kept.pop(here, None)
        self.close()
        if kept is not None:
            await kept.http.close()

    def close(self) -> None:
        """Close every kept session; callable from sync code, inside or outside their loops."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for loop, kept in list(self._kept.items()):
            del self._kept[loop]
            if loop.is_closed():
                kept.http.detach()  # its connections went with the loop
            elif loop is running:
                # Scheduled now, its first step (which closes the connections) runs before
                # anything the caller awaits next, even when the loop is about to finish.
                task = loop.create_task(kept.http.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
            elif loop.is_running():
                asyncio.run_coroutine_threadsafe(kept.http.close(), loop)
            else:
                loop.run_until_complete(kept.http.close())


def _unreachable(method: str, path: str, error: BaseException) -> TransientError:
    return TransientError(
        f"Vault unreachable for {method} {path}: {type(error).__name__}", reason="VaultUnavailable"
    )
