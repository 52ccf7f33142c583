"""The connection-status writer's budget: transitions first, refreshes at most once per interval
per device, a global writes/s cap, a flapping device written once with its latest state, and a
failing sink never reaching the relay."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from cloudconnector.model import ObjectRef
from cloudconnector.proxy.presence import ConnectionStatus, Presence


@dataclass
class Recorder:
    """A sink that keeps what it was given; ``holder`` plays the API server's recorded proxy."""

    writes: list[tuple[ObjectRef, ConnectionStatus]] = field(default_factory=list)
    holder: dict[ObjectRef, str] = field(default_factory=dict)
    fail: bool = False

    async def write(self, device: ObjectRef, status: ConnectionStatus) -> None:
        if self.fail:
            raise ConnectionError("API server away")
        self.writes.append((device, status))
        self.holder[device] = status["proxy"]

    async def write_ended(self, device: ObjectRef, status: ConnectionStatus, proxy: str) -> bool:
        if self.holder.get(device) != proxy:
            return False
        self.writes.append((device, status))
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def settle(presence: Presence, seconds: float = 0.3) -> None:
    task = asyncio.create_task(presence.run(tick=0.05))
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_connect_refresh_and_disconnect() -> None:
    sink, clock = Recorder(), Clock()
    presence = Presence(sink, "proxy-a", interval=60, rate=100, clock=clock)
    dev = ObjectRef("fleet", "m1")
    session = presence.opened(dev, 4, device_tls=False)
    await settle(presence)
    assert [s["connected"] for _, s in sink.writes] == [True]
    first = sink.writes[0][1]
    assert (first["proxy"], first["mqttVersion"], first["transport"]) == ("proxy-a", "3.1.1", "Plain")
    assert first["since"] == "2027-01-15T08:00:00Z"

    # Traffic within the interval: no write; after it, one refresh with the counters.
    session.add(True, 3, 120, clock.now)
    session.wire_bytes = 4000
    await settle(presence)
    assert len(sink.writes) == 1
    clock.now += 61
    session.add(False, 1, 40, clock.now)
    await settle(presence)
    assert len(sink.writes) == 2
    refreshed = sink.writes[1][1]
    assert (refreshed["messagesUp"], refreshed["bytesUp"], refreshed["messagesDown"]) == (3, 120, 1)
    assert refreshed["tlsBytesSaved"] == 4000 - 160
    assert refreshed["lastSeen"] == "2027-01-15T08:01:01Z"
    # No change since: no refresh, however long it stays idle.
    clock.now += 600
    await settle(presence)
    assert len(sink.writes) == 2

    presence.closed(session)
    await settle(presence)
    assert [s["connected"] for _, s in sink.writes] == [True, True, False]


async def test_a_device_on_tls_saves_nothing_and_mqtt5_is_named() -> None:
    sink = Recorder()
    presence = Presence(sink, "p", rate=100, clock=Clock())
    session = presence.opened(ObjectRef("fleet", "t"), 5, device_tls=True)
    session.wire_bytes = 9000
    await settle(presence)
    status = sink.writes[0][1]
    assert (status["mqttVersion"], status["transport"], status["tlsBytesSaved"]) == ("5", "TLS", 0)


async def test_flapping_is_written_once_with_the_latest_state() -> None:
    sink = Recorder()
    presence = Presence(sink, "p", rate=100, clock=Clock())
    dev = ObjectRef("fleet", "flappy")
    for _ in range(50):
        presence.closed(presence.opened(dev, 4, device_tls=False))
    last = presence.opened(dev, 4, device_tls=False)
    await settle(presence)
    assert [s["connected"] for _, s in sink.writes] == [True]
    assert presence.connected() == [dev]
    presence.closed(last)
    await settle(presence)
    assert [s["connected"] for _, s in sink.writes] == [True, False]


async def test_the_global_cap_spreads_writes() -> None:
    sink = Recorder()
    presence = Presence(sink, "p", rate=20, clock=Clock())
    for i in range(100):
        presence.opened(ObjectRef("fleet", f"d{i}"), 4, device_tls=False)
    await settle(presence, 1.0)
    # One second at 20 writes/s (plus the first tick's bucket): far fewer than 100.
    assert 15 <= len(sink.writes) <= 45, len(sink.writes)
    await settle(presence, 5.0)
    assert len({d for d, _ in sink.writes}) == 100  # everyone gets written, in order
    assert [d.name for d, _ in sink.writes[:3]] == ["d0", "d1", "d2"]


async def test_an_older_proxy_does_not_overwrite_a_newer_session() -> None:
    sink = Recorder()
    dev = ObjectRef("fleet", "roamer")
    old, new = (
        Presence(sink, "proxy-a", rate=100, clock=Clock()),
        Presence(sink, "proxy-b", rate=100, clock=Clock()),
    )
    a = old.opened(dev, 4, device_tls=False)
    await settle(old)
    new.opened(dev, 4, device_tls=False)
    await settle(new)
    old.closed(a)
    await settle(old)
    assert [(s["proxy"], s["connected"]) for _, s in sink.writes] == [("proxy-a", True), ("proxy-b", True)]
    assert old.skipped == 1


async def test_a_failing_sink_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    sink = Recorder(fail=True)
    presence = Presence(sink, "p", rate=100, clock=Clock())
    presence.opened(ObjectRef("fleet", "x"), 4, device_tls=False)
    await settle(presence)
    assert presence.writes == 0
    assert "connection status not written" in caplog.text
