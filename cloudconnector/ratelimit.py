"""Per-Endpoint pacing of cloud API work, and retry with backoff for throttled calls."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class RateLimiter:
    """A token bucket: at most ``rate`` acquisitions per second, with a burst of ``burst``.

    Waiters are served in arrival order (one lock), so a large Group cannot starve a small one
    sharing the same Endpoint.
    """

    def __init__(self, rate: float, burst: float = 1.0) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = max(1.0, burst)
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
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
