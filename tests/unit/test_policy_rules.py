"""Policy rules: validation, first match wins, indexes that never change the answer."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ramp.policy.rules import NO_RULE, Facts, Policy, Rule, RuleError, validate
from ramp.store.db import Store, StoreError


def facts(
    identity: str | None = "alice",
    to: str = "198.51.100.10",
    port: int = 8000,
    protocol: str = "tcp",
    groups: frozenset[str] = frozenset(),
    onramp: str = "socks5",
    source: str = "192.0.2.1",
    host: str | None = None,
) -> Facts:
    return Facts(identity, groups, onramp, source, host, to, port, protocol)


def test_first_match_wins_and_no_match_denies() -> None:
    p = Policy(
        [
            validate(
                Rule("alice-web", "allow", identity="alice", to="198.51.100.10", ports="8000")
            ),
            validate(Rule("no-alice", "deny", identity="alice")),
            validate(Rule("staff", "allow", group="staff", protocol="udp")),
        ]
    )
    v = p.decide(facts())
    assert (v.allowed, v.rule) == (True, "alice-web")
    assert "position 1" in v.why
    v = p.decide(facts(port=8001))
    assert (v.allowed, v.rule) == (False, "no-alice")
    v = p.decide(facts(identity="bob"))
    assert (v.allowed, v.rule) == (False, NO_RULE)
    v = p.decide(facts(identity="bob", groups=frozenset({"staff"}), protocol="udp"))
    assert (v.allowed, v.rule) == (True, "staff")
    assert p.decide(facts(identity="bob", groups=frozenset({"staff"}))).rule == NO_RULE


def test_host_patterns_ports_sources_and_onramps() -> None:
    p = Policy(
        [
            validate(Rule("db", "allow", to="*.corp.example", ports="5432,6000-6010")),
            validate(Rule("apex", "allow", to="corp.example")),
            validate(Rule("office", "allow", source="203.0.113.0/24", onramp="forward")),
        ]
    )
    assert p.decide(facts(to=None, host="db.corp.example", port=5432)).rule == "db"
    assert p.decide(facts(to=None, host="a.b.corp.example", port=6005)).rule == "db"
    assert p.decide(facts(to=None, host="corp.example", port=5432)).rule == "apex"
    assert not p.decide(facts(to=None, host="evilcorp.example", port=5432)).allowed
    assert not p.decide(facts(to=None, host="db.corp.example", port=6011)).allowed
    assert p.decide(facts(source="203.0.113.9", onramp="forward")).rule == "office"
    assert not p.decide(facts(source="203.0.113.9", onramp="socks5")).allowed


def test_cidr_rules_match_addresses_not_names_and_mapped_ipv6() -> None:
    p = Policy([validate(Rule("net", "allow", to="198.51.100.0/24"))])
    assert p.decide(facts(to="198.51.100.77")).allowed
    assert p.decide(facts(to="::ffff:198.51.100.77")).allowed
    assert not p.decide(facts(to=None, host="web.example")).allowed


@pytest.mark.parametrize(
    "rule, field",
    [
        (Rule("", "allow"), "id"),
        (Rule("-x", "allow"), "id"),
        (Rule("ok", "maybe"), "action"),
        (Rule("ok", "allow", protocol="sctp"), "protocol"),
        (Rule("ok", "allow", source="10.0.0.0/33"), "from"),
        (Rule("ok", "allow", to="10.0.0.0/40"), "to"),
        (Rule("ok", "allow", to="not a host"), "to"),
        (Rule("ok", "allow", ports="80-70"), "ports"),
        (Rule("ok", "allow", ports="http"), "ports"),
        (Rule("ok", "allow", identity=" "), "identity"),
    ],
)
def test_malformed_rules_name_the_field(rule: Rule, field: str) -> None:
    with pytest.raises(RuleError, match=rf"^{field}:"):
        validate(rule)


def test_store_rejects_bad_rules_and_keeps_what_it_has(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        before = store.list_rules()
        assert [r.id for r in before] == ["default"]
        version = store.data_version()
        for bad in (Rule("x", "allow", ports="99999"), Rule("default", "deny")):
            with pytest.raises(StoreError):
                store.add_rule(bad)
        with pytest.raises(StoreError, match="position 5"):
            store.add_rule(Rule("y", "allow"), position=5)
        assert store.list_rules() == before
        assert store.data_version() == version
        store.add_rule(Rule("first", "deny", identity="mallory"), position=1)
        store.add_rule(Rule("last", "allow"))
        assert [r.id for r in store.list_rules()] == ["first", "default", "last"]
        store.delete_rule("default")
        assert [r.id for r in store.list_rules()] == ["first", "last"]
        with pytest.raises(StoreError, match="no rule"):
            store.delete_rule("default")
    with Store(tmp_path) as store:  # deleting `default` sticks across opens
        assert [r.id for r in store.list_rules()] == ["first", "last"]


_idents = st.sampled_from(["alice", "bob", "carol", None])
_nets = st.sampled_from(["198.51.100.0/24", "198.51.100.0/25", "203.0.113.7/32", "10.0.0.0/8"])
_rules = st.builds(
    Rule,
    id=st.from_regex(r"r[0-9]{1,4}", fullmatch=True),
    action=st.sampled_from(["allow", "deny"]),
    identity=_idents,
    group=st.sampled_from([None, "staff", "ops"]),
    onramp=st.sampled_from([None, "socks5", "http"]),
    source=st.sampled_from([None, "192.0.2.0/24"]),
    to=st.sampled_from([None, "198.51.100.0/24", "203.0.113.7", "*.corp.example", "db.example"]),
    ports=st.sampled_from([None, "80", "8000-8100", "22,443"]),
    protocol=st.sampled_from(["any", "tcp", "udp"]),
)


def _linear(rules: list[Rule], f: Facts) -> str:
    """The obvious scan, to check the indexed policy against."""
    for r in rules:
        if r.identity is not None and r.identity != f.identity:
            continue
        if r.group is not None and r.group not in f.groups:
            continue
        if r.onramp is not None and r.onramp != f.onramp:
            continue
        if r.protocol != "any" and r.protocol != f.protocol:
            continue
        if r.source is not None and ipaddress.ip_address(f.source) not in ipaddress.ip_network(
            r.source
        ):
            continue
        if r.ports is not None:
            ok = False
            for part in r.ports.split(","):
                lo, _, hi = part.partition("-")
                ok = ok or int(lo) <= f.port <= int(hi or lo)
            if not ok:
                continue
        if r.to is not None:
            if "/" in r.to:
                if f.address is None or ipaddress.ip_address(f.address) not in ipaddress.ip_network(
                    r.to
                ):
                    continue
            elif r.to.startswith("*."):
                if f.host is None or not f.host.endswith(r.to[1:]):
                    continue
            elif f.host != r.to:
                continue
        return r.id
    return NO_RULE


@settings(max_examples=200, deadline=None)
@given(
    rules=st.lists(_rules, max_size=30, unique_by=lambda r: r.id),
    identity=_idents,
    groups=st.frozensets(st.sampled_from(["staff", "ops"])),
    dest=st.sampled_from(
        [
            ("198.51.100.9", None),
            ("203.0.113.7", None),
            (None, "a.corp.example"),
            (None, "db.example"),
        ]
    ),
    port=st.sampled_from([22, 80, 443, 8050]),
    protocol=st.sampled_from(["tcp", "udp"]),
    onramp=st.sampled_from(["socks5", "http"]),
    source=st.sampled_from(["192.0.2.5", "203.0.113.1"]),
)
def test_indexed_decisions_equal_a_linear_scan(
    rules: list[Rule],
    identity: str | None,
    groups: frozenset[str],
    dest: tuple[str | None, str | None],
    port: int,
    protocol: str,
    onramp: str,
    source: str,
) -> None:
    rules = [validate(r) for r in rules]
    f = Facts(identity, groups, onramp, source, dest[1], dest[0], port, protocol)
    policy = Policy(rules)
    assert policy.decide(f).rule == _linear(rules, f)
    assert policy.decide(f).rule == _linear(rules, f)  # the memoised answer is the same
