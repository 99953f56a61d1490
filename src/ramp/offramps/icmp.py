"""ICMP echo at the connector: client echo requests out to private hosts, replies and the
errors routers send back as packets for the client (see reference
icmp-ping-traceroute-through-tunnel.txt, and how this improves on it below).

- Only echo requests go out and only echo replies and the errors about them come back; every
  other packet is dropped and counted by reason.
- The connector counts as a hop: a request arriving with TTL 1 is answered with time exceeded
  from the connector's own address (toward that destination); others go out with TTL - 1, set
  on the socket per send, so traceroute's probes expire at the routers inside the private
  network. Their time-exceeded (and unreachable) errors come back through the error queue
  (ping sockets) or the raw socket, and go to the client as errors from those routers, quoting
  the client's own request, so traceroute and mtr show the private hops.
- Replies keep the TTL they arrived with (IP_RECVTTL / IPV6_RECVHOPLIMIT).
- One ping socket per flow (`ramp.flows.echo_nat`), closed after `idle_timeout`; where ping
  sockets are not permitted, one raw socket per address family (CAP_NET_RAW) and echo ids the
  table picks.

All sockets sit in one epoll set whose descriptor the event loop watches: a socket with a
queued error reports EPOLLERR, which libuv (uvloop) treats as a dead descriptor, while the
epoll descriptor itself only ever becomes readable.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import select
import socket
import struct
from collections.abc import Callable
from typing import Any, Protocol

from ramp.flows.echo_nat import EchoFlow, EchoTable, TableFull
from ramp.net import ping
from ramp.observe.loglimit import LogLimiter
from ramp.wire import ip
from ramp.wire.tunnel import ProtocolError, encode_packet_datagram, parse_packet_datagram

log = logging.getLogger("ramp.connector.icmp")

DEFAULT_IDLE_TIMEOUT = 10.0
READ_BATCH = 64  # datagrams read from one socket per wake-up, so one flow cannot starve others
MAX_ICMP = 65535

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# ICMP error types worth passing back to the client, per version; the rest are dropped.
_V4_ERRORS = (ip.ICMP_DEST_UNREACHABLE, ip.ICMP_TIME_EXCEEDED, ip.ICMP_PARAMETER_PROBLEM)
_V6_ERRORS = (
    ip.ICMPV6_DEST_UNREACHABLE,
    ip.ICMPV6_PACKET_TOO_BIG,
    ip.ICMPV6_TIME_EXCEEDED,
    ip.ICMPV6_PARAMETER_PROBLEM,
)


class PacketLink(Protocol):
    """A tunnel connection to an edge (ConnectorConnection)."""

    @property
    def edge_id(self) -> str: ...

    @property
    def closed(self) -> bool: ...

    def send_datagram(self, data: bytes) -> bool: ...


def _family(version: int) -> int:
    return socket.AF_INET if version == 4 else socket.AF_INET6


def _echo_request(ident: int, seq: int, data: bytes, version: int) -> bytes:
    """An echo request's ICMP message (no IP header) with its checksum; ICMPv6 sockets fill in
    theirs (the pseudo header is the kernel's to know), ping sockets both."""
    icmp_type = ip.ICMP_ECHO_REQUEST if version == 4 else ip.ICMPV6_ECHO_REQUEST
    body = bytearray(struct.pack("!BBHHH", icmp_type, 0, 0, ident, seq) + data)
    if version == 4:
        body[2:4] = ip.checksum(body).to_bytes(2, "big")
    return bytes(body)


class ConnectorIcmp:
    """The connector's sink for PACKET datagrams (set as `TunnelClient.packets`)."""

    def __init__(
        self,
        *,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        limit: int = 4096,
        metrics_packet: Callable[[str], None] = lambda what: None,
        metrics_drop: Callable[[str], None] = lambda reason: None,
        metrics_active: Callable[[int], None] = lambda n: None,
        metrics_mode: Callable[[str, str], None] = lambda family, mode: None,
        bad_input: Callable[[str], None] = lambda reason: None,
        on_end: Callable[[EchoFlow, float, str], None] = lambda flow, now, reason: None,
        modes: dict[int, str] | None = None,
    ) -> None:
        self.table = EchoTable(limit, idle_timeout)
        self._metrics_packet = metrics_packet
        self.metrics_drop = metrics_drop
        self._metrics_active = metrics_active
        self._metrics_mode = metrics_mode
        self._bad_input = bad_input
        self._on_end = on_end  # a finished flow, the loop time and why, for the audit
        self._forced = modes
        self.capabilities: dict[int, ping.Capability] = {}
        self._raw: dict[int, socket.socket] = {}
        self._by_fd: dict[int, tuple[socket.socket, EchoFlow | None, int]] = {}
        self._epoll: Any = None
        self._own: dict[IPAddress, IPAddress | None] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._log = LogLimiter()

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Find out which sockets may be used, say so, and start reading."""
        self._epoll = select.epoll()
        loop = asyncio.get_running_loop()
        loop.add_reader(self._epoll.fileno(), self._ready)
        for family in (socket.AF_INET, socket.AF_INET6):
            cap = ping.probe(family)
            if self._forced and family in self._forced:
                cap = ping.Capability(family, self._forced[family], "set by configuration")
            self.capabilities[family] = cap
            name = "ipv4" if family == socket.AF_INET else "ipv6"
            self._metrics_mode(name, cap.mode)
            if cap.mode == ping.RAW_SOCKET:
                sock = ping.open_raw_socket(family)
                self._raw[family] = sock
                self._watch(sock, None, family)
                log.warning("ICMP (%s): %s", name, cap.why)
            elif cap.mode == ping.NO_SOCKET:
                log.warning("ICMP (%s) through this connector is off: %s", name, cap.why)
            else:
                log.info("ICMP (%s): ping sockets", name)
        self._sweeper = asyncio.ensure_future(self._sweep())

    def status(self) -> dict[str, str]:
        """For /ready: the echo socket kind per address family, and why when not ping sockets."""
        out = {}
        for family, cap in self.capabilities.items():
            name = "ipv4" if family == socket.AF_INET else "ipv6"
            out[name] = cap.mode if not cap.why else f"{cap.mode}: {cap.why}"
        return out

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for flow in self.table.flows():
            self._end(flow, "connector shutting down")
        for sock in self._raw.values():
            self._unwatch(sock)
            sock.close()
        self._raw.clear()
        if self._epoll is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None

    def _watch(self, sock: socket.socket, flow: EchoFlow | None, family: int) -> None:
        self._by_fd[sock.fileno()] = (sock, flow, family)
        self._epoll.register(sock.fileno(), select.EPOLLIN)

    def _unwatch(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if fd >= 0 and self._by_fd.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.2, self.table.idle_timeout / 4))
            for flow in self.table.expire(loop.time()):
                self._end(flow, "idle timeout")

    def _end(self, flow: EchoFlow, reason: str) -> None:
        self.table.remove(flow)
        if flow.sock is not None:
            self._unwatch(flow.sock)
            flow.sock.close()
            flow.sock = None
        self._metrics_active(len(self.table))
        try:
            self._on_end(flow, asyncio.get_running_loop().time(), reason)
        except Exception:
            log.exception("reporting the end of an ICMP flow failed")

    # --- from the edge ---------------------------------------------------------------------

    def datagram(self, conn: PacketLink, data: bytes) -> None:
        """A PACKET datagram from an edge."""
        try:
            got = parse_packet_datagram(data)
        except ProtocolError as e:
            self._bad_input(str(e))
            return
        self.handle(conn, got.vnet, got.packet)

    def _drop(self, reason: str, detail: str = "") -> None:
        self.metrics_drop(reason)
        if detail and self._log.allow(reason):
            log.info("ICMP packet dropped (%s): %s", reason, detail)

    def handle(self, conn: PacketLink, vnet: str, raw: bytes) -> None:
        try:
            packet = ip.parse_packet(raw)
            icmp = ip.parse_icmp(packet)
        except ip.PacketError as e:
            self._drop(e.reason, str(e))
            return
        if not icmp.is_echo_request:
            self._drop("not_echo_request", f"ICMP type {icmp.type} code {icmp.code}")
            return
        family = _family(packet.version)
        cap = self.capabilities.get(family)
        if cap is None or cap.mode == ping.NO_SOCKET:
            self._drop("no_icmp_socket", cap.why if cap else "not started")
            return
        if packet.ttl <= 1:
            self._time_exceeded_here(conn, vnet, packet)
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        key = (conn.edge_id, vnet, packet.src, packet.dst, icmp.ident)
        flow = self.table.get(key)
        if flow is None:
            flow = self._open(key, family, now)
            if flow is None:
                return
        flow.link = conn
        flow.last_active = now
        ttl = packet.ttl - 1
        sock = flow.sock if flow.sock is not None else self._raw[family]
        df = packet.version == 4 and bool(packet.header[6] & 0x40)
        try:
            if flow.sock is None or flow.last_ttl != ttl:
                ping.set_ttl(sock, family, ttl)
                flow.last_ttl = ttl
            if packet.version == 4 and (flow.sock is None or flow.extra.get("df") != df):
                ping.set_dont_fragment(sock, df)
                flow.extra["df"] = df
            message = _echo_request(flow.local_ident, icmp.seq, icmp.data, packet.version)
            sock.sendto(message, (str(packet.dst), 0))
        except OSError as e:
            if e.errno == errno.EMSGSIZE:
                self._too_big_here(conn, vnet, packet)
            else:
                self._drop("send_failed", f"echo to {packet.dst}: {e.strerror}")
            return
        flow.packets_up += 1
        self._metrics_packet("to_origin")

    def _open(self, key: tuple[Any, ...], family: int, now: float) -> EchoFlow | None:
        dst = key[3]
        try:
            if self._raw.get(family) is not None:
                return self._added(self.table.add(key, self.table.free_ident(dst), now))  # type: ignore[arg-type]
            sock = ping.open_ping_socket(family)
        except TableFull as e:
            self._drop("too_many_flows", str(e))
            return None
        except OSError as e:
            self._drop("socket_failed", f"ping socket: {e.strerror}")
            return None
        try:
            flow = self.table.add(key, sock.getsockname()[1], now)  # type: ignore[arg-type]
        except TableFull as e:
            sock.close()
            self._drop("too_many_flows", str(e))
            return None
        flow.sock = sock
        self._watch(sock, flow, family)
        return self._added(flow)

    def _added(self, flow: EchoFlow) -> EchoFlow:
        self._metrics_active(len(self.table))
        return flow

    def _own_address(self, toward: IPAddress) -> IPAddress | None:
        if toward not in self._own:
            if len(self._own) > 1024:
                self._own.clear()
            self._own[toward] = ping.source_address_for(toward)
        return self._own[toward]

    def _time_exceeded_here(self, conn: PacketLink, vnet: str, packet: ip.Packet) -> None:
        own = self._own_address(packet.dst)
        if own is None or not ip.error_allowed(packet):
            self._drop("ttl_expired", f"TTL 1 toward {packet.dst}")
            return
        self._send_back(conn, vnet, ip.build_icmp_error(packet.raw, own, "time_exceeded"))
        self._metrics_packet("time_exceeded_here")

    def _too_big_here(self, conn: PacketLink, vnet: str, packet: ip.Packet) -> None:
        """The request (DF set) exceeds the path MTU this host knows: answer as a router
        would, "fragmentation needed" / "packet too big" with that MTU (RFC 1191, 8201)."""
        mtu = ping.path_mtu(packet.dst)
        own = self._own_address(packet.dst)
        if mtu is None or own is None or not ip.error_allowed(packet):
            self._drop("too_big", f"echo of {len(packet.raw)} bytes to {packet.dst}")
            return
        self._send_back(conn, vnet, ip.build_icmp_error(packet.raw, own, "frag_needed", mtu=mtu))
        self._metrics_packet("too_big_here")

    def _send_back(self, conn: PacketLink | None, vnet: str, packet: bytes) -> None:
        if conn is None or conn.closed:
            self._drop("connection_closed")
            return
        conn.send_datagram(encode_packet_datagram(packet, vnet))

    # --- from the origins ------------------------------------------------------------------

    def _ready(self) -> None:
        try:
            self._ready_sockets()
        except Exception:  # a bug here must not stop every ICMP flow: count, log, carry on
            self.metrics_drop("internal_error")
            if self._log.allow("internal_error"):
                log.exception("reading ICMP sockets failed")

    def _ready_sockets(self) -> None:
        if self._epoll is None:
            return
        for fd, events in self._epoll.poll(0):
            entry = self._by_fd.get(fd)
            if entry is None:
                continue
            sock, flow, family = entry
            if events & select.EPOLLERR and flow is not None:
                self._read_errors(sock, flow, family)
            if events & select.EPOLLIN:
                if flow is None:
                    self._read_raw(sock, family)
                else:
                    self._read_ping(sock, flow, family)

    def _read_ping(self, sock: socket.socket, flow: EchoFlow, family: int) -> None:
        for _ in range(READ_BATCH):
            try:
                data, ancdata, _, _ = sock.recvmsg(MAX_ICMP, ping.CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._read_errors(sock, flow, family)
                continue
            self._reply(flow, data, ping.received_ttl(ancdata), family)

    def _reply(self, flow: EchoFlow, message: bytes, ttl: int | None, family: int) -> None:
        """An echo reply's ICMP message for `flow`: to the client with its own echo id."""
        if len(message) < ip.ICMP_HEADER:
            self._drop("truncated")
            return
        icmp_type, _, _, _, seq = struct.unpack_from("!BBHHH", message)
        want = ip.ICMP_ECHO_REPLY if family == socket.AF_INET else ip.ICMPV6_ECHO_REPLY
        if icmp_type != want:
            self._drop("not_echo_reply")
            return
        flow.packets_down += 1
        packet = ip.build_echo(
            flow.destination,
            flow.source,
            flow.client_ident,
            seq,
            message[ip.ICMP_HEADER :],
            True,
            ttl=ttl if ttl is not None else 64,
        )
        self._send_back(flow.link, flow.vnet, packet)
        self._metrics_packet("from_origin")

    def _read_errors(self, sock: socket.socket, flow: EchoFlow, family: int) -> None:
        for _ in range(READ_BATCH):
            try:
                data, ancdata, _, _ = sock.recvmsg(MAX_ICMP, ping.CMSG_SPACE, ping.MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            err = ping.parse_queued_error(ancdata)
            if err is None or len(data) < ip.ICMP_HEADER:
                continue  # a local error (EMSGSIZE): the failed send answered it already
            seq = struct.unpack_from("!H", data, 6)[0]
            self._router_error(flow, err.offender, err.icmp_type, err.code, err.info, seq, data)

    def _router_error(
        self,
        flow: EchoFlow,
        router: IPAddress,
        icmp_type: int,
        code: int,
        info: int,
        seq: int,
        sent: bytes,
    ) -> None:
        """A router's ICMP error about one of `flow`'s requests: the same error from the same
        router to the client, quoting the client's request as the client sent it."""
        errors = _V4_ERRORS if flow.destination.version == 4 else _V6_ERRORS
        if icmp_type not in errors or router.version != flow.destination.version:
            self._drop("not_echo_error")
            return
        original = ip.build_echo(
            flow.source,
            flow.destination,
            flow.client_ident,
            seq,
            sent[ip.ICMP_HEADER :],
            False,
            ttl=1 if icmp_type in (ip.ICMP_TIME_EXCEEDED, ip.ICMPV6_TIME_EXCEEDED) else 64,
        )
        rest = 0
        if (flow.destination.version, icmp_type, code) == (4, ip.ICMP_DEST_UNREACHABLE, 4):
            rest = info & 0xFFFF  # the next-hop MTU
        elif (flow.destination.version, icmp_type) == (6, ip.ICMPV6_PACKET_TOO_BIG):
            rest = info
        flow.errors += 1
        error = ip.build_icmp_error_typed(original, router, icmp_type, code, rest)
        self._send_back(flow.link, flow.vnet, error)
        self._metrics_packet("error_from_router")

    def _read_raw(self, sock: socket.socket, family: int) -> None:
        for _ in range(READ_BATCH):
            try:
                data, ancdata, _, addr = sock.recvmsg(MAX_ICMP, ping.CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if family == socket.AF_INET:
                self._raw_v4(data)
            else:
                self._raw_v6(data, ipaddress.IPv6Address(addr[0].split("%")[0]), ancdata)

    def _raw_v4(self, data: bytes) -> None:
        try:
            packet = ip.parse_packet(data)
            icmp = ip.parse_icmp(packet)
        except ip.PacketError:
            return  # a raw socket sees all ICMP of the host: not ours to count
        self._raw_message(packet.src, icmp, packet.ttl)

    def _raw_v6(self, data: bytes, src: ipaddress.IPv6Address, ancdata: Any) -> None:
        if len(data) < ip.ICMP_HEADER:
            return
        icmp_type, code, _, ident, seq = struct.unpack_from("!BBHHH", data)
        icmp = ip.Icmp(6, icmp_type, code, ident, seq, data[ip.ICMP_HEADER :])
        self._raw_message(src, icmp, ping.received_ttl(ancdata))

    def _raw_message(self, src: IPAddress, icmp: ip.Icmp, ttl: int | None) -> None:
        family = _family(icmp.version)
        if icmp.is_echo_reply:
            flow = self.table.by_reply(src, icmp.ident)
            if flow is not None:
                message = struct.pack("!BBHHH", icmp.type, 0, 0, 0, icmp.seq) + icmp.data
                self._reply(flow, message, ttl, family)
            return
        if not icmp.is_error:
            return
        quoted = ip.quoted_echo(icmp)
        if quoted is None:
            return
        qpacket, qicmp = quoted
        flow = self.table.by_reply(qpacket.dst, qicmp.ident)
        if flow is None:
            return
        sent = struct.pack("!BBHHH", qicmp.type, 0, 0, qicmp.ident, qicmp.seq) + qicmp.data
        rest = (icmp.ident << 16) | icmp.seq
        self._router_error(flow, src, icmp.type, icmp.code, rest, qicmp.seq, sent)
