"""A UDP endpoint that answers from the address the client sent to.

A UDP socket bound to a wildcard address (0.0.0.0, ::) receives datagrams for every local
address, but a plain `sendto` lets the kernel pick the reply's source address from the route
to the client. On a host with several addresses that is often not the address the client
asked, and clients that check (dig, connected UDP sockets, QUIC) drop the reply. The fix is
the packet-info ancillary data: `IP_PKTINFO` / `IPV6_RECVPKTINFO` tell us on receive which
local address a datagram was for, and `IP_PKTINFO` / `IPV6_PKTINFO` on send make that address
the reply's source.

The socket is non-blocking and read with `loop.add_reader` (asyncio's datagram transports
cannot pass ancillary data); each wakeup drains a bounded number of datagrams so one busy
socket cannot starve the rest of the loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

from ramp.net.inherit import inherited, publish
from ramp.net.listen import sharing_ports
from ramp.net.sockopts import set_buffers

log = logging.getLogger(__name__)

# Linux values (include/uapi/linux/in.h, include/uapi/linux/in6.h), for Pythons that lack them
IP_PKTINFO: int = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO: int = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO: int = getattr(socket, "IPV6_PKTINFO", 50)

_IN_PKTINFO = struct.Struct("=i4s4s")  # ipi_ifindex, ipi_spec_dst, ipi_addr
_IN6_PKTINFO = struct.Struct("=16si")  # ipi6_addr, ipi6_ifindex
# Room for one packet-info message and some slack; a truncated control buffer is counted.
_ANCBUF = socket.CMSG_SPACE(_IN6_PKTINFO.size) + 64
DRAIN_BATCH = 64  # datagrams read per wakeup before yielding to the loop

Address = tuple[Any, ...]  # (host, port) or (host, port, flowinfo, scope_id)
OnDatagram = Callable[[bytes, Address, str], None]


class PktinfoEndpoint:
    """One UDP socket; `on_datagram(data, peer, local_ip)` gets every datagram, and
    `sendto(data, peer, local_ip)` replies from `local_ip`.

    When bound to a specific address, packet info is not needed: `local_ip` is that address.
    Errors never raise out of the receive path; they are counted in `errors` (by reason) and
    reported to `on_error` if given.
    """

    def __init__(
        self,
        *,
        name: str = "udp",
        buffer_size: int | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self.errors: collections.Counter[str] = collections.Counter()
        self._on_error = on_error
        self._buffer_size = buffer_size
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_datagram: OnDatagram | None = None
        self._max_size = 65535
        self._family = socket.AF_INET
        self._wildcard = False
        self._bound_ip = ""

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(
        self, host: str, port: int, on_datagram: OnDatagram, max_size: int = 65535
    ) -> None:
        """Bind host:port (port 0 picks one: see `port`) and start delivering datagrams."""
        loop = asyncio.get_running_loop()
        given = inherited().take(self.name, socket.SOCK_DGRAM, host, port)
        if given is not None:
            sock, family = given, given.family
        else:
            infos = await loop.getaddrinfo(
                host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
            )
            family, type_, proto, _, addr = infos[0]
            sock = socket.socket(family, type_, proto)
        try:
            if given is None:
                if sharing_ports():
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    # "::" means IPv6 only, as for the TCP listeners; dual stack is separate.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
            bound = sock.getsockname()[0]
            wildcard = ipaddress.ip_address(bound.split("%")[0]).is_unspecified
            if wildcard:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
                else:
                    sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            if self._buffer_size:
                set_buffers(sock, self._buffer_size)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        publish(self.name, sock)
        self._sock, self._loop, self._family = sock, loop, family
        self._wildcard, self._bound_ip = wildcard, bound
        self._on_datagram, self._max_size = on_datagram, max_size
        loop.add_reader(sock.fileno(), self._readable)
        log.debug("%s: UDP endpoint on %s (pktinfo %s)", self.name, self.address, wildcard)

    def pause(self) -> None:
        """Stop reading (another process reads the same socket now); sending still works."""
        if self._sock is not None and self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._sock.fileno())

    def close(self) -> None:
        if self._sock is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None

    @property
    def address(self) -> tuple[str, int]:
        if self._sock is None:
            raise RuntimeError("not open")
        name = self._sock.getsockname()
        return str(name[0]), int(name[1])

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def uses_pktinfo(self) -> bool:
        return self._wildcard

    # -- receive ------------------------------------------------------------------------------

    def _error(self, reason: str, detail: object = "") -> None:
        self.errors[reason] += 1
        log.debug("%s: %s %s", self.name, reason, detail)
        if self._on_error is not None:
            try:
                self._on_error(reason)
            except Exception:
                log.exception("%s: error hook failed", self.name)

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(DRAIN_BATCH):
            try:
                data, ancdata, flags, peer = sock.recvmsg(self._max_size, _ANCBUF)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # Pending ICMP errors and the like: the next datagram may be fine.
                self._error("recv_error", e)
                return
            if flags & socket.MSG_TRUNC:
                self._error("truncated", f"datagram from {peer} over {self._max_size} bytes")
                continue
            local_ip = self._local_ip(ancdata, flags)
            if local_ip is None:
                self._error("no_pktinfo", f"datagram from {peer}")
                continue
            assert self._on_datagram is not None
            try:
                self._on_datagram(data, peer, local_ip)
            except Exception:
                self.errors["callback_error"] += 1
                log.exception("%s: handling a datagram from %s failed", self.name, peer)
            if self._sock is None:  # the callback closed us
                return

    def _local_ip(self, ancdata: list[tuple[int, int, bytes]], flags: int) -> str | None:
        if not self._wildcard:
            return self._bound_ip
        for level, type_, payload in ancdata:
            if level == socket.IPPROTO_IP and type_ == IP_PKTINFO:
                if len(payload) < _IN_PKTINFO.size:
                    continue
                _, spec_dst, _ = _IN_PKTINFO.unpack_from(payload)
                # ipi_spec_dst is the header's destination for a local unicast datagram, and a
                # usable local address for a broadcast one: the right source for the reply.
                return socket.inet_ntop(socket.AF_INET, spec_dst)
            if level == socket.IPPROTO_IPV6 and type_ == IPV6_PKTINFO:
                if len(payload) < _IN6_PKTINFO.size:
                    continue
                addr, ifindex = _IN6_PKTINFO.unpack_from(payload)
                text = socket.inet_ntop(socket.AF_INET6, addr)
                if ipaddress.IPv6Address(text).is_link_local and ifindex:
                    # A link-local address means nothing without its interface.
                    return f"{text}%{ifindex}"
                return text
        if flags & socket.MSG_CTRUNC:
            self._error("control_truncated")
        return None

    # -- send ---------------------------------------------------------------------------------

    def sendto(self, data: bytes, addr: Address, local_ip: str | None = None) -> bool:
        """Send one datagram to `addr` from `local_ip` (as passed to `on_datagram`).

        Never blocks and never raises OSError: a full send buffer or a send error is counted
        and the datagram dropped (UDP's contract). Returns whether it was sent.
        """
        sock = self._sock
        if sock is None:
            self._error("send_closed")
            return False
        try:
            if self._wildcard and local_ip:
                sock.sendmsg([data], self._pktinfo_cmsg(local_ip), 0, addr)
            else:
                sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            self._error("send_buffer_full", f"to {addr}")
            return False
        except (OSError, ValueError) as e:
            self._error("send_error", f"to {addr}: {e}")
            return False
        return True

    def _pktinfo_cmsg(self, local_ip: str) -> list[tuple[int, int, bytes]]:
        if self._family == socket.AF_INET6:
            host, _, scope = local_ip.partition("%")
            ifindex = int(scope) if scope.isdigit() else 0
            payload = _IN6_PKTINFO.pack(socket.inet_pton(socket.AF_INET6, host), ifindex)
            return [(socket.IPPROTO_IPV6, IPV6_PKTINFO, payload)]
        # ifindex 0: the route to the client picks the interface, only the source is fixed.
        spec_dst = socket.inet_pton(socket.AF_INET, local_ip)
        return [(socket.IPPROTO_IP, IP_PKTINFO, _IN_PKTINFO.pack(0, spec_dst, bytes(4)))]


__all__ = ["IPV6_PKTINFO", "IPV6_RECVPKTINFO", "IP_PKTINFO", "PktinfoEndpoint"]
