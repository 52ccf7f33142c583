"""One device connection, from its CONNECT to the close of both sides.

The order matters for the guarantees: the device is identified *before* anything else happens,
so an unknown device costs no Vault read and no upstream connection; credentials are fetched,
loaded into a context of their own and the local reference dropped once the upstream handshake
is done; the cloud's CONNACK is relayed before any other byte so the device knows where it stands;
then both directions are pumped until either side ends, and the other side is closed at once.
Before the device is identified, reading is bounded (``preauth.py``); after, each direction's
packet size limit follows the Endpoint (``limits.py``).
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
from cloudconnector.model import ObjectRef
from cloudconnector.mqtt.codec import MalformedPacket, PacketTooLarge, decode, encode, read_packet, skip_bytes
from cloudconnector.mqtt.packets import (
    IDENTIFIER_REJECTED,
    MQTT_5,
    MQTT_311,
    NOT_AUTHORIZED,
    SERVER_UNAVAILABLE,
    Connack,
    Connect,
    Packet,
    Publish,
    refusal,
)
from cloudconnector.proxy.config import ProxyConfig
from cloudconnector.proxy.credentials import CredentialsUnusable, read_credentials
from cloudconnector.proxy.divert import relay_diverted
from cloudconnector.proxy.limits import (
    Limits,
    device_connack,
    endpoint_limit,
    too_large_disconnect,
    upstream_connect,
)
from cloudconnector.proxy.logs import describe
from cloudconnector.proxy.metrics import DOWN, UP, Metrics
from cloudconnector.proxy.outcome import SessionEnd
from cloudconnector.proxy.pipe import LINGER_SECONDS, ended_reason, relay_bytes
from cloudconnector.proxy.preauth import GatedReader, read_connect
from cloudconnector.proxy.presence import Presence
from cloudconnector.proxy.presence import Session as Usage
from cloudconnector.proxy.resolver import Resolver
from cloudconnector.proxy.transform import Relay, SessionTransform, TransformError, transform_for
from cloudconnector.proxy.upstream_tls import ContextCache, device_connection, open_tls
from cloudconnector.routes import AmbiguousIdentity, Directory, Route

log = logging.getLogger("cloudconnector.proxy")

CONNACK_MAX = 64 * 1024  # a CONNACK is a few bytes plus properties; anything larger is not one


__all__ = ["Deps", "SessionEnd", "close_writer", "identify", "serve"]


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
    live_sessions: Callable[[ObjectRef], int] = lambda device: 0
    presence: Presence | None = None  # live connection status (status.connection)


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
        connect = await read_connect(deps.config, reader)
        level = connect.protocol_level
        fields["mqtt"] = level
        if not connect.client_id and not connect.clean_start and level != MQTT_5:
            # MQTT 3.1.1 (3.1.2-8): a session the client cannot name again is refused, return code 2.
            reason = "empty client id with CleanSession 0"
            raise SessionEnd("identifier_rejected", reason, IDENTIFIER_REJECTED)
        route, mode = identify(deps, connect, peer)
        if route is None and mode:
            reason = f"identity ({mode}) claimed by several devices"
            raise SessionEnd("ambiguous_identity", reason, NOT_AUTHORIZED)
        if route is None:
            raise SessionEnd("unknown_device", "no ready device for this identity", NOT_AUTHORIZED)
        if isinstance(reader, GatedReader):
            reader.identified()
        fields.update(device=str(route.device), identity=mode, endpoint=f"{route.host}:{route.port}")
        if others := deps.live_sessions(route.device):
            # The cloud knows one client per identity: this session will end the older one there.
            log.warning(
                "second session for one device: it replaces the first at the cloud",
                extra={**fields, "result": "replaces_session", "sessions": others + 1},
            )
        transform = transform_for(route)
        endpoint = endpoint_limit(route, deps.config.max_packet_size)
        up_reader, upstream, up_level, down = await _open_upstream(deps, route, connect, transform, endpoint)
        connack = await _upstream_connack(deps, up_reader, up_level)
        up = endpoint
        assigned = route.client_id if not connect.client_id else None  # MQTT 5: the id it was given
        for p in transform.from_cloud(connack).to_device:
            if isinstance(p, Connack):
                p, up = device_connack(p, level, endpoint, assigned)
            writer.write(encode(p, level))
        await writer.drain()
        if connack.reason_code != 0:
            metrics.attempts.labels("upstream_refused").inc()
            log.info(
                "cloud refused device",
                extra={**fields, "result": "upstream_refused", "code": connack.reason_code},
            )
            return
        metrics.attempts.labels("ok").inc()
        log.info("session started", extra={**fields, "result": "ok"})
        with deps.track(route):
            if identify(deps, connect, peer)[0] != route:
                # Deleted, rotated or moved while this session was being set up.
                log.info("session ended: revoked during setup", extra={**fields, "result": "revoked"})
                return
            metrics.active.inc()
            usage = None
            if deps.presence is not None:
                usage = deps.presence.opened(
                    route.device, level, writer.get_extra_info("ssl_object") is not None
                )
                usage.wire = upstream.transport
            try:
                link = Link(reader, writer, level, up_reader, upstream, up_level)
                why = await _relay(deps, transform, link, Limits(up, down), fields, usage)
            finally:
                metrics.active.dec()
                if usage is not None and deps.presence is not None:
                    deps.presence.closed(usage)
        log.info("session ended: %s", why, extra={**fields, "result": "ended", "reason": why})
    except SessionEnd as end:
        metrics.attempts.labels(end.result).inc()
        if end.level is not None:
            level = end.level
            fields["mqtt"] = level
        if end.answer is not None:
            answer = end.answer if isinstance(end.answer, Connack) else refusal(end.answer, level)
            with contextlib.suppress(OSError, ssl.SSLError):
                writer.write(encode(answer, level))
                await writer.drain()
        log.info(
            "device refused: %s", end.reason, extra={**fields, "result": end.result, "reason": end.reason}
        )
    except asyncio.CancelledError:
        log.info("session ended: revoked or shutting down", extra={**fields, "result": "cancelled"})
        raise
    except Exception as e:  # a bug must cost one connection, never the listener
        metrics.attempts.labels("error").inc()
        log.error("session failed: %s", short(repr(e)), extra={**fields, "result": "error"})
    finally:
        if isinstance(reader, GatedReader):
            reader.identified()  # whatever it still held no longer counts
        if upstream is not None:
            await close_writer(upstream)
        await close_writer(writer)


async def _open_upstream(
    deps: Deps, route: Route, connect: Connect, transform: SessionTransform, endpoint_limit: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int, int]:
    """The cloud connection with CONNECT sent; its protocol level, and the largest packet it may send."""
    cfg, metrics = deps.config, deps.metrics
    unavailable = SERVER_UNAVAILABLE
    started = time.perf_counter()
    try:
        material = await read_credentials(deps.keys, route)  # at status.keyLocation
    except KeyError:
        raise SessionEnd("no_credentials", "no credentials stored", NOT_AUTHORIZED) from None
    except Exception as e:
        raise SessionEnd("key_store_error", f"key store: {short(describe(e), 200)}", unavailable) from None
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
        raise SessionEnd(
            "bad_endpoint_ca", f"endpoint trust: {short(describe(e), 200)}", unavailable
        ) from None
    finally:
        del material  # the key now lives only inside the connection object
    started = time.perf_counter()
    try:
        async with asyncio.timeout(cfg.upstream_timeout):
            up_reader, up_writer = await open_tls(route.host, route.port, conn, deps.resolver)
    except TimeoutError:
        reason = f"upstream: no connection within {cfg.upstream_timeout:g} s"
        raise SessionEnd("upstream_unavailable", reason, unavailable) from None
    except OSError as e:
        raise SessionEnd(
            "upstream_unavailable", f"upstream: {short(describe(e), 200)}", unavailable
        ) from None
    finally:
        del conn
    metrics.handshake.observe(time.perf_counter() - started)
    up_level = first.protocol_level
    first, down = upstream_connect(first, connect, endpoint_limit)
    up_writer.write(encode(first, up_level))
    del first  # may hold the broker password
    return up_reader, up_writer, up_level, down


async def _upstream_connack(deps: Deps, reader: asyncio.StreamReader, level: int) -> Connack:
    cfg = deps.config
    try:
        async with asyncio.timeout(cfg.upstream_timeout):
            header, body = await read_packet(reader, CONNACK_MAX)
        packet = decode(header, body, level)
    except TimeoutError:
        reason = f"upstream gave no CONNACK within {cfg.upstream_timeout:g} s"
        raise SessionEnd("upstream_unavailable", reason, SERVER_UNAVAILABLE) from None
    except (asyncio.IncompleteReadError, OSError, ssl.SSLError, MalformedPacket) as e:
        reason = f"upstream gave no CONNACK: {short(describe(e), 200)}"
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


async def _relay(
    deps: Deps,
    transform: SessionTransform,
    link: Link,
    limits: Limits,
    fields: dict[str, object],
    usage: Usage | None = None,
) -> str:
    """Relay both ways until one side ends; returns why.

    Bytes pass through ``pipe.relay_bytes`` (protocols only). Rewritten packets (Azure) are pumped
    by coroutines: device-to-cloud in the session's own task, cloud-to-device in a task of its own.
    When the cloud side ends first it cancels the session's task, which tells that cancellation
    from a revocation or shutdown by the task's cancel count.
    """

    def dropped(size: int, limit: int) -> None:  # never a reason to cut the device
        log.info(
            "dropped a packet from the cloud: %d bytes, over the limit of %d",
            size,
            limit,
            extra={**fields, "result": "dropped_oversized", "size": size, "limit": limit},
        )

    if not transform.packet_relay:
        device, cloud = (link.dev_reader, link.dev_writer), (link.up_reader, link.up_writer)
        if getattr(transform, "divert", None):  # e.g. AWS: SUBSCRIBEs to the transform, PUBLISH as bytes
            levels = (link.dev_level, link.up_level)
            m = deps.metrics
            return await relay_diverted(m, limits, device, cloud, levels, transform, dropped, usage)
        return await relay_bytes(deps.metrics, limits, device, cloud, link.dev_level, dropped, usage)
    up = _pump_packets(deps, link, UP, transform.from_device, limits.up, dropped, usage)
    down = _pump_packets(deps, link, DOWN, transform.from_cloud, limits.down, dropped, usage)
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


async def _pump_packets(
    deps: Deps,
    link: Link,
    direction: str,
    handle: Callable[[Packet], Relay],
    limit: int,
    dropped: Callable[[int, int], None],
    usage: Usage | None = None,
) -> str:
    src, src_level = (link.dev_reader, link.dev_level) if direction == UP else (link.up_reader, link.up_level)
    count_bytes = deps.metrics.bytes.labels(direction)
    count_msgs = deps.metrics.messages.labels(direction)
    count_oversized = deps.metrics.oversized.labels(direction)
    try:
        while True:
            try:
                header, body = await read_packet(src, limit)
            except PacketTooLarge as e:
                count_oversized.inc()
                if direction == UP:
                    if link.dev_level == MQTT_5:
                        link.dev_writer.write(encode(too_large_disconnect(e.size, e.limit), MQTT_5))
                        # The rest of the packet, dropped, so the close does not reset the answer.
                        with contextlib.suppress(TimeoutError, asyncio.IncompleteReadError, OSError):
                            async with asyncio.timeout(LINGER_SECONDS):
                                await skip_bytes(src, e.unread)
                    return ended_reason(
                        direction, f"sent a packet of {e.size} bytes, over the limit of {e.limit}"
                    )
                await skip_bytes(src, e.unread)  # from the cloud: dropped, the session goes on
                dropped(e.size, e.limit)
                continue
            count_bytes.inc(len(body) + 2)
            relay = handle(decode(header, body, src_level))
            for p in relay.to_cloud:
                link.up_writer.write(encode(p, link.up_level))
            for p in relay.to_device:
                link.dev_writer.write(encode(p, link.dev_level))
            forwarded = relay.to_cloud if direction == UP else relay.to_device
            published = sum(isinstance(p, Publish) for p in forwarded)
            count_msgs.inc(published)
            if usage is not None:
                usage.add(direction == UP, published, len(body) + 2, time.time())
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
