"""Time slices for long passes that share the event loop with the proxy's relays.

A reconcile pass over thousands of objects is many small synchronous steps. Run back to back they
hold the loop for seconds, and every relayed message waits. :meth:`Slicer.pause` between steps
gives the loop back once the current slice has used its budget, so a relay waits at most about
one budget plus one step. Every coroutine of a pass shares one :class:`Slicer`: the budget is per
turn of the loop, not per caller, and callers that must wait queue for the next slices in order
(one woken per turn, not all of them woken to find the slice taken).
"""

from __future__ import annotations

import asyncio
import collections
import time

BUDGET = 0.0005  # seconds of work per turn of the event loop


class Slicer:
    def __init__(self, budget: float = BUDGET) -> None:
        self.budget = budget
        self._start = time.perf_counter()
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._turn_pending = False

    async def pause(self) -> None:
        """Return at once while the current slice has time left; else queue for a fresh one."""
        if time.perf_counter() - self._start <= self.budget:
            return
        loop = asyncio.get_running_loop()
        ticket: asyncio.Future[None] = loop.create_future()
        self._waiting.append(ticket)
        if not self._turn_pending:
            self._turn_pending = True
            loop.call_soon(self._next_turn)
        await ticket  # in a later turn of the loop, after the relays' callbacks
        self._start = time.perf_counter()

    def _next_turn(self) -> None:
        """Once per turn of the loop while callers queue: wake the first (it runs next turn)."""
        self._turn_pending = False
        while self._waiting:
            ticket = self._waiting.popleft()
            if not ticket.done():  # a cancelled caller gave its place up
                ticket.set_result(None)
                break
        if self._waiting:
            self._turn_pending = True
            asyncio.get_running_loop().call_soon(self._next_turn)
