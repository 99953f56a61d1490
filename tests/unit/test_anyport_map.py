"""The any-port on-ramp's options: mapping (address, port) to destinations, and bad configs."""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from ramp.config import EdgeConfig
from ramp.flows.flow import Destination
from ramp.net.tproxy import nft_ruleset
from ramp.onramps.anyport_map import AnyportOptions, PortMap, parse_ports
from ramp.onramps.registry import parse_entry

PREFIX = "203.0.113.0/24"


def options(**kw: object) -> AnyportOptions:
    entry = {"type": "anyport", "prefix": PREFIX, **kw}
    parsed = parse_entry(entry)
    assert isinstance(parsed, AnyportOptions)
    return parsed


def test_a_fixed_destination_takes_every_address_and_port() -> None:
    m = PortMap.from_options(options(to="198.51.100.10:80"))
    assert m.lookup("203.0.113.1", 1) == Destination("198.51.100.10", 80)
    assert m.lookup("203.0.113.255", 65535) == Destination("198.51.100.10", 80)
    assert m.lookup("203.0.114.1", 80) is None  # not in the prefix


def test_the_same_port_on_a_private_host() -> None:
    m = PortMap.from_options(options(ports="1000-2000", to={"host": "db.corp.example"}))
    assert m.lookup("203.0.113.9", 1234) == Destination("db.corp.example", 1234)
    assert m.lookup("203.0.113.9", 999) is None
    assert m.lookup("203.0.113.9", 2001) is None
    assert m.claims("203.0.113.9", 2000) and not m.claims("203.0.113.9", 2001)


def test_the_first_matching_rule_wins() -> None:
    m = PortMap.from_options(
        options(
            to=[
                {"addresses": "203.0.113.7/32", "ports": 22, "to": "198.51.100.10:22"},
                {"addresses": "203.0.113.0/25", "to": {"host": "198.51.100.10"}},
                {"ports": "80", "to": "198.51.100.11:8080"},
            ]
        )
    )
    assert m.lookup("203.0.113.7", 22) == Destination("198.51.100.10", 22)
    assert m.lookup("203.0.113.7", 23) == Destination("198.51.100.10", 23)
    assert m.lookup("203.0.113.200", 80) == Destination("198.51.100.11", 8080)
    assert m.lookup("203.0.113.200", 81) is None  # in the prefix, no rule: the on-ramp closes it
    assert m.claims("203.0.113.200", 81)


rule_nets = st.builds(
    lambda length, index: ipaddress.IPv4Network(PREFIX).subnets(new_prefix=length),
    st.integers(24, 28),
    st.just(0),
).flatmap(lambda subnets: st.sampled_from(list(subnets)))
rule_ports = st.tuples(st.integers(1, 200), st.integers(0, 50)).map(lambda t: (t[0], t[0] + t[1]))


@given(
    st.lists(st.tuples(rule_nets, rule_ports, st.integers(1, 65535) | st.none()), max_size=8),
    st.lists(st.tuples(st.integers(0, 255), st.integers(1, 260)), max_size=40),
)
def test_lookup_is_the_first_rule_that_holds_the_address_and_port(
    rules: list[tuple[ipaddress.IPv4Network, tuple[int, int], int | None]],
    probes: list[tuple[int, int]],
) -> None:
    entries = [
        {
            "addresses": str(net),
            "ports": f"{lo}-{hi}",
            "to": f"198.51.100.10:{port}" if port else {"host": "198.51.100.10"},
        }
        for net, (lo, hi), port in rules
    ]
    try:
        m = PortMap.from_options(options(to=entries)) if entries else None
    except ValidationError as e:
        # only a rule an earlier one covers entirely is refused
        assert "never matches" in str(e)
        return
    if m is None:
        return
    for last, port in probes:
        address = f"203.0.113.{last}"
        expected = None
        for net, (lo, hi), to_port in rules:
            if ipaddress.IPv4Address(address) in net and lo <= port <= hi:
                expected = Destination("198.51.100.10", to_port or port)
                break
        assert m.lookup(address, port) == expected


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"prefix": "203.0.113.1/24", "to": "a:1"}, "host bits set"),
        (
            {"prefix": "2001:db8::/64", "to": [{"addresses": "203.0.113.0/28", "to": "a:1"}]},
            "not inside the prefix 2001:db8::/64",
        ),
        ({"ports": "0-10", "to": "a:1"}, "ports are 1-65535"),
        ({"ports": "2000-1000", "to": "a:1"}, "ends before it starts"),
        ({"ports": "http", "to": "a:1"}, "a port or a range"),
        ({"to": "198.51.100.10"}, "HOST:PORT"),
        ({"to": {"host": "198.51.100.10:80"}}, "without a port"),
        ({"to": []}, "rule table `to` is empty"),
        (
            {"to": [{"addresses": "198.51.100.0/24", "to": "a:1"}]},
            "rule 1: addresses 198.51.100.0/24 are not inside the prefix 203.0.113.0/24",
        ),
        (
            {"ports": "1-1024", "to": [{"ports": "1000-2000", "to": "a:1"}]},
            "rule 1: ports 1000-2000 are not inside the on-ramp's ports 1-1024",
        ),
        (
            {"to": [{"to": "a:1"}, {"addresses": "203.0.113.0/28", "to": "b:2"}]},
            "rule 2 never matches: rule 1 comes first",
        ),
        ({"to": "a:1", "mechanism": "xdp"}, "auto"),
        ({"to": "a:1", "protocol": "sctp"}, "tcp"),
        (
            {
                "to": "a:1",
                "protocol": "udp",
                "proxy_protocol": {"mode": "required", "trusted": ["192.0.2.0/24"]},
            },
            "a udp anyport on-ramp takes none",
        ),
    ],
)
def test_bad_options_say_what_is_wrong(entry: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse_entry({"type": "anyport", "prefix": PREFIX, **entry})
    assert message in str(info.value)


def edge(*onramps: dict[str, object]) -> EdgeConfig:
    return EdgeConfig.model_validate(
        {"onramps": [{"type": "anyport", "to": "198.51.100.10:80", **o} for o in onramps]}
    )


def test_two_anyport_onramps_must_not_claim_one_address_and_port() -> None:
    with pytest.raises(ValidationError, match="overlap: each address and port may belong"):
        edge(
            {"prefix": "203.0.113.0/24", "ports": "1-1000"},
            {"prefix": "203.0.113.128/25", "ports": "1000-2000"},
        )
    # TCP beside UDP, other ports, or another prefix: fine
    edge({"prefix": PREFIX}, {"prefix": PREFIX, "protocol": "udp"})
    edge({"prefix": PREFIX, "ports": "1-999"}, {"prefix": PREFIX, "ports": "1000-2000"})
    edge({"prefix": PREFIX}, {"prefix": "203.0.114.0/24"})


def test_parse_ports() -> None:
    assert parse_ports("80") == (80, 80)
    assert parse_ports(443) == (443, 443)
    assert parse_ports(" 1 - 65535 ") == (1, 65535)


def test_the_tproxy_rule() -> None:
    text = nft_ruleset(
        "ramp_anyport_1",
        "udp",
        ipaddress.IPv4Network("203.0.113.0/24"),
        (53, 53),
        ("127.0.0.1", 4000),
        0x72610000,
    )
    assert "type filter hook prerouting priority mangle" in text
    assert (
        "ip daddr 203.0.113.0/24 udp dport 53 tproxy to 127.0.0.1:4000 "
        "meta mark set 0x72610000 accept"
    ) in text


def test_ipv6_prefixes_map_like_ipv4_ones() -> None:
    o = options(
        prefix="2001:db8:1::/64",
        to=[
            {"addresses": "2001:db8:1::/112", "to": "[2001:db8:198::10]:80"},
            {"to": {"host": "2001:db8:198::11"}},
        ],
    )
    assert o.listen == "[::1]:0"  # the one socket is of the prefix's family
    m = PortMap.from_options(o)
    assert m.lookup("2001:db8:1::5", 9) == Destination("2001:db8:198::10", 80)
    assert m.lookup("2001:db8:1::1:0", 9) == Destination("2001:db8:198::11", 9)
    assert m.lookup("2001:db8:2::1", 9) is None
    assert m.lookup("203.0.113.1", 9) is None
    # an IPv4 and an IPv6 on-ramp never overlap
    edge({"prefix": PREFIX}, {"prefix": "2001:db8:1::/64"})


def test_the_ipv6_tproxy_rule() -> None:
    text = nft_ruleset(
        "ramp_anyport_2",
        "tcp",
        ipaddress.IPv6Network("2001:db8:1::/64"),
        (1, 65535),
        ("::1", 4000),
        0x72610001,
    )
    assert text.startswith("table ip6 ramp_anyport_2 {")
    assert "ip6 daddr 2001:db8:1::/64 tcp dport 1-65535 tproxy to [::1]:4000" in text


def test_no_other_onramp_may_listen_inside_the_claimed_prefix() -> None:
    with pytest.raises(
        ValidationError, match=re.escape("socks5 on-ramp listens on 203.0.113.9:1080")
    ):
        EdgeConfig.model_validate(
            {
                "onramps": [
                    {"type": "socks5", "listen": "203.0.113.9:1080"},
                    {"type": "anyport", "prefix": PREFIX, "to": "198.51.100.10:80"},
                ]
            }
        )
    # outside the ports: fine
    EdgeConfig.model_validate(
        {
            "onramps": [
                {"type": "socks5", "listen": "203.0.113.9:1080"},
                {"type": "anyport", "prefix": PREFIX, "ports": "2000-3000", "to": "a:80"},
            ]
        }
    )


def test_a_listener_flag_inside_the_claimed_prefix_is_refused_too() -> None:
    with pytest.raises(
        ValidationError, match=re.escape("http on-ramp listens on 203.0.113.9:8080")
    ):
        EdgeConfig.model_validate(
            {
                "http_listen": "203.0.113.9:8080",
                "onramps": [{"type": "anyport", "prefix": PREFIX, "to": "198.51.100.10:80"}],
            }
        )
