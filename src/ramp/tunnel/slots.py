"""Flows waiting for a tunnel stream slot: a first-come queue per tunnel, woken when a
connection's peer raises its MAX_STREAMS limit (or the set of connections changes).

A flow only waits here when every connection it may use is at the connector's stream limit.
Each waiter is one future: nothing polls, and a slot that frees wakes exactly as many waiters
as it can serve, in the order they came.
"""

from __future__ import annotations

import asyncio
from collections import deque


class QueueFull(Exception):
    """The queue already holds its limit of waiting flows."""


class SlotQueue:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._waiters: deque[asyncio.Future[None]] = deque()
        # woken but not yet running: a newcomer must not take the slot they were woken for
        self.woken = 0
        self.waits = 0  # times a flow went to sleep here (tests: no polling)

    def __len__(self) -> int:
        return len(self._waiters)

    @property
    def busy(self) -> bool:
        """Whether flows are ahead of a newcomer (waiting, or woken and about to open)."""
        return bool(self._waiters) or self.woken > 0

    async def wait(self, deadline: float, *, front: bool = False) -> None:
        """Sleep until woken; TimeoutError at `deadline` (loop time). `front` puts back a
        waiter that was woken but found no slot after all, keeping its place."""
        if not front and len(self._waiters) >= self.limit:
            raise QueueFull()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if front:
            self._waiters.appendleft(fut)
        else:
            self._waiters.append(fut)
        self.waits += 1
        try:
            async with asyncio.timeout_at(deadline):
                await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                # woken and then cancelled or timed out before running: pass the slot on
                self.woken -= 1
                self.wake(1)
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            raise
        self.woken -= 1

    def wake(self, n: int) -> int:
        """Wake up to `n` waiters, oldest first; returns how many."""
        woken = 0
        waiters = self._waiters
        while waiters and woken < n:
            fut = waiters.popleft()
            if fut.done():
                continue  # cancelled: its task removes nothing (already popped)
            fut.set_result(None)
            self.woken += 1
            woken += 1
        return woken

    def wake_all(self) -> None:
        self.wake(len(self._waiters))
