"""Time slices for long passes that share the event loop with the proxy's relays.

A reconcile pass over thousands of objects is many small synchronous steps. Run back to back they
hold the loop for seconds, and every relayed message waits. :meth:`Slicer.pause` between steps
gives the loop back once the current slice has used its budget, so a relay waits at most about
one budget plus one step. Every coroutine of a pass shares one :class:`Slicer`: the budget is per
turn of the loop, not per caller.
"""

from __future__ import annotations

import asyncio
import time

BUDGET = 0.0005  # seconds of work per turn of the event loop


class Slicer:
    def __init__(self, budget: float = BUDGET) -> None:
        self.budget = budget
        self._start = time.perf_counter()
        self._turn_pending = False

    async def pause(self) -> None:
        """Return at once while the slice has time left; else yield until a later turn has."""
        while time.perf_counter() - self._start > self.budget:
            if not self._turn_pending:
                # Runs at the head of the next turn, before the callers resume: a fresh slice.
                self._turn_pending = True
                asyncio.get_running_loop().call_soon(self._new_slice)
            await asyncio.sleep(0)

    def _new_slice(self) -> None:
        self._turn_pending = False
        self._start = time.perf_counter()
