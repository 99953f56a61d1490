"""The pool of egress source addresses: which address each flow gets, in which order it tries
the others, and what it leaves out."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ramp.config import ConnectorConfig, EdgeConfig
from ramp.net.sources import MAX_POOL_ENTRY, UNUSABLE_FOR, SourcePool, parse_source


def test_flows_take_the_addresses_in_turn_and_fall_back_to_the_next() -> None:
    pool = SourcePool(["198.51.100.21", "198.51.100.22", "198.51.100.23"])
    firsts = [next(pool.choose(4)) for _ in range(6)]
    assert firsts == ["198.51.100.21", "198.51.100.22", "198.51.100.23"] * 2
    # one flow's order: its own address first, then the ones after it, each once
    assert list(pool.choose(4)) == ["198.51.100.21", "198.51.100.22", "198.51.100.23"]
    assert list(pool.choose(4)) == ["198.51.100.22", "198.51.100.23", "198.51.100.21"]


def test_families_have_their_own_addresses_and_turns() -> None:
    pool = SourcePool(["198.51.100.21", "2001:db8::21", "198.51.100.22", "2001:db8::22"])
    assert pool.size(4) == 2 and pool.size(6) == 2
    assert next(pool.choose(6)) == "2001:db8::21"
    assert next(pool.choose(4)) == "198.51.100.21"
    assert next(pool.choose(6)) == "2001:db8::22"
    assert list(SourcePool(["198.51.100.21"]).choose(6)) == []


def test_prefixes_give_their_host_addresses() -> None:
    # an IPv4 /30 or wider: no network or broadcast address
    assert list(SourcePool(["192.0.2.0/30"]).choose(4)) == ["192.0.2.1", "192.0.2.2"]
    assert list(SourcePool(["192.0.2.0/31"]).choose(4)) == ["192.0.2.0", "192.0.2.1"]
    pool = SourcePool(["2001:db8::4/126"])
    assert list(pool.choose(6)) == [f"2001:db8::{i}" for i in range(4, 8)]
    wide = SourcePool(["10.1.0.0/16"])
    assert wide.size(4) == 65534
    assert wide.address(4, 0) == "10.1.0.1" and wide.address(4, 65533) == "10.1.255.254"
    # one flow tries a bounded number of them, not all 65,534
    assert len(list(wide.choose(4, tries=16))) == 16


def test_addresses_that_cannot_be_bound_are_left_out_for_a_while() -> None:
    now = [100.0]
    pool = SourcePool(["198.51.100.21", "198.51.100.22"], clock=lambda: now[0])
    pool.unusable("198.51.100.21")
    assert [list(pool.choose(4)) for _ in range(2)] == [["198.51.100.22"], ["198.51.100.22"]]
    pool.unusable("198.51.100.22")
    assert list(pool.choose(4)) == []
    now[0] += UNUSABLE_FOR + 1
    assert sorted(pool.choose(4)) == ["198.51.100.21", "198.51.100.22"]


@pytest.mark.parametrize("bad", ["not-an-address", "198.51.100.300", "10.0.0.0/8", "2001:db8::/64"])
def test_bad_or_too_wide_entries_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="egress source"):
        parse_source(bad)


def test_config_takes_a_list_or_commas_and_names_the_bad_entry() -> None:
    cfg = ConnectorConfig(egress_source="198.51.100.21, 198.51.100.32/30")
    assert cfg.egress_source == ["198.51.100.21", "198.51.100.32/30"]
    assert EdgeConfig(egress_source=["2001:db8::1"]).egress_source == ["2001:db8::1"]
    assert ConnectorConfig().egress_share_ports is True
    with pytest.raises(ValueError, match=f"at most {MAX_POOL_ENTRY}"):
        ConnectorConfig(egress_source=["198.51.100.21", "10.0.0.0/8"])
    with pytest.raises(ValueError, match=re.escape("198.51.100.0/24 and 198.51.100.21/32 overlap")):
        ConnectorConfig(egress_source="198.51.100.0/24,198.51.100.21")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(16, 32)), min_size=1, max_size=4),
    st.integers(1, 40),
    st.integers(0, 50),
)
def test_a_flow_gets_distinct_addresses_of_the_pool(
    nets: list[tuple[int, int]], tries: int, turns: int
) -> None:
    entries = [str(ipaddress.ip_network((addr, plen), strict=False)) for addr, plen in nets]
    try:
        pool = SourcePool(entries)
    except ValueError as e:
        assert "overlap" in str(e)
        return
    allowed = [ipaddress.ip_network(e) for e in entries]
    for _ in range(turns):
        next(pool.choose(4), None)
    chosen = list(pool.choose(4, tries=tries))
    assert len(chosen) == len(set(chosen)) == min(tries, pool.size(4))
    for a in chosen:
        ip = ipaddress.ip_address(a)
        assert any(ip in net for net in allowed)
        # never a network or broadcast address of a /30 or wider prefix it came from alone
        hosts_only = [n for n in allowed if ip in n]
        assert any(n.num_addresses < 4 or ip not in (n[0], n[-1]) for n in hosts_only)
