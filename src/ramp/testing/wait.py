"""Waiting on conditions instead of sleeping.

A test that sleeps and then asserts passes or fails by how loaded the machine is; one that
polls a condition under a generous deadline only fails when the condition never holds. The
deadlines here are upper bounds for a stuck test, not expectations of speed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEADLINE = 30.0  # seconds: long enough for two busy cores, short of pytest's own timeout


async def until(
    predicate: Callable[[], T],
    timeout: float = DEADLINE,
    *,
    interval: float = 0.01,
    what: str | Callable[[], str] = "condition",
) -> T:
    """Poll `predicate` on the running loop until it returns something truthy; return that.

    Raises TimeoutError naming `what` when the deadline passes first.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() >= deadline:
            text = what() if callable(what) else what
            raise TimeoutError(f"gave up after {timeout} s waiting for {text}")
        await asyncio.sleep(interval)


async def settled(
    value: Callable[[], object],
    quiet: float = 0.5,
    timeout: float = DEADLINE,
    *,
    interval: float = 0.02,
    what: str = "value",
) -> None:
    """Wait until `value()` has not changed for `quiet` seconds (a transfer held back by
    flow control, a counter that stopped moving). On a loaded machine this waits longer,
    never shorter: progress resets the quiet period."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = value()
    since = loop.time()
    while loop.time() - since < quiet:
        if loop.time() >= deadline:
            raise TimeoutError(f"gave up after {timeout} s waiting for {what} to settle")
        await asyncio.sleep(interval)
        now = value()
        if now != last:
            last, since = now, loop.time()
