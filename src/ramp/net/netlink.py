"""Two netlink questions the egress code asks the kernel, each one request and one answer:
which UDP socket would receive a datagram from a peer (sock_diag, as `ss` asks it), and which
source address the routing table picks for a destination (RTM_GETROUTE, as `ip route get`).

A netlink socket belongs to the network namespace of the thread that opens it, so each
question opens its own: it is answered from the namespace the caller's sockets live in.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

# include/uapi/linux/netlink.h, sock_diag.h, inet_diag.h, rtnetlink.h
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
RTM_GETROUTE = 26
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 0x2
RTA_DST = 1
RTA_OIF = 4
RTA_PREFSRC = 7
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
SO_COOKIE = 57  # include/uapi/asm-generic/socket.h

_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_DIAG_REQ = struct.Struct("=BBBBI")  # family, protocol, ext, pad, states
_PORTS = struct.Struct("!HH")
_TAIL = struct.Struct("=III")  # interface, cookie (two halves)
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")
_COOKIE_AT = _NLMSG.size + 4 + _PORTS.size + 32 + 4  # inet_diag_msg: ..., id.idiag_cookie
_RTMSG_END = _NLMSG.size + _RTMSG.size
_ALL_STATES = 0xFFFFFFFF


def socket_cookie(sock: socket.socket) -> int:
    """The kernel's id of `sock` (SO_COOKIE), the one sock_diag answers with."""
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


def _addr16(family: int, ip: str) -> bytes:
    return socket.inet_pton(family, ip).ljust(16, b"\0")


def _ask(protocol: int, message: bytes) -> bytes:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol) as nl:
        nl.send(message)
        return nl.recv(65536)


def _error(answer: bytes) -> int | None:
    _, kind, _, _, _ = _NLMSG.unpack_from(answer)
    if kind != NLMSG_ERROR:
        return None
    return -struct.unpack_from("=i", answer, _NLMSG.size)[0]


def udp_receiver(family: int, local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The cookie of the UDP socket a datagram from `remote` to `local` would reach, None
    when none would. The kernel runs its receive lookup (__udp4_lib_lookup): a socket
    connected to exactly `remote` wins over one only bound to `local`."""
    # the request names the packet's source first ("swapped for historical reasons")
    sockid = (
        _PORTS.pack(remote[1], local[1])
        + _addr16(family, remote[0])
        + _addr16(family, local[0])
        + _TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    )
    body = _DIAG_REQ.pack(family, socket.IPPROTO_UDP, 0, 0, _ALL_STATES) + sockid
    answer = _ask(
        NETLINK_SOCK_DIAG,
        _NLMSG.pack(_NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + body,
    )
    err = _error(answer)
    if err == errno.ENOENT:
        return None
    if err:
        raise OSError(err, f"sock_diag: {os.strerror(err)}")
    low, high = struct.unpack_from("=II", answer, _COOKIE_AT)
    return low | high << 32


def route_source(family: int, ip: str, interface: int = 0) -> str | None:
    """The source address the kernel would give a packet to `ip` (`ip route get IP`'s src);
    None when the route names none. OSError (ENETUNREACH, ...) when there is no route."""
    dst = socket.inet_pton(family, ip)
    attrs = _RTATTR.pack(_RTATTR.size + len(dst), RTA_DST) + dst
    if interface:
        attrs += _RTATTR.pack(_RTATTR.size + 4, RTA_OIF) + struct.pack("=I", interface)
    body = _RTMSG.pack(family, len(dst) * 8, 0, 0, 0, 0, 0, 0, 0) + attrs
    answer = _ask(
        socket.NETLINK_ROUTE,
        _NLMSG.pack(_NLMSG.size + len(body), RTM_GETROUTE, NLM_F_REQUEST, 1, 0) + body,
    )
    err = _error(answer)
    if err:
        raise OSError(err, os.strerror(err))
    end = min(_NLMSG.unpack_from(answer)[0], len(answer))
    pos = _RTMSG_END
    while pos + _RTATTR.size <= end:
        length, kind = _RTATTR.unpack_from(answer, pos)
        if length < _RTATTR.size:
            break
        if kind == RTA_PREFSRC:
            return socket.inet_ntop(family, answer[pos + _RTATTR.size : pos + length])
        pos += (length + 3) & ~3
    return None
