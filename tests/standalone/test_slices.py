"""Slices: a pass gives the loop back between steps once its budget is used, callers in turn."""

from __future__ import annotations

import asyncio
import itertools

from cloudconnector.standalone.slices import Slicer


async def run_pass(slicer: Slicer, budget_steps: int) -> tuple[list[tuple[str, int]], list[int]]:
    turns = 0
    seen: list[tuple[str, int]] = []
    relay_turns: list[int] = []
    stop = False

    async def relay() -> None:  # stands for the proxy: one callback per turn of the loop
        nonlocal turns
        while not stop:
            turns += 1
            await asyncio.sleep(0)

    async def worker(name: str) -> None:
        for step in range(budget_steps):
            await slicer.pause()
            seen.append((name, step))
            relay_turns.append(turns)

    ticker = asyncio.create_task(relay())
    await asyncio.sleep(0)
    await asyncio.gather(worker("a"), worker("b"))
    stop = True
    await ticker
    return seen, relay_turns


async def test_spent_budget_yields_between_steps_in_order() -> None:
    seen, relay_turns = await run_pass(Slicer(budget=0.0), 4)
    assert seen == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3), ("b", 3)]
    assert all(later > earlier for earlier, later in itertools.pairwise(relay_turns))


async def test_time_left_in_the_slice_runs_on() -> None:
    seen, relay_turns = await run_pass(Slicer(budget=3600.0), 4)
    assert sorted(seen) == [(n, s) for n in "ab" for s in range(4)]
    assert len(set(relay_turns[:4])) == 1  # worker a's four steps within one turn of the loop


async def test_a_cancelled_caller_gives_its_place_up() -> None:
    slicer = Slicer(budget=0.0)
    first = asyncio.create_task(slicer.pause())
    second = asyncio.create_task(slicer.pause())
    await asyncio.sleep(0)  # both queued
    first.cancel()
    await asyncio.wait_for(second, 5)
    assert second.done() and not second.cancelled()
