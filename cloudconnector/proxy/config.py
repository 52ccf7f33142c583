"""The proxy's settings, read from the environment (``CC_PROXY_*``) and overridable by arguments.

One frozen value so that every part of the proxy sees the same settings and tests can build a
proxy without touching the environment. Each field ``name`` is read from ``CC_PROXY_{NAME}``:

- ``BIND``, ``MQTT_PORT`` (1883), ``TLS_PORT`` (8883); a port of ``off``/``0`` disables it.
- ``TLS_CERT_FILE``, ``TLS_KEY_FILE``: the 8883 certificate (e.g. a mounted Secret), re-read every
  ``TLS_RELOAD_SECONDS`` when the files change.
- ``TRUSTED_PROXIES``: comma-separated CIDRs of load balancers that must send a PROXY header.
- ``IDENTITY``: ``ip`` (default), ``client_id`` and/or ``username`` (equal to the ICCID), in order.
- ``CONNECT_TIMEOUT``, ``UPSTREAM_TIMEOUT`` (seconds), ``MAX_CONNECTIONS``.
- ``MAX_PACKET_SIZE``: a cap over every Endpoint's packet limit (``limits.py``); unset, none.
- ``MAX_CONNECT_SIZE``, ``MAX_UNIDENTIFIED_BYTES``: what a connection may send, and all connections
  together may have buffered, before the device is identified (``preauth.py``).
- ``DEFAULT_CA_FILE``: trust for endpoints without ``caCertificate`` (e.g. Amazon Root CA 1);
  the system trust store when unset.
- ``HTTP_BIND``, ``HTTP_PORT`` (9090): ``/healthz``, ``/readyz``, ``/metrics``.
- ``DRAIN_SECONDS``: on SIGTERM, live sessions are closed spread over this time.
- ``LOG_JSON``: one JSON object per log line (default true).
- ``CONNECTION_STATUS`` (default true), ``STATUS_INTERVAL`` (60 s), ``STATUS_WRITES_PER_SECOND``
  (20): each Device's live connection in its ``status.connection``, within that write budget
  (``presence.py``); ``POD_NAME`` names this proxy there (default: the host name).
- ``WORKERS``: processes serving the ports (``workers.py``); unset or ``auto``: the cores this
  process may use (cgroup quota, CPU affinity); 1: one process, no parent.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IDENTITY_MODES = ("ip", "client_id", "username")


@dataclass(frozen=True)
class ProxyConfig:
    bind: str = "0.0.0.0"
    mqtt_port: int | None = 1883  # None: no plain listener
    tls_port: int | None = 8883  # None: no TLS listener
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_reload_seconds: float = 10.0  # how often the 8883 certificate files are checked for changes
    trusted_proxies: tuple[Network, ...] = ()  # sources that must send a PROXY protocol header
    identity: tuple[str, ...] = ("ip",)  # tried in order: ip, client_id, username (= ICCID)
    connect_timeout: float = 10.0  # for the PROXY header + TLS handshake, then again for CONNECT
    upstream_timeout: float = 10.0  # TCP + TLS to the cloud, and its CONNACK
    dns_cache_seconds: float = 10.0  # how long an endpoint's addresses are reused; 0: every time
    max_connections: int = 10_000
    max_packet_size: int | None = None  # a cap over every Endpoint's own limit; None: no cap
    max_connect_size: int = 16 * 1024  # the first packet, read before the device is known
    max_unidentified_bytes: int = 32 * 1024 * 1024  # held by all not-yet-identified connections
    default_ca_file: str | None = None  # trust for endpoints without caCertificate; else system
    http_bind: str = "0.0.0.0"
    http_port: int | None = 9090  # /healthz /readyz /metrics; None: off
    drain_seconds: float = 10.0  # on SIGTERM: spread closing live sessions over this time
    log_json: bool = True
    connection_status: bool = True  # write status.connection (presence.py)
    status_interval: float = 60.0  # least seconds between two counter refreshes of one device
    status_writes_per_second: float = 20.0  # all status writes of this proxy together
    pod_name: str | None = None  # who wrote status.connection; None: the host name
    workers: int | None = None  # worker processes; None: the cores this process may use

    def __post_init__(self) -> None:
        for mode in self.identity:
            if mode not in IDENTITY_MODES:
                raise ValueError(f"identity mode {mode!r} is not one of {', '.join(IDENTITY_MODES)}")
        if self.max_connect_size < 128 or self.max_unidentified_bytes < self.max_connect_size:
            raise ValueError("max_connect_size must be at least 128, max_unidentified_bytes at least that")
        if self.workers is not None and self.workers < 1:
            raise ValueError("workers must be at least 1 (or auto)")
        if self.tls_port is not None and not (self.tls_cert_file and self.tls_key_file):
            raise ValueError("the TLS listener needs tls_cert_file and tls_key_file")


def parse_networks(text: str) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in text.split(",") if p.strip())


def _port(text: str) -> int | None:
    return None if text.strip().lower() in ("", "0", "off", "none") else int(text)


def _bool(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def _workers(text: str) -> int | None:
    if text.strip().lower() in ("", "auto"):
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"workers must be a number of processes or auto, not {text!r}") from None


_PARSERS: dict[str, Any] = {
    "mqtt_port": _port,
    "tls_port": _port,
    "http_port": _port,
    "trusted_proxies": parse_networks,
    "identity": lambda t: tuple(p.strip() for p in t.split(",") if p.strip()),
    "tls_reload_seconds": float,
    "connect_timeout": float,
    "upstream_timeout": float,
    "dns_cache_seconds": float,
    "drain_seconds": float,
    "max_connections": int,
    "max_packet_size": lambda t: int(t) if t.strip() else None,
    "max_connect_size": int,
    "max_unidentified_bytes": int,
    "log_json": _bool,
    "connection_status": _bool,
    "status_interval": float,
    "status_writes_per_second": float,
    "workers": _workers,
}


def from_mapping(values: Mapping[str, str], prefix: str = "CC_PROXY_") -> ProxyConfig:
    """Settings from ``{PREFIX}{FIELD}`` keys (e.g. ``CC_PROXY_TLS_PORT``); missing keys keep defaults."""
    kwargs: dict[str, Any] = {}
    for f in fields(ProxyConfig):
        key = prefix + f.name.upper()
        if key in values:
            parse = _PARSERS.get(f.name, lambda t: t or None)
            kwargs[f.name] = parse(values[key])
    return ProxyConfig(**kwargs)


def from_env() -> ProxyConfig:
    return from_mapping(os.environ)
