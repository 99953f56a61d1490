"""Fair shares: how much of a bounded resource one key (a source address, an identity) holds.

A table with a global limit alone lets one client take all of it; a share caps each key so the
others still get in (HAProxy's per-source stick-table counters, Envoy's per-downstream limits).
Counting is exact and O(1); keys whose count drops to zero are forgotten, so the map is never
larger than the resource it guards.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Shares(Generic[K]):
    """Counts per key, each at most `limit` (0 = no share: every take succeeds)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[K, int] = {}
        self.refused = 0

    def __len__(self) -> int:
        """Keys holding at least one unit."""
        return len(self._held)

    def held(self, key: K) -> int:
        return self._held.get(key, 0)

    def try_take(self, key: K, *, enforce: bool = True) -> bool:
        """Take one unit for `key`; False (and nothing taken) when its share is used up.
        With `enforce` False (the resource is far from full) the unit is taken regardless:
        a burst from one client may use room nobody else needs, and is counted all the same."""
        if not self.limit:
            return True  # no share: nothing to count
        n = self._held.get(key, 0)
        if enforce and n >= self.limit:
            self.refused += 1
            return False
        self._held[key] = n + 1
        return True

    def release(self, key: K) -> None:
        """Give one unit back; releasing more than was taken is ignored."""
        n = self._held.get(key, 0)
        if n <= 1:
            self._held.pop(key, None)
        else:
            self._held[key] = n - 1


POOL_FULL = "full"
POOL_SHARE = "share"


class Pool(Generic[K]):
    """A bounded pool of short-lived slots (handshakes, connections) whose per-key share binds
    once half the pool is taken: a burst from one client may use room nobody else needs, a
    flood from one client cannot take the other half."""

    def __init__(self, limit: int, per_key: int) -> None:
        self.limit = limit
        self.shares: Shares[K] = Shares(per_key)
        self.used = 0

    def try_take(self, key: K) -> str | None:
        """Take a slot for `key`: None when taken, else why not (POOL_FULL, POOL_SHARE)."""
        if self.used >= self.limit:
            return POOL_FULL
        if not self.shares.try_take(key, enforce=self.used >= self.limit // 2):
            return POOL_SHARE
        self.used += 1
        return None

    def release(self, key: K) -> None:
        self.used -= 1
        self.shares.release(key)
