"""Per-Endpoint pacing of cloud API work, and retry with backoff for throttled calls."""

from __future__ import annotations

import asyncio
import contextvars
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

T = TypeVar("T")

MAX_IN_FLIGHT = 128
"""Most devices one Endpoint works on at once, whatever the rate and the cloud's latency (each
holds a cloud-call thread while it waits for an answer, see ``clouds.aws_api.CALL_THREADS``)."""
MIN_IN_FLIGHT = 4
FIRST_GUESS = 1.0
"""Seconds one device's work is assumed to take until the first ones have been measured."""
HEADROOM = 2.0
"""In-flight devices allowed per device the rate and the base time need (Little's law): room for
devices slower than the fastest (latency jitter, a throttled call's backoff)."""
DRIFT = 0.005
"""How far the base time moves toward the typical time with each finished device."""

# The limiters whose turn the current task holds: admission is not taken twice by one device
# whose caller already waited for it (a reconciler admitting before its first status write).
_HELD: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "cloudconnector_admitted", default=frozenset()
)


class RateLimiter:
    """A token bucket: at most ``rate`` acquisitions per second, with a burst of ``burst``.

    Waiters are served in arrival order (one lock), so a large Group cannot starve a small one
    sharing the same Endpoint. :meth:`admit` also bounds how many devices are in flight: a device
    that got its turn does all its steps while later ones wait, so devices finish in the order
    they arrived, the N-th after about N / rate plus one device's own time, instead of all of them
    advancing one step at a time together.
    """

    def __init__(
        self,
        rate: float,
        burst: float = 1.0,
        *,
        max_in_flight: int = MAX_IN_FLIGHT,
        first_guess: float = FIRST_GUESS,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = max(1.0, burst)
        self.max_in_flight = max(1, max_in_flight)
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()
        self._in_flight = 0
        self._released = asyncio.Event()
        # One device's work, in seconds: typical (moving average) and base (the fastest seen,
        # creeping slowly toward typical). Sizing from the base keeps a machine that cannot keep
        # up with the rate from filling up with devices that only wait for it, which would delay
        # every one of them; a lasting change of the cloud's latency is followed within a few
        # hundred devices.
        self._typical = first_guess
        self._base = first_guess

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def in_flight_limit(self) -> int:
        """Devices allowed at once: rate x base time per device x headroom, within bounds."""
        wanted = math.ceil(self.rate * self._base * HEADROOM) + 1
        return min(self.max_in_flight, max(MIN_IN_FLIGHT, wanted))

    def _measured(self, seconds: float) -> None:
        self._typical = 0.8 * self._typical + 0.2 * seconds
        self._base = min(seconds, self._base + DRIFT * (self._typical - self._base))

    async def acquire(self) -> None:
        """One token (one call, or one device that needs no slot)."""
        async with self._lock:
            await self._take_token()

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """One device's turn: a token and an in-flight slot, in arrival order; the slot is held
        until the block ends, whatever way it ends. Inside a block the same task already holds,
        it takes nothing more."""
        held = _HELD.get()
        if id(self) in held:
            yield
            return
        async with self._lock:
            while self._in_flight >= self.in_flight_limit:
                self._released.clear()
                await self._released.wait()
            await self._take_token()
            self._in_flight += 1
        started = time.monotonic()
        mark = _HELD.set(held | {id(self)})
        try:
            yield
            # Only finished work is timed: a device failing at once (keys revoked) says nothing
            # about how long one takes.
            self._measured(time.monotonic() - started)
        finally:
            _HELD.reset(mark)
            self._in_flight -= 1
            self._released.set()

    async def _take_token(self) -> None:
        while True:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return
            await asyncio.sleep((1.0 - self._tokens) / self.rate)

    def set_rate(self, rate: float) -> None:
        if rate > 0:
            self.rate = rate


async def with_backoff(
    call: Callable[[], Awaitable[T]],
    *,
    retry_on: Callable[[BaseException], bool],
    attempts: int = 8,
    base: float = 0.2,
    cap: float = 10.0,
) -> T:
    """Run ``call``; on an error ``retry_on`` accepts, sleep with full jitter and try again."""
    for attempt in range(attempts):
        try:
            return await call()
        except Exception as e:
            if not retry_on(e) or attempt == attempts - 1:
                raise
            await asyncio.sleep(random.uniform(0, min(cap, base * 2**attempt)))  # noqa: S311
    raise AssertionError("unreachable")
