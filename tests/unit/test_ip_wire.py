"""IP, ICMP, UDP and TCP codecs: round trips, checksums, refusals, and damaged packets never
raising anything but PacketError."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ramp.testing.mutate import mutated
from ramp.wire.ip import (
    ERROR_KINDS,
    ICMP_ECHO_REQUEST,
    ICMPV6_ECHO_REQUEST,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    PacketError,
    build_echo,
    build_icmp_error,
    build_ip,
    build_ipv4,
    build_ipv6,
    build_udp,
    checksum,
    error_allowed,
    parse_icmp,
    parse_packet,
    parse_tcp,
    parse_tcp_ports,
    parse_udp,
    pseudo_header_checksum,
    quoted_echo,
    rewrite,
    with_ttl,
)

v4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
v6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
pairs = st.tuples(v4, v4) | st.tuples(v6, v6)
u16 = st.integers(0, 0xFFFF)
ttls = st.integers(0, 255)
A4, B4 = ipaddress.IPv4Address("192.0.2.1"), ipaddress.IPv4Address("198.51.100.7")
A6, B6 = ipaddress.IPv6Address("2001:db8::1"), ipaddress.IPv6Address("2001:db8:1::7")


def _slow_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@given(st.binary(max_size=300))
def test_checksum_matches_the_word_by_word_definition(data: bytes) -> None:
    assert checksum(data) == _slow_checksum(data)


@given(pairs, st.sampled_from([PROTO_TCP, PROTO_UDP, 99]), st.binary(max_size=1500), ttls)
def test_ip_packets_round_trip(addrs, proto: int, payload: bytes, ttl: int) -> None:
    src, dst = addrs
    raw = build_ip(src, dst, proto, payload, ttl)
    packet = parse_packet(raw)
    assert (packet.version, packet.src, packet.dst, packet.proto, packet.ttl) == (
        src.version,
        src,
        dst,
        proto,
        ttl,
    )
    assert packet.payload == payload and packet.raw == raw
    assert packet.header + packet.payload == raw


@given(pairs, st.binary(max_size=200), ttls)
def test_with_ttl_changes_only_the_ttl_and_keeps_the_header_valid(addrs, payload, ttl) -> None:
    src, dst = addrs
    packet = parse_packet(with_ttl(build_ip(src, dst, PROTO_UDP, payload, 64), ttl))
    assert packet.ttl == ttl and packet.payload == payload and packet.src == src


@given(pairs, u16, u16, st.binary(max_size=1000), st.booleans(), ttls)
def test_echoes_round_trip_with_a_right_checksum(addrs, ident, seq, data, reply, ttl) -> None:
    src, dst = addrs
    packet = parse_packet(build_echo(src, dst, ident, seq, data, reply, src.version, ttl))
    icmp = parse_icmp(packet)
    assert (icmp.ident, icmp.seq, icmp.data, packet.ttl) == (ident, seq, data, ttl)
    assert icmp.is_echo_reply is reply and icmp.is_echo_request is not reply
    assert not icmp.is_error


@given(pairs, st.integers(1, 0xFFFF), st.integers(1, 0xFFFF), st.binary(max_size=1400))
def test_udp_round_trips_with_a_right_checksum(addrs, sport, dport, payload) -> None:
    src, dst = addrs
    packet = parse_packet(build_udp(src, dst, sport, dport, payload, src.version))
    assert packet.proto == PROTO_UDP
    udp = parse_udp(packet)
    assert (udp.sport, udp.dport, udp.payload) == (sport, dport, payload)
    assert pseudo_header_checksum(src, dst, PROTO_UDP, packet.payload) == 0


def test_an_ipv4_udp_datagram_without_a_checksum_is_accepted_but_not_in_ipv6() -> None:
    for src, dst in ((A4, B4), (A6, B6)):
        raw = bytearray(build_udp(src, dst, 1000, 53, b"query"))
        raw[len(raw) - 5 - 2 : len(raw) - 5] = b"\0\0"
        packet = parse_packet(bytes(raw))
        if src.version == 4:
            assert parse_udp(packet).payload == b"query"
        else:
            with pytest.raises(PacketError) as e:
                parse_udp(packet)
            assert e.value.reason == "bad_checksum"


@pytest.mark.parametrize(("src", "dst"), [(A4, B4), (A6, B6)])
def test_a_damaged_icmp_or_udp_checksum_is_refused(src, dst) -> None:
    for raw in (build_echo(src, dst, 7, 1, b"ping", False), build_udp(src, dst, 9, 10, b"x")):
        bad = bytearray(raw)
        bad[-1] ^= 0x40
        packet = parse_packet(bytes(bad))
        with pytest.raises(PacketError) as e:
            (parse_icmp if packet.proto in (PROTO_ICMP, PROTO_ICMPV6) else parse_udp)(packet)
        assert e.value.reason == "bad_checksum"


def test_an_icmpv6_checksum_covers_the_pseudo_header() -> None:
    raw = build_echo(A6, B6, 7, 1, b"ping", False)
    moved = raw[:24] + ipaddress.IPv6Address("2001:db8::2").packed + raw[40:]
    with pytest.raises(PacketError) as e:
        parse_icmp(parse_packet(moved))
    assert e.value.reason == "bad_checksum"


def _reason(data: bytes) -> str:
    with pytest.raises(PacketError) as e:
        parse_packet(data)
    return e.value.reason


def test_refusals_carry_a_reason_for_the_counter() -> None:
    good = build_ipv4(A4, B4, PROTO_UDP, b"12345678")
    assert _reason(b"") == "truncated"
    assert _reason(b"\x70" + good[1:]) == "bad_version"
    assert _reason(good[:19]) == "truncated"
    assert _reason(good[:-1]) == "truncated"
    assert _reason(good + b"\0") == "bad_length"
    assert _reason(b"\x44" + good[1:]) == "bad_header_length"
    bad_sum = bytearray(good)
    bad_sum[8] ^= 1  # TTL changed, checksum not
    assert _reason(bytes(bad_sum)) == "bad_checksum"
    v6 = build_ipv6(A6, B6, PROTO_UDP, b"12345678")
    assert _reason(v6[:39]) == "truncated"
    assert _reason(v6 + b"\0") == "bad_length"


@pytest.mark.parametrize("flags", [0x2000, 0x0001, 0x3FFF])
def test_ipv4_fragments_are_refused(flags: int) -> None:
    raw = bytearray(build_ipv4(A4, B4, PROTO_UDP, b"12345678"))
    raw[6:8] = flags.to_bytes(2, "big")
    raw[10:12] = b"\0\0"
    raw[10:12] = checksum(raw[:20]).to_bytes(2, "big")
    assert _reason(bytes(raw)) == "fragment"


def test_ipv6_fragments_are_refused_also_behind_other_extension_headers() -> None:
    fragment = bytes((PROTO_UDP, 0, 0, 1, 0, 0, 0, 1)) + b"12345678"
    assert _reason(build_ipv6(A6, B6, 44, fragment)) == "fragment"
    hop_by_hop = bytes((44, 0, 1, 4, 0, 0, 0, 0))  # next header: fragment; a PadN option
    assert _reason(build_ipv6(A6, B6, 0, hop_by_hop + fragment)) == "fragment"


def test_ipv6_extension_headers_are_skipped_to_the_upper_layer() -> None:
    dest_opts = bytes((PROTO_UDP, 0, 1, 4, 0, 0, 0, 0))
    segment = build_udp(A6, B6, 5, 6, b"hi")[40:]
    packet = parse_packet(build_ipv6(A6, B6, 60, dest_opts + segment))
    assert packet.proto == PROTO_UDP and len(packet.header) == 48
    assert parse_udp(packet).payload == b"hi"


@pytest.mark.parametrize(("src", "dst"), [(A4, B4), (A6, B6)])
@pytest.mark.parametrize("kind", ERROR_KINDS)
def test_errors_go_back_to_the_sender_and_quote_its_packet(src, dst, kind) -> None:
    original = build_echo(src, dst, 0x1234, 9, b"x" * 2000, False, ttl=1)
    router = ipaddress.ip_address("203.0.113.9" if src.version == 4 else "2001:db8:2::9")
    error = parse_packet(build_icmp_error(original, router, kind, mtu=1400))
    icmp = parse_icmp(error)
    assert (error.src, error.dst) == (router, src)
    assert icmp.is_error
    limit = 576 if src.version == 4 else 1280
    assert len(error.raw) == limit and original.startswith(icmp.data)
    quoted = quoted_echo(icmp)
    assert quoted is not None
    assert (quoted[0].src, quoted[0].dst, quoted[1].ident, quoted[1].seq) == (src, dst, 0x1234, 9)
    if kind in ("frag_needed", "packet_too_big"):
        assert icmp.mtu == 1400
    assert not error_allowed(error)  # never an error about an error


def test_error_types_and_codes_are_the_rfcs() -> None:
    original = build_udp(A4, B4, 1, 2, b"")
    got = {
        k: parse_icmp(parse_packet(build_icmp_error(original, B4, k, mtu=1280)))
        for k in ERROR_KINDS
    }
    assert (got["admin_prohibited"].type, got["admin_prohibited"].code) == (3, 13)
    assert (got["frag_needed"].type, got["frag_needed"].code) == (3, 4)
    assert (got["time_exceeded"].type, got["time_exceeded"].code) == (11, 0)
    assert (got["port_unreachable"].type, got["port_unreachable"].code) == (3, 3)
    original6 = build_udp(A6, B6, 1, 2, b"")
    got6 = {
        k: parse_icmp(parse_packet(build_icmp_error(original6, B6, k, mtu=1280)))
        for k in ERROR_KINDS
    }
    assert (got6["admin_prohibited"].type, got6["admin_prohibited"].code) == (1, 1)
    assert (got6["packet_too_big"].type, got6["packet_too_big"].mtu) == (2, 1280)
    assert (got6["time_exceeded"].type, got6["time_exceeded"].code) == (3, 0)
    assert (got6["port_unreachable"].type, got6["port_unreachable"].code) == (1, 4)


def test_a_short_original_is_quoted_whole() -> None:
    original = build_udp(A4, B4, 1, 2, b"abc")
    icmp = parse_icmp(parse_packet(build_icmp_error(original, B4, "port_unreachable")))
    assert icmp.data == original


def test_echo_requests_allow_errors_and_other_icmp_types_are_told_apart() -> None:
    request = parse_packet(build_echo(A4, B4, 1, 1, b"", False))
    assert error_allowed(request)
    assert parse_icmp(request).type == ICMP_ECHO_REQUEST
    assert (
        parse_icmp(parse_packet(build_echo(A6, B6, 1, 1, b"", False))).type == ICMPV6_ECHO_REQUEST
    )


def _tcp_segment(src, dst, sport, dport, flags, payload=b"") -> bytes:
    segment = bytearray(
        struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, flags, 65535, 0, 0)
    )
    segment += payload
    segment[16:18] = pseudo_header_checksum(src, dst, PROTO_TCP, bytes(segment)).to_bytes(2, "big")
    return bytes(segment)


@pytest.mark.parametrize(("src", "dst"), [(A4, B4), (A6, B6)])
def test_tcp_ports_flags_and_checksum(src, dst) -> None:
    packet = parse_packet(
        build_ip(src, dst, PROTO_TCP, _tcp_segment(src, dst, 4000, 80, 0x02, b"d"))
    )
    assert parse_tcp_ports(packet) == (4000, 80)
    tcp = parse_tcp(packet)
    assert tcp.flags & tcp.SYN and tcp.payload == b"d" and tcp.header_len == 20


@given(
    st.sampled_from([(A4, B4), (A6, B6)]),
    st.booleans(),
    st.integers(1, 0xFFFF),
    st.integers(1, 0xFFFF),
    st.binary(max_size=100),
)
def test_rewrite_keeps_every_checksum_right(addrs, tcp, sport, dport, payload) -> None:
    src, dst = addrs
    if tcp:
        raw = build_ip(src, dst, PROTO_TCP, _tcp_segment(src, dst, 1, 2, 0x10, payload))
    else:
        raw = build_udp(src, dst, 1, 2, payload)
    new_src = ipaddress.ip_address("10.9.8.7" if src.version == 4 else "fd00::7")
    out = parse_packet(rewrite(parse_packet(raw), src=new_src, sport=sport, dport=dport))
    assert out.src == new_src and out.dst == dst
    if tcp:
        got = parse_tcp(out)
        assert (got.sport, got.dport, got.payload) == (sport, dport, payload)
    else:
        got_udp = parse_udp(out)
        assert (got_udp.sport, got_udp.dport, got_udp.payload) == (sport, dport, payload)


# --- never-crash fuzzing from valid packets --------------------------------------------------


valid_packets = st.one_of(
    st.builds(
        lambda a, i, s, d, r: build_echo(a[0], a[1], i, s, d, r),
        pairs,
        u16,
        u16,
        st.binary(max_size=64),
        st.booleans(),
    ),
    st.builds(
        lambda a, sp, dp, d: build_udp(a[0], a[1], sp, dp, d),
        pairs,
        st.integers(1, 0xFFFF),
        st.integers(1, 0xFFFF),
        st.binary(max_size=64),
    ),
    st.builds(
        lambda a, k: build_icmp_error(
            build_echo(a[0], a[1], 1, 2, b"abcdefgh", False), a[1], k, mtu=1280
        ),
        pairs,
        st.sampled_from(ERROR_KINDS),
    ),
)


@given(mutated(valid_packets))
def test_damaged_packets_raise_only_packet_errors(data: bytes) -> None:
    try:
        packet = parse_packet(data)
    except PacketError as e:
        assert e.reason
        return
    for parse in (parse_icmp, parse_udp, parse_tcp, parse_tcp_ports):
        try:
            parse(packet)
        except PacketError as e:
            assert e.reason
    try:
        icmp = parse_icmp(packet)
    except PacketError:
        return
    quoted_echo(icmp)
    error_allowed(packet)
    if error_allowed(packet):
        reply = parse_packet(build_icmp_error(data, packet.dst, "time_exceeded"))
        assert reply.dst == packet.src
