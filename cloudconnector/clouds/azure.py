"""Azure IoT Hub provisioner: one self-signed X.509 device identity per Device, by thumbprint.

The connector makes the key pair itself (RSA-2048, CN = device id), so it can store the key
before the hub knows the certificate, and the hub never names a thumbprint whose key is lost.
A device id that already exists in the hub has its thumbprints replaced: that is how a
compromised or lost certificate is retired.

Rotation uses the registry's two thumbprint slots, so no connection is refused at any moment:
the new thumbprint goes in as secondary, the new certificate is stored (the proxy uses it on its
next connection), then it becomes primary and the old one is dropped. Renewal is due after two
thirds of the certificate's lifetime (:meth:`AzureIotHubProvisioner.renewal_due`).

Every step is written to ``progress`` through ``checkpoint`` before the next one (see
:mod:`cloudconnector.clouds.base`). Keys in ``progress``: ``deviceId``, ``step``
(stored|done|deleted), ``thumbprint``, ``notBefore``, ``notAfter``, ``renewAfter``,
``keyLocation``, and while a rotation is under way ``rotation`` {``thumbprint``, ``step``}.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

from cloudconnector.clouds.azure_credentials import registry_credentials
from cloudconnector.clouds.azure_registry import DeviceExists, EtagMismatch, HubDevice, Registry
from cloudconnector.clouds.base import Checkpoint, CloudIdentity, EndpointInfo, Progress
from cloudconnector.clouds.certs import cert_info, load_cert, self_signed
from cloudconnector.errors import InvalidSpec, PermanentError, TransientError
from cloudconnector.keystore.base import KeyMaterial, KeyWriter, StoredInfo
from cloudconnector.model import Device, Endpoint
from cloudconnector.ratelimit import RateLimiter

log = logging.getLogger(__name__)

PROBE_DEVICE_ID = "cloud-connector-credentials-probe"
RENEW_AT_FRACTION = 2 / 3
_WRITE_ATTEMPTS = 4  # re-reads after a 412 (someone else changed the device meanwhile)


def renew_after(not_before: dt.datetime, not_after: dt.datetime) -> dt.datetime:
    """When a certificate valid over [not_before, not_after] is due for renewal."""
    return not_before + (not_after - not_before) * RENEW_AT_FRACTION


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _parse_iso(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


class _Cert:
    """A freshly made or adopted certificate's public facts (the key is kept apart)."""

    def __init__(self, cert_pem: str) -> None:
        info = cert_info(cert_pem)
        self.pem = cert_pem
        self.sha256 = info.sha256
        self.sha1 = info.sha1
        self.not_before = load_cert(cert_pem).not_valid_before_utc
        self.not_after = info.not_after

    def metadata(self, endpoint: Endpoint, device_id: str) -> dict[str, str]:
        return {
            "endpointType": "AzureIotHub",
            "endpoint": endpoint.ref.name,
            "deviceId": device_id,
            "thumbprint": self.sha256,
            "notBefore": _iso(self.not_before),
            "notAfter": _iso(self.not_after),
        }

    def record(self, progress: Progress, stored: StoredInfo) -> None:
        progress.update(
            thumbprint=self.sha256,
            notBefore=_iso(self.not_before),
            notAfter=_iso(self.not_after),
            renewAfter=_iso(renew_after(self.not_before, self.not_after)),
            keyLocation=stored.location,
        )


def _record_from_store(progress: Progress, stored: StoredInfo) -> None:
    """Progress fields for material already in the key store (resume after a crash)."""
    meta = stored.metadata
    progress.update(
        thumbprint=meta["thumbprint"],
        notBefore=meta["notBefore"],
        notAfter=meta["notAfter"],
        renewAfter=_iso(renew_after(_parse_iso(meta["notBefore"]), _parse_iso(meta["notAfter"]))),
        keyLocation=stored.location,
    )


class AzureIotHubProvisioner:
    """:class:`~cloudconnector.clouds.base.Provisioner` for ``type: AzureIotHub`` Endpoints."""

    def __init__(
        self,
        endpoint: Endpoint,
        credentials: Mapping[str, str],
        limiter: RateLimiter | None = None,
    ) -> None:
        if endpoint.azure is None:
            raise InvalidSpec("spec.azure", "is required for an AzureIotHub endpoint")
        if endpoint.azure.certificate_validity_days < 1:
            raise InvalidSpec("spec.azure.certificateValidityDays", "must be at least 1")
        self.endpoint = endpoint
        self.spec = endpoint.azure
        self._credentials = dict(credentials)
        self._limiter = limiter or RateLimiter(endpoint.rate_per_second)
        self._registry: Registry | None = None
        self._lock = asyncio.Lock()

    async def _reg(self) -> Registry:
        async with self._lock:
            if self._registry is None:
                # The service-principal path makes blocking ARM calls.
                creds = await asyncio.to_thread(registry_credentials, self._credentials, self.spec.host_name)
                self._registry = Registry(
                    creds,
                    limiter=self._limiter,
                    base_url=self.spec.registry_url,
                    ca_pem=self.endpoint.ca_certificate,
                )
            return self._registry

    # -- the Provisioner protocol -------------------------------------------------------------

    async def check(self) -> EndpointInfo:
        reg = await self._reg()
        await reg.get(PROBE_DEVICE_ID)  # cheap; 401/403 raise CredentialsError, 404 is fine
        return EndpointInfo(
            host=self.spec.host_name,
            port=self.endpoint.port,
            details={"registry": self.spec.registry_url or f"https://{self.spec.host_name}"},
        )

    async def provision(
        self, device: Device, progress: Progress, checkpoint: Checkpoint, keys: KeyWriter
    ) -> CloudIdentity:
        device_id = device.cloud_id
        if progress.get("deviceId") not in (None, device_id):
            progress.clear()  # cloudId changed: the old record is the caller's to deprovision first
        progress["deviceId"] = device_id
        stored = await keys.describe(device.ref)
        if progress.get("step") == "done" and self._holds(stored, progress):
            return self._identity(device_id, progress)
        if progress.get("step") == "stored" and self._holds(stored, progress):
            log.info("resuming the registration of %s", device_id)
        else:
            cert_pem, key_pem = self_signed(device_id, days=self.spec.certificate_validity_days)
            cert = _Cert(cert_pem)
            stored = await keys.put(
                device.ref, KeyMaterial(cert_pem, key_pem), cert.metadata(self.endpoint, device_id)
            )
            cert.record(progress, stored)
            progress["step"] = "stored"
            await checkpoint(progress)
        thumbprint = progress["thumbprint"]
        await self._put_thumbprints(device_id, thumbprint, thumbprint)
        progress["step"] = "done"
        await checkpoint(progress)
        return self._identity(device_id, progress)

    async def rotate(
        self, device: Device, progress: Progress, checkpoint: Checkpoint, keys: KeyWriter
    ) -> CloudIdentity:
        device_id = device.cloud_id
        if progress.get("deviceId") != device_id or progress.get("step") not in ("done", "stored"):
            return await self.provision(device, progress, checkpoint, keys)
        stored = await keys.describe(device.ref)
        rotation: dict[str, Any] = dict(progress.get("rotation") or {})
        old = rotation.get("previous") or progress["thumbprint"]
        if rotation.get("step") == "stored":
            pass  # new certificate stored and accepted as secondary: only the swap is left
        elif (
            rotation.get("step") == "secondary"
            and stored is not None
            and stored.metadata.get("thumbprint") == rotation.get("thumbprint")
        ):
            _record_from_store(progress, stored)  # crashed right after storing it
        else:
            cert_pem, key_pem = self_signed(device_id, days=self.spec.certificate_validity_days)
            cert = _Cert(cert_pem)
            progress["rotation"] = {"thumbprint": cert.sha256, "previous": old, "step": "secondary"}
            await checkpoint(progress)
            await self._put_thumbprints(device_id, old, cert.sha256)
            stored = await keys.put(
                device.ref, KeyMaterial(cert_pem, key_pem), cert.metadata(self.endpoint, device_id)
            )
            cert.record(progress, stored)
        progress["rotation"] = {"thumbprint": progress["thumbprint"], "previous": old, "step": "stored"}
        progress["step"] = "stored"
        await checkpoint(progress)
        new = progress["thumbprint"]
        await self._put_thumbprints(device_id, new, new)
        progress.pop("rotation", None)
        progress["step"] = "done"
        await checkpoint(progress)
        log.info("rotated the certificate of %s", device_id)
        return self._identity(device_id, progress)

    async def adopt(
        self,
        device: Device,
        material: KeyMaterial,
        progress: Progress,
        checkpoint: Checkpoint,
        keys: KeyWriter,
    ) -> CloudIdentity:
        device_id = device.cloud_id
        cert = _Cert(material.certificate_pem)
        progress.clear()
        progress["deviceId"] = device_id
        if not device.register_manual_certificate:
            existing = await (await self._reg()).get(device_id)
            if existing is None or not (
                existing.has_thumbprint(cert.sha256) or existing.has_thumbprint(cert.sha1)
            ):
                raise PermanentError(
                    f"registerCertificate is false, but hub device {device_id} does not carry this "
                    "certificate's thumbprint",
                    reason="NotRegistered",
                )
        stored = await keys.put(device.ref, material, cert.metadata(self.endpoint, device_id))
        cert.record(progress, stored)
        progress["step"] = "stored"
        progress["manual"] = True
        await checkpoint(progress)
        if device.register_manual_certificate:
            await self._put_thumbprints(device_id, cert.sha256, cert.sha256)
        progress["step"] = "done"
        await checkpoint(progress)
        return self._identity(device_id, progress)

    async def deprovision(self, device: Device, progress: Progress, checkpoint: Checkpoint) -> None:
        device_id = progress.get("deviceId") or device.cloud_id
        rotation = progress.get("rotation") or {}
        ours = {
            t for t in (progress.get("thumbprint"), rotation.get("thumbprint"), rotation.get("previous")) if t
        }
        if not ours or progress.get("step") == "deleted":
            return  # nothing was ever sent to the hub for this device
        reg = await self._reg()
        for _ in range(_WRITE_ATTEMPTS):
            existing = await reg.get(device_id)
            if existing is None:
                break
            if not any(existing.has_thumbprint(t) for t in ours):
                log.warning("hub device %s carries other certificates now; leaving it in place", device_id)
                break
            try:
                await reg.delete(device_id, existing.etag)
                break
            except EtagMismatch:
                continue
        else:
            raise TransientError(f"hub device {device_id} kept changing while being deleted")
        progress["step"] = "deleted"
        await checkpoint(progress)

    async def aclose(self) -> None:
        if self._registry is not None:
            await self._registry.aclose()
            self._registry = None

    # -- renewal ------------------------------------------------------------------------------

    def renewal_due(self, identity: CloudIdentity, now: dt.datetime | None = None) -> bool:
        """True once two thirds of the certificate's lifetime have passed.

        The lifetime is taken from the Endpoint's ``certificateValidityDays``; ``progress``
        additionally records the exact ``renewAfter`` of the certificate in use.
        """
        now = now or dt.datetime.now(dt.UTC)
        lifetime = dt.timedelta(days=self.spec.certificate_validity_days)
        return now >= renew_after(identity.not_after - lifetime, identity.not_after)

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _holds(stored: StoredInfo | None, progress: Progress) -> bool:
        return stored is not None and stored.metadata.get("thumbprint") == progress.get("thumbprint")

    @staticmethod
    def _identity(device_id: str, progress: Progress) -> CloudIdentity:
        return CloudIdentity(
            cloud_id=device_id,
            certificate_id=progress["thumbprint"],
            thumbprint=progress["thumbprint"],
            not_after=_parse_iso(progress["notAfter"]),
            key_location=progress["keyLocation"],
        )

    async def _put_thumbprints(self, device_id: str, primary: str, secondary: str) -> HubDevice:
        """Create the device, or replace its thumbprints (If-Match on the etag just read)."""
        reg = await self._reg()
        existing = await reg.get(device_id)
        for _ in range(_WRITE_ATTEMPTS):
            if existing is None:
                try:
                    return await reg.create(device_id, primary, secondary)
                except DeviceExists:
                    existing = await reg.get(device_id)  # made meanwhile by someone else
                    continue
            if (
                existing.auth_type == "selfSigned"
                and (existing.primary or "").lower() == primary
                and (existing.secondary or "").lower() == secondary
                and existing.status == "enabled"
            ):
                return existing
            try:
                return await reg.update(device_id, existing.etag, primary, secondary)
            except EtagMismatch:
                existing = await reg.get(device_id)
        raise TransientError(f"hub device {device_id} kept changing during the update")
