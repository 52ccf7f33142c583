"""The endpoint address cache: reused within its TTL, bypassed for literals, dropped on failure."""

from __future__ import annotations

import asyncio
import socket

import pytest

from cloudconnector.proxy.resolver import Resolver
from cloudconnector.proxy.upstream_tls import ContextCache, device_connection, open_tls
from tests.proxy.conftest import World
from tests.support.procs import free_port


def test_answers_are_reused_within_the_ttl_and_not_without_one() -> None:
    async def run() -> None:
        cached = Resolver(ttl=60)
        first = await cached.addresses("localhost", 1883)
        assert first and all(family in (socket.AF_INET, socket.AF_INET6) for family, _ in first)
        assert await cached.addresses("localhost", 1883) is first
        cached.forget("localhost", 1883)
        assert await cached.addresses("localhost", 1883) is not first

        uncached = Resolver(ttl=0)
        assert await uncached.addresses("localhost", 1883) is not await uncached.addresses("localhost", 1883)

        # Literals never reach the resolver: the address is the answer.
        assert await cached.addresses("127.0.0.1", 8883) == [(socket.AF_INET, ("127.0.0.1", 8883))]
        assert await cached.addresses("::1", 8883) == [(socket.AF_INET6, ("::1", 8883))]

    asyncio.run(run())


def test_unknown_name_is_an_os_error() -> None:
    with pytest.raises(OSError):
        asyncio.run(Resolver().addresses("no-such-endpoint.invalid", 8883))


def test_a_failed_connection_forgets_the_answer(world: World) -> None:
    route = world.add(port=free_port())  # nothing listens there

    async def run() -> None:
        resolver = Resolver(ttl=60)
        before = await resolver.addresses(route.host, route.port)
        conn = device_connection(ContextCache(None), route, world.keys.items[route.device])
        with pytest.raises(OSError):
            await open_tls(route.host, route.port, conn, resolver)
        assert await resolver.addresses(route.host, route.port) is not before

    asyncio.run(run())
