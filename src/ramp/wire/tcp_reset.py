"""The RST that answers a TCP segment of no connection (RFC 9293 section 3.10.7.1), sans-I/O.

The edge sends it for a segment of a packet flow it no longer knows (expired, or from before a
restart), so the client's connection fails at once instead of waiting out its timeouts.
"""

from __future__ import annotations

import struct

from ramp.wire.ip import PROTO_TCP, Packet, build_ip, parse_tcp, pseudo_header_checksum

RST = 0x04
ACK = 0x10
SYN = 0x02
FIN = 0x01


def reset_for(packet: Packet) -> bytes | None:
    """An IP packet carrying the RST for `packet` (a TCP segment), or None when none is due
    (it is an RST itself). Raises PacketError for a malformed segment."""
    tcp = parse_tcp(packet)
    if tcp.flags & RST:
        return None
    if tcp.flags & ACK:
        seq, ack, flags = tcp.ack, 0, RST
    else:
        length = len(tcp.payload) + (1 if tcp.flags & SYN else 0) + (1 if tcp.flags & FIN else 0)
        seq, ack, flags = 0, (tcp.seq + length) & 0xFFFFFFFF, RST | ACK
    segment = bytearray(
        struct.pack("!HHIIBBHHH", tcp.dport, tcp.sport, seq, ack, 5 << 4, flags, 0, 0, 0)
    )
    check = pseudo_header_checksum(packet.dst, packet.src, PROTO_TCP, bytes(segment))
    segment[16:18] = check.to_bytes(2, "big")
    return build_ip(packet.dst, packet.src, PROTO_TCP, bytes(segment))


__all__ = ["reset_for"]
