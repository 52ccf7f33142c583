"""The proxy's Prometheus metrics, in a registry of its own (several proxies may share a process
in tests; the default global registry would refuse the second)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.attempts = Counter(
            "cloudconnector_proxy_connections",
            "Device connection attempts by outcome.",
            ["result"],
            registry=r,
        )
        self.active = Gauge("cloudconnector_proxy_active_sessions", "Relaying device sessions.", registry=r)
        self.open_connections = Gauge(
            "cloudconnector_proxy_open_connections", "Device connections, relaying or not yet.", registry=r
        )
        self.bytes = Counter(
            "cloudconnector_proxy_bytes", "Bytes relayed, by direction.", ["direction"], registry=r
        )
        self.messages = Counter(
            "cloudconnector_proxy_messages",
            "PUBLISH packets relayed.",
            ["direction"],
            registry=r,
        )
        self.handshake = Histogram(
            "cloudconnector_proxy_upstream_handshake_seconds",
            "TCP + TLS setup to the cloud.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.key_fetch = Histogram(
            "cloudconnector_proxy_key_fetch_seconds",
            "Reading and decrypting a device's credentials.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.oversized = Counter(
            "cloudconnector_proxy_oversized_packets",
            "Packets over the session's size limit: from the device they end the session, from the cloud"
            " they are dropped.",
            ["direction"],
            registry=r,
        )
        self.unidentified_bytes = Gauge(
            "cloudconnector_proxy_unidentified_bytes",
            "Bytes buffered by connections whose device is not identified yet.",
            registry=r,
        )
        self.revoked = Counter(
            "cloudconnector_proxy_sessions_revoked", "Sessions ended by a directory change.", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


UP = "device_to_cloud"
DOWN = "cloud_to_device"
