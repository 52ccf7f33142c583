"""MQTT 3.1.1 and 5.0 wire codec used by the proxy (packets, properties, framing)."""

from cloudconnector.mqtt.codec import (
    FrameScanner,
    MalformedPacket,
    PacketTooLarge,
    UnsupportedVersion,
    decode,
    encode,
    read_packet,
)

__all__ = [
    "FrameScanner",
    "MalformedPacket",
    "PacketTooLarge",
    "UnsupportedVersion",
    "decode",
    "encode",
    "read_packet",
]
