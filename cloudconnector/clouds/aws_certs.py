"""The life of one AWS IoT device certificate: issue, resume, retire, and the orphan sweep.

A certificate's record (a "slot" in the device's progress) is filled in step by step, and every
step is checkpointed before the next one starts. AWS hands out a private key exactly once, in the
CreateKeysAndCertificate answer, so a certificate recorded but whose key never reached the key
store is useless after a crash: it is detached and deleted, and a new one is made.

A crash between CreateKeysAndCertificate and the checkpoint that records its answer leaves a
certificate nobody knows the id of. The slot therefore records ``requestedAt`` before the call;
on resume the sweep deletes INACTIVE certificates created around that time that have no thing and
no policy attached (a certificate of ours always gets both before it is activated). Certificates
this process created and has not attached yet are never swept. Residual risk: another process
using the same AWS account (a second connector, a person, a script) that creates an INACTIVE
certificate in the same minutes and has not attached it yet when the sweep runs loses it.

Removed keys are set to None, never deleted, so that a JSON merge patch of the progress into the
Device's status removes them there too.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from cloudconnector.clouds.aws_api import AwsAlreadyExists, AwsNotFound, IotApi
from cloudconnector.clouds.base import Checkpoint, Progress
from cloudconnector.clouds.certs import cert_info
from cloudconnector.errors import PermanentError
from cloudconnector.keystore.base import KeyMaterial, KeyWriter, StoredInfo
from cloudconnector.model import Device

log = logging.getLogger(__name__)

# How far the AWS clock (creationDate) may be from ours, and how long one create call may take.
CLOCK_SKEW = dt.timedelta(minutes=5)
CALL_WINDOW = dt.timedelta(minutes=10)
PAGE_SIZE = 250

Slot = dict[str, Any]


class Journal:
    """The device's progress record and the way to persist it."""

    def __init__(self, progress: Progress, checkpoint: Checkpoint) -> None:
        self.p = progress
        self._checkpoint = checkpoint
        self._saved = copy.deepcopy(progress)

    async def save(self) -> None:
        # A copy: the caller may keep what it is given while we go on changing ours.
        self._saved = copy.deepcopy(self.p)
        await self._checkpoint(copy.deepcopy(self.p))

    async def flush(self) -> None:
        """Save what changed since the last save, if anything did."""
        if self.p != self._saved:
            await self.save()

    def slot(self, name: str) -> Slot:
        slot = self.p.get(name)
        if not isinstance(slot, dict):
            slot = self.p[name] = {}
        return slot


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def _parse_time(value: str | dt.datetime) -> dt.datetime:
    t = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(value)
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


class Certificates:
    """Certificate steps for one provisioner (one AWS account and region)."""

    def __init__(self, api: IotApi) -> None:
        self._api = api
        # Created by this process and not yet attached: the sweep must not take them.
        self._fresh: set[str] = set()
        self._swept: set[str] = set()  # orphans this process deleted: never looked at again

    async def issue(
        self,
        device: Device,
        journal: Journal,
        slot_name: str,
        keys: KeyWriter,
        *,
        supplied: KeyMaterial | None = None,
        register: bool = True,
    ) -> Slot:
        """Fill ``slot_name`` up to an ACTIVE, attached, stored certificate and return the slot.

        ``supplied`` is the user's own material (manual provisioning): it is registered in AWS
        when ``register`` is true, otherwise only stored.
        """
        c = journal.slot(slot_name)
        if (
            supplied is not None
            and c.get("id")
            and not c.get("stored")
            and c.get("thumbprint") != cert_info(supplied.certificate_pem).sha256
        ):
            # The user's Secret changed while a previous adoption was half done: start over.
            await self.retire(c, journal.p)
            c = journal.p[slot_name] = {}
            await journal.save()
        if c.get("id") and not c.get("stored"):
            held = await _stored_here(keys, device, c)
            if held is not None:
                c.update(stored=True, keyLocation=held.location, keyVersion=held.version)
                await journal.save()
            elif supplied is None:
                log.info(
                    "Certificate %s of %s lost its key in a crash: replacing it", c["id"][:16], device.ref
                )
                await self.retire(c, journal.p)  # its key is gone with the crashed process
                c = journal.p[slot_name] = {}
                await journal.save()
        if c.get("requestedAt") and not c.get("id"):
            await self.sweep(c["requestedAt"])
            c["requestedAt"] = None
            await journal.save()

        material = supplied
        if not c.get("id"):
            if supplied is None:
                material = await self._create(c, journal)
            elif register:
                await self._register(c, journal, supplied)
            else:
                info = cert_info(supplied.certificate_pem)
                c.update(id=info.sha256, arn=None, registered=False, owned=False)
                c.update(thumbprint=info.sha256, notAfter=info.not_after.isoformat())
                await journal.save()

        try:
            if c.get("registered"):
                await self._attach(c, journal)
        finally:
            self._fresh.discard(c["id"])

        # Active before stored: the key store only ever switches to a certificate the cloud already
        # accepts, so a rotation never hands the proxy a not-yet-active one. The id is checkpointed,
        # so a crash before the store step retires this certificate on resume.
        if c.get("registered") and not c.get("active"):
            await self._api.call("update_certificate", certificateId=c["id"], newStatus="ACTIVE")
            c["active"] = True  # saved with "stored" below, see _attach
            log.info("Certificate %s of %s is active", c["id"][:16], device.ref)
        if not c.get("stored"):
            assert material is not None  # otherwise the slot was reset above
            metadata = {
                "certificateId": c["id"],
                "thumbprint": c["thumbprint"],
                "notAfter": c["notAfter"],
                "cloudId": journal.p.get("thingName") or device.cloud_id,
            }
            if c.get("arn"):
                metadata["certificateArn"] = c["arn"]
            stored = await keys.put(device.ref, material, metadata)
            c.update(stored=True, keyLocation=stored.location, keyVersion=stored.version)
        await journal.flush()

        return c

    async def _create(self, c: Slot, journal: Journal) -> KeyMaterial:
        c["requestedAt"] = now_iso()
        await journal.save()
        # Not retried after a failure that may have taken effect: that certificate is the sweep's.
        resp = await self._api.call("create_keys_and_certificate", setAsActive=False, idempotent=False)
        self._fresh.add(resp["certificateId"])
        material = KeyMaterial(
            certificate_pem=resp["certificatePem"],
            private_key_pem=resp["keyPair"]["PrivateKey"].encode(),
        )
        info = cert_info(material.certificate_pem)
        c.update(
            id=resp["certificateId"],
            arn=resp["certificateArn"],
            registered=True,
            owned=True,
            thumbprint=info.sha256,
            notAfter=info.not_after.isoformat(),
            requestedAt=None,
        )
        await journal.save()  # before anything else: this is the only record of the certificate
        return material

    async def _register(self, c: Slot, journal: Journal, supplied: KeyMaterial) -> None:
        info = cert_info(supplied.certificate_pem)
        first_try = not c.get("registerRequested")
        c["registerRequested"] = True
        await journal.save()
        try:
            resp = await self._api.call(
                "register_certificate_without_ca",
                certificatePem=supplied.certificate_pem,
                status="INACTIVE",
                idempotent=False,
            )
            cert_id, arn, owned = resp["certificateId"], resp["certificateArn"], True
        except AwsAlreadyExists as e:
            if not (e.resource_id and e.resource_arn):
                raise PermanentError(
                    "the certificate is already registered in AWS IoT, which did not say under which id",
                    reason="CertificateExists",
                ) from e
            # Registered before our first attempt: someone else's, so never deleted by us.
            cert_id, arn, owned = e.resource_id, e.resource_arn, not first_try
        self._fresh.add(cert_id)
        c.update(id=cert_id, arn=arn, registered=True, owned=owned, registerRequested=None)
        c.update(thumbprint=info.sha256, notAfter=info.not_after.isoformat())
        await journal.save()

    async def _attach(self, c: Slot, journal: Journal) -> None:
        # The attachments and the activation are recorded with the "stored" checkpoint only: a
        # resume that finds the id but not "stored" retires the certificate (or, if the key store
        # has it, attaches and activates again, which AWS accepts as no-ops), so saving each of
        # them on its own would cost three status writes per device and change no resume.
        if not c.get("policyAttached"):
            await self._api.call("attach_policy", policyName=journal.p["policyName"], target=c["arn"])
            c["policyAttached"] = True
        if not c.get("thingAttached"):
            await self._api.call(
                "attach_thing_principal", thingName=journal.p["thingName"], principal=c["arn"]
            )
            c["thingAttached"] = True

    async def retire(self, c: Slot, p: Progress) -> None:
        """Detach, deactivate and delete one recorded certificate; each step tolerates "gone"."""
        if c.get("requestedAt") and not c.get("id"):
            await self.sweep(c["requestedAt"])
        if not (c.get("id") and c.get("registered")):
            return
        gone = (AwsNotFound,)
        if p.get("policyName"):
            await self._api.call("detach_policy", policyName=p["policyName"], target=c["arn"], tolerate=gone)
        if p.get("thingName"):
            await self._api.call(
                "detach_thing_principal", thingName=p["thingName"], principal=c["arn"], tolerate=gone
            )
        if not c.get("owned"):
            return  # the user's registration: take our attachments away, leave the certificate
        await self._api.call("update_certificate", certificateId=c["id"], newStatus="INACTIVE", tolerate=gone)
        await self._api.call("delete_certificate", certificateId=c["id"], tolerate=gone)

    async def sweep(self, requested_at: str) -> list[str]:
        """Delete the certificate a crashed CreateKeysAndCertificate may have left; return ids."""
        at = _parse_time(requested_at)
        since, until = at - CLOCK_SKEW, at + CALL_WINDOW
        deleted: list[str] = []
        marker: str | None = None
        while True:
            params: dict[str, Any] = {"pageSize": PAGE_SIZE, "ascendingOrder": False}
            if marker:
                params["marker"] = marker
            page = await self._api.call("list_certificates", **params)
            certs = page.get("certificates", [])
            for cert in certs:
                if await self._is_orphan(cert, lambda t: since <= t <= until):
                    done = await self._api.call(
                        "delete_certificate", certificateId=cert["certificateId"], tolerate=(AwsNotFound,)
                    )
                    deleted.append(cert["certificateId"])
                    self._swept.add(cert["certificateId"])
                    # Sweeps of several devices see the same orphan: only the one that deleted it says so.
                    if done:
                        log.warning("Deleted orphaned certificate %s", cert["certificateId"][:16])
            marker = page.get("nextMarker")
            # Newest first: once a whole page predates the window, older pages cannot match.
            older = all(_parse_time(x["creationDate"]) < since for x in certs)
            if not marker or not certs or older:
                return deleted

    async def _is_orphan(self, cert: dict[str, Any], in_window: Callable[[dt.datetime], bool]) -> bool:
        if cert.get("status") != "INACTIVE" or cert["certificateId"] in self._fresh:
            return False
        if cert["certificateId"] in self._swept:
            return False
        if not in_window(_parse_time(cert["creationDate"])):
            return False
        arn = cert["certificateArn"]
        things = await self._api.call("list_principal_things", principal=arn, tolerate=(AwsNotFound,))
        if things.get("things"):
            return False
        policies = await self._api.call("list_attached_policies", target=arn, tolerate=(AwsNotFound,))
        return not policies.get("policies")


async def _stored_here(keys: KeyWriter, device: Device, c: Slot) -> StoredInfo | None:
    """The key store may hold this certificate although the checkpoint saying so was lost."""
    info = await keys.describe(device.ref)
    return info if info is not None and info.metadata.get("certificateId") == c["id"] else None
