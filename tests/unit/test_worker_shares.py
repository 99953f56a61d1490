"""Each worker enforces its share of the role's limits (ramp.workers.shares)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ramp.config import ConnectorConfig, EdgeConfig
from ramp.workers.shares import SHARED_LIMITS, share, worker_share


def test_an_edge_worker_enforces_half_of_each_limit_of_the_edge() -> None:
    config = EdgeConfig(max_flows=10000, max_udp_associations_per_source=40, workers=2)
    mine = worker_share(config, 2)
    assert mine.max_flows == 5000
    assert mine.max_udp_associations_per_source == 20
    # per-association and per-connection limits and timeouts stay as they are
    assert mine.max_udp_destinations_per_association == config.max_udp_destinations_per_association
    assert mine.max_streams_per_connection == config.max_streams_per_connection
    assert mine.handshake_timeout == config.handshake_timeout
    assert config.max_flows == 10000  # the whole edge's config is left alone


def test_a_share_that_is_off_stays_off_and_none_drops_to_off() -> None:
    config = EdgeConfig(max_flows_per_source=0, max_handshakes_per_source=1, workers=4)
    mine = worker_share(config, 4)
    assert mine.max_flows_per_source == 0  # 0: no share, in every worker
    assert mine.max_handshakes_per_source == 1  # rounded up, not to 0 ("off")


def test_a_machine_sized_flow_budget_is_split_too() -> None:
    mine = worker_share(ConnectorConfig(workers=2), 2)
    assert mine.flow_memory_budget > 0


def test_what_the_user_set_stays_marked_as_set() -> None:
    config = EdgeConfig(max_flows=100)
    assert worker_share(config, 2).model_fields_set == config.model_fields_set


def test_every_shared_limit_is_a_field_of_its_config() -> None:
    for cls, keys in SHARED_LIMITS.items():
        assert set(keys) <= set(cls.model_fields), cls


@given(st.integers(0, 10**9), st.integers(1, 64))
def test_the_shares_add_up_to_at_least_the_limit_and_never_much_more(value: int, n: int) -> None:
    part = share(value, n)
    assert value <= part * n < value + n
