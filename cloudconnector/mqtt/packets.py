"""MQTT control packets as immutable values, shared by MQTT 3.1.1 and 5.0.

One frozen dataclass per packet type. Fields that only exist in MQTT 5 (reason codes on acks,
properties) have defaults, so a 3.1.1 packet is the same value with those left empty. MQTT 5
properties stay as their raw encoded bytes (``properties``): the proxy relays them unchanged, and
:mod:`cloudconnector.mqtt.properties` parses them where a rule needs one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

MQTT_311 = 4
MQTT_5 = 5
MQTT_31 = 3  # the pre-standard "MQIsdp" level; framed like 3.1.1
# The largest Maximum Packet Size MQTT 5 peers take (clients check 1 to 268,435,455): in effect no
# limit, as the largest remaining length MQTT can frame is the same number.
MQTT_MAX_PACKET_SIZE = 268_435_455


class PacketType(enum.IntEnum):
    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14
    AUTH = 15


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: bytes = b""


@dataclass(frozen=True)
class Connect:
    client_id: str
    protocol_level: int = MQTT_311
    clean_start: bool = True
    keep_alive: int = 60
    username: str | None = None
    password: bytes | None = field(default=None, repr=False)
    will: Will | None = None
    properties: bytes = b""

    @property
    def protocol_name(self) -> str:
        return "MQIsdp" if self.protocol_level == MQTT_31 else "MQTT"


@dataclass(frozen=True)
class Connack:
    reason_code: int = 0  # the 3.1.1 "return code" or the 5.0 "reason code"
    session_present: bool = False
    properties: bytes = b""


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None  # present exactly when qos > 0
    properties: bytes = b""


@dataclass(frozen=True)
class Puback:
    packet_id: int
    reason_code: int = 0
    properties: bytes = b""


@dataclass(frozen=True)
class Pubrec:
    packet_id: int
    reason_code: int = 0
    properties: bytes = b""


@dataclass(frozen=True)
class Pubrel:
    packet_id: int
    reason_code: int = 0
    properties: bytes = b""


@dataclass(frozen=True)
class Pubcomp:
    packet_id: int
    reason_code: int = 0
    properties: bytes = b""


@dataclass(frozen=True)
class Subscription:
    topic_filter: str
    options: int = 0  # 5.0 subscription options byte; in 3.1.1 only the QoS bits

    @property
    def qos(self) -> int:
        return self.options & 0x03


@dataclass(frozen=True)
class Subscribe:
    packet_id: int
    subscriptions: tuple[Subscription, ...]
    properties: bytes = b""


@dataclass(frozen=True)
class Suback:
    packet_id: int
    reason_codes: tuple[int, ...]  # granted QoS or failure (0x80) per filter
    properties: bytes = b""


@dataclass(frozen=True)
class Unsubscribe:
    packet_id: int
    topic_filters: tuple[str, ...]
    properties: bytes = b""


@dataclass(frozen=True)
class Unsuback:
    packet_id: int
    reason_codes: tuple[int, ...] = ()  # 5.0 only
    properties: bytes = b""


@dataclass(frozen=True)
class Pingreq:
    pass


@dataclass(frozen=True)
class Pingresp:
    pass


@dataclass(frozen=True)
class Disconnect:
    reason_code: int = 0
    properties: bytes = b""


@dataclass(frozen=True)
class Auth:
    reason_code: int = 0
    properties: bytes = b""


Ack = Puback | Pubrec | Pubrel | Pubcomp
Packet = (
    Connect
    | Connack
    | Publish
    | Puback
    | Pubrec
    | Pubrel
    | Pubcomp
    | Subscribe
    | Suback
    | Unsubscribe
    | Unsuback
    | Pingreq
    | Pingresp
    | Disconnect
    | Auth
)

# CONNACK refusals the proxy sends, by protocol generation.
NOT_AUTHORIZED = {MQTT_311: 5, MQTT_5: 0x87}
SERVER_UNAVAILABLE = {MQTT_311: 3, MQTT_5: 0x88}
UNSUPPORTED_VERSION = {MQTT_311: 1, MQTT_5: 0x84}
IDENTIFIER_REJECTED = {MQTT_311: 2, MQTT_5: 0x85}
MALFORMED = 0x81  # 5.0 DISCONNECT reason
PACKET_TOO_LARGE = 0x95  # 5.0 DISCONNECT reason


def refusal(codes: dict[int, int], level: int) -> Connack:
    """A CONNACK refusing the connection, with the code for the device's protocol level."""
    return Connack(reason_code=codes[MQTT_5 if level == MQTT_5 else MQTT_311])
