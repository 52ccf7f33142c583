"""Where the proxy sends a device: the join of Device, Group and Endpoint, from their status.

The operator (or the standalone reconciler) writes status; the proxy only reads it. This module is
the single definition of which status fields the proxy relies on:

Device ``status``: ``phase`` (Ready when usable), ``endpoint`` (name the identity was made at),
``cloudId``, ``certificateId`` (changes on rotation), ``keyLocation`` (where the key store holds the
device's credentials; the proxy reads them there).
Endpoint ``status``: ``phase`` (Ready), ``host`` and ``port`` of the data plane.

A directory answers an identity claimed by more than one Ready device with
:class:`AmbiguousIdentity`, never with one of them (see :mod:`cloudconnector.identity`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from cloudconnector import topic_template
from cloudconnector.core.inventory import Inventory, place
from cloudconnector.errors import InvalidSpec
from cloudconnector.identity import IdentityKey
from cloudconnector.model import (
    Device,
    Endpoint,
    EndpointType,
    Group,
    ObjectRef,
    TopicMapping,
    parse_device,
    parse_endpoint,
    parse_group,
)
from cloudconnector.vocabulary import DevicePhase


@dataclass(frozen=True)
class Route:
    device: ObjectRef  # also the key store slot
    iccid: str
    imsi: str | None
    ip: str | None
    endpoint_type: EndpointType
    host: str
    port: int
    ca_pem: str | None
    client_id: str  # AWS thing name / Azure device id / MQTT client id
    certificate_id: str  # a new value means new credentials: reconnects must refetch
    topic_mapping: TopicMapping = TopicMapping.FLATTEN
    key_location: str | None = None  # status.keyLocation; None: the key store's own slot path
    max_packet_size: int | None = None  # spec.mqtt.maxPacketSize; None: the cloud's documented maximum
    topic_prefix: str = ""  # the device's expanded topic template ("" for none; proxy/topics.py)
    topic_error: str = ""  # why the template cannot be expanded for this device (it is refused)


class AmbiguousIdentity(LookupError):
    """More than one device claims this identity: it is served to none of them."""

    def __init__(self, key: IdentityKey, value: str, claimants: tuple[ObjectRef, ...]) -> None:
        super().__init__(f"{key} {value} is claimed by {len(claimants)} devices")
        self.key = key
        self.value = value
        self.claimants = claimants


class Directory(Protocol):
    """The proxy's view of provisioned devices; implementations keep it current.

    Both lookups return None for an unknown identity and raise :class:`AmbiguousIdentity` for one
    that more than one device claims.
    """

    def by_ip(self, ip: str) -> Route | None: ...

    def by_iccid(self, iccid: str) -> Route | None: ...


def route_of(inventory: Inventory, device: Mapping[str, Any]) -> Route | None:
    """The route for a device body, joined with its Group and Endpoint from ``inventory``."""
    placed = place(inventory, device)
    return build_route(device, placed.group, placed.endpoint)


def build_route(
    device: Mapping[str, Any], group: Mapping[str, Any] | None, endpoint: Mapping[str, Any] | None
) -> Route | None:
    """The route for a device, or None while it is not usable (not Ready, moved, endpoint down)."""
    dstatus = device.get("status") or {}
    if dstatus.get("phase") != DevicePhase.READY or group is None or endpoint is None:
        return None
    try:
        dev = parse_device(device)
        grp = parse_group(group)
        ep = parse_endpoint(endpoint)
    except InvalidSpec:
        return None
    if dev.group != grp.ref.name or grp.endpoint != ep.ref.name or dstatus.get("endpoint") != ep.ref.name:
        return None  # mid-migration: the stored identity belongs to another endpoint
    estatus = endpoint.get("status") or {}
    host = estatus.get("host") or ep.host
    if not host:
        return None
    prefix, topic_error = _topic_prefix(dev, grp, ep, dstatus.get("cloudId") or dev.cloud_id)
    return Route(
        device=dev.ref,
        iccid=dev.iccid,
        imsi=dev.imsi,
        ip=dev.ip,
        endpoint_type=ep.type,
        host=host,
        port=int(estatus.get("port") or ep.port),
        ca_pem=ep.ca_certificate,
        client_id=dstatus.get("cloudId") or dev.cloud_id,
        certificate_id=str(dstatus.get("certificateId") or ""),
        topic_mapping=ep.azure.topic_mapping if ep.azure else TopicMapping.FLATTEN,
        key_location=str(dstatus["keyLocation"]) if dstatus.get("keyLocation") else None,
        max_packet_size=ep.mqtt.max_packet_size if ep.mqtt else None,
        topic_prefix=prefix,
        topic_error=topic_error,
    )


def _topic_prefix(dev: Device, grp: Group, ep: Endpoint, cloud_id: str) -> tuple[str, str]:
    """The device's topic prefix (the Group's template, else the Endpoint's), or why there is none."""
    template = grp.topic_template if grp.topic_template is not None else ep.topic_template
    values = {
        "cloudId": cloud_id,
        "iccid": dev.iccid,
        "imsi": dev.imsi,
        "device": dev.ref.name,
        "namespace": dev.ref.namespace,
        "group": grp.ref.name,
    }
    try:
        return topic_template.expand(template, values), ""
    except topic_template.TemplateError as e:
        return "", f"topic template {template!r} {e}"
