"""ICMP echo sockets: unprivileged ping sockets, raw sockets where those are not permitted,
and what the kernel says about them (the error queue, received TTLs).

A ping socket (`socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)`, Linux 3.0+) sends echo requests
without CAP_NET_RAW: the kernel sets the echo identifier (the socket's "port") and the
checksum, and hands the socket only the replies with its identifier. Who may open one is
`net.ipv4.ping_group_range` (per network namespace, for IPv4 and IPv6 alike); Debian's default
`1 0` permits nobody, so containers often cannot (cloudflared issues #1109, #1334). Then a raw
socket does the same job with CAP_NET_RAW, matching replies to flows by identifier itself.

With IP_RECVERR / IPV6_RECVERR the ICMP errors routers send about our echo requests (time
exceeded, unreachable) are queued on the socket that sent them (ip(7) "MSG_ERRQUEUE"): a
`sock_extended_err` names the ICMP type and code, and the offender is the router's address.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

# Linux values (include/uapi/linux/in.h, in6.h, errqueue.h) the socket module may lack.
SOL_IP = 0
SOL_IPV6 = 41
IP_TTL = 2
IP_MTU_DISCOVER = 10
IP_MTU = 14
IP_PMTUDISC_DONT = 0  # fragment where needed: the client's packet had no DF
IP_PMTUDISC_DO = 2  # DF set, EMSGSIZE past the path MTU
IP_RECVERR = 11
IP_RECVTTL = 12
IPV6_UNICAST_HOPS = 16
IPV6_MTU = 24
IPV6_RECVERR = 25
IPV6_RECVHOPLIMIT = 51
IPV6_HOPLIMIT = 52
MSG_ERRQUEUE = 0x2000
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3
_EXTENDED_ERR = struct.Struct("=IBBBBII")  # ee_errno, origin, type, code, pad, info, data
CMSG_SPACE = 512

PING_GROUP_RANGE = Path("/proc/sys/net/ipv4/ping_group_range")

PING_SOCKET = "ping_socket"
RAW_SOCKET = "raw_socket"
NO_SOCKET = "none"


def ping_group_range() -> str:
    """net.ipv4.ping_group_range of this network namespace, as the kernel prints it."""
    try:
        return " ".join(PING_GROUP_RANGE.read_text().split())
    except OSError:
        return "unknown"


def _proto(family: int) -> int:
    return socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6


def _prepare(sock: socket.socket, family: int, kind: str) -> socket.socket:
    sock.setblocking(False)
    if family == socket.AF_INET:
        if kind == PING_SOCKET:
            sock.setsockopt(SOL_IP, IP_RECVERR, 1)
        sock.setsockopt(SOL_IP, IP_RECVTTL, 1)
    else:
        if kind == PING_SOCKET:
            sock.setsockopt(SOL_IPV6, IPV6_RECVERR, 1)
        sock.setsockopt(SOL_IPV6, IPV6_RECVHOPLIMIT, 1)
    return sock


def open_ping_socket(family: int) -> socket.socket:
    """A ping socket bound to a free identifier (`sock.getsockname()[1]`); raises
    PermissionError where ping_group_range excludes our groups."""
    sock = socket.socket(family, socket.SOCK_DGRAM, _proto(family))
    try:
        _prepare(sock, family, PING_SOCKET)
        sock.bind(("0.0.0.0", 0) if family == socket.AF_INET else ("::", 0))
    except BaseException:
        sock.close()
        raise
    return sock


def open_raw_socket(family: int) -> socket.socket:
    """A raw ICMP (ICMPv6) socket; raises PermissionError without CAP_NET_RAW."""
    sock = socket.socket(family, socket.SOCK_RAW, _proto(family))
    try:
        _prepare(sock, family, RAW_SOCKET)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(frozen=True, slots=True)
class Capability:
    family: int
    mode: str  # PING_SOCKET, RAW_SOCKET or NO_SOCKET
    why: str  # what the operator should know when the mode is not PING_SOCKET


def probe(family: int) -> Capability:
    """Which kind of echo socket this process may open for `family`, and why not the better."""
    try:
        open_ping_socket(family).close()
        return Capability(family, PING_SOCKET, "")
    except PermissionError:
        groups = ping_group_range()
        why = f"ping sockets are not permitted (net.ipv4.ping_group_range is {groups!r})"
    except OSError as e:
        if e.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
            return Capability(family, NO_SOCKET, f"no {_family_name(family)} here")
        why = f"ping sockets failed: {e.strerror}"
    try:
        open_raw_socket(family).close()
        return Capability(family, RAW_SOCKET, why + "; using a raw socket (CAP_NET_RAW)")
    except OSError as e:
        return Capability(family, NO_SOCKET, why + f", and a raw socket neither ({e.strerror})")


def _family_name(family: int) -> str:
    return "IPv4" if family == socket.AF_INET else "IPv6"


def set_ttl(sock: socket.socket, family: int, ttl: int) -> None:
    if family == socket.AF_INET:
        sock.setsockopt(SOL_IP, IP_TTL, ttl)
    else:
        sock.setsockopt(SOL_IPV6, IPV6_UNICAST_HOPS, ttl)


def set_dont_fragment(sock: socket.socket, df: bool) -> None:
    """IPv4: send with DF (as the client's packet had it) or let the kernel fragment."""
    sock.setsockopt(SOL_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO if df else IP_PMTUDISC_DONT)


def path_mtu(dst: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int | None:
    """The path MTU this host knows toward `dst` (its route's, or a smaller one learnt from a
    router's "fragmentation needed"); nothing is sent."""
    family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
    level, option = (SOL_IP, IP_MTU) if dst.version == 4 else (SOL_IPV6, IPV6_MTU)
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((str(dst), 9))
        return int(s.getsockopt(level, option))
    return None


def received_ttl(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    """The TTL (hop limit) a datagram arrived with, from IP_RECVTTL / IPV6_RECVHOPLIMIT."""
    for level, kind, data in ancdata:
        if len(data) >= 4 and (
            (level == SOL_IP and kind == IP_TTL) or (level == SOL_IPV6 and kind == IPV6_HOPLIMIT)
        ):
            return int(struct.unpack_from("=i", data)[0])
    return None


@dataclass(frozen=True, slots=True)
class QueuedError:
    """One ICMP error from the error queue: the type and code the router sent, its info word
    (the MTU of "fragmentation needed" / "packet too big"), and the router's address."""

    icmp_type: int
    code: int
    info: int
    offender: ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_queued_error(ancdata: list[tuple[int, int, bytes]]) -> QueuedError | None:
    """The ICMP error in a MSG_ERRQUEUE message's control data, or None when it holds none
    (a local error, or no offender address)."""
    for level, kind, data in ancdata:
        if (level, kind) not in ((SOL_IP, IP_RECVERR), (SOL_IPV6, IPV6_RECVERR)):
            continue
        if len(data) < _EXTENDED_ERR.size + 8:
            return None
        _, origin, icmp_type, code, _, info, _ = _EXTENDED_ERR.unpack_from(data)
        if origin not in (SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6):
            return None
        offender = data[_EXTENDED_ERR.size :]
        family = struct.unpack_from("=H", offender)[0]
        address: ipaddress.IPv4Address | ipaddress.IPv6Address
        if family == socket.AF_INET and len(offender) >= 8:
            address = ipaddress.IPv4Address(offender[4:8])
        elif family == socket.AF_INET6 and len(offender) >= 24:
            address = ipaddress.IPv6Address(offender[8:24])
        else:
            return None
        return QueuedError(icmp_type, code, info, address)
    return None


def source_address_for(
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address this host sends from toward `dst` (a route lookup, nothing is sent)."""
    family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((str(dst), 9))
        return ipaddress.ip_address(s.getsockname()[0])
    return None
