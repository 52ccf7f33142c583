"""Endpoint addresses, looked up once per few seconds rather than once per device connection.

After a restart or an outage thousands of devices reconnect within seconds; resolving the cloud's
host name for each of them would send that many identical queries to the cluster's DNS and cost
the proxy a resolver thread hop per connection. Answers are kept for ``ttl`` seconds (0 turns the
cache off) and dropped as soon as connecting to them fails, so a moved endpoint is followed at
the next attempt.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import time
from typing import Any

Address = tuple[int, Any]  # (address family, socket address)
MAX_NAMES = 256  # endpoints are few; this only bounds a misconfiguration


@functools.lru_cache(maxsize=MAX_NAMES)
def literal_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``host`` spells, or None for a name (remembered: asked on every connection)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class Resolver:
    def __init__(self, ttl: float = 10.0) -> None:
        self.ttl = ttl
        self._answers: dict[tuple[str, int], tuple[float, list[Address]]] = {}

    async def addresses(self, host: str, port: int) -> list[Address]:
        """Where ``host:port`` may be reached, in the resolver's order."""
        ip = literal_ip(host)
        if ip is not None:
            return [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, (host, port))]
        key = (host, port)
        now = time.monotonic()
        cached = self._answers.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        found = [(family, sockaddr) for family, _, _, _, sockaddr in infos]
        if self.ttl > 0 and found:
            if len(self._answers) >= MAX_NAMES:
                self._answers.clear()
            self._answers[key] = (now + self.ttl, found)
        return found

    def forget(self, host: str, port: int) -> None:
        """Drop the answer for ``host:port`` (connecting to it failed)."""
        self._answers.pop((host, port), None)
