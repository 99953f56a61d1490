"""Incremental NAT: the same packet as a full rewrite, bad checksums kept bad, no crashes."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from ramp.testing.mutate import mutated
from ramp.wire import ip
from ramp.wire.nat import NatError, nat

v4 = st.ip_addresses(v=4)
v6 = st.ip_addresses(v=6)
ports = st.integers(1, 65535)


def _tcp(src: ip.IPAddress, dst: ip.IPAddress, sport: int, dport: int, data: bytes) -> bytes:
    header = bytearray(
        sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + bytes(8) + bytes([0x50, 0x18])
    )
    header += (65535).to_bytes(2, "big") + bytes(4)
    segment = bytearray(header + data)
    check = ip.pseudo_header_checksum(src, dst, ip.PROTO_TCP, bytes(segment))
    segment[16:18] = check.to_bytes(2, "big")
    return ip.build_ip(src, dst, ip.PROTO_TCP, bytes(segment))


@given(
    st.one_of(st.tuples(v4, v4, v4, v4), st.tuples(v6, v6, v6, v6)),
    ports,
    ports,
    ports,
    st.binary(max_size=1500),
    st.booleans(),
)
def test_nat_gives_what_a_full_rewrite_gives(
    addrs: tuple[ip.IPAddress, ...], sport: int, dport: int, new_port: int, data: bytes, udp: bool
) -> None:
    src, dst, new_src, new_dst = addrs
    build = ip.build_udp if udp else _tcp
    raw = build(src, dst, sport, dport, data)
    got = nat(raw, new_src.packed, new_dst.packed, dport=new_port)
    want = ip.rewrite(ip.parse_packet(raw), src=new_src, dst=new_dst, dport=new_port)
    at = (20 if src.version == 4 else 40) + (6 if udp else 16)
    assert got[:at] + got[at + 2 :] == want[:at] + want[at + 2 :]
    # one's complement has two zeros: 0x0000 and 0xFFFF are the same checksum
    assert {got[at : at + 2], want[at : at + 2]} <= {b"\0\0", b"\xff\xff"} or (
        got[at : at + 2] == want[at : at + 2]
    )
    parsed = ip.parse_packet(got)  # header checksum right
    if udp:
        assert ip.parse_udp(parsed).payload == data  # checksum right
    else:
        assert ip.parse_tcp(parsed).payload == data


def test_a_bad_checksum_stays_bad() -> None:
    a, b = ipaddress.IPv4Address("192.0.2.1"), ipaddress.IPv4Address("198.51.100.1")
    raw = bytearray(_tcp(a, b, 1000, 80, b"hello"))
    raw[-1] ^= 0x01  # damaged payload, checksum unchanged
    got = nat(bytes(raw), b.packed, a.packed)
    try:
        ip.parse_tcp(ip.parse_packet(got))
    except ip.PacketError as e:
        assert e.reason == "bad_checksum"
    else:
        raise AssertionError("a damaged segment got a good checksum")


@given(
    mutated(
        st.just(
            ip.build_udp(
                ipaddress.IPv4Address("192.0.2.1"),
                ipaddress.IPv4Address("192.0.2.2"),
                1,
                2,
                b"x" * 30,
            )
        )
    )
)
def test_damaged_packets_rewrite_or_fail_cleanly(raw: bytes) -> None:
    try:
        nat(raw, bytes(4), bytes(4))
    except NatError:
        pass
