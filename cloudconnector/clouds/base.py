"""The provisioner interface: one implementation per cloud (AWS IoT Core, Azure IoT Hub, MQTT).

A provisioner turns a Device into a cloud identity and back. It is resumable: every externally
visible step is recorded in ``progress`` (a JSON-able dict the caller persists in the Device's
status) through ``checkpoint`` *before* the next step, so a process killed anywhere can be
restarted and finish without a second thing, certificate or device, and without orphans.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from cloudconnector.keystore.base import KeyMaterial, KeyWriter
from cloudconnector.model import Device

Progress = dict[str, Any]
Checkpoint = Callable[[Progress], Awaitable[None]]


@dataclass(frozen=True)
class EndpointInfo:
    """What a healthy Endpoint resolves to: the data-plane host devices are relayed to."""

    host: str
    port: int
    details: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CloudIdentity:
    """A provisioned device, as recorded in its status (no secrets here)."""

    cloud_id: str
    certificate_id: str
    thumbprint: str  # SHA-256 hex of the certificate's DER
    not_after: datetime
    key_location: str
    certificate_arn: str | None = None
    policy_name: str | None = None


class Provisioner(Protocol):
    async def check(self) -> EndpointInfo:
        """Verify the API credentials and resolve the data endpoint; raises CredentialsError."""
        ...

    async def provision(
        self, device: Device, progress: Progress, checkpoint: Checkpoint, keys: KeyWriter
    ) -> CloudIdentity:
        """Create (or finish creating) the device's identity and store its key material."""
        ...

    async def rotate(
        self, device: Device, progress: Progress, checkpoint: Checkpoint, keys: KeyWriter
    ) -> CloudIdentity:
        """New certificate in, stored, then the old one out."""
        ...

    async def adopt(
        self,
        device: Device,
        material: KeyMaterial,
        progress: Progress,
        checkpoint: Checkpoint,
        keys: KeyWriter,
    ) -> CloudIdentity:
        """Manual provisioning: register user-supplied credentials (already validated)."""
        ...

    async def deprovision(self, device: Device, progress: Progress, checkpoint: Checkpoint) -> None:
        """Remove everything ``progress`` says was created; idempotent."""
        ...

    async def aclose(self) -> None: ...


ProvisionerFactory = Callable[..., Provisioner]
