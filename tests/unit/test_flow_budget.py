"""The flow memory budget: windows come out of it, shrink as it runs low, and go back."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ramp.flows.budget import (
    AUTO_MAX,
    AUTO_MIN,
    WINDOW_FLOOR,
    MemoryBudget,
    auto_budget,
    parse_cgroup_limit,
    parse_meminfo,
    reserve,
)

MIB = 1024 * 1024


def test_a_flow_gets_the_window_it_asks_for_while_the_budget_is_roomy() -> None:
    budget = MemoryBudget(64 * MIB)
    r = budget.reserve(MIB)
    assert r.window == MIB
    assert budget.reserved == MIB
    assert budget.reduced == 0


def test_windows_shrink_as_the_budget_runs_low_and_never_below_the_floor() -> None:
    reduced = []
    budget = MemoryBudget(16 * MIB, on_reduced=lambda: reduced.append(1))
    windows = [budget.reserve(MIB).window for _ in range(200)]
    assert windows[0] == MIB
    assert windows == sorted(windows, reverse=True)  # later flows never get more
    assert min(windows) == WINDOW_FLOOR
    assert all(w >= WINDOW_FLOOR for w in windows)
    assert len(reduced) == budget.reduced == sum(1 for w in windows if w < MIB)


def test_a_flood_still_leaves_room_for_many_flows_within_the_budget() -> None:
    budget = MemoryBudget(32 * MIB)
    for _ in range(100):
        budget.reserve(MIB)
    assert budget.reserved <= budget.total


def test_past_the_budget_new_flows_still_open_at_the_floor() -> None:
    budget = MemoryBudget(WINDOW_FLOOR * 2)
    windows = [budget.reserve(MIB).window for _ in range(10)]
    assert windows == [WINDOW_FLOOR] * 10  # smaller, not refused


def test_released_windows_come_back_once_and_full_windows_return() -> None:
    budget = MemoryBudget(8 * MIB)
    held = [budget.reserve(MIB) for _ in range(50)]
    squeezed = budget.reserve(MIB)
    assert squeezed.window < MIB
    for r in held:
        r.release()
        r.release()  # idempotent: a second release gives nothing back twice
    assert budget.reserved == squeezed.window
    assert budget.reserve(MIB).window == MIB  # room again: full windows
    assert budget.flows == 2


def test_small_asks_are_granted_as_asked() -> None:
    budget = MemoryBudget(WINDOW_FLOOR)
    assert budget.reserve(1000).window == 1000


def test_no_budget_means_the_window_asked_for() -> None:
    r = reserve(None, MIB)
    assert r.window == MIB
    r.release()


@given(
    total=st.integers(min_value=WINDOW_FLOOR, max_value=256 * MIB),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("reserve"), st.integers(min_value=1, max_value=4 * MIB)),
            st.tuples(st.just("release"), st.integers(min_value=0, max_value=1000)),
        ),
        max_size=200,
    ),
)
def test_reserved_is_the_sum_of_live_windows_and_only_floor_flows_overrun(
    total: int, ops: list[tuple[str, int]]
) -> None:
    budget = MemoryBudget(total)
    live = []
    for op, n in ops:
        if op == "reserve":
            before = budget.reserved
            r = budget.reserve(n)
            assert min(n, WINDOW_FLOOR) <= r.window <= n
            if before + r.window > total:
                # over the budget only with the floor, and only when not even that fit
                assert r.window == min(n, WINDOW_FLOOR)
                assert total - before < r.window
            live.append(r)
        elif live:
            live.pop(n % len(live)).release()
        assert budget.reserved == sum(r.window for r in live)
        assert budget.flows == len(live)
    for r in live:
        r.release()
    assert budget.reserved == 0


def test_auto_budget_is_a_fraction_of_the_smaller_limit_within_bounds() -> None:
    assert auto_budget(64 * 1024 * MIB, None) == AUTO_MAX
    assert auto_budget(64 * 1024 * MIB, 512 * MIB) == 32 * MIB  # the cgroup limit wins
    assert auto_budget(64 * MIB, None) == AUTO_MIN
    assert AUTO_MIN <= auto_budget(None, None) <= AUTO_MAX


def test_meminfo_and_cgroup_limits_are_parsed_and_nonsense_ignored() -> None:
    assert parse_meminfo("MemTotal:       24683584 kB\nMemFree: 1 kB\n") == 24683584 * 1024
    assert parse_meminfo("garbage") is None
    assert parse_meminfo("MemTotal: lots") is None
    assert parse_cgroup_limit("max\n") is None
    assert parse_cgroup_limit("536870912\n") == 512 * MIB
    assert parse_cgroup_limit("9223372036854771712") is None  # cgroup v1's "no limit"
    assert parse_cgroup_limit("") is None
