"""The key store interface: where each device's certificate and private key live.

Two roles, two protocols: the provisioning side (operator, standalone reconciler) may write and
delete but never read key material back; only the proxy reads, at connect time. Implementations:
``vault`` (HashiCorp Vault / OpenBao, KV v2 + transit) and ``embedded`` (local encrypted SQLite).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from cloudconnector.model import ObjectRef


@dataclass(frozen=True)
class KeyMaterial:
    """A device's credentials towards its cloud. ``repr`` never shows the secret parts."""

    certificate_pem: str
    private_key_pem: bytes = field(repr=False)
    ca_pem: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class StoredInfo:
    """Non-secret facts about what is stored, readable by the writer role (for resume checks)."""

    location: str
    version: int
    metadata: Mapping[str, str]


class KeyWriter(Protocol):
    async def put(self, device: ObjectRef, material: KeyMaterial, metadata: Mapping[str, str]) -> StoredInfo:
        """Store (or replace) the device's credentials; ``metadata`` must hold no secret."""
        ...

    async def describe(self, device: ObjectRef) -> StoredInfo | None:
        """What is stored for the device, without the secret parts; None if nothing."""
        ...

    async def delete(self, device: ObjectRef) -> None:
        """Destroy the device's credentials and its encryption key; idempotent."""
        ...


class KeyReader(Protocol):
    async def get(self, device: ObjectRef, location: str | None = None) -> KeyMaterial:
        """Read and decrypt; raises KeyError if the device has nothing stored.

        ``location`` is where the writer recorded the credentials (``StoredInfo.location``, shown
        as the Device's ``status.keyLocation``); None reads the store's own slot of ``device``. A
        location that is not a slot of ``device`` in this store is refused (PermanentError).
        """
        ...
