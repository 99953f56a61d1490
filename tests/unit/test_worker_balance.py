"""Spreading a tunnel's connections over the edge's workers (ramp.workers.balance)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ramp.workers.balance import SETTLE, Balancer, Move, plan


def test_a_worker_without_connections_gets_one_from_the_worker_with_most() -> None:
    holdings = {0: {"t": 2}, 1: {}}
    assert plan(holdings, [0, 1]) == [Move("t", 0, 1)]


def test_connections_that_differ_by_one_stay() -> None:
    assert plan({0: {"t": 2}, 1: {"t": 1}}, [0, 1]) == []
    assert plan({0: {"t": 1}, 1: {}}, [0, 1]) == []  # one connection: nowhere to spread


def test_only_listening_workers_count() -> None:
    # worker 1 has not listened yet (or died): nothing moves to it
    assert plan({0: {"t": 3}, 1: {}}, [0]) == []
    assert plan({0: {"t": 3}, 1: {}, 2: {"t": 1}}, [0, 2]) == [Move("t", 0, 2)]


def test_each_tunnel_is_planned_on_its_own() -> None:
    holdings = {0: {"a": 4, "b": 1}, 1: {"b": 2}}
    assert plan(holdings, [0, 1]) == [Move("a", 0, 1)]


def test_one_move_per_tunnel_until_the_source_reports_it() -> None:
    b = Balancer()
    holdings = {0: {"t": 4}, 1: {}}
    assert b.due(holdings, [0, 1], 0.0) == [Move("t", 0, 1)]
    holdings = {0: {"t": 4}, 1: {"t": 1}}  # the new connection registered first
    assert b.due(holdings, [0, 1], 1.0) == []  # the move under way is not asked twice
    holdings = {0: {"t": 3}, 1: {"t": 1}}  # then the old one unregistered: done
    assert b.due(holdings, [0, 1], 2.0) == [Move("t", 0, 1)]


def test_a_move_that_never_happens_is_asked_again_after_the_settle_time() -> None:
    b = Balancer()
    holdings = {0: {"t": 2}, 1: {}}
    assert b.due(holdings, [0, 1], 0.0) == [Move("t", 0, 1)]
    assert b.due(holdings, [0, 1], SETTLE - 0.1) == []
    assert b.due(holdings, [0, 1], SETTLE + 0.1) == [Move("t", 0, 1)]


def test_a_tunnel_whose_connections_cannot_move_is_left_alone_until_they_change() -> None:
    b = Balancer()
    holdings = {0: {"t": 2}, 1: {}}
    assert b.due(holdings, [0, 1], 0.0) == [Move("t", 0, 1)]
    b.cannot("t", holdings)  # its connector predates REDIAL
    assert b.due(holdings, [0, 1], SETTLE * 3) == []  # not asked every settle time
    holdings = {0: {"t": 3}, 1: {}}  # a new connection (of a connector that may redial)
    assert b.due(holdings, [0, 1], SETTLE * 3) == [Move("t", 0, 1)]


@given(
    st.dictionaries(
        st.integers(0, 5),
        st.dictionaries(st.sampled_from("abc"), st.integers(1, 8), max_size=3),
        max_size=6,
    ),
    st.lists(st.integers(0, 5), max_size=6),
)
def test_moves_always_narrow_the_spread(
    holdings: dict[int, dict[str, int]], listening: list[int]
) -> None:
    for move in plan(holdings, listening):
        assert move.source != move.target
        assert move.source in listening and move.target in listening
        have = holdings[move.source][move.tunnel]
        other = holdings.get(move.target, {}).get(move.tunnel, 0)
        assert have - other >= 2  # after the move the two differ by less than before
