"""TCP MSS clamping, sans-I/O: lower the maximum segment size a SYN announces.

A TCP flow upgraded at the edge (ramp.onramps.tcp_upgrade) is spoken by a kernel whose TUN
device has the edge's MTU, but each segment must fit one QUIC DATAGRAM frame of the client's
connection to travel unreliably; a bigger one would go in a capsule on the request stream,
reliable and ordered, TCP inside TCP. Routers solve the same problem for tunnels by clamping
the MSS option of SYN segments (RFC 4459 section 3.2); so does the edge, both ways.
"""

from __future__ import annotations

OPT_EOL = 0
OPT_NOP = 1
OPT_MSS = 2
SYN = 0x02
TCP_MIN_HEADER = 20


def clamp_mss(segment: bytes, mss: int) -> bytes:
    """`segment` (a TCP header and payload, no IP header) with its MSS option lowered to `mss`
    when it is a SYN announcing more; anything else comes back unchanged. The TCP checksum is
    not updated: the caller recomputes it (it rewrites addresses anyway)."""
    if len(segment) < TCP_MIN_HEADER or not segment[13] & SYN:
        return segment
    header_len = (segment[12] >> 4) * 4
    if header_len <= TCP_MIN_HEADER or header_len > len(segment):
        return segment
    at = TCP_MIN_HEADER
    while at < header_len:
        kind = segment[at]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            at += 1
            continue
        if at + 1 >= header_len:
            break
        length = segment[at + 1]
        if length < 2 or at + length > header_len:
            break  # malformed options: leave them to the kernel
        if kind == OPT_MSS and length == 4:
            announced = int.from_bytes(segment[at + 2 : at + 4], "big")
            if announced <= mss:
                return segment
            out = bytearray(segment)
            out[at + 2 : at + 4] = mss.to_bytes(2, "big")
            return bytes(out)
        at += length
    return segment


def announced_mss(segment: bytes) -> int | None:
    """The MSS a SYN announces, or None (not a SYN, no option)."""
    if len(segment) < TCP_MIN_HEADER or not segment[13] & SYN:
        return None
    header_len = (segment[12] >> 4) * 4
    if header_len > len(segment):
        return None
    at = TCP_MIN_HEADER
    while at < header_len:
        kind = segment[at]
        if kind == OPT_EOL:
            return None
        if kind == OPT_NOP:
            at += 1
            continue
        if at + 1 >= header_len:
            return None
        length = segment[at + 1]
        if length < 2 or at + length > header_len:
            return None
        if kind == OPT_MSS and length == 4:
            return int.from_bytes(segment[at + 2 : at + 4], "big")
        at += length
    return None


__all__ = ["announced_mss", "clamp_mss"]
