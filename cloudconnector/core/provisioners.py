"""One provisioner and one rate limiter per Endpoint, shared by every device on it.

The limiter is keyed by the Endpoint's identity (uid, else namespace/name) and survives spec
changes: a new generation gets a new provisioner (new region, new credentials) but keeps the same
token bucket with the new rate, so editing an Endpoint never lets a burst through at twice the rate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from cloudconnector.clouds.base import Provisioner
from cloudconnector.errors import CredentialsError
from cloudconnector.model import Endpoint
from cloudconnector.ratelimit import RateLimiter

logger = logging.getLogger(__name__)

Credentials = Mapping[str, str]
CredentialsLoader = Callable[[Endpoint], Awaitable[Credentials]]
"""Reads an Endpoint's cloud API credentials (a Secret in Kubernetes, a file in standalone mode)."""

Factory = Callable[[Endpoint, Credentials, RateLimiter], Provisioner]
"""Builds the provisioner for one Endpoint; normally ``clouds.factory.make_provisioner``."""


class ProvisionerSource(Protocol):
    """Where reconcilers get the provisioner for an Endpoint; ``removal`` for work that only
    deletes identities (see :meth:`ProvisionerPool.get`)."""

    async def get(self, endpoint: Endpoint, *, removal: bool = False) -> Provisioner: ...


@dataclass
class _Entry:
    generation: int
    credentials: Credentials
    provisioner: Provisioner


def _key(endpoint: Endpoint) -> str:
    return endpoint.uid or str(endpoint.ref)


class ProvisionerPool:
    """Caches provisioners by Endpoint generation and credentials; closes replaced ones."""

    def __init__(self, factory: Factory, load_credentials: CredentialsLoader, burst: float = 1.0) -> None:
        self._factory = factory
        self._load = load_credentials
        self._burst = burst
        self._entries: dict[str, _Entry] = {}
        self._limiters: dict[str, RateLimiter] = {}
        self._lock = asyncio.Lock()

    def limiter(self, endpoint: Endpoint) -> RateLimiter:
        key = _key(endpoint)
        limiter = self._limiters.get(key)
        if limiter is None:
            limiter = self._limiters[key] = RateLimiter(endpoint.rate_per_second, self._burst)
        else:
            limiter.set_rate(endpoint.rate_per_second)
        return limiter

    async def get(self, endpoint: Endpoint, *, removal: bool = False) -> Provisioner:
        """The provisioner with the Endpoint's current credentials.

        Credentials are re-read every time: a rotated or revoked Secret takes effect on the next
        call without waiting for the Endpoint's generation to change. Only ``removal`` work
        (deleting a Device, moving it away) may go on with the keys read last when the Secret
        cannot be read any more: deleting a namespace or a manifest file removes the Secret
        together with the Devices, and their cloud identities must not be left behind.
        """
        key = _key(endpoint)
        try:
            credentials = await self._load(endpoint)
        except CredentialsError:
            entry = self._entries.get(key)
            if not removal or entry is None:
                raise
            logger.warning(
                "the credentials of Endpoint %s cannot be read: removing identities with the keys read last",
                endpoint.ref,
            )
            return entry.provisioner
        async with self._lock:
            entry = self._entries.get(key)
            if (
                entry is not None
                and entry.generation == endpoint.generation
                and entry.credentials == credentials
            ):
                return entry.provisioner
            provisioner = self._factory(endpoint, credentials, self.limiter(endpoint))
            self._entries[key] = _Entry(endpoint.generation, dict(credentials), provisioner)
        if entry is not None:
            await _close(entry.provisioner)
        return provisioner

    async def forget(self, endpoint: Endpoint) -> None:
        """Drop what is cached for a deleted Endpoint."""
        key = _key(endpoint)
        async with self._lock:
            entry = self._entries.pop(key, None)
            self._limiters.pop(key, None)
        if entry is not None:
            await _close(entry.provisioner)

    async def aclose(self) -> None:
        async with self._lock:
            entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            await _close(entry.provisioner)


async def _close(provisioner: Provisioner) -> None:
    try:
        await provisioner.aclose()
    except Exception as e:  # closing a replaced client must not fail the caller's work
        logger.debug("closing a replaced provisioner failed: %s", type(e).__name__)
