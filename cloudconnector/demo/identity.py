"""Proof that a device listener opens only for its own device's certificate.

For a sample of devices, connect to *another* device's listener with this device's credentials
(built exactly as the proxy builds them, in memory) and expect the broker to refuse; connect to its
own listener and expect a CONNACK. Together with the mount points, this shows that a message seen
under ``via/<thing>/`` was carried by ``<thing>``'s certificate and no other.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping

from cloudconnector.demo.devices import connect_packet, read_packet
from cloudconnector.keystore.base import KeyMaterial
from cloudconnector.proxy.upstream_tls import ContextCache, device_connection, open_tls
from cloudconnector.routes import Route

SAMPLE = 5


async def _accepted(route: Route, material: KeyMaterial, port: int) -> bool:
    """Whether the broker answers CONNACK 0 on ``port`` to ``route``'s device credentials."""
    connection = device_connection(ContextCache(None), route, material)
    try:
        async with asyncio.timeout(10):
            reader, writer = await open_tls(route.host, port, connection)
            try:
                writer.write(connect_packet(route.client_id))
                kind, body = await read_packet(reader)
                return kind == 2 and len(body) >= 2 and body[1] == 0
            finally:
                writer.close()
                with contextlib.suppress(OSError, ssl.SSLError):
                    await writer.wait_closed()
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError):
        return False


async def cross_check(
    routes: Mapping[str, Route], materials: Mapping[str, KeyMaterial], ports: Mapping[str, int]
) -> tuple[int, int]:
    """(refused, tried) over foreign attempts; own attempts that fail count against ``refused``."""
    ids = sorted(set(routes) & set(materials) & set(ports))[:SAMPLE]
    if len(ids) < 2:
        return 0, 0
    refused = tried = 0
    for i, cid in enumerate(ids):
        other = ids[(i + 1) % len(ids)]
        own_ok = await _accepted(routes[cid], materials[cid], ports[cid])
        foreign_ok = await _accepted(routes[cid], materials[cid], ports[other])
        tried += 1
        if own_ok and not foreign_ok:
            refused += 1
    return refused, tried
