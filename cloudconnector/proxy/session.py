"""One device connection, from its CONNECT to the close of both sides.

The order matters for the guarantees: the device is identified *before* anything else happens,
so an unknown device costs no Vault read and no upstream connection; credentials are fetched,
loaded into a context of their own and the local reference dropped once the upstream handshake
is done; the cloud's CONNACK is relayed before any other byte so the device knows where it stands;
then both directions are pumped until either side ends, and the other side is closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from OpenSSL import SSL

from cloudconnector.errors import short
from cloudconnector.keystore.base import KeyReader
from cloudconnector.mqtt.codec import (
    MalformedPacket,
    UnsupportedVersion,
    decode,
    encode,
    read_packet,
)
from cloudconnector.mqtt.packets import (
    MQTT_311,
    NOT_AUTHORIZED,
    SERVER_UNAVAILABLE,
    UNSUPPORTED_VERSION,
    Connack,
    Connect,
    Packet,
    PacketType,
    Publish,
    refusal,
)
from cloudconnector.proxy.config import ProxyConfig
from cloudconnector.proxy.credentials import CredentialsUnusable, read_credentials
from cloudconnector.proxy.metrics import DOWN, UP, Metrics
from cloudconnector.proxy.pipe import ended_reason, relay_bytes
from cloudconnector.proxy.resolver import Resolver
from cloudconnector.proxy.transform import Relay, SessionTransform, TransformError, transform_for
from cloudconnector.proxy.upstream_tls import ContextCache, device_connection, open_tls
from cloudconnector.routes import AmbiguousIdentity, Directory, Route

log = logging.getLogger("cloudconnector.proxy")


class SessionEnd(Exception):
    """Ends a session before relaying; ``result`` is the metrics label, ``reason`` the log text."""

    def __init__(self, result: str, reason: str, answer: Connack | dict[int, int] | None = None) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason
        self.answer = answer  # a CONNACK, or refusal codes by protocol level, for the device


@dataclass
class Deps:
    """What every session needs from the proxy."""

    config: ProxyConfig
    directory: Directory
    keys: KeyReader
    metrics: Metrics
    track: Callable[[Route], contextlib.AbstractContextManager[None]]
    contexts: ContextCache
    resolver: Resolver


async def close_writer(writer: asyncio.StreamWriter, grace: float = 2.0) -> None:
    """Close politely, but never let a peer that stopped reading hold the session open."""
    if writer.is_closing():
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), grace)
        return
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), grace)
    except (TimeoutError, OSError, ssl.SSLError):
        writer.transport.abort()


def identify(deps: Deps, connect: Connect, peer_ip: str | None) -> tuple[Route | None, str]:
    """The route and the mode that found it; ``(None, mode)`` when that mode's identity is claimed
    by several devices (refused outright: no other mode is tried), ``(None, "")`` when unknown."""
    for mode in deps.config.identity:
        route = None
        try:
            if mode == "ip" and peer_ip:
                route = deps.directory.by_ip(peer_ip)
            elif mode == "client_id" and connect.client_id:
                route = deps.directory.by_iccid(connect.client_id)
            elif mode == "username" and connect.username:
                route = deps.directory.by_iccid(connect.username)
        except AmbiguousIdentity:
            return None, mode
        if route is not None:
            return route, mode
    return None, ""


async def serve(
    deps: Deps, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str | None
) -> None:
    """Handle one device connection to the end; never raises except on cancellation."""
    metrics = deps.metrics
    upstream: asyncio.StreamWriter | None = None
    fields: dict[str, object] = {"peer": peer}
    level = MQTT_311  # the device's protocol level, once known
    try:
        connect = await _read_connect(deps, reader)
        level = connect.protocol_level
        fields["mqtt"] = level
        route, mode = identify(deps, connect, peer)
        if route is None and mode:
            reason = f"identity ({mode}) claimed by several devices"
            raise SessionEnd("ambiguous_identity", reason, NOT_AUTHORIZED)
        if route is None:
            raise SessionEnd("unknown_device", "no ready device for this identity", NOT_AUTHORIZED)
        fields.update(device=str(route.device), identity=mode, endpoint=f"{route.host}:{route.port}")
        transform = transform_for(route)
        up_reader, upstream, up_level = await _open_upstream(deps, route, connect, transform)
        connack = await _upstream_connack(deps, up_reader, up_level)
        for p in transform.from_cloud(connack).to_device:
            writer.write(encode(p, level))
        await writer.drain()
        if connack.reason_code != 0:
            metrics.attempts.labels("upstream_refused").inc()
            log.info("cloud refused device", extra={**fields, "code": connack.reason_code})
            return
        metrics.attempts.labels("ok").inc()
        log.info("session started", extra=fields)
        with deps.track(route):
            if identify(deps, connect, peer)[0] != route:
                # Deleted, rotated or moved while this session was being set up.
                log.info("session ended: revoked during setup", extra=fields)
                return
            metrics.active.inc()
            try:
                link = Link(reader, writer, level, up_reader, upstream, up_level)
                why = await _relay(deps, transform, link)
            finally:
                metrics.active.dec()
        log.info("session ended: %s", why, extra=fields)
    except SessionEnd as end:
        metrics.attempts.labels(end.result).inc()
        if end.answer is not None:
            answer = end.answer if isinstance(end.answer, Connack) else refusal(end.answer, level)
            with contextlib.suppress(OSError, ssl.SSLError):
                writer.write(encode(answer, level))
                await writer.drain()
        log.info("device refused: %s", end.reason, extra={**fields, "result": end.result})
    except asyncio.CancelledError:
        log.info("session ended: revoked or shutting down", extra=fields)
        raise
    except Exception as e:  # a bug must cost one connection, never the listener
        metrics.attempts.labels("error").inc()
        log.error("session failed: %s", short(repr(e)), extra=fields)
    finally:
        if upstream is not None:
            await close_writer(upstream)
        await close_writer(writer)


async def _read_connect(deps: Deps, reader: asyncio.StreamReader) -> Connect:
    cfg = deps.config
    try:
        async with asyncio.timeout(cfg.connect_timeout):  # unlike wait_for, no task per call
            header, body = await read_packet(reader, cfg.max_packet_size)
    except TimeoutError:
        raise SessionEnd("timeout", "no CONNECT in time") from None
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        raise SessionEnd("closed", "closed before CONNECT") from None
    except MalformedPacket as e:
        raise SessionEnd("malformed", str(e)) from None
    if header >> 4 != PacketType.CONNECT:
        raise SessionEnd("malformed", "first packet is not CONNECT")
    try:
        packet = decode(header, body)
    except UnsupportedVersion as e:
        raise SessionEnd("malformed", str(e), UNSUPPORTED_VERSION) from None
    except MalformedPacket as e:
        raise SessionEnd("malformed", str(e)) from None
    assert isinstance(packet, Connect)
    return packet


async def _open_upstream(
    deps: Deps, route: Route, connect: Connect, transform: SessionTransform
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    cfg, metrics = deps.config, deps.metrics
    unavailable = SERVER_UNAVAILABLE
    started = time.perf_counter()
    try:
        material = await read_credentials(deps.keys, route)  # at status.keyLocation
    except KeyError:
        raise SessionEnd("no_credentials", "no credentials stored", NOT_AUTHORIZED) from None
    except Exception as e:
        raise SessionEnd("key_store_error", f"key store: {short(e, 200)}", unavailable) from None
    finally:
        metrics.key_fetch.observe(time.perf_counter() - started)
    try:
        first = transform.connect(connect, material)
        if isinstance(first, Connack):
            raise SessionEnd("refused_by_transform", "the endpoint cannot serve this CONNECT", first)
        conn = device_connection(deps.contexts, route, material)
    except CredentialsUnusable as e:
        raise SessionEnd("bad_credentials", str(e), unavailable) from None
    except (SSL.Error, ValueError, OSError) as e:  # the endpoint's CA bundle or name cannot be used
        raise SessionEnd("bad_endpoint_ca", f"endpoint trust: {short(e, 200)}", unavailable) from None
    finally:
        del material  # the key now lives only inside the connection object
    started = time.perf_counter()
    try:
        async with asyncio.timeout(cfg.upstream_timeout):
            up_reader, up_writer = await open_tls(route.host, route.port, conn, deps.resolver)
    except (OSError, TimeoutError) as e:
        raise SessionEnd("upstream_unavailable", f"upstream: {short(e, 200)}", unavailable) from None
    finally:
        del conn
    metrics.handshake.observe(time.perf_counter() - started)
    up_level = first.protocol_level
    up_writer.write(encode(first, up_level))
    del first  # may hold the broker password
    return up_reader, up_writer, up_level


async def _upstream_connack(deps: Deps, reader: asyncio.StreamReader, level: int) -> Connack:
    cfg = deps.config
    try:
        async with asyncio.timeout(cfg.upstream_timeout):
            header, body = await read_packet(reader, cfg.max_packet_size)
        packet = decode(header, body, level)
    except (TimeoutError, asyncio.IncompleteReadError, OSError, ssl.SSLError, MalformedPacket) as e:
        reason = f"upstream gave no CONNACK: {short(e, 200) or type(e).__name__}"
        raise SessionEnd("upstream_unavailable", reason, SERVER_UNAVAILABLE) from None
    if not isinstance(packet, Connack):
        raise SessionEnd(
            "upstream_unavailable", "upstream answered CONNECT without CONNACK", SERVER_UNAVAILABLE
        )
    return packet


@dataclass(slots=True)
class Link:
    """Both connections of a relaying session, with the protocol level spoken on each."""

    dev_reader: asyncio.StreamReader
    dev_writer: asyncio.StreamWriter
    dev_level: int
    up_reader: asyncio.StreamReader
    up_writer: asyncio.StreamWriter
    up_level: int


async def _relay(deps: Deps, transform: SessionTransform, link: Link) -> str:
    """Relay both ways until one side ends; returns why.

    Bytes pass through ``pipe.relay_bytes`` (protocols only). Rewritten packets (Azure) are pumped
    by coroutines: device-to-cloud in the session's own task, cloud-to-device in a task of its own.
    When the cloud side ends first it cancels the session's task, which tells that cancellation
    from a revocation or shutdown by the task's cancel count.
    """
    if not transform.packet_relay:
        device, cloud = (link.dev_reader, link.dev_writer), (link.up_reader, link.up_writer)
        return await relay_bytes(deps.metrics, deps.config.max_packet_size, device, cloud)
    up = _pump_packets(deps, link, UP, transform.from_device)
    down = _pump_packets(deps, link, DOWN, transform.from_cloud)
    session = asyncio.current_task()
    assert session is not None
    down_task = asyncio.ensure_future(down)
    relaying = True
    stopped_by_down = False

    def down_ended(_: asyncio.Future[str]) -> None:
        nonlocal stopped_by_down
        if relaying:  # runs a loop turn after the end: the session may have moved on
            stopped_by_down = True
            session.cancel()

    down_task.add_done_callback(down_ended)
    try:
        return await up
    except asyncio.CancelledError:
        if stopped_by_down and session.uncancel() == 0:
            return down_task.result()
        raise
    finally:
        relaying = False
        down_task.cancel()
        await asyncio.gather(down_task, return_exceptions=True)


async def _pump_packets(deps: Deps, link: Link, direction: str, handle: Callable[[Packet], Relay]) -> str:
    src, src_level = (link.dev_reader, link.dev_level) if direction == UP else (link.up_reader, link.up_level)
    count_bytes = deps.metrics.bytes.labels(direction)
    count_msgs = deps.metrics.messages.labels(direction)
    try:
        while True:
            header, body = await read_packet(src, deps.config.max_packet_size)
            count_bytes.inc(len(body) + 2)
            relay = handle(decode(header, body, src_level))
            for p in relay.to_cloud:
                link.up_writer.write(encode(p, link.up_level))
            for p in relay.to_device:
                link.dev_writer.write(encode(p, link.dev_level))
            forwarded = relay.to_cloud if direction == UP else relay.to_device
            count_msgs.inc(sum(isinstance(p, Publish) for p in forwarded))
            await link.up_writer.drain()
            await link.dev_writer.drain()
    except asyncio.IncompleteReadError:
        return ended_reason(direction, "closed")
    except MalformedPacket as e:
        return ended_reason(direction, f"sent a bad packet: {e}")
    except TransformError as e:
        return ended_reason(direction, f"sent what the endpoint cannot take: {e}")
    except (OSError, ssl.SSLError) as e:
        return ended_reason(direction, f"connection failed: {short(e, 120)}")
