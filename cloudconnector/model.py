"""Typed, validated views of the three custom resources.

The CRD schemas reject most bad input at apply time; these parsers are the second line (the
standalone mode reads files no API server validated, and cross-field rules live here). Every
parser raises :class:`InvalidSpec` naming the field, never a bare KeyError.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cloudconnector import topic_template
from cloudconnector.errors import InvalidSpec
from cloudconnector.identity import canonical_ip
from cloudconnector.mqtt.packets import MQTT_MAX_PACKET_SIZE
from cloudconnector.vocabulary import ROTATE_ANNOTATION

# The providers' documented device-registration limit; an Azure hub's registry is much slower
# (100 operations/minute/unit on S1) so its default follows the hub, not AWS.
DEFAULT_RATE = {"AwsIotCore": 15.0, "AzureIotHub": 100.0 / 60.0, "MqttBroker": 15.0}

MIN_PACKET_SIZE = 1024  # spec.mqtt.maxPacketSize: below this a CONNECT with a will may not fit
_THING_NAME = re.compile(r"^[a-zA-Z0-9:_-]{1,128}$")
_ICCID = re.compile(r"^[0-9]{18,22}$")
_IMSI = re.compile(r"^[0-9]{15}$")


class EndpointType(enum.StrEnum):
    AWS = "AwsIotCore"
    AZURE = "AzureIotHub"
    MQTT = "MqttBroker"


class PolicyMode(enum.StrEnum):
    LEAST_PRIVILEGE = "LeastPrivilege"
    ALLOW_ALL = "AllowAll"  # the original product's iot:* document, only on explicit opt-in


class TopicMapping(enum.StrEnum):
    FLATTEN = "Flatten"  # /a/b -> devices/{id}/messages/events/a-b, as the original product does
    PROPERTY = "Property"  # lossless: original topic carried as a message property


@dataclass(frozen=True)
class ObjectRef:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class AwsSpec:
    region: str
    credentials_secret: str | None
    endpoint_url: str | None = None  # control-plane override (VPC endpoint, or moto in tests)
    data_endpoint: str | None = None  # skip DescribeEndpoint and use this host
    policy_mode: PolicyMode = PolicyMode.LEAST_PRIVILEGE
    publish_topics: tuple[str, ...] = ("${iot:Connection.Thing.ThingName}/*",)
    subscribe_topics: tuple[str, ...] = ("${iot:Connection.Thing.ThingName}/*",)
    thing_prefix: str = ""
    topic_template: str = ""  # the Endpoint's spec.topicTemplate: the default policy follows it


@dataclass(frozen=True)
class AzureSpec:
    host_name: str
    credentials_secret: str | None
    registry_url: str | None = None  # registry REST override (tests)
    certificate_validity_days: int = 365
    topic_mapping: TopicMapping = TopicMapping.FLATTEN


@dataclass(frozen=True)
class MqttSpec:
    host: str
    credentials_from_device_secret: bool = True
    # Largest MQTT packet relayed either way; by default MQTT's own maximum, as mosquitto accepts.
    max_packet_size: int = MQTT_MAX_PACKET_SIZE


@dataclass(frozen=True)
class Endpoint:
    ref: ObjectRef
    generation: int
    type: EndpointType
    port: int
    rate_per_second: float
    ca_certificate: str | None  # PEM bundle to verify the cloud's server cert; None = built-in default
    aws: AwsSpec | None = None
    azure: AzureSpec | None = None
    mqtt: MqttSpec | None = None
    uid: str = ""
    topic_template: str = ""  # spec.topicTemplate (cloudconnector.topic_template); "" for none

    @property
    def host(self) -> str | None:
        """The data-plane host, when known from the spec alone."""
        if self.aws is not None:
            return self.aws.data_endpoint
        if self.azure is not None:
            return self.azure.host_name
        if self.mqtt is not None:
            return self.mqtt.host
        return None


@dataclass(frozen=True)
class Group:
    ref: ObjectRef
    generation: int
    endpoint: str  # name of an Endpoint in the same namespace
    uid: str = ""
    topic_template: str | None = None  # spec.topicTemplate; None: the Endpoint's, "": none


@dataclass(frozen=True)
class Device:
    ref: ObjectRef
    generation: int
    group: str
    iccid: str
    imsi: str | None
    ip: str | None
    cloud_id: str  # thing name (AWS) / device id (Azure) / client id (MQTT)
    credentials_secret: str | None = None  # manual provisioning
    register_manual_certificate: bool = True
    rotate_token: str | None = None
    uid: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    # Its Group's spec.topicTemplate, filled in by the reconciler for the provisioner (the default
    # AWS policy follows it); None: the Endpoint's template applies.
    topic_template: str | None = None


def _get(obj: Mapping[str, Any], path: str, *, required: bool = False, default: Any = None) -> Any:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur or cur[part] is None:
            if required:
                raise InvalidSpec(path, "is required")
            return default
        cur = cur[part]
    return cur


def _str(obj: Mapping[str, Any], path: str, *, required: bool = False, default: str | None = None) -> Any:
    value = _get(obj, path, required=required, default=default)
    if value is not None and not isinstance(value, str):
        raise InvalidSpec(path, f"must be a string, got {type(value).__name__}")
    return value


def _ref(obj: Mapping[str, Any]) -> tuple[ObjectRef, int, str]:
    namespace = _str(obj, "metadata.namespace", default="default")
    name = _str(obj, "metadata.name", required=True)
    return (
        ObjectRef(namespace, name),
        int(_get(obj, "metadata.generation", default=0)),
        _get(obj, "metadata.uid", default=""),
    )


def parse_endpoint(obj: Mapping[str, Any]) -> Endpoint:
    ref, generation, uid = _ref(obj)
    raw_type = _str(obj, "spec.type", required=True)
    try:
        etype = EndpointType(raw_type)
    except ValueError:
        allowed = ", ".join(t.value for t in EndpointType)
        raise InvalidSpec("spec.type", f"must be one of {allowed}, got {raw_type!r}") from None
    rate = float(_get(obj, "spec.rateLimit.devicesPerSecond", default=DEFAULT_RATE[etype]))
    if not 0 < rate <= 1000:
        raise InvalidSpec("spec.rateLimit.devicesPerSecond", "must be in (0, 1000]")
    port = int(_get(obj, "spec.port", default=8883))
    if not 0 < port < 65536:
        raise InvalidSpec("spec.port", "must be a TCP port")
    ca = _str(obj, "spec.caCertificate")
    template = _template(obj) or ""
    aws = azure = mqtt = None
    if etype is EndpointType.AWS:
        policy = _get(obj, "spec.aws.policy", default={})
        aws = AwsSpec(
            region=_str(obj, "spec.aws.region", required=True),
            credentials_secret=_str(obj, "spec.aws.credentialsSecretRef.name"),
            endpoint_url=_str(obj, "spec.aws.endpointUrl"),
            data_endpoint=_str(obj, "spec.aws.dataEndpoint"),
            policy_mode=PolicyMode(policy.get("mode", PolicyMode.LEAST_PRIVILEGE.value)),
            publish_topics=tuple(policy.get("publishTopics") or AwsSpec.publish_topics),
            subscribe_topics=tuple(policy.get("subscribeTopics") or AwsSpec.subscribe_topics),
            thing_prefix=_str(obj, "spec.aws.thingPrefix", default=""),
            topic_template=template,
        )
        if aws.thing_prefix and not _THING_NAME.match(aws.thing_prefix):
            raise InvalidSpec("spec.aws.thingPrefix", "may only hold letters, digits, ':', '_' and '-'")
    elif etype is EndpointType.AZURE:
        azure = AzureSpec(
            host_name=_str(obj, "spec.azure.hostName", required=True),
            credentials_secret=_str(obj, "spec.azure.credentialsSecretRef.name"),
            registry_url=_str(obj, "spec.azure.registryUrl"),
            certificate_validity_days=int(_get(obj, "spec.azure.certificateValidityDays", default=365)),
            topic_mapping=TopicMapping(_get(obj, "spec.azure.topicMapping", default="Flatten")),
        )
    else:
        max_packet = _get(obj, "spec.mqtt.maxPacketSize", default=MQTT_MAX_PACKET_SIZE)
        if type(max_packet) is not int or not MIN_PACKET_SIZE <= max_packet <= MQTT_MAX_PACKET_SIZE:
            bounds = f"from {MIN_PACKET_SIZE} to {MQTT_MAX_PACKET_SIZE}"
            raise InvalidSpec("spec.mqtt.maxPacketSize", f"must be an integer {bounds}")
        mqtt = MqttSpec(host=_str(obj, "spec.mqtt.host", required=True), max_packet_size=max_packet)
    return Endpoint(ref, generation, etype, port, rate, ca, aws, azure, mqtt, uid, template)


def parse_group(obj: Mapping[str, Any]) -> Group:
    ref, generation, uid = _ref(obj)
    return Group(ref, generation, _str(obj, "spec.endpointRef.name", required=True), uid, _template(obj))


def _template(obj: Mapping[str, Any]) -> str | None:
    template = _str(obj, "spec.topicTemplate")
    if template is not None:
        try:
            topic_template.check(template)
        except topic_template.TemplateError as e:
            raise InvalidSpec("spec.topicTemplate", str(e)) from None
    return template


def derive_cloud_id(namespace: str, name: str, prefix: str = "") -> str:
    """A stable cloud identity valid both as an AWS thing name and an Azure device id.

    Kubernetes names never contain ``_`` or ``:``, so ``namespace_name`` with dots turned into
    colons cannot collide between two devices; over-long results keep a hash of the full name.
    """
    base = f"{prefix}{namespace}_{name.replace('.', ':')}"
    if len(base) <= 128:
        return base
    digest = hashlib.sha256(base.encode()).hexdigest()[:16]
    return f"{base[:111]}-{digest}"


def parse_device(obj: Mapping[str, Any], *, thing_prefix: str = "") -> Device:
    ref, generation, uid = _ref(obj)
    iccid = _str(obj, "spec.sim.iccid", required=True)
    if not _ICCID.match(iccid):
        raise InvalidSpec("spec.sim.iccid", "must be 18 to 22 digits")
    imsi = _str(obj, "spec.sim.imsi")
    if imsi is not None and not _IMSI.match(imsi):
        raise InvalidSpec("spec.sim.imsi", "must be 15 digits")
    ip = _str(obj, "spec.ip")
    if ip is not None:
        try:
            ip = canonical_ip(ip)  # the spelling every index compares (IPv4-mapped IPv6 folds to IPv4)
        except ValueError:
            raise InvalidSpec("spec.ip", f"{ip!r} is not an IPv4 or IPv6 address") from None
    cloud_id = _str(obj, "spec.cloudId") or derive_cloud_id(ref.namespace, ref.name, thing_prefix)
    if not _THING_NAME.match(cloud_id):
        raise InvalidSpec("spec.cloudId", "must be 1-128 of letters, digits, ':', '_' and '-'")
    annotations = _get(obj, "metadata.annotations", default={}) or {}
    return Device(
        ref=ref,
        generation=generation,
        group=_str(obj, "spec.group", required=True),
        iccid=iccid,
        imsi=imsi,
        ip=ip,
        cloud_id=cloud_id,
        credentials_secret=_str(obj, "spec.credentialsSecretRef.name"),
        register_manual_certificate=bool(_get(obj, "spec.registerCertificate", default=True)),
        rotate_token=annotations.get(ROTATE_ANNOTATION),
        uid=uid,
        labels=dict(_get(obj, "metadata.labels", default={}) or {}),
    )
