"""How large a packet may be on each side of a session, and how that is told to MQTT 5 peers.

The limit follows the Endpoint: AWS IoT Core and Azure IoT Hub refuse payloads over their
documented maximums (128 KB and 256 KB), so a larger packet can only fail upstream; a generic
broker's limit is the Endpoint's ``spec.mqtt.maxPacketSize``. ``CC_PROXY_MAX_PACKET_SIZE``, when
set, caps every Endpoint's limit.

With MQTT 5 both peers are told (Maximum Packet Size): the device in CONNACK, the cloud in CONNECT,
so that a broker itself skips a message this device cannot take. Each peer's own announcement
narrows the limit towards it further.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from cloudconnector.model import EndpointType
from cloudconnector.mqtt.packets import (
    MQTT_5,
    MQTT_MAX_PACKET_SIZE,
    PACKET_TOO_LARGE,
    Connack,
    Connect,
    Disconnect,
)
from cloudconnector.mqtt.properties import Prop, PropValue, build_properties, get_property, parse_properties
from cloudconnector.routes import Route

# Room for what surrounds a payload at its cloud's maximum: fixed header, topic (AWS: 256 bytes),
# packet id and MQTT 5 properties (AWS allows 8 KB of user properties).
HEADER_ALLOWANCE = 16 * 1024
CLOUD_PAYLOAD_MAX = {
    EndpointType.AWS: 128 * 1024,
    EndpointType.AZURE: 256 * 1024,  # device to cloud; cloud to device is at most 64 KB
}


def endpoint_limit(route: Route, ceiling: int | None) -> int:
    """The largest packet relayed either way for ``route``'s Endpoint."""
    if route.endpoint_type in CLOUD_PAYLOAD_MAX:
        limit = CLOUD_PAYLOAD_MAX[route.endpoint_type] + HEADER_ALLOWANCE
    else:
        limit = route.max_packet_size or MQTT_MAX_PACKET_SIZE
    return min(limit, ceiling) if ceiling else limit


def announced(properties: bytes) -> int | None:
    """The Maximum Packet Size in an MQTT 5 CONNECT or CONNACK property block, if any."""
    value = get_property(properties, Prop.MAXIMUM_PACKET_SIZE) if properties else None
    return value if isinstance(value, int) and value > 0 else None


def with_property(properties: bytes, pid: int, value: PropValue) -> bytes:
    """``properties`` with ``pid`` set to ``value`` (replacing any value it had)."""
    kept = [(k, v) for k, v in parse_properties(properties) if k != pid] if properties else []
    return build_properties([*kept, (pid, value)])


@dataclass(frozen=True)
class Limits:
    """The packet size limit in each direction of one session."""

    up: int  # device to cloud: a larger packet ends the session (MQTT 5: DISCONNECT 0x95)
    down: int  # cloud to device: a larger packet is dropped and counted


def upstream_connect(first: Connect, device: Connect, endpoint: int) -> tuple[Connect, int]:
    """The CONNECT for the cloud, telling an MQTT 5 cloud the largest packet to send this session,
    and that size: the Endpoint's limit, or less if the device announced less."""
    down = (
        min(endpoint, announced(device.properties) or endpoint)
        if device.protocol_level == MQTT_5
        else endpoint
    )
    if first.protocol_level == MQTT_5:
        first = replace(first, properties=with_property(first.properties, Prop.MAXIMUM_PACKET_SIZE, down))
    return first, down


def device_connack(
    connack: Connack, level: int, endpoint: int, assigned_id: str | None
) -> tuple[Connack, int]:
    """The cloud's CONNACK as the device gets it, and the largest packet the device may send.

    For MQTT 5, on success, the CONNACK carries that size (the Endpoint's limit, or the cloud's if it
    announced less) and, when the device sent an empty client id, the id the session was given.
    """
    up = min(endpoint, announced(connack.properties) or endpoint) if level == MQTT_5 else endpoint
    if level != MQTT_5 or connack.reason_code != 0:
        return connack, up
    props = with_property(connack.properties, Prop.MAXIMUM_PACKET_SIZE, up)
    if assigned_id is not None:
        props = with_property(props, Prop.ASSIGNED_CLIENT_ID, assigned_id)
    return replace(connack, properties=props), up


def too_large_disconnect(size: int, limit: int) -> Disconnect:
    """MQTT 5's DISCONNECT "packet too large" for a device, saying by how much."""
    reason = f"packet of {size} bytes exceeds the maximum packet size of {limit}"
    return Disconnect(PACKET_TOO_LARGE, build_properties([(Prop.REASON_STRING, reason)]))
