"""connect-ip on the MASQUE endpoint (RFC 9484): whole IP packets from a client's TUN device.

One request (extended CONNECT, `:protocol = connect-ip`) is one client session. The edge
answers 200, assigns an address of each IP version from its pool (ADDRESS_ASSIGN; a client's
ADDRESS_REQUEST is honoured when the address is free) and advertises the prefixes policy lets
the identity reach (ROUTE_ADVERTISEMENT, sent again when the policy or the routes change).
Packets ride HTTP Datagrams with context id 0, or DATAGRAM capsules where datagrams do not fit.

Each packet from the client is checked as a router would: parsed (malformed, bad checksum and
fragments dropped and counted), its source must be the address assigned (else dropped and
counted), it must fit the MTU (else ICMP fragmentation needed / packet too big), go to an
advertised prefix (else ICMP administratively prohibited) and have TTL left (the edge is a
hop: TTL 1 gets time exceeded from the edge's own address, others go on with TTL - 1). Then
it joins its packet flow (ramp.flows.packet_flows), whose first packet opened a flow on the
edge's normal path (table, policy, hooks, router, audit):
- UDP: the payload goes to a tunnel UDP session, the answers come back as UDP packets built
  here (headers rebuilt, checksums right);
- TCP: upgraded to a kernel TCP socket (ramp.onramps.tcp_upgrade), then a stream flow;
- ICMP echo: the packet itself goes to the tunnel's connector (PACKET datagrams), and echo
  replies and ICMP errors come back to the client whose flow key they match.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections import deque
from typing import Any, Protocol

from ramp.flows.flow import (
    Destination,
    Flow,
    FlowError,
    FlowKind,
    FlowResult,
    FlowState,
    Identity,
)
from ramp.flows.ip_pool import AddressPool, PoolExhausted
from ramp.flows.packet_flows import (
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    FlowLimit,
    PacketFlow,
    PacketFlows,
    PacketKey,
    protocol_name,
)
from ramp.observe.loglimit import LogLimiter
from ramp.observe.packet_metrics import PacketMetrics
from ramp.onramps.tcp_upgrade import TcpUpgrade, reset
from ramp.quic.connect_udp import UdpStream
from ramp.quic.h3 import H3_MESSAGE_ERROR, H3Peer
from ramp.wire import connect_ip as cip
from ramp.wire import ip as wip
from ramp.wire import masque
from ramp.wire.tcp_reset import reset_for


class MasqueHost(Protocol):
    """What connect-ip needs of the MASQUE on-ramp serving it (ramp.onramps.masque)."""

    onramp: str
    opener: Any  # the edge's FlowPipeline
    options: Any  # MasqueOptions
    config: Any  # EdgeConfig

    def _bad(self, reason: str, peer: H3Peer | None = None) -> None: ...

    def _dropped(self, reason: str) -> None: ...


log = logging.getLogger("ramp.edge.connect_ip")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PENDING_PER_FLOW = 16  # packets held while a flow opens
EXPIRY_INTERVAL = 1.0
ICMP_ERROR_RATE = 100.0  # ICMP errors per second one session may get, after a burst of
ICMP_ERROR_BURST = 200
# what UdpStream.send_udp reserves in front of a packet: quarter stream id and context id (8),
# and the context id's own byte
DATAGRAM_HEADER = 9
MIN_MSS = {4: 536, 6: 1220}  # RFC 9293 and RFC 8200's minimums
# how a flow that could not open is answered (RFC 792 / 4443 words)
_FAILURE_ICMP = {
    FlowResult.NOT_PERMITTED: "admin_prohibited",
    FlowResult.REFUSED: "port_unreachable",
}


class ConnectIp:
    """The connect-ip service of one MASQUE on-ramp: pool, sessions, packet flows, upgrade."""

    def __init__(
        self,
        server: MasqueHost,
        pool: AddressPool,
        mtu: int,
        *,
        max_flows: int,
        udp_idle: float,
        packets: Any = None,  # ramp.tunnel.packets_edge.EdgePackets, for ICMP
        metrics: PacketMetrics | None = None,
    ) -> None:
        self.server = server
        self.opener = server.opener
        self.pool = pool
        self.mtu = mtu
        self.flows = PacketFlows(max_flows, udp_idle=udp_idle + 5.0)
        self.packets = packets
        self.metrics = metrics or PacketMetrics()
        # labels() takes a lock and a dict lookup: bound once, not per packet
        self.count_up = self.metrics.packets.labels("up").inc
        self.count_down = self.metrics.packets.labels("down").inc
        self.sessions: dict[IPAddress, IpSession] = {}
        self.all_sessions: set[IpSession] = set()
        self.upgrade: TcpUpgrade | None = None
        self._upgrade_failed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._log = LogLimiter()
        listeners = getattr(self.opener, "on_policy_change", None)
        if isinstance(listeners, list):
            listeners.append(self.readvertise)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(EXPIRY_INTERVAL, self._expire)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for sess in list(self.all_sessions):
            sess.end("edge shutting down")
        for task in list(self._tasks):
            task.cancel()
        if self.upgrade is not None:
            self.upgrade.close()
            self.upgrade = None
        listeners = getattr(self.opener, "on_policy_change", None)
        if isinstance(listeners, list) and self.readvertise in listeners:
            listeners.remove(self.readvertise)

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _expire(self) -> None:
        now = time.monotonic()
        for pf in self.flows.expire(now):
            self._finish(pf, FlowResult.OK, "idle" if pf.closing_since is None else "closed")
        self._count_flows()
        self._timer = asyncio.get_running_loop().call_later(EXPIRY_INTERVAL, self._expire)

    def _count_flows(self) -> None:
        counts = {"icmp": 0, "udp": 0, "tcp": 0}
        for pf in self.flows:
            counts[protocol_name(pf.key.proto)] = counts.get(protocol_name(pf.key.proto), 0) + 1
        for name, n in counts.items():
            self.metrics.flows.labels(name).set(n)

    def readvertise(self) -> None:
        """Policy, routes or identities changed: a revoked identity's sessions end (their
        addresses go back to the pool), the others learn their prefixes again."""
        revoked = getattr(self.opener, "revoked", set())
        memo: dict[Any, list[IPNetwork]] = {}
        for sess in list(self.all_sessions):
            if sess.identity.name in revoked:
                sess.finish("identity revoked")
            else:
                sess.advertise(memo)

    # -- counting -----------------------------------------------------------------------

    def drop(self, reason: str, peer: H3Peer | None = None, bad: bool = False) -> None:
        self.metrics.dropped.labels(reason).inc()
        if bad:
            self.server._bad(reason, peer)
        elif self._log.allow(reason):
            log.info("connect-ip packet dropped: %s", reason)

    # -- flows --------------------------------------------------------------------------

    def _finish(self, pf: PacketFlow, result: FlowResult, reason: str) -> None:
        """End a packet flow: its protocol's handle closed, the flow reported once."""
        self.flows.remove(pf.key)
        handle = pf.handle
        proto = pf.key.proto
        if proto == PROTO_UDP:
            if handle is not None:
                pf.handle = None
                handle.close()  # the session reports the flow
            else:
                task = pf.extra.get("task")
                if task is not None:
                    task.cancel()
            return
        if proto == PROTO_TCP:
            if self.upgrade is not None:
                self.upgrade.release(pf.key)
            task = pf.extra.get("task")
            if task is not None and not task.done():
                if pf.extra.get("relaying"):
                    pf.flow.fail(result, reason)
                task.cancel()
            return
        # ICMP: nothing to close; the flow is reported here
        task = pf.extra.get("task")
        if task is not None and not task.done():
            task.cancel()
            return
        if pf.extra.get("opened"):
            pf.flow.fail(result, reason)
            self.opener.flow_finished(pf.flow)

    def flow_for(self, sess: IpSession, key: PacketKey, now: float) -> PacketFlow | None:
        """A new packet flow, or None (counted) when the table is full."""
        flow = Flow(
            onramp=self.server.onramp,
            source=sess.source,
            destination=Destination(str(key.peer), key.dport if key.proto in (6, 17) else 0),
            identity=sess.identity,
            protocol=protocol_name(key.proto),
            vnet=self.server.options.vnet,
        )
        flow.annotations["packet_source"] = f"{key.client}:{key.sport}"
        try:
            return self.flows.add(key, flow, now)
        except FlowLimit:
            self.drop("flow_limit")
            return None

    # -- the TCP upgrade ----------------------------------------------------------------

    def tcp_upgrade(self) -> TcpUpgrade | None:
        if self.upgrade is None and not self._upgrade_failed:
            upgrade = TcpUpgrade(
                self.mtu,
                self._upgraded_to_client,
                self._upgraded_accept,
                bad=lambda reason: self.drop(reason),
            )
            try:
                upgrade.start()
            except OSError as e:
                self._upgrade_failed = True
                log.error("TCP over connect-ip is off: the upgrade namespace failed: %s", e)
                return None
            self.upgrade = upgrade
        return self.upgrade

    def _upgraded_to_client(self, key: PacketKey, packet: bytes) -> None:
        pf = self.flows.get(key)
        sess = self.sessions.get(key.client)
        if pf is None or sess is None:
            return
        pf.last_seen = time.monotonic()
        if len(packet) >= 34:
            version = packet[0] >> 4
            at = ((packet[0] & 0x0F) * 4 if version == 4 else 40) + 13
            if at < len(packet):
                pf.saw_tcp_flags(packet[at], False, pf.last_seen)
        sess.send_packet(packet)

    def _upgraded_accept(self, key: PacketKey, conn: socket.socket) -> None:
        pf = self.flows.get(key)
        waiter = pf.extra.get("accepted") if pf is not None else None
        if waiter is None or waiter.done():
            reset(conn)
            return
        waiter.set_result(conn)

    # -- ICMP from the tunnel ------------------------------------------------------------

    def packet_from_tunnel(self, tunnel_id: str, raw: bytes) -> bool:
        """A packet a connector sent back: delivered to the client whose flow it answers.
        False when it is not for one of this service's clients."""
        try:
            packet = wip.parse_packet(raw)
        except wip.PacketError as e:
            self.drop("tunnel_" + e.reason)
            return False
        sess = self.sessions.get(packet.dst)
        if sess is None:
            return False
        try:
            icmp = wip.parse_icmp(packet)
        except wip.PacketError as e:
            self.drop("tunnel_" + e.reason)
            return True
        if icmp.is_echo_reply:
            key = PacketKey(packet.proto, packet.dst, icmp.ident, packet.src, icmp.ident)
        elif icmp.is_error:
            quoted = wip.quoted_echo(icmp)
            if quoted is None or quoted[0].src != packet.dst:
                self.drop("icmp_unmatched")
                return True
            inner, echo = quoted
            key = PacketKey(packet.proto, packet.dst, echo.ident, inner.dst, echo.ident)
        else:
            self.drop("icmp_type")
            return True
        pf = self.flows.touch(key, time.monotonic())
        if pf is None:
            self.drop("no_flow")
            return True
        pf.flow.packets_down += 1
        pf.flow.bytes_down += len(raw)
        sess.send_packet(raw)
        return True


class IpSession(UdpStream):
    """One connect-ip request: the client's addresses, routes and packets."""

    def __init__(
        self,
        service: ConnectIp,
        peer: H3Peer,
        stream_id: int,
        identity: str,
        scope: masque.IpScope,
        source: tuple[str, int],
    ) -> None:
        server = service.server
        super().__init__(
            peer, stream_id, bad=lambda why: server._bad(why, peer), drop=server._dropped
        )
        self.service = service
        self.identity = Identity(identity)
        self.scope = scope
        self.source = source
        self.addresses: dict[int, IPAddress] = {}
        self.prefixes: list[IPNetwork] = []
        self._advertised: cip.RouteAdvertisement | None = None
        self._routes4: list[IPNetwork] = []
        self._routes6: list[IPNetwork] = []
        self._error_tokens = float(ICMP_ERROR_BURST)
        self._error_at = time.monotonic()

    # -- start and end ------------------------------------------------------------------

    def start(self) -> bool:
        """Assign addresses and answer; False (the request refused) when the pool is empty."""
        svc = self.service
        for version in (4, 6):
            if version not in svc.pool.networks:
                continue
            if self.scope.target is not None and self.scope.target.version != version:
                continue
            try:
                addr = svc.pool.take(version)
            except PoolExhausted:
                svc.drop("pool_exhausted")
                continue
            self.addresses[version] = addr
            svc.sessions[addr] = self
        if not self.addresses:
            return False
        svc.all_sessions.add(self)
        self._count()
        self.peer.send_headers(self.stream_id, [(b":status", b"200"), (b"capsule-protocol", b"?1")])
        self._assign(())
        self.advertise()
        log.info(
            "connect-ip session for %s from %s: %s",
            self.identity,
            self.source[0],
            ", ".join(str(a) for a in self.addresses.values()),
        )
        return True

    def _count(self) -> None:
        svc = self.service
        for version in (4, 6):
            svc.metrics.addresses.labels(str(version)).set(svc.pool.in_use(version))
        svc.metrics.sessions.set(len(svc.all_sessions))

    def end(self, why: str) -> None:
        if self.done:
            return
        self.done = True
        svc = self.service
        self.peer.forget(self.stream_id)
        for addr in self.addresses.values():
            if svc.sessions.get(addr) is self:
                del svc.sessions[addr]
            for pf in svc.flows.of_client(addr):
                svc._finish(pf, FlowResult.OK, "client session ended")
            svc.pool.give_back(addr)
        svc.all_sessions.discard(self)
        self._count()
        log.debug("connect-ip session %d from %s ended: %s", self.stream_id, self.source[0], why)

    def stream_ended(self) -> None:
        self.finish("client ended the request")

    def finish(self, why: str) -> None:
        """End the session from the edge's side too: FIN on the request stream."""
        if not self.done:
            self.peer.send_data(self.stream_id, b"", end_stream=True)
        self.end(why)

    def stream_broken(self, why: str) -> None:
        self.end(why)

    def reset(self, code: int) -> None:
        self.end("reset")

    def stop_sending(self, code: int) -> None:
        self.end("stop sending")

    def connection_lost(self) -> None:
        self.end("connection lost")

    # -- capsules -----------------------------------------------------------------------

    def _assign(self, answered: tuple[tuple[int, int], ...]) -> None:
        """Send the full set of assigned addresses; `answered` pairs (version, request id)."""
        ids = dict(answered)
        entries = [
            (ids.get(v, 0), v, ipaddress.ip_network(f"{a}/{a.max_prefixlen}"))
            for v, a in sorted(self.addresses.items())
        ]
        self.peer.send_data(self.stream_id, cip.encode_capsule(cip.AddressAssign(entries)))

    def advertise(self, memo: dict[Any, list[IPNetwork]] | None = None) -> None:
        """Send the prefixes this identity may reach, when they changed. `memo` shares the
        answers among the sessions of one re-advertisement (many sessions, few identities)."""
        if self.done:
            return
        ask = (self.identity.name, self.source[0], self.scope)
        prefixes = memo.get(ask) if memo is not None else None
        if prefixes is None:
            prefixes = self.service.opener.reachable(
                self.identity.name,
                self.source[0],
                onramp=self.service.server.onramp,
                vnet=self.service.server.options.vnet,
                scope=self.scope.target,
                ipproto=self.scope.ipproto,
            )
            if memo is not None:
                memo[ask] = prefixes
        prefixes = [p for p in prefixes if p.version in self.addresses]
        adv = cip.advertise(prefixes, self.scope.ipproto or cip.IP_PROTOCOL_ANY)
        if adv == self._advertised:
            return
        self._advertised = adv
        self.prefixes = prefixes
        self._routes4 = [p for p in prefixes if p.version == 4]
        self._routes6 = [p for p in prefixes if p.version == 6]
        self.peer.send_data(self.stream_id, cip.encode_capsule(adv))
        self.service.metrics.route_updates.inc()
        log.info(
            "connect-ip %s: routes %s",
            self.identity,
            ", ".join(str(p) for p in prefixes) or "(none)",
        )

    def capsule(self, capsule: masque.Capsule) -> bool:
        try:
            parsed = cip.parse_capsule(capsule.type, capsule.value)
        except cip.ConnectIpError as e:
            self.service.server._bad("malformed_capsule", self.peer)
            self.peer.reset_request(self.stream_id, H3_MESSAGE_ERROR)
            self.end(str(e))
            return True
        if parsed is None:
            return False
        if isinstance(parsed, cip.AddressRequest):
            self._address_request(parsed)
        # a client's own ADDRESS_ASSIGN or ROUTE_ADVERTISEMENT (routes behind it) are not used
        return True

    def _address_request(self, req: cip.AddressRequest) -> None:
        svc = self.service
        answered: list[tuple[int, int]] = []
        for entry in req.addresses:
            version = entry.ip_version
            if version not in self.addresses:
                continue
            wanted = entry.prefix.network_address
            current = self.addresses[version]
            if entry.prefix.prefixlen == entry.prefix.max_prefixlen and wanted != current:
                got = _take_exact(svc.pool, wanted)
                if got is not None:
                    svc.pool.give_back(current)
                    if svc.sessions.get(current) is self:
                        del svc.sessions[current]
                    for pf in svc.flows.of_client(current):
                        svc._finish(pf, FlowResult.OK, "address changed")
                    self.addresses[version] = got
                    svc.sessions[got] = self
            answered.append((version, entry.request_id))
        self._assign(tuple(answered))

    # -- packets ------------------------------------------------------------------------

    def send_packet(self, packet: bytes) -> None:
        if self.send_udp(packet):
            self.service.count_down()

    def icmp_error(self, packet: wip.Packet, kind: str, mtu: int | None = None) -> None:
        if not wip.error_allowed(packet):
            return
        # routers rate-limit the errors they send (RFC 1812 4.3.2.8, RFC 4443 2.4 (f))
        now = time.monotonic()
        self._error_tokens = min(
            ICMP_ERROR_BURST, self._error_tokens + (now - self._error_at) * ICMP_ERROR_RATE
        )
        self._error_at = now
        if self._error_tokens < 1:
            self.service.drop("icmp_error_rate")
            return
        self._error_tokens -= 1
        gateway = self.service.pool.gateway(packet.version)
        if gateway is None:
            return
        try:
            err = wip.build_icmp_error(packet.raw, gateway, kind, mtu)
        except (ValueError, wip.PacketError):
            return
        self.service.metrics.icmp_errors.labels(kind).inc()
        self.send_packet(err)

    def tcp_mss(self, version: int) -> int:
        """The MSS an upgraded TCP flow announces both ways: segments fit one DATAGRAM frame
        of this client's connection (when it takes datagrams) and the edge's MTU."""
        largest = self.service.mtu
        if self.peer.takes_datagrams():
            room = self.peer.datagram_limit() - DATAGRAM_HEADER
            if room > 0:
                largest = min(largest, room)
        headers = 40 if version == 4 else 60
        return max(largest - headers, MIN_MSS[version])

    def _advertised_to(self, dst: IPAddress) -> bool:
        return any(dst in net for net in (self._routes4 if dst.version == 4 else self._routes6))

    def udp_received(self, payload: bytes) -> None:
        """One IP packet from the client (context id 0)."""
        self.service.count_up()
        try:
            self._packet(payload)
        except Exception:  # a bug here must cost one packet, not the client's connection
            self.service.drop("internal_error")
            if self.service._log.allow("internal_error"):
                log.exception("connect-ip: a packet from %s failed", self.source[0])

    def _packet(self, payload: bytes) -> None:
        svc = self.service
        try:
            packet = wip.parse_packet(payload)
        except wip.PacketError as e:
            svc.drop(e.reason, self.peer, bad=True)
            return
        if self.addresses.get(packet.version) != packet.src:
            svc.drop("spoofed_source", self.peer, bad=True)
            return
        if len(payload) > svc.mtu:
            svc.drop("too_big")
            self.icmp_error(
                packet, "frag_needed" if packet.version == 4 else "packet_too_big", svc.mtu
            )
            return
        gateway = svc.pool.gateway(packet.version)
        if packet.dst == gateway:
            self._to_edge(packet)
            return
        if not self._advertised_to(packet.dst) or (
            self.scope.ipproto is not None and packet.proto != self.scope.ipproto
        ):
            svc.drop("not_advertised")
            self.icmp_error(packet, "admin_prohibited")
            return
        if packet.ttl <= 1:
            svc.drop("ttl_exceeded")
            self.icmp_error(packet, "time_exceeded")
            return
        proto = packet.proto
        try:
            if proto == PROTO_UDP:
                self._udp(packet)
            elif proto == PROTO_TCP:
                self._tcp(packet)
            elif proto == (PROTO_ICMP if packet.version == 4 else PROTO_ICMPV6):
                self._icmp(packet)
            else:
                svc.drop("protocol")
                self.icmp_error(packet, "admin_prohibited")
        except wip.PacketError as e:
            svc.drop(e.reason, self.peer, bad=True)

    def _to_edge(self, packet: wip.Packet) -> None:
        """A packet for the edge's own address: echo requests are answered, nothing else."""
        svc = self.service
        if packet.proto in (PROTO_ICMP, PROTO_ICMPV6):
            try:
                icmp = wip.parse_icmp(packet)
            except wip.PacketError as e:
                svc.drop(e.reason, self.peer, bad=True)
                return
            if icmp.is_echo_request:
                self.send_packet(
                    wip.build_echo(
                        packet.dst, packet.src, icmp.ident, icmp.seq, icmp.data, reply=True
                    )
                )
                return
        svc.drop("to_edge")
        if packet.proto == PROTO_UDP:
            self.icmp_error(packet, "port_unreachable")

    # -- UDP ----------------------------------------------------------------------------

    def _udp(self, packet: wip.Packet) -> None:
        svc = self.service
        udp = wip.parse_udp(packet)
        key = PacketKey(PROTO_UDP, packet.src, udp.sport, packet.dst, udp.dport)
        now = time.monotonic()
        pf = svc.flows.touch(key, now)
        if pf is None:
            pf = svc.flow_for(self, key, now)
            if pf is None:
                return
            pf.extra["pending"] = deque([udp.payload])
            pf.extra["task"] = svc.spawn(self._open_udp(pf, packet))
            return
        if pf.handle is not None and getattr(pf.handle, "finished", False):
            # the session ended under the flow (policy changed, the tunnel went): start over,
            # so the packet meets the current policy and route
            svc.flows.remove(key)
            pf.handle = None
            self._udp(packet)
            return
        if pf.handle is not None:
            pf.handle.send(udp.payload)
        else:
            pending: deque[bytes] = pf.extra["pending"]
            if len(pending) < PENDING_PER_FLOW:
                pending.append(udp.payload)
            else:
                svc.drop("not_yet_open")

    async def _open_udp(self, pf: PacketFlow, first: wip.Packet) -> None:
        svc = self.service
        key = pf.key

        def receive(payload: bytes) -> None:
            sess = svc.sessions.get(key.client)
            if sess is None:
                return
            pf.last_seen = time.monotonic()
            try:
                out = wip.build_udp(key.peer, key.client, key.dport, key.sport, payload, ttl=63)
            except ValueError:
                svc.drop("too_big_down")
                return
            sess.send_packet(out)

        def closed(reason: str) -> None:
            if svc.flows.get(key) is pf:
                svc.flows.remove(key)
            pf.handle = None

        try:
            session = await svc.opener.open_udp(pf.flow, receive, closed)
        except FlowError as e:
            svc.flows.remove(key)
            svc.drop("denied" if e.result is FlowResult.NOT_PERMITTED else "open_failed")
            self.icmp_error(first, _FAILURE_ICMP.get(e.result, "host_unreachable"))
            return
        except asyncio.CancelledError:
            return
        if pf.ended or self.done:
            session.close()
            return
        pf.handle = session
        pending: deque[bytes] = pf.extra.pop("pending")
        while pending:
            session.send(pending.popleft())

    # -- TCP ----------------------------------------------------------------------------

    def _tcp(self, packet: wip.Packet) -> None:
        svc = self.service
        tcp = wip.parse_tcp(packet)
        key = PacketKey(PROTO_TCP, packet.src, tcp.sport, packet.dst, tcp.dport)
        now = time.monotonic()
        pf = svc.flows.touch(key, now)
        if pf is None:
            if tcp.flags & (wip.Tcp.SYN | wip.Tcp.ACK | wip.Tcp.RST) != wip.Tcp.SYN:
                # not the start of a connection, and none we know (expired, or from before
                # a restart): reset, so the client's end fails now, not after its timeouts
                svc.drop("tcp_no_flow")
                rst = reset_for(packet)
                if rst is not None:
                    self.send_packet(rst)
                return
            upgrade = svc.tcp_upgrade()
            if upgrade is None:
                svc.drop("tcp_unavailable")
                self.icmp_error(packet, "admin_prohibited")
                return
            pf = svc.flow_for(self, key, now)
            if pf is None:
                return
            pf.extra["syn"] = packet
            pf.extra["task"] = svc.spawn(self._open_tcp(pf, upgrade))
            return
        pf.saw_tcp_flags(tcp.flags, True, now)
        if svc.upgrade is None or not svc.upgrade.from_client(key, packet):
            if tcp.flags & wip.Tcp.SYN:
                pf.extra["syn"] = packet  # a retransmitted SYN while the flow opens
            else:
                svc.drop("tcp_not_yet_open")
            return
        pf.flow.packets_up += 1

    async def _open_tcp(self, pf: PacketFlow, upgrade: TcpUpgrade) -> None:
        svc = self.service
        key = pf.key
        flow = pf.flow
        flow.kind = FlowKind.STREAM
        leg = None
        try:
            try:
                leg = await svc.opener.open_tcp(flow)
            except FlowError as e:
                svc.flows.remove(key)
                svc.drop("denied" if e.result is FlowResult.NOT_PERMITTED else "open_failed")
                self.icmp_error(pf.extra["syn"], _FAILURE_ICMP.get(e.result, "host_unreachable"))
                flow.fail(e.result, e.reason)
                svc.opener.flow_finished(flow)
                return
            if pf.ended or self.done:
                leg.abort()
                flow.fail(FlowResult.ERROR, "client gone")
                svc.opener.flow_finished(flow)
                return
            accepted: asyncio.Future[socket.socket] = asyncio.get_running_loop().create_future()
            pf.extra["accepted"] = accepted
            if not upgrade.admit(key, pf.extra["syn"], self.tcp_mss(key.client.version)):
                raise FlowError(FlowResult.BUSY, "no upgrade slot free")
            try:
                conn = await asyncio.wait_for(accepted, svc.server.config.connect_timeout)
            except TimeoutError:
                raise FlowError(
                    FlowResult.TIMEOUT, "the client never completed the handshake"
                ) from None
            pf.extra["relaying"] = True
            task = asyncio.current_task()

            def stop(result: FlowResult, reason: str) -> None:
                flow.fail(result, reason)
                if task is not None:
                    task.cancel()

            flow.stop = stop
            await leg.relay(conn)
            if flow.result is None:
                flow.result = FlowResult.OK
            leg = None
        except FlowError as e:
            flow.fail(e.result, e.reason)
        except asyncio.CancelledError:
            flow.fail(FlowResult.ERROR, flow.reason or "cancelled")
        except Exception as e:
            log.exception("connect-ip TCP flow %d failed", flow.id)
            flow.fail(FlowResult.ERROR, f"internal error: {e!r}")
        finally:
            if leg is not None:
                leg.abort()
        if flow.state is not FlowState.ENDED:
            svc.opener.flow_finished(flow)
        if not pf.ended and pf.closing_since is None:
            pf.closing_since = time.monotonic()  # the slot lingers for late segments

    # -- ICMP ---------------------------------------------------------------------------

    def _icmp(self, packet: wip.Packet) -> None:
        svc = self.service
        icmp = wip.parse_icmp(packet)
        if not icmp.is_echo_request:
            svc.drop("icmp_type", self.peer, bad=True)
            return
        if svc.packets is None:
            svc.drop("icmp_unavailable")
            self.icmp_error(packet, "admin_prohibited")
            return
        key = PacketKey(packet.proto, packet.src, icmp.ident, packet.dst, icmp.ident)
        now = time.monotonic()
        pf = svc.flows.touch(key, now)
        if pf is None:
            pf = svc.flow_for(self, key, now)
            if pf is None:
                return
            pf.extra["pending"] = deque([packet])
            pf.extra["task"] = svc.spawn(self._open_icmp(pf))
            return
        if pf.handle is None:
            pending: deque[wip.Packet] = pf.extra["pending"]
            if len(pending) < PENDING_PER_FLOW:
                pending.append(packet)
            return
        self._send_echo(pf, packet)

    def _send_echo(self, pf: PacketFlow, packet: wip.Packet) -> None:
        svc = self.service
        route = pf.handle
        out = wip.with_ttl(packet.raw, packet.ttl - 1)
        if svc.packets.send(route.tunnel_id, out, route.vnet):
            pf.flow.packets_up += 1
            pf.flow.bytes_up += len(out)
        else:
            pf.flow.drops += 1
            self.icmp_error(packet, "host_unreachable")

    async def _open_icmp(self, pf: PacketFlow) -> None:
        svc = self.service
        try:
            route = await svc.opener.open_packet(pf.flow)
        except FlowError as e:
            svc.flows.remove(pf.key)
            svc.drop("denied" if e.result is FlowResult.NOT_PERMITTED else "open_failed")
            for packet in pf.extra.pop("pending", ()):
                self.icmp_error(packet, _FAILURE_ICMP.get(e.result, "host_unreachable"))
                break
            return
        except asyncio.CancelledError:
            return
        pf.extra["opened"] = True
        if pf.ended or self.done:
            pf.flow.fail(FlowResult.OK, "client gone")
            svc.opener.flow_finished(pf.flow)
            return

        def stop(result: FlowResult, reason: str) -> None:
            svc._finish(pf, result, reason)

        pf.flow.stop = stop
        pf.handle = route
        for packet in pf.extra.pop("pending", ()):
            self._send_echo(pf, packet)


def _take_exact(pool: AddressPool, wanted: IPAddress) -> IPAddress | None:
    """`wanted` from the pool when it is free, else None (nothing taken)."""
    with contextlib.suppress(KeyError, PoolExhausted):
        got = pool.take(wanted.version, wanted)
        if got == wanted:
            return got
        pool.give_back(got)
    return None


__all__ = ["ConnectIp", "IpSession"]
