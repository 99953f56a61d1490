"""RSTs for segments of no connection: the right sequence numbers, valid checksums."""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given
from hypothesis import strategies as st

from ramp.wire import ip
from ramp.wire.tcp_reset import ACK, RST, SYN, reset_for

A = ipaddress.IPv4Address("192.0.2.5")
B = ipaddress.IPv4Address("198.51.100.10")


def _segment(flags: int, seq: int, ack: int, data: bytes = b"") -> ip.Packet:
    seg = bytearray(struct.pack("!HHIIBBHHH", 40000, 80, seq, ack, 5 << 4, flags, 1000, 0, 0))
    seg += data
    seg[16:18] = ip.pseudo_header_checksum(A, B, ip.PROTO_TCP, bytes(seg)).to_bytes(2, "big")
    return ip.parse_packet(ip.build_ip(A, B, ip.PROTO_TCP, bytes(seg)))


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=100))
def test_an_ack_gets_a_reset_at_its_ack_number(seq: int, ack: int, data: bytes) -> None:
    out = reset_for(_segment(ACK, seq, ack, data))
    assert out is not None
    packet = ip.parse_packet(out)
    tcp = ip.parse_tcp(packet)  # checksum checked
    assert (packet.src, packet.dst, tcp.sport, tcp.dport) == (B, A, 80, 40000)
    assert (tcp.flags, tcp.seq) == (RST, ack)


def test_a_syn_gets_reset_ack_for_the_next_sequence_number() -> None:
    out = reset_for(_segment(SYN, 2**32 - 1, 0))
    assert out is not None
    tcp = ip.parse_tcp(ip.parse_packet(out))
    assert (tcp.flags, tcp.seq, tcp.ack) == (RST | ACK, 0, 0)  # wraps


def test_a_reset_is_never_answered() -> None:
    assert reset_for(_segment(RST | ACK, 1, 2)) is None
