"""NAT of TCP/UDP packets on their raw bytes, sans-I/O: addresses and ports replaced, the
checksums updated incrementally (RFC 1624) instead of summed again over the whole segment.

This is the per-packet step of the TCP upgrade (ramp.onramps.tcp_upgrade), run for every
segment between the kernel and a client. An incremental update keeps a wrong checksum wrong,
so a damaged segment is still dropped by whoever checks it, as a router's NAT would behave.
`ramp.wire.ip.rewrite` does the same from a parsed packet, recomputing everything.
"""

from __future__ import annotations

IPV4_HEADER = 20
IPV6_HEADER = 40
PROTO_TCP = 6
PROTO_UDP = 17
_CHECK_AT = {PROTO_TCP: 16, PROTO_UDP: 6}


class NatError(ValueError):
    """Not a packet this NAT can rewrite (too short, another protocol, IPv6 extension
    headers)."""


def _fold(total: int) -> int:
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _words(data: bytes | bytearray | memoryview) -> int:
    """The one's-complement sum of `data`'s 16-bit words (even length)."""
    n = int.from_bytes(data, "big")
    total = n % 0xFFFF
    return 0xFFFF if total == 0 and n else total


def _update(check: int, old: int, new: int) -> int:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), `old` and `new` word sums of what changed."""
    return ~_fold((~check & 0xFFFF) + (~old & 0xFFFF) + new) & 0xFFFF


def offsets(packet: bytes | bytearray) -> tuple[int, int, int, int]:
    """(version, where the upper layer starts, address bytes at, address length)."""
    if not packet:
        raise NatError("empty packet")
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if ihl < IPV4_HEADER or len(packet) < ihl + 8:
            raise NatError("IPv4 packet too short")
        proto = packet[9]
        start, addr_at, addr_len = ihl, 12, 4
    elif version == 6:
        if len(packet) < IPV6_HEADER + 8:
            raise NatError("IPv6 packet too short")
        proto = packet[6]
        start, addr_at, addr_len = IPV6_HEADER, 8, 16
    else:
        raise NatError(f"IP version {version}")
    if proto not in _CHECK_AT:
        raise NatError(f"protocol {proto}")
    return version, start, addr_at, addr_len


def nat(
    packet: bytes | bytearray,
    src: bytes,
    dst: bytes,
    sport: int | None = None,
    dport: int | None = None,
) -> bytes:
    """`packet` with source and destination addresses `src`, `dst` (packed, of the packet's
    version) and, when given, ports `sport`, `dport`; TCP/UDP and IPv4 header checksums
    updated. An IPv4 UDP packet without a checksum (0) keeps none."""
    version, start, addr_at, addr_len = offsets(packet)
    if len(src) != addr_len or len(dst) != addr_len:
        raise NatError("address of the other IP version")
    out = bytearray(packet)
    proto = out[9] if version == 4 else out[6]
    old_addrs = bytes(out[addr_at : addr_at + 2 * addr_len])
    new_addrs = src + dst
    old_ports = bytes(out[start : start + 4])
    new_ports = bytearray(old_ports)
    if sport is not None:
        new_ports[0:2] = sport.to_bytes(2, "big")
    if dport is not None:
        new_ports[2:4] = dport.to_bytes(2, "big")
    out[addr_at : addr_at + 2 * addr_len] = new_addrs
    out[start : start + 4] = new_ports
    at = start + _CHECK_AT[proto]
    if len(out) >= at + 2:
        check = int.from_bytes(out[at : at + 2], "big")
        if not (proto == PROTO_UDP and version == 4 and check == 0):
            old = _fold(_words(old_addrs) + _words(old_ports))
            new = _fold(_words(new_addrs) + _words(bytes(new_ports)))
            check = _update(check, old, new)
            if proto == PROTO_UDP and check == 0:
                check = 0xFFFF
            out[at : at + 2] = check.to_bytes(2, "big")
    if version == 4:
        check = int.from_bytes(out[10:12], "big")
        out[10:12] = _update(check, _words(old_addrs), _words(new_addrs)).to_bytes(2, "big")
    return bytes(out)


__all__ = ["NatError", "nat", "offsets"]
