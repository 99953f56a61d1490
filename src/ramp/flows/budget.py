"""A byte budget for flow windows across all flows of a process.

Every flow holds up to its window of bytes in user space per direction (the tunnel credit
bounds it; see tunnel/bridge_state.py), so the sum of the windows granted is what the flows
can cost. A new flow reserves its window here; as less of the budget remains, new flows get
smaller windows, down to a floor, instead of failing: a flood of slow readers then costs at
most the budget (plus the floor for each flow once even the floor no longer fits, a number
the flow limits bound), while a legitimate flow still opens. The reservation goes back when
the flow ends. No I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

WINDOW_FLOOR = 64 * 1024
# a new flow takes at most 1/SHARE of what remains above the floor reserve, so windows shrink
# gradually under pressure instead of the first comers taking everything
SHARE = 4
# 1/FLOOR_RESERVE of the budget is kept for flows at the floor: a flood that used up the rest
# still leaves room for many more flows within the budget
FLOOR_RESERVE = 4
_PAGE = 4096

AUTO_FRACTION = 16  # auto budget: this fraction of the machine's (or cgroup's) memory
AUTO_MIN = 16 * 1024 * 1024
AUTO_MAX = 1024 * 1024 * 1024


class Reservation:
    """One flow's window; `release()` gives it back (idempotent)."""

    __slots__ = ("_budget", "window")

    def __init__(self, budget: MemoryBudget | None, window: int) -> None:
        self._budget = budget
        self.window = window

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget.release(self.window)

    def release_when_done(self, future: object) -> None:
        """`release()` as a done-callback of the flow's task or future."""
        self.release()


class MemoryBudget:
    """`total` bytes shared by the windows of all flows.

    `on_reduced` is called for each flow given less than it asked for.
    """

    def __init__(
        self,
        total: int,
        floor: int = WINDOW_FLOOR,
        on_reduced: Callable[[], None] | None = None,
    ) -> None:
        if total <= 0 or floor <= 0:
            raise ValueError("budget and floor must be positive")
        self.total = total
        self.floor = floor
        self.reserved = 0
        self.flows = 0
        self.reduced = 0  # flows granted less than they asked for, since start
        self._on_reduced = on_reduced

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.reserved)

    def window_for(self, want: int) -> int:
        """The window a new flow asking for `want` bytes would get now."""
        if want <= self.floor:
            return want
        spare = self.remaining - self.total // FLOOR_RESERVE
        grant = min(want, max(0, spare) // SHARE)
        grant -= grant % _PAGE
        return max(self.floor, grant)

    def reserve(self, want: int) -> Reservation:
        window = self.window_for(want)
        self.reserved += window
        self.flows += 1
        if window < want:
            self.reduced += 1
            if self._on_reduced is not None:
                self._on_reduced()
        return Reservation(self, window)

    def release(self, window: int) -> None:
        self.reserved = max(0, self.reserved - window)
        self.flows = max(0, self.flows - 1)


def unbudgeted(window: int) -> Reservation:
    """A reservation outside any budget (a role built without one)."""
    return Reservation(None, window)


def reserve(budget: MemoryBudget | None, want: int) -> Reservation:
    return unbudgeted(want) if budget is None else budget.reserve(want)


# -- sizing the default to the machine --------------------------------------------------------


def parse_meminfo(text: str) -> int | None:
    """MemTotal in bytes from /proc/meminfo's text."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            try:
                return int(parts[1]) * 1024
            except (IndexError, ValueError):
                return None
    return None


def parse_cgroup_limit(text: str) -> int | None:
    """A cgroup v2 memory.max (or v1 limit_in_bytes) in bytes; None for 'max' or nonsense."""
    value = text.strip()
    if not value.isdigit():
        return None
    limit = int(value)
    # cgroup v1 says "no limit" with a huge number near 2**63
    return limit if 0 < limit < 1 << 60 else None


def auto_budget(mem_total: int | None, cgroup_limit: int | None) -> int:
    """A budget sized to the memory the process may use: a fraction of the smaller of the
    machine's memory and the cgroup limit, within [AUTO_MIN, AUTO_MAX]."""
    limits = [m for m in (mem_total, cgroup_limit) if m]
    if not limits:
        return AUTO_MIN * 4
    return max(AUTO_MIN, min(AUTO_MAX, min(limits) // AUTO_FRACTION))


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine_budget() -> int:
    """auto_budget() for this machine (reads /proc/meminfo and the cgroup limit)."""
    cgroup = parse_cgroup_limit(_read("/sys/fs/cgroup/memory.max")) or parse_cgroup_limit(
        _read("/sys/fs/cgroup/memory/memory.limit_in_bytes")
    )
    return auto_budget(parse_meminfo(_read("/proc/meminfo")), cgroup)


def make_budget(setting: int, on_reduced: Callable[[], None] | None = None) -> MemoryBudget:
    """The budget for the `flow_memory_budget` setting (0 = sized to the machine)."""
    return MemoryBudget(setting or machine_budget(), on_reduced=on_reduced)
