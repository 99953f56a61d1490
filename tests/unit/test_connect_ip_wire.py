"""connect-ip capsules (RFC 9484 section 4.7): round trips, the ordering rules, and damaged
capsules raising only ConnectIpError."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ramp.testing.mutate import mutated
from ramp.wire.connect_ip import (
    CAPSULE_ADDRESS_ASSIGN,
    CAPSULE_ADDRESS_REQUEST,
    CAPSULE_ROUTE_ADVERTISEMENT,
    AddressAssign,
    AddressRequest,
    ConnectIpError,
    IpRange,
    RouteAdvertisement,
    advertise,
    encode_capsule,
    encode_value,
    parse_capsule,
)
from ramp.wire.masque import CapsuleDecoder
from ramp.wire.varint import MAX_VARINT

networks = st.one_of(
    st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)).map(
        lambda t: ipaddress.IPv4Network((t[0], t[1]), strict=False)
    ),
    st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128)).map(
        lambda t: ipaddress.IPv6Network((t[0], t[1]), strict=False)
    ),
)
entries = st.lists(
    st.tuples(st.integers(1, MAX_VARINT), networks).map(lambda t: (t[0], t[1].version, t[1])),
    min_size=1,
    max_size=5,
)


def _round_trip(capsule):
    decoder = CapsuleDecoder()
    (framed,) = decoder.feed(encode_capsule(capsule))
    return parse_capsule(framed.type, framed.value)


@given(entries)
def test_address_assign_and_request_round_trip(items) -> None:
    assert _round_trip(AddressAssign(items)) == AddressAssign(items)
    assert _round_trip(AddressRequest(items)) == AddressRequest(items)


def test_an_unsolicited_assignment_has_request_id_zero_and_may_be_empty() -> None:
    pool = ipaddress.ip_network("100.96.0.5/32")
    assert _round_trip(AddressAssign([(0, 4, pool)])).addresses[0].request_id == 0
    assert _round_trip(AddressAssign([])) == AddressAssign([])


def test_requests_need_an_address_and_non_zero_ids() -> None:
    with pytest.raises(ConnectIpError):
        parse_capsule(CAPSULE_ADDRESS_REQUEST, b"")
    zero = encode_value(AddressAssign([(0, 4, ipaddress.ip_network("0.0.0.0/32"))]))
    with pytest.raises(ConnectIpError, match="request id 0"):
        parse_capsule(CAPSULE_ADDRESS_REQUEST, zero)


def test_bits_past_the_prefix_and_long_prefixes_are_refused() -> None:
    good = bytearray(encode_value(AddressAssign([(1, 4, ipaddress.ip_network("192.0.2.0/24"))])))
    good[-2] = 1  # 192.0.2.1/24
    with pytest.raises(ConnectIpError, match="past its prefix"):
        parse_capsule(CAPSULE_ADDRESS_ASSIGN, bytes(good))
    good[-2], good[-1] = 0, 33
    with pytest.raises(ConnectIpError, match="prefix length 33"):
        parse_capsule(CAPSULE_ADDRESS_ASSIGN, bytes(good))


@given(st.lists(networks, max_size=8), st.sampled_from([0, 1, 6, 17]))
def test_advertised_prefixes_round_trip_and_cover_exactly_the_prefixes(nets, proto) -> None:
    adv = advertise(nets, proto)
    got = _round_trip(adv)
    assert got == adv
    covered = set(ipaddress.collapse_addresses([n for n in got.networks() if n.version == 4]))
    assert covered == set(ipaddress.collapse_addresses([n for n in nets if n.version == 4]))
    covered6 = set(ipaddress.collapse_addresses([n for n in got.networks() if n.version == 6]))
    assert covered6 == set(ipaddress.collapse_addresses([n for n in nets if n.version == 6]))


def _r(version: int, start: str, end: str, proto: int = 0) -> IpRange:
    return IpRange(version, ipaddress.ip_address(start), ipaddress.ip_address(end), proto)


@pytest.mark.parametrize(
    "ranges",
    [
        [_r(6, "2001:db8::", "2001:db8::ff"), _r(4, "192.0.2.0", "192.0.2.255")],
        [_r(4, "192.0.2.0", "192.0.2.255", 17), _r(4, "198.51.100.0", "198.51.100.255", 1)],
        [_r(4, "192.0.2.0", "192.0.2.255"), _r(4, "192.0.2.255", "192.0.3.0")],
        [_r(4, "192.0.2.9", "192.0.2.1")],
    ],
    ids=["v6-before-v4", "protocols-out-of-order", "overlap", "end-before-start"],
)
def test_route_advertisements_out_of_order_are_refused(ranges) -> None:
    value = b"".join(
        bytes((r.ip_version,)) + r.start.packed + r.end.packed + bytes((r.ip_protocol,))
        for r in ranges
    )
    with pytest.raises(ConnectIpError):
        parse_capsule(CAPSULE_ROUTE_ADVERTISEMENT, value)
    with pytest.raises(ConnectIpError):
        encode_capsule(RouteAdvertisement(ranges))


def test_a_single_slash_32_is_advertised_as_that_address_only() -> None:
    adv = advertise([ipaddress.ip_network("198.51.100.10/32")])
    assert adv.ranges == (_r(4, "198.51.100.10", "198.51.100.10"),)


def test_other_capsule_types_are_not_connect_ip() -> None:
    assert parse_capsule(0x00, b"\x00abc") is None


valid = st.one_of(
    entries.map(lambda e: (CAPSULE_ADDRESS_ASSIGN, encode_value(AddressAssign(e)))),
    entries.map(lambda e: (CAPSULE_ADDRESS_REQUEST, encode_value(AddressRequest(e)))),
    st.lists(networks, min_size=1, max_size=6).map(
        lambda n: (CAPSULE_ROUTE_ADVERTISEMENT, encode_value(advertise(n)))
    ),
)


@given(st.sampled_from([1, 2, 3]), mutated(valid.map(lambda t: t[1])))
def test_damaged_capsules_raise_only_connect_ip_errors(capsule_type: int, value: bytes) -> None:
    try:
        got = parse_capsule(capsule_type, value)
    except ConnectIpError:
        return
    assert got is not None
    # What parses re-encodes to something that parses the same (varints may come non-minimal).
    assert parse_capsule(capsule_type, encode_value(got)) == got
