"""The words the operator, the standalone reconciler and the proxy share about the three resources:
phases, condition types and statuses, annotations, and the shape of each status and of the
provisioner's progress record.

The CRDs are the contract with users (``kubectl get``, ``kubectl wait``); this module is the same
contract for the code, so that "Ready" is spelled once. tests/test_vocabulary.py checks it against
the CRDs' status schemas. The values are ``StrEnum`` members: equal to the plain strings stored in
status, so reading an old status or comparing with a literal keeps working.
"""

from __future__ import annotations

import enum
from typing import Final, TypedDict

from cloudconnector import api


class DevicePhase(enum.StrEnum):
    PENDING = "Pending"  # waiting for its Group or Endpoint
    PROVISIONING = "Provisioning"
    READY = "Ready"  # the only phase the proxy routes
    FAILED = "Failed"  # needs a person; the message says why
    CONFLICT = "Conflict"  # another Device in the proxy's scope claims its IP or ICCID
    DELETING = "Deleting"


class EndpointPhase(enum.StrEnum):
    PENDING = "Pending"
    READY = "Ready"  # credentials accepted, data-plane host known
    ERROR = "Error"


class ConditionType(enum.StrEnum):
    READY = "Ready"
    CONFLICT = "Conflict"
    ROTATING = "Rotating"
    CREDENTIALS_REVOCABLE = "CredentialsRevocable"
    TERMINATING = "Terminating"  # a Group or Endpoint whose deletion waits for its users


class ConditionStatus(enum.StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


# Setting it (any new value) asks for a new certificate for the Device.
ROTATE_ANNOTATION: Final = api.ROTATE_ANNOTATION


class ConditionRecord(TypedDict, total=False):
    type: str
    status: str
    reason: str
    message: str
    observedGeneration: int
    lastTransitionTime: str


class RotationRecord(TypedDict, total=False):
    token: str  # the rotate-annotation value last carried out
    rotatedAt: str


class Progress(TypedDict, total=False):
    """A provisioner's resumable record (``status.progress``): each step is written here before the
    next one starts. Which keys appear depends on the Endpoint type."""

    step: str  # Azure and MQTT: stored | done | deleted
    keyLocation: str
    thumbprint: str
    stored: bool
    manual: bool
    # AWS IoT Core
    thingName: str
    thingArn: str
    thingOwned: bool
    policyName: str
    policyReady: bool
    certificate: dict[str, object]
    next: dict[str, object]
    retiring: dict[str, object]
    rotatedFor: str
    # Azure IoT Hub
    deviceId: str
    notBefore: str
    notAfter: str
    renewAfter: str
    rotation: dict[str, object]


class ConnectionRecord(TypedDict, total=False):
    """``status.connection``: the device's live connection, written by the proxy serving it."""

    connected: bool
    since: str
    lastSeen: str
    proxy: str
    mqttVersion: str  # "3.1.1" or "5"
    transport: str  # "Plain" or "TLS"
    messagesUp: int
    messagesDown: int
    bytesUp: int
    bytesDown: int
    tlsBytesSaved: int


class DeviceStatus(TypedDict, total=False):
    phase: str  # a DevicePhase
    message: str
    step: str
    observedGeneration: int
    conditions: list[ConditionRecord]
    endpoint: str  # the Endpoint the identity (or the progress record) belongs to
    endpointType: str
    cloudId: str
    certificateId: str  # set last: with ``endpoint`` it means provisioning completed
    certificateArn: str
    thumbprint: str
    notAfter: str
    keyLocation: str  # where the key store holds the credentials; the proxy reads them there
    policyName: str
    manualSecret: str
    rotation: RotationRecord
    progress: Progress
    connection: ConnectionRecord  # written by the proxy, never by the operator


class EndpointStatus(TypedDict, total=False):
    phase: str  # an EndpointPhase
    host: str
    port: int
    observedGeneration: int
    conditions: list[ConditionRecord]


class GroupStatus(TypedDict, total=False):
    endpoint: str
    total: int
    provisioned: int
    failed: int
    pending: int
    connected: int  # devices whose status.connection says connected
    observedGeneration: int
    conditions: list[ConditionRecord]
