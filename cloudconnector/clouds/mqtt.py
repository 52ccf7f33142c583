"""The provisioner for a plain MQTT broker: there is no registry, only credentials to keep.

A generic broker has no API to create identities, so each Device brings its own credentials
(a client certificate and key, and/or a username and password) in a Secret; the connector only
checks them (the caller has) and moves them into the key store. Provisioning without such a Secret
is therefore a permanent error that tells the user what to add.
"""

from __future__ import annotations

import datetime as dt

from cloudconnector.clouds.base import Checkpoint, CloudIdentity, EndpointInfo, Progress
from cloudconnector.clouds.certs import cert_info
from cloudconnector.errors import InvalidSpec, PermanentError
from cloudconnector.keystore.base import KeyMaterial, KeyWriter
from cloudconnector.model import Device, Endpoint
from cloudconnector.ratelimit import RateLimiter

# A username/password identity has no certificate and so no expiry.
NO_EXPIRY = dt.datetime.max.replace(tzinfo=dt.UTC)


class MqttBrokerProvisioner:
    """:class:`~cloudconnector.clouds.base.Provisioner` for ``type: MqttBroker`` Endpoints."""

    def __init__(self, endpoint: Endpoint, limiter: RateLimiter | None = None) -> None:
        if endpoint.mqtt is None:
            raise InvalidSpec("spec.mqtt", "is required for an MqttBroker Endpoint")
        self.endpoint = endpoint
        self.host = endpoint.mqtt.host
        self._limiter = limiter

    async def check(self) -> EndpointInfo:
        return EndpointInfo(self.host, self.endpoint.port)

    async def provision(
        self, device: Device, progress: Progress, checkpoint: Checkpoint, keys: KeyWriter
    ) -> CloudIdentity:
        raise PermanentError(
            "an MqttBroker endpoint cannot create identities: set spec.credentialsSecretRef on the "
            "Device to a Secret with the broker credentials",
            reason="ManualCredentialsRequired",
        )

    async def rotate(
        self, device: Device, progress: Progress, checkpoint: Checkpoint, keys: KeyWriter
    ) -> CloudIdentity:
        raise PermanentError(
            "credentials for an MqttBroker endpoint are rotated by putting the new certificate and key "
            "in the Device's Secret, then setting the cloudconnector.io/rotate annotation",
            reason="ManualCredentialsRequired",
        )

    async def adopt(
        self,
        device: Device,
        material: KeyMaterial,
        progress: Progress,
        checkpoint: Checkpoint,
        keys: KeyWriter,
    ) -> CloudIdentity:
        if self._limiter is not None:
            await self._limiter.acquire()
        if material.certificate_pem:
            info = cert_info(material.certificate_pem)
            thumbprint, not_after = info.sha256, info.not_after
        elif material.username:
            thumbprint, not_after = "", NO_EXPIRY
        else:
            raise PermanentError(
                "the credentials Secret holds neither a client certificate nor a username",
                reason="BadCredentials",
            )
        metadata = {"certificateId": thumbprint, "thumbprint": thumbprint, "cloudId": device.cloud_id}
        stored = await keys.put(device.ref, material, metadata)
        progress.update(stored=True, keyLocation=stored.location, thumbprint=thumbprint)
        await checkpoint(dict(progress))
        return CloudIdentity(
            cloud_id=device.cloud_id,
            certificate_id=thumbprint,
            thumbprint=thumbprint,
            not_after=not_after,
            key_location=stored.location,
        )

    async def deprovision(self, device: Device, progress: Progress, checkpoint: Checkpoint) -> None:
        # Nothing at the broker to undo; the caller deletes the key store entry.
        return None

    async def aclose(self) -> None:
        return None
