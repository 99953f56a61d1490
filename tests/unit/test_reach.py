"""The prefixes a connect-ip client is told it may reach: routes intersected with policy."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from ramp.policy.reach import reachable_prefixes
from ramp.policy.router import RouteEntry, RouteTable
from ramp.policy.rules import Facts, Policy, Rule

N = ipaddress.ip_network
ROUTES = RouteTable(
    [
        RouteEntry(N("198.51.100.0/24"), "t1", "corp"),
        RouteEntry(N("203.0.113.0/24"), "t2", "lab"),
        RouteEntry(N("2001:db8:198::/64"), "t1", "corp"),
    ]
)


def _reach(rules: list[Rule], **kw: object) -> list[str]:
    kw.setdefault("identity", "alice")
    return [str(n) for n in reachable_prefixes(Policy(rules), ROUTES, **kw)]  # type: ignore[arg-type]


def test_one_allowed_address_is_the_only_route() -> None:
    rules = [Rule("one", "allow", identity="alice", to="198.51.100.10/32")]
    assert _reach(rules) == ["198.51.100.10/32"]
    assert _reach(rules, identity="bob") == []


def test_an_allow_everything_rule_gives_every_route_of_the_network() -> None:
    rules = [Rule("all", "allow", group="staff")]
    got = _reach(rules, groups=frozenset({"staff"}))
    assert got == ["198.51.100.0/24", "203.0.113.0/24", "2001:db8:198::/64"]


def test_an_earlier_deny_cuts_a_hole_and_first_match_wins() -> None:
    rules = [
        Rule("no-db", "deny", to="198.51.100.11/32"),
        Rule("corp", "allow", to="198.51.100.0/24"),
        Rule("late", "deny", to="198.51.100.10/32"),  # after the allow: never decides
    ]
    got = {N(p) for p in _reach(rules)}
    assert N("198.51.100.11/32") not in got
    assert sum(n.num_addresses for n in got) == 255
    assert any(ipaddress.ip_address("198.51.100.10") in n for n in got)


def test_a_port_or_protocol_condition_still_advertises_and_settles_nothing() -> None:
    rules = [
        Rule("dns", "allow", to="198.51.100.53/32", ports="53", protocol="udp"),
        Rule("rest", "deny"),
    ]
    assert _reach(rules) == ["198.51.100.53/32"]
    assert _reach(rules, ipproto=17) == ["198.51.100.53/32"]
    assert _reach(rules, ipproto=6) == []  # a TCP-only request: the UDP rule never applies
    # a conditional deny leaves the later allow in force for the other packets
    rules = [Rule("no-ssh", "deny", ports="22"), Rule("corp", "allow", to="203.0.113.0/24")]
    assert _reach(rules) == ["203.0.113.0/24"]


def test_host_rules_source_rules_and_scope() -> None:
    rules = [
        Rule("name", "allow", to="*.corp.example"),
        Rule("office", "allow", source="192.0.2.0/24", to="203.0.113.0/24"),
    ]
    assert _reach(rules) == []
    assert _reach(rules, source=ipaddress.ip_address("192.0.2.9")) == ["203.0.113.0/24"]
    assert _reach([Rule("all", "allow")], scope=N("198.51.100.0/25")) == ["198.51.100.0/25"]


def test_no_routes_no_advertisement() -> None:
    assert reachable_prefixes(Policy([Rule("all", "allow")]), None, identity="a") == []


rules_st = st.lists(
    st.builds(
        Rule,
        id=st.sampled_from(["r1", "r2", "r3"]),
        action=st.sampled_from(["allow", "deny"]),
        to=st.one_of(
            st.none(),
            st.sampled_from(
                ["198.51.100.0/24", "198.51.100.0/28", "198.51.100.10/32", "203.0.113.0/25"]
            ),
        ),
        ports=st.one_of(st.none(), st.just("80")),
    ),
    max_size=5,
)


@given(rules_st, st.integers(0, 255), st.sampled_from(["198.51.100", "203.0.113"]))
def test_advertised_exactly_where_some_packet_is_allowed(
    rules: list[Rule], last: int, net: str
) -> None:
    """Whatever the rules: an address is advertised if and only if the policy allows some
    packet to it (port 80 or another port, TCP) and a route covers it."""
    policy = Policy(rules)
    addr = f"{net}.{last}"
    advertised = any(
        ipaddress.ip_address(addr) in n
        for n in reachable_prefixes(policy, ROUTES, identity="alice")
    )

    def allows(port: int) -> bool:
        f = Facts("alice", frozenset(), "masque", "192.0.2.9", None, addr, port, "tcp")
        return policy.decide(f).allowed

    assert advertised == (allows(80) or allows(81))
