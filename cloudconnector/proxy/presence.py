"""Live connection status: which devices are connected through this proxy, since when, and how
much they sent, published where platform engineers look (the Device's ``status.connection``).

The relay never waits for this. Sessions record their start, end and counters in memory; one
writer task publishes them through a :class:`PresenceSink` within a write budget, so 10,000
devices on several proxy replicas do not flood the API server:

- a device is written when it connects or disconnects, and otherwise at most once per
  ``interval`` seconds while its counters change (``CC_PROXY_STATUS_INTERVAL``, default 60);
- all writes of one proxy share a token bucket of ``rate`` writes per second
  (``CC_PROXY_STATUS_WRITES_PER_SECOND``, default 20). Connects and disconnects go first; when
  the budget is short, counter refreshes wait their turn (``lastSeen`` gets coarser, nothing is
  lost); a device that connects and disconnects many times before its turn is written once, with
  its latest state.

Counters are per session: they start at zero when the device connects. ``tlsBytesSaved`` is what
a device on plain MQTT did not spend on TLS over its metered bearer: the bytes the proxy exchanged
with the cloud on the device's behalf (TLS records and handshake) less the MQTT bytes relayed. A
device that itself speaks TLS to the proxy saves nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cloudconnector.errors import short
from cloudconnector.model import ObjectRef
from cloudconnector.vocabulary import ConnectionRecord as ConnectionStatus

log = logging.getLogger("cloudconnector.proxy.presence")

PLAIN, TLS = "Plain", "TLS"


class PresenceSink(Protocol):
    """Where connection status goes: the API server, or the standalone store."""

    async def write(self, device: ObjectRef, status: ConnectionStatus) -> None:
        """Publish a connected device's status (or a refresh of it)."""

    async def write_ended(self, device: ObjectRef, status: ConnectionStatus, proxy: str) -> bool:
        """Publish that a session ended, unless another proxy has since taken the device over;
        returns whether it was written."""


def _rfc3339(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(slots=True, eq=False)
class Session:
    """One live session's record. The relay adds to the counters (in batches, off the per-chunk
    path); the writer reads them."""

    device: ObjectRef
    since: float
    mqtt_version: str
    transport: str
    messages_up: int = 0
    messages_down: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    wire_bytes: int = 0  # bytes on the cloud-side TLS connection, records and handshake included
    last_seen: float = 0.0
    ended: bool = False
    wire: Any = None  # the cloud-side TLS transport, whose ``wire_bytes`` it reads when set
    pulls: list[Callable[[], None]] = field(default_factory=list)  # hand over unflushed counters

    def pull(self) -> None:
        for pull in self.pulls:
            pull()

    def wire_total(self) -> int:
        if self.wire is not None:
            self.wire_bytes = int(getattr(self.wire, "wire_bytes", self.wire_bytes))
        return self.wire_bytes

    def add(self, up: bool, messages: int, nbytes: int, seen: float) -> None:
        if up:
            self.messages_up += messages
            self.bytes_up += nbytes
        else:
            self.messages_down += messages
            self.bytes_down += nbytes
        self.last_seen = max(self.last_seen, seen)

    def snapshot(self, proxy: str) -> ConnectionStatus:
        saved = 0
        if self.transport == PLAIN:
            saved = max(0, self.wire_total() - self.bytes_up - self.bytes_down)
        return ConnectionStatus(
            connected=not self.ended,
            since=_rfc3339(self.since),
            lastSeen=_rfc3339(self.last_seen or self.since),
            proxy=proxy,
            mqttVersion=self.mqtt_version,
            transport=self.transport,
            messagesUp=self.messages_up,
            messagesDown=self.messages_down,
            bytesUp=self.bytes_up,
            bytesDown=self.bytes_down,
            tlsBytesSaved=saved,
        )

    def usage(self) -> tuple[int, int, int, int, int]:
        return (self.messages_up, self.messages_down, self.bytes_up, self.bytes_down, self.wire_total())


@dataclass(slots=True)
class _Entry:
    session: Session
    written_usage: tuple[int, int, int, int, int] | None = None
    written_at: float = float("-inf")


@dataclass
class Presence:
    """Sessions in, budgeted writes out. Without a sink it only keeps the table (tests, metrics)."""

    sink: PresenceSink | None
    proxy: str
    interval: float = 60.0
    rate: float = 20.0
    clock: Callable[[], float] = time.time
    _live: OrderedDict[ObjectRef, _Entry] = field(default_factory=OrderedDict)  # by last write
    _transitions: OrderedDict[ObjectRef, Session] = field(default_factory=OrderedDict)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    writes: int = 0
    skipped: int = 0

    def opened(self, device: ObjectRef, mqtt_version: int, device_tls: bool) -> Session:
        now = self.clock()
        session = Session(device, now, "5" if mqtt_version == 5 else "3.1.1", TLS if device_tls else PLAIN)
        session.last_seen = now
        self._live[device] = _Entry(session)
        self._transitions[device] = session
        self._transitions.move_to_end(device)
        self._wake.set()
        return session

    def closed(self, session: Session) -> None:
        session.pull()
        session.wire_total()  # the transport is about to go: keep its last count
        session.wire = None
        session.pulls.clear()
        session.ended = True
        session.last_seen = self.clock()
        entry = self._live.get(session.device)
        if entry is not None and entry.session is session:
            del self._live[session.device]
        # A newer session of the same device already queued its own state: that one wins.
        queued = self._transitions.get(session.device)
        if queued is None or queued is session or queued.ended:
            self._transitions[session.device] = session
            self._transitions.move_to_end(session.device)
        self._wake.set()

    def connected(self) -> list[ObjectRef]:
        return list(self._live)

    def _due_refreshes(self, now: float, budget: int) -> list[Session]:
        """Sessions whose counters changed and whose last write is ``interval`` old, oldest
        first. ``_live`` is kept in order of last write, so this looks only at the due front."""
        due: list[Session] = []
        while self._live and len(due) < budget:
            device, entry = next(iter(self._live.items()))
            if now - entry.written_at < self.interval:
                break
            self._live.move_to_end(device)
            entry.session.pull()
            changed = entry.session.usage() != entry.written_usage
            entry.written_at = now  # looked at: the next look is an interval away
            if changed and device not in self._transitions:
                due.append(entry.session)
        return due

    async def run(self, tick: float = 1.0) -> None:
        """Write until cancelled; each tick spends at most ``rate * tick`` writes."""
        if self.sink is None:
            return
        tokens = 0.0
        last = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await self._wake.wait()
            self._wake.clear()
            now_mono = time.monotonic()
            tokens = min(self.rate * max(tick, 1.0), tokens + (now_mono - last) * self.rate)
            last = now_mono
            while tokens >= 1 and self._transitions:
                _, session = self._transitions.popitem(last=False)
                tokens -= 1
                await self._publish(session)
            if tokens >= 1 and not self._transitions:
                for session in self._due_refreshes(self.clock(), int(tokens)):
                    tokens -= 1
                    await self._publish(session)
            if self._transitions:
                self._wake.set()  # more waiting: come back on the next tick
                await asyncio.sleep(max(0.0, (1 - tokens) / self.rate))

    async def _publish(self, session: Session) -> None:
        assert self.sink is not None
        status = session.snapshot(self.proxy)
        try:
            if session.ended:
                if not await self.sink.write_ended(session.device, status, self.proxy):
                    self.skipped += 1
                    return
            else:
                await self.sink.write(session.device, status)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # never the relay's problem: the next change writes again
            log.warning(
                "connection status not written: %s",
                short(e, 200),
                extra={"device": str(session.device), "result": "status_write_failed"},
            )
            return
        self.writes += 1
        entry = self._live.get(session.device)
        if entry is not None and entry.session is session:
            entry.written_usage = session.usage()
            entry.written_at = self.clock()
            self._live.move_to_end(session.device)

    async def drain(self) -> None:
        """At shutdown: write every live device as disconnected, within a few seconds."""
        if self.sink is None:
            return
        for entry in list(self._live.values()):
            self.closed(entry.session)
        pending = list(self._transitions.values())
        self._transitions.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                for session in pending:
                    await self._publish(session)
