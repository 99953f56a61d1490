"""connect-ip requests (RFC 9484 section 3): the URI template's scope, and damaged requests
refused with a status, never a crash."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ramp.testing.mutate import mutated
from ramp.wire.masque import (
    IpRequest,
    IpScope,
    IpTemplate,
    MasqueError,
    RequestRefused,
    UdpTemplate,
    parse_request,
)

N = ipaddress.ip_network
AUTH = (b"proxy-authorization", b"Bearer a.b")


def _ip(path: str) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"CONNECT"),
        (b":protocol", b"connect-ip"),
        (b":scheme", b"https"),
        (b":authority", b"edge.example"),
        (b":path", path.encode()),
        AUTH,
    ]


@pytest.mark.parametrize(
    ("path", "scope"),
    [
        ("/.well-known/masque/ip/*/*/", IpScope(None, None)),
        ("/.well-known/masque/ip/198.51.100.10/*/", IpScope(N("198.51.100.10/32"), None)),
        ("/.well-known/masque/ip/198.51.100.0%2F24/17/", IpScope(N("198.51.100.0/24"), 17)),
        ("/.well-known/masque/ip/2001%3Adb8%3A%3A%2F32/58/", IpScope(N("2001:db8::/32"), 58)),
    ],
)
def test_the_default_template_names_the_scope(path: str, scope: IpScope) -> None:
    req = parse_request(_ip(path), UdpTemplate(), IpTemplate())
    assert req == IpRequest(scope, b"Bearer a.b", "edge.example", path)


@pytest.mark.parametrize(
    "path",
    [
        "/.well-known/masque/ip/*/256/",
        "/.well-known/masque/ip/*/x/",
        "/.well-known/masque/ip/corp.example/*/",  # names are not routed by this proxy
        "/.well-known/masque/ip/198.51.100.1%2F24/*/",  # host bits set
    ],
)
def test_a_bad_scope_is_refused_as_a_bad_target(path: str) -> None:
    with pytest.raises(RequestRefused) as e:
        parse_request(_ip(path), UdpTemplate(), IpTemplate())
    assert (e.value.status, e.value.bad_input) == (400, "bad_target")


def test_connect_ip_is_not_served_without_a_template() -> None:
    with pytest.raises(RequestRefused) as e:
        parse_request(_ip("/.well-known/masque/ip/*/*/"), UdpTemplate())
    assert e.value.status == 501


def test_another_path_is_not_found() -> None:
    with pytest.raises(RequestRefused) as e:
        parse_request(_ip("/ip/*/*/"), UdpTemplate(), IpTemplate())
    assert e.value.status == 404


def test_templates_need_both_variables() -> None:
    with pytest.raises(ValueError):
        IpTemplate("/ip/{target}/")
    assert IpTemplate("https://edge.example/x/{target}/{ipproto}").path == "/x/{target}/{ipproto}"


@given(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    st.integers(0, 128),
    st.one_of(st.just("*"), st.integers(0, 255)),
)
def test_expand_and_match_round_trip(
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address, plen: int, proto: str | int
) -> None:
    net = ipaddress.ip_network(f"{addr}/{min(plen, addr.max_prefixlen)}", strict=False)
    t = IpTemplate()
    scope = t.match(t.expand(str(net), proto))
    assert scope == IpScope(net, None if proto == "*" else proto)


@given(mutated(st.just(b"/.well-known/masque/ip/198.51.100.0%2F24/17/")))
def test_damaged_paths_match_or_fail_cleanly(path: bytes) -> None:
    try:
        IpTemplate().match(path.decode("latin-1"))
    except MasqueError:
        pass
