"""The Vault (or OpenBao) key store: KV version 2 for the record, transit for the encryption.

Each device slot ``namespace/name`` has:

- a KV v2 secret at ``{kv_mount}/data/{prefix}/{namespace}/{name}`` holding the certificate, the CA,
  the MQTT username, the name of the device's transit key and the transit ciphertexts of the private
  key and of the MQTT password;
- non-secret facts (thumbprint, certificate id, ...) in that secret's ``custom_metadata``, which the
  operator reads back through the metadata endpoint without any right on the data;
- its own transit key ``cc-{namespace}.{name}`` (the design's per-device "vault password"). The
  operator's policy may encrypt with it, never decrypt; the proxy's policy may decrypt only. The
  ciphertexts also carry associated data naming the slot and the field, so a ciphertext moved to
  another slot or field does not decrypt.

Kubernetes namespaces cannot contain dots, so the first dot in a transit key name separates the
namespace from the device name and no two slots share a key. The policies live in
:mod:`cloudconnector.keystore.vault_setup` and ``deploy/vault/``. Connection settings and the
environment variables that set them: :mod:`cloudconnector.keystore.vault_config`.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Mapping
from typing import Any

from cloudconnector.errors import InvalidSpec, PermanentError
from cloudconnector.keystore.base import KeyMaterial, StoredInfo
from cloudconnector.keystore.vault_config import VaultConfig
from cloudconnector.keystore.vault_session import VaultRequestError, VaultSession
from cloudconnector.model import ObjectRef

log = logging.getLogger(__name__)

SCHEMA = "1"
TRANSIT_PREFIX = "cc-"
_NAMESPACE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_]*[A-Za-z0-9])?")
_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
LOCATION_SCHEME = "vault:"


def transit_key_name(device: ObjectRef) -> str:
    """The device's own transit key; unique per slot because namespaces hold no dots."""
    _check_slot(device)
    return f"{TRANSIT_PREFIX}{device.namespace}.{device.name}"


def _check_slot(device: ObjectRef) -> None:
    if not _NAMESPACE.fullmatch(device.namespace) or len(device.namespace) > 63:
        raise InvalidSpec("metadata.namespace", "is not usable as a Vault path segment")
    if not _NAME.fullmatch(device.name) or len(device.name) > 253:
        raise InvalidSpec("metadata.name", "is not usable as a Vault path segment")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class VaultKeyStore:
    """Both roles over Vault; which one actually works is decided by the token's policy.

    The operator builds it with its own role (``put``/``describe``/``delete``, sent through hvac),
    the proxy with its read-only role (``get``, sent natively over aiohttp).
    """

    def __init__(self, config: VaultConfig, *, session: VaultSession | None = None) -> None:
        self.config = config
        self.session = session or VaultSession(config)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> VaultKeyStore:
        return cls(VaultConfig.from_env(env))

    def __repr__(self) -> str:
        return f"<VaultKeyStore {self.config.address} {self.config.kv_mount}/{self.config.prefix}>"

    def close(self) -> None:
        self.session.close()

    async def aclose(self) -> None:
        await self.session.aclose()

    # Paths.

    def _relative(self, device: ObjectRef) -> str:
        _check_slot(device)
        parts = [self.config.prefix] if self.config.prefix else []
        return "/".join([*parts, device.namespace, device.name])

    def location(self, device: ObjectRef) -> str:
        """What the status field ``keyLocation`` shows: ``vault:{kv_mount}/{prefix}/{ns}/{name}``."""
        return f"{LOCATION_SCHEME}{self.config.kv_mount}/{self._relative(device)}"

    def _data_path_at(self, device: ObjectRef, location: str | None) -> str:
        """The KV data path ``location`` names; it must end in the device's own slot, so a status
        pointing at another device's record is refused here (and its ciphertext, bound to its
        own slot, would not decrypt for this one either)."""
        if location is None:
            return self._data_path(device)
        _check_slot(device)
        mount, _, relative = location.removeprefix(LOCATION_SCHEME).partition("/")
        parts = relative.split("/")
        if (
            not location.startswith(LOCATION_SCHEME)
            or not all(_NAME.fullmatch(p) for p in (mount, *parts))
            or parts[-2:] != [device.namespace, device.name]
        ):
            raise PermanentError(
                f"the key location of {device} is not a Vault slot of that device",
                reason="KeyLocationInvalid",
            )
        return f"{mount}/data/{relative}"

    def _data_path(self, device: ObjectRef) -> str:
        return f"{self.config.kv_mount}/data/{self._relative(device)}"

    def _metadata_path(self, device: ObjectRef) -> str:
        return f"{self.config.kv_mount}/metadata/{self._relative(device)}"

    def _transit(self, action: str, key: str) -> str:
        return f"{self.config.transit_mount}/{action}/{key}"

    # KeyWriter.

    async def put(self, device: ObjectRef, material: KeyMaterial, metadata: Mapping[str, str]) -> StoredInfo:
        key = transit_key_name(device)
        await self._ensure_transit_key(key)
        record: dict[str, Any] = {
            "schema": SCHEMA,
            "certificate": material.certificate_pem,
            "transit_key": key,
            "private_key": await self._encrypt(key, device, "private_key", material.private_key_pem),
        }
        if material.ca_pem is not None:
            record["ca"] = material.ca_pem
        if material.username is not None:
            record["username"] = material.username
        if material.password is not None:
            record["password"] = await self._encrypt(key, device, "password", material.password.encode())
        written = await self.session.request("POST", self._data_path(device), {"data": record}) or {}
        version = int((written.get("data") or {}).get("version") or 0)
        # Data first, then the facts: a crash in between leaves facts that do not claim the new data.
        meta = {str(k): str(v) for k, v in metadata.items()}
        await self.session.request("POST", self._metadata_path(device), {"custom_metadata": meta})
        log.info("Stored credentials of %s at %s (version %d)", device, self.location(device), version)
        return StoredInfo(location=self.location(device), version=version, metadata=meta)

    async def describe(self, device: ObjectRef) -> StoredInfo | None:
        body = await self.session.request("GET", self._metadata_path(device))
        if body is None:
            return None
        data = body.get("data") or {}
        version = int(data.get("current_version") or 0)
        current = (data.get("versions") or {}).get(str(version)) or {}
        if version == 0 or current.get("destroyed") or current.get("deletion_time"):
            return None
        meta = data.get("custom_metadata") or {}
        return StoredInfo(location=self.location(device), version=version, metadata=dict(meta))

    async def delete(self, device: ObjectRef) -> None:
        key = transit_key_name(device)
        # The transit key first: once it is gone the ciphertext is useless even if the rest fails.
        try:
            await self.session.request(
                "POST", self._transit("keys", key) + "/config", {"deletion_allowed": True}
            )
            await self.session.request("DELETE", self._transit("keys", key))
        except VaultRequestError as e:
            if not e.mentions("not found", "no existing key"):
                raise
        await self.session.request("DELETE", self._metadata_path(device))
        log.info("Deleted credentials of %s and its transit key", device)

    # KeyReader.

    async def get(self, device: ObjectRef, location: str | None = None) -> KeyMaterial:
        # The proxy's path at every device connection: sent natively on the event loop (vault_http).
        body = await self.session.read("GET", self._data_path_at(device, location))
        record = ((body or {}).get("data") or {}).get("data")
        if not record:
            raise KeyError(str(device))
        key = transit_key_name(device)
        if record.get("transit_key") != key or record.get("schema") != SCHEMA:
            raise PermanentError(
                f"the Vault record of {device} does not belong to this slot", reason="VaultRecordInvalid"
            )
        private_key = await self._decrypt(key, device, "private_key", record["private_key"])
        password = None
        if record.get("password"):
            password = (await self._decrypt(key, device, "password", record["password"])).decode()
        return KeyMaterial(
            certificate_pem=record["certificate"],
            private_key_pem=private_key,
            ca_pem=record.get("ca"),
            username=record.get("username"),
            password=password,
        )

    # Transit.

    async def _ensure_transit_key(self, key: str) -> None:
        path = self._transit("keys", key)
        created = await self.session.request("POST", path, {"type": "aes256-gcm96", "exportable": False})
        # Newer servers answer with the key's settings; skip the config call when already deletable.
        if not ((created or {}).get("data") or {}).get("deletion_allowed"):
            await self.session.request("POST", path + "/config", {"deletion_allowed": True})

    async def _encrypt(self, key: str, device: ObjectRef, field: str, plaintext: bytes) -> str:
        body = await self.session.request(
            "POST",
            self._transit("encrypt", key),
            {"plaintext": _b64(plaintext), "associated_data": _b64(_context(device, field))},
        )
        ciphertext = ((body or {}).get("data") or {}).get("ciphertext")
        if not ciphertext:
            raise PermanentError(
                f"Vault transit returned no ciphertext for {device}", reason="VaultEncryptFailed"
            )
        return str(ciphertext)

    async def _decrypt(self, key: str, device: ObjectRef, field: str, ciphertext: str) -> bytes:
        try:
            body = await self.session.read(
                "POST",
                self._transit("decrypt", key),
                {"ciphertext": ciphertext, "associated_data": _b64(_context(device, field))},
            )
        except VaultRequestError as e:
            raise PermanentError(
                f"cannot decrypt the {field} of {device} with its transit key", reason="VaultDecryptFailed"
            ) from e
        plaintext = ((body or {}).get("data") or {}).get("plaintext")
        if plaintext is None:
            # 404: the transit key is gone, so the device's credentials are unrecoverable.
            raise KeyError(str(device))
        return base64.b64decode(plaintext)


def _context(device: ObjectRef, field: str) -> bytes:
    return f"cloud-connector/{device.namespace}/{device.name}/{field}".encode()
