"""AWS IoT Core provisioner: one thing, one policy and one certificate per Device.

Order of a provisioning run: CreateThing -> per-device policy -> CreateKeysAndCertificate
(inactive; AWS makes the RSA-2048 key pair) -> AttachPolicy -> AttachThingPrincipal ->
UpdateCertificate ACTIVE -> key store. Five checkpoints in ``progress`` (each a status write):
the thing's name before CreateThing, the policy's name before CreatePolicy, ``requestedAt``
before CreateKeysAndCertificate, the certificate's id right after it, and ``stored`` at the end.
What the idempotent steps return (the thing's ARN, the policy in place, attachments, activation)
rides with the next checkpoint; a resume that lost it does those steps again, which AWS accepts.
The key store only ever points at an active certificate, so a rotation has no moment where the
proxy would present a certificate AWS still refuses; a crash after activation but before the key
was stored retires that certificate on resume (its id was checkpointed first). See
:mod:`cloudconnector.clouds.aws_certs` for resume rules and the orphan sweep.

Progress layout (camelCase, JSON): ``thingName``, ``thingArn``, ``thingOwned`` (false when the thing
existed before us: then it is never deleted), ``policyName``, ``policyReady``, ``certificate`` (the
current certificate's slot), ``next`` (a rotation's new certificate), ``retiring`` (the old one
being removed), ``rotatedFor`` (the rotate-annotation value last carried out).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Mapping

from cloudconnector.clouds.aws_api import AwsAlreadyExists, AwsNotFound, IotApi, RetryPolicy
from cloudconnector.clouds.aws_certs import Certificates, Journal, Slot
from cloudconnector.clouds.aws_policy import policy_document, policy_name, render, same_document
from cloudconnector.clouds.base import Checkpoint, CloudIdentity, EndpointInfo, Progress
from cloudconnector.errors import InvalidSpec, PermanentError
from cloudconnector.keystore.base import KeyMaterial, KeyWriter
from cloudconnector.model import AwsSpec, Device, Endpoint
from cloudconnector.ratelimit import RateLimiter

log = logging.getLogger(__name__)

DATA_ENDPOINT_TYPE = "iot:Data-ATS"
MANAGED_BY = "cloud-connector"


class AwsIotProvisioner:
    """:class:`~cloudconnector.clouds.base.Provisioner` for ``type: AwsIotCore`` Endpoints."""

    def __init__(
        self,
        endpoint: Endpoint,
        credentials: Mapping[str, str],
        limiter: RateLimiter,
        *,
        retry: RetryPolicy | None = None,
    ) -> None:
        if endpoint.aws is None:
            raise InvalidSpec("spec.aws", "is required for an AwsIotCore Endpoint")
        self.endpoint = endpoint
        self.spec: AwsSpec = endpoint.aws
        self._limiter = limiter
        self._api = IotApi(self.spec.region, credentials, endpoint_url=self.spec.endpoint_url, retry=retry)
        self._certs = Certificates(self._api)

    async def check(self) -> EndpointInfo:
        # Called even with a dataEndpoint override: it is also the credentials check.
        resp = await self._api.call("describe_endpoint", endpointType=DATA_ENDPOINT_TYPE)
        host = self.spec.data_endpoint or resp["endpointAddress"]
        return EndpointInfo(host, self.endpoint.port, {"region": self.spec.region})

    async def provision(
        self, device: Device, progress: Progress, checkpoint: Checkpoint, keys: KeyWriter
    ) -> CloudIdentity:
        async with self._limiter.admit():  # the whole device, not one call
            journal = Journal(progress, checkpoint)
            await self._ensure_thing(device, journal)
            await self._ensure_policy(journal, device)
            cert = await self._certs.issue(device, journal, "certificate", keys)
            return _identity(journal.p, cert)

    async def rotate(
        self, device: Device, progress: Progress, checkpoint: Checkpoint, keys: KeyWriter
    ) -> CloudIdentity:
        async with self._limiter.admit():  # the whole device, not one call
            journal = Journal(progress, checkpoint)
            p = journal.p
            await self._ensure_thing(device, journal)
            await self._ensure_policy(journal, device)
            current = p.get("certificate") or {}
            if not current.get("active"):
                # Never finished provisioning: finishing it already yields a fresh certificate.
                cert = await self._certs.issue(device, journal, "certificate", keys)
                return _identity(p, cert)
            already = device.rotate_token is not None and p.get("rotatedFor") == device.rotate_token
            if already and not p.get("next") and not p.get("retiring"):
                return _identity(p, current)
            if not p.get("retiring"):
                new = await self._certs.issue(device, journal, "next", keys)
                # One checkpoint swaps the roles, so a crash cannot lose track of either certificate.
                p.update(
                    retiring=p["certificate"], certificate=new, next=None, rotatedFor=device.rotate_token
                )
                await journal.save()
            await self._certs.retire(p["retiring"], p)
            p["retiring"] = None
            await journal.save()
            log.info("Rotated the certificate of %s", device.ref)
            return _identity(p, p["certificate"])

    async def adopt(
        self,
        device: Device,
        material: KeyMaterial,
        progress: Progress,
        checkpoint: Checkpoint,
        keys: KeyWriter,
    ) -> CloudIdentity:
        async with self._limiter.admit():  # the whole device, not one call
            journal = Journal(progress, checkpoint)
            await self._ensure_thing(device, journal)
            await self._ensure_policy(journal, device)
            cert = await self._certs.issue(
                device,
                journal,
                "certificate",
                keys,
                supplied=material,
                register=device.register_manual_certificate,
            )
            return _identity(journal.p, cert)

    async def deprovision(self, device: Device, progress: Progress, checkpoint: Checkpoint) -> None:
        async with self._limiter.admit():  # the whole device, not one call
            journal = Journal(progress, checkpoint)
            p = journal.p
            for slot in ("next", "certificate", "retiring"):
                if p.get(slot):
                    await self._certs.retire(p[slot], p)
                    p[slot] = None
                    await journal.save()
            if p.get("policyName"):
                await self._delete_policy(p["policyName"])
                p.update(policyName=None, policyReady=None)
                await journal.save()
            if p.get("thingName"):
                if p.get("thingOwned"):
                    await self._api.call("delete_thing", thingName=p["thingName"], tolerate=(AwsNotFound,))
                p.update(thingName=None, thingArn=None, thingOwned=None)
                await journal.save()
            log.info("Removed the AWS IoT identity of %s", device.ref)

    async def aclose(self) -> None:
        self._api.close()

    async def _ensure_thing(self, device: Device, journal: Journal) -> None:
        p = journal.p
        if p.get("thingName") and p["thingName"] != device.cloud_id:
            raise PermanentError(
                f"the device is provisioned as thing {p['thingName']!r}; deprovision it before "
                f"changing its cloud id to {device.cloud_id!r}",
                reason="CloudIdChanged",
            )
        if p.get("thingArn"):
            return
        name = device.cloud_id
        if p.get("thingOwned") is None:
            found = await self._api.call("describe_thing", thingName=name, tolerate=(AwsNotFound,))
            if found:
                p.update(thingName=name, thingArn=found["thingArn"], thingOwned=False)
                await journal.save()
                return
            p.update(thingName=name, thingOwned=True)  # ours from here on, even if we crash now
            await journal.save()
        attributes = {"iccid": device.iccid, "managedBy": MANAGED_BY}
        try:
            resp = await self._api.call(
                "create_thing", thingName=name, attributePayload={"attributes": attributes}
            )
            arn = resp["thingArn"]
        except AwsAlreadyExists:
            # Ours from a crashed run whose attributes have changed since; it is the same thing.
            arn = (await self._api.call("describe_thing", thingName=name))["thingArn"]
        # Not checkpointed on its own: the policy step saves it next, before its own cloud call, and
        # a resume that lost it gets the same thing again (AlreadyExists, then DescribeThing).
        p["thingArn"] = arn
        log.info("Thing %s ready for %s", name, device.ref)

    async def _ensure_policy(self, journal: Journal, device: Device) -> None:
        p = journal.p
        if p.get("policyReady"):
            return
        name = policy_name(p["thingName"])
        spec = self.spec
        if device.topic_template is not None:  # the device's Group sets its own template
            spec = dataclasses.replace(spec, topic_template=device.topic_template)
        document = render(policy_document(spec, p["thingArn"]))
        p["policyName"] = name
        await journal.save()
        try:
            await self._api.call("create_policy", policyName=name, policyDocument=document)
        except AwsAlreadyExists:
            current = await self._api.call("get_policy", policyName=name)
            if not same_document(current.get("policyDocument", ""), document):
                await self._replace_policy(name, document)
        p["policyReady"] = True  # saved with the certificate's first checkpoint (redone if lost)

    async def _replace_policy(self, name: str, document: str) -> None:
        """Make ``document`` the default version, dropping the others (AWS keeps at most five)."""
        await self._drop_old_versions(name)
        await self._api.call(
            "create_policy_version", policyName=name, policyDocument=document, setAsDefault=True
        )
        await self._drop_old_versions(name)

    async def _drop_old_versions(self, name: str) -> None:
        versions = await self._api.call("list_policy_versions", policyName=name, tolerate=(AwsNotFound,))
        for v in versions.get("policyVersions", []):
            if not v.get("isDefaultVersion"):
                await self._api.call(
                    "delete_policy_version",
                    policyName=name,
                    policyVersionId=v["versionId"],
                    tolerate=(AwsNotFound,),
                )

    async def _delete_policy(self, name: str) -> None:
        await self._drop_old_versions(name)
        await self._api.call("delete_policy", policyName=name, tolerate=(AwsNotFound,))


def _identity(p: Progress, cert: Slot) -> CloudIdentity:
    return CloudIdentity(
        cloud_id=p["thingName"],
        certificate_id=cert["id"],
        thumbprint=cert["thumbprint"],
        not_after=dt.datetime.fromisoformat(cert["notAfter"]),
        key_location=cert["keyLocation"],
        certificate_arn=cert.get("arn"),
        policy_name=p.get("policyName"),
    )
