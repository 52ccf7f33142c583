"""The proxy's listeners and the life of the process: accept, limit, revoke, reload, drain.

Connections are accepted on raw sockets rather than through ``asyncio.start_server`` because a
trusted load balancer's PROXY header must be read byte-exactly *before* the TLS handshake (the
stream machinery would swallow the ClientHello with it); only then is the socket handed to the
event loop, with TLS for the 8883 listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import ssl
import time
from collections.abc import Iterator

from cloudconnector.errors import PermanentError
from cloudconnector.keystore.base import KeyReader
from cloudconnector.model import ObjectRef
from cloudconnector.mqtt.codec import encode
from cloudconnector.mqtt.packets import Connack, refusal
from cloudconnector.proxy.config import ProxyConfig
from cloudconnector.proxy.credentials import file_stamp, server_context
from cloudconnector.proxy.directory import Revocations, normalize_ip
from cloudconnector.proxy.logs import describe
from cloudconnector.proxy.memory import settle_startup_objects, tune_allocator
from cloudconnector.proxy.metrics import Metrics
from cloudconnector.proxy.outcome import SessionEnd
from cloudconnector.proxy.preauth import (
    Gate,
    GatedReader,
    RawRefusal,
    discard,
    first_header,
    unknown_source_refusal,
)
from cloudconnector.proxy.presence import Presence
from cloudconnector.proxy.proxyproto import ProxyHeaderError, read_proxy_header
from cloudconnector.proxy.resolver import Resolver
from cloudconnector.proxy.session import Deps, serve
from cloudconnector.proxy.upstream_tls import ContextCache
from cloudconnector.routes import Directory, Route

log = logging.getLogger("cloudconnector.proxy")

LINGER_SECONDS = 1.0  # after refusing an unknown address: how long the rest of its CONNECT may take


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=4096, reuse_port=False)
    except OSError as e:  # one line for the operator, not a traceback (port taken, no permission)
        why = os.strerror(e.errno) if e.errno else str(e)
        raise PermanentError(f"cannot listen on {host}:{port}: {why}", reason="Listen") from None
    sock.setblocking(False)
    return sock


class Proxy:
    """Plain and TLS MQTT listeners relaying each device to its cloud with its own identity."""

    def __init__(
        self,
        config: ProxyConfig,
        directory: Directory,
        keys: KeyReader,
        metrics: Metrics | None = None,
        presence: Presence | None = None,
        sockets: dict[str, socket.socket] | None = None,
    ) -> None:
        self.config = config
        self.directory = directory
        self.metrics = metrics or Metrics()
        self.presence = presence  # live connection status, written by its own task (presence.py)
        contexts = ContextCache(config.default_ca_file)
        resolver = Resolver(config.dns_cache_seconds)
        self.deps = Deps(
            config,
            directory,
            keys,
            self.metrics,
            self._track,
            contexts,
            resolver,
            self.live_sessions,
            presence,
        )
        self.gate = Gate(config.max_unidentified_bytes)  # bytes of connections not yet identified
        self.metrics.unidentified_bytes.set_function(lambda: self.gate.held)
        self.ports: dict[str, int] = {}  # "mqtt"/"tls" -> bound port (useful with port 0)
        self.accepting = False
        self._sockets: list[socket.socket] = []
        self._given = dict(sockets or {})  # "mqtt"/"tls" -> listening socket bound by a parent (workers.py)
        self._tasks: list[asyncio.Task[None]] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._live: dict[ObjectRef, set[asyncio.Task[None]]] = {}
        self._tls: ssl.SSLContext | None = None
        self._limit_refusals = 0  # over max_connections since the last such log line
        self._limit_logged_at = float("-inf")
        self._tls_stamp: tuple[tuple[int, int, int], ...] = ()
        if isinstance(directory, Revocations):
            directory.subscribe(self.revoke)

    # ------------------------------------------------------------ life cycle

    async def start(self) -> None:
        cfg = self.config
        tune_allocator()  # idle TLS sessions' read buffers stay mostly unresident (memory.py)
        settle_startup_objects()
        if cfg.tls_port is not None:
            assert cfg.tls_cert_file and cfg.tls_key_file
            self._tls = server_context(cfg.tls_cert_file, cfg.tls_key_file)
            self._tls_stamp = file_stamp(cfg.tls_cert_file, cfg.tls_key_file)
            self._tasks.append(asyncio.create_task(self._reload_tls_loop()))
        for name, port, tls in (("mqtt", cfg.mqtt_port, False), ("tls", cfg.tls_port, True)):
            if port is None:
                continue
            sock = self._given.pop(name, None) or _listen(cfg.bind, port)
            sock.setblocking(False)
            self._sockets.append(sock)
            self.ports[name] = sock.getsockname()[1]
            self._tasks.append(asyncio.create_task(self._accept_loop(sock, tls)))
        self.accepting = True
        log.info("proxy listening", extra={"ports": dict(self.ports)})

    async def stop(self, drain_seconds: float | None = None) -> None:
        """Stop accepting, then end live sessions spread over ``drain_seconds`` (devices reconnect
        to another replica without all arriving in the same instant)."""
        self.accepting = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        pending = list(self._connections)
        drain = self.config.drain_seconds if drain_seconds is None else drain_seconds
        step = drain / len(pending) if pending else 0.0
        for task in pending:
            task.cancel()
            if step:
                await asyncio.sleep(step)
        await asyncio.gather(*pending, return_exceptions=True)

    async def __aenter__(self) -> Proxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(0)

    # ------------------------------------------------------------ sessions

    def revoke(self, device: ObjectRef) -> None:
        """End the live sessions of ``device`` (deleted, rotated, moved)."""
        tasks = self._live.get(device, set())
        for task in list(tasks):
            task.cancel()
        if tasks:
            self.metrics.revoked.inc(len(tasks))
            log.info("sessions revoked", extra={"device": str(device), "count": len(tasks)})

    @contextlib.contextmanager
    def _track(self, route: Route) -> Iterator[None]:
        task = asyncio.current_task()
        assert task is not None
        self._live.setdefault(route.device, set()).add(task)
        try:
            yield
        finally:
            tasks = self._live.get(route.device)
            if tasks is not None:
                tasks.discard(task)
                if not tasks:
                    del self._live[route.device]

    def live_sessions(self, device: ObjectRef) -> int:
        return len(self._live.get(device, ()))

    # ------------------------------------------------------------ accepting

    def _trusted(self, ip: str) -> bool:
        if not self.config.trusted_proxies:
            return False
        addr = ipaddress.ip_address(ip)
        return any(addr in net for net in self.config.trusted_proxies)

    async def _accept_loop(self, lsock: socket.socket, tls: bool) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(lsock)
            except OSError as e:  # e.g. EMFILE: back off instead of spinning
                log.warning("accept failed: %s", describe(e), extra={"reason": describe(e)})
                await asyncio.sleep(0.1)
                continue
            if len(self._connections) >= self.config.max_connections:
                self.metrics.attempts.labels("limit").inc()
                self._over_limit(normalize_ip(addr[0]))
                conn.close()
                continue
            if tls and not self._trusted(addr[0]) and self._unknown_source(normalize_ip(addr[0])):
                self._refuse_before_handshake(conn, normalize_ip(addr[0]))  # no task for it at all
                continue
            task = asyncio.create_task(self._handle(conn, addr[0], tls))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _handle(self, conn: socket.socket, addr: str, tls: bool) -> None:
        loop = asyncio.get_running_loop()
        self.metrics.open_connections.inc()
        try:
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = normalize_ip(addr)
            deadline = loop.time() + self.config.connect_timeout  # PROXY header and TLS handshake
            try:
                if self._trusted(peer):
                    async with asyncio.timeout_at(deadline):
                        header = await read_proxy_header(conn)
                    peer = normalize_ip(header.source) if header.source else peer
                if self._unknown_source(peer):
                    if tls:
                        self._refuse_before_handshake(conn, peer)
                    else:
                        await self._refuse_raw(
                            conn, peer, await unknown_source_refusal(conn, deadline), deadline
                        )
                    return
                head = b""
                if not tls:  # a CONNECT over the limit is refused before a byte of its body is read
                    first = await first_header(conn, self.config.max_connect_size, deadline)
                    if isinstance(first, RawRefusal):
                        await self._refuse_raw(conn, peer, first, deadline)
                        return
                    head = first
                async with asyncio.timeout_at(deadline):
                    reader = GatedReader(self.gate)
                    if head:
                        reader.feed_data(head)  # read off the socket already: the CONNECT's start
                    protocol = asyncio.StreamReaderProtocol(reader)
                    transport, _ = await loop.connect_accepted_socket(
                        lambda: protocol, conn, ssl=self._tls if tls else None
                    )
                    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            except (ProxyHeaderError, TimeoutError, OSError, ssl.SSLError, ValueError) as e:
                result = "bad_proxy_header" if isinstance(e, ProxyHeaderError | ValueError) else "handshake"
                self.metrics.attempts.labels(result).inc()
                reason = describe(e)
                log.info(
                    "connection dropped: %s", reason, extra={"peer": peer, "result": result, "reason": reason}
                )
                conn.close()
                return
            await serve(self.deps, reader, writer, peer)
        finally:
            self.metrics.open_connections.dec()

    def _unknown_source(self, peer: str) -> bool:
        """In IP mode only: no Ready device has this address, so nothing the peer could send would
        change the answer. (An address several devices claim is not unknown: it gets its own
        refusal once its CONNECT is read.)"""
        if self.config.identity != ("ip",):
            return False
        try:
            return self.directory.by_ip(peer) is None
        except LookupError:
            return False

    def _over_limit(self, peer: str) -> None:
        # Logged at most once a second, with the count: a flood must not become a flood of lines.
        self._limit_refusals += 1
        now = time.monotonic()
        if now >= self._limit_logged_at + 1.0:
            reason = f"{self.config.max_connections} connections open, the limit"
            log.info(
                "connections refused: %s",
                reason,
                extra={"peer": peer, "result": "limit", "reason": reason, "count": self._limit_refusals},
            )
            self._limit_refusals, self._limit_logged_at = 0, now

    def _refused(self, end: SessionEnd, peer: str, level: int | None) -> None:
        self.metrics.attempts.labels(end.result).inc()
        fields: dict[str, object] = {"peer": peer, "result": end.result, "reason": end.reason}
        if level is not None:
            fields["mqtt"] = level
        log.info("device refused: %s", end.reason, extra=fields)

    def _refuse_before_handshake(self, conn: socket.socket, peer: str) -> None:
        # Without the handshake nothing can be answered; refusing before it spends neither memory
        # nor a key exchange on an address that no device has.
        reason = "no ready device has this address (closed before the TLS handshake)"
        self._refused(SessionEnd("unknown_device", reason), peer, None)
        conn.close()

    async def _refuse_raw(self, conn: socket.socket, peer: str, refused: RawRefusal, deadline: float) -> None:
        """Answer (when the protocol level is known) and close, with no stream ever set up."""
        end, level = refused.end, refused.level
        if level is not None and end.answer is not None:
            answer = end.answer if isinstance(end.answer, Connack) else refusal(end.answer, level)
            with contextlib.suppress(OSError):
                conn.send(encode(answer, level))  # 4 or 5 bytes: never blocks
            # The rest of an ordinary CONNECT, so the close is not a reset; never more than a
            # CONNECT may be, nor for more than a second.
            loop = asyncio.get_running_loop()
            linger = min(deadline, loop.time() + LINGER_SECONDS)
            await discard(conn, min(refused.rest, self.config.max_connect_size), linger)
        self._refused(end, peer, level)
        conn.close()

    async def _reload_tls_loop(self) -> None:
        cfg = self.config
        assert cfg.tls_cert_file and cfg.tls_key_file
        while True:
            await asyncio.sleep(cfg.tls_reload_seconds)
            stamp = file_stamp(cfg.tls_cert_file, cfg.tls_key_file)
            if stamp == self._tls_stamp:
                continue
            try:
                self._tls = server_context(cfg.tls_cert_file, cfg.tls_key_file)
            except (OSError, ssl.SSLError) as e:
                # Mid-update (certificate and key not yet matching): keep the old one, retry.
                log.warning("TLS certificate reload failed", extra={"reason": str(e)})
                continue
            self._tls_stamp = stamp
            log.info("TLS certificate reloaded")
