"""Rate limits for log lines about bad input: a flood of garbage must not become a flood of
log lines. Counters still count every event; the log says how many lines it left out."""

from __future__ import annotations

import time
from collections.abc import Hashable


class LogLimiter:
    """At most `burst` lines per key per `period` seconds."""

    def __init__(self, burst: int = 5, period: float = 10.0, max_keys: int = 1024) -> None:
        self.burst = burst
        self.period = period
        self.max_keys = max_keys
        self._windows: dict[Hashable, list[float | int]] = {}  # key -> [start, count]
        self.suppressed = 0

    def allow(self, key: Hashable) -> bool:
        now = time.monotonic()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.period:
            if window is None and len(self._windows) >= self.max_keys:
                self._windows.clear()  # keys come from a small fixed set; this is a backstop
            self._windows[key] = [now, 1]
            return True
        window[1] += 1
        if window[1] <= self.burst:
            return True
        self.suppressed += 1
        return False
