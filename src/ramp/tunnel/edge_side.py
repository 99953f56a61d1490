"""The edge's end of the tunnel: accepts connector connections, registers them, and keeps
the registry of which live connections serve which tunnel."""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection

from ramp.net.reuseport import SteeringGroup
from ramp.observe.loglimit import LogLimiter
from ramp.quic import endpoint
from ramp.quic.admission import DEFAULT_LIMITS, HandshakeLimits
from ramp.tunnel import control_state as cs
from ramp.tunnel.bridge import StreamBridge
from ramp.tunnel.control import ControlStream, carry_out_shared
from ramp.tunnel.control_state import REGISTRATION_TIMEOUT, EdgeControl, Verdict
from ramp.tunnel.interfaces import STALE_AFTER, EdgeDatagramSink
from ramp.tunnel.packets_edge import EdgePackets
from ramp.wire.tunnel import (
    ALPN,
    CAP_REDIAL,
    CAP_SUCCESSOR,
    PROTOCOL_VERSION,
    CloseCode,
    Register,
    capabilities,
    is_packet_datagram,
)

log = logging.getLogger("ramp.edge.tunnel")

REFUSAL_LOG_BURST = 5  # log lines about refused registrations, per source, reason and period
REFUSAL_LOG_PERIOD = 10.0


class EdgeConnection(endpoint.TunnelConnection):
    """One connector connection at the edge: the I/O face of an EdgeControl machine."""

    def __init__(self, quic: QuicConnection, stream_handler: Any = None, *, edge: TunnelEdge):
        super().__init__(quic)
        self.edge = edge
        self.machine = EdgeControl(edge.check, edge.edge_id)
        self.control: ControlStream | None = None
        self.registered = False
        self.draining = False
        self.tunnel_id = ""
        self.tunnel_name = ""
        self.connector_id = ""
        self.conn_index = 0
        self.bridges: dict[int, StreamBridge] = {}
        self.sessions: dict[int, Any] = {}  # UDP sessions riding this connection, by id
        self.ip_packets = False  # its connector takes PACKET datagrams (said at registration)
        self.follows_successor = False  # it answers SUCCESSOR by dialling the successor
        self.redials = False  # it answers REDIAL by moving the connection
        self.redial_asked = False
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def handshake_done(self, alpn: str | None) -> None:
        self._run(self.machine.handshake_done(alpn, self.loop.time()))

    def peer_stream_opened(self, stream_id: int) -> endpoint.StreamHandler | None:
        if not self.machine.peer_stream(stream_id):
            return None
        self.control = ControlStream(stream_id, self.machine, self._run, self.loop.time)
        return self.control

    def terminated(self, error_code: int, reason: str) -> None:
        self._run(self.machine.connection_lost())
        if self.registered:
            log.info(
                "connector %s conn %d (tunnel %s) disconnected: %s",
                self.connector_id[:8],
                self.conn_index,
                self.tunnel_name,
                reason or error_code,
            )
        self.edge.remove(self)
        self.bridges.clear()  # their streams were told through their handlers
        if self.edge.sessions is not None:
            self.edge.sessions.connection_lost(self)

    def tunnel_datagram(self, data: bytes) -> None:
        if self.registered and self.edge.packets is not None and is_packet_datagram(data):
            self.edge.packets.connection_datagram(self, data)
        elif self.registered and self.edge.sessions is not None:
            self.edge.sessions.connection_datagram(self, data)
        else:
            self.edge.on_drop("datagram_before_registration")

    def datagram_dropped(self, reason: str) -> None:
        if self.edge.sessions is not None:
            self.edge.sessions.metrics_drop(reason)

    def send_window(self, stream_id: int, increment: int) -> None:
        if self.control is not None and not self.closed:
            self._run(self.machine.window(stream_id, increment))

    def stream_credit(self) -> None:
        self.edge.slots_changed(self)

    # -- carrying out the machine's actions ---------------------------------------------------

    def announce_successor(self, edge_id: str) -> None:
        self._run(self.machine.announce_successor(edge_id))

    @property
    def takes_flows(self) -> bool:
        """Registered and neither draining nor closed: new flows may use it."""
        return not self.draining and not self.closed

    def ask_redial(self, initial_cid: bytes) -> None:
        self.redial_asked = True
        self._run(self.machine.ask_redial(initial_cid))

    def _timer(self, name: str) -> None:
        self._timers.pop(name, None)
        self._run(self.machine.timer(name, self.loop.time()))

    def _run(self, actions: list[cs.ControlAction]) -> None:
        for a in actions:
            if carry_out_shared(self, a):
                continue
            if isinstance(a, cs.SetTimer):
                old = self._timers.pop(a.name, None)
                if old is not None:
                    old.cancel()
                self._timers[a.name] = self.loop.call_at(a.at, self._timer, a.name)
            elif isinstance(a, cs.CancelTimer):
                timer = self._timers.pop(a.name, None)
                if timer is not None:
                    timer.cancel()
            elif isinstance(a, cs.ControlError):
                log.warning("tunnel connection %s: %s", self.peer, a.message)
                self.edge.on_drop("protocol_error")
            elif isinstance(a, cs.Refused):
                self.edge.refused(self, a.reason, a.message)
            elif isinstance(a, cs.Accepted):
                self._accepted(a.frame, a.tunnel_name)
            elif isinstance(a, cs.Draining):
                self.draining = True
                log.info(
                    "connector %s conn %d (tunnel %s) is draining",
                    self.connector_id[:8],
                    self.conn_index,
                    self.tunnel_name,
                )
                self.edge.changed()
                self.edge.slots_changed(self)
                if self.edge.sessions is not None:  # UDP sessions move before it goes
                    self.edge.sessions.connection_draining(self)

    def _accepted(self, frame: Register, tunnel_name: str) -> None:
        self.registered = True
        self.tunnel_id = str(frame.tunnel_id)
        self.tunnel_name = tunnel_name
        self.connector_id = str(frame.connector_id)
        self.conn_index = frame.conn_index
        caps = capabilities(frame.client_info)
        self.follows_successor = CAP_SUCCESSOR in caps
        self.redials = CAP_REDIAL in caps
        if self.edge.packets is not None:
            self.ip_packets = self.edge.packets.connection_registered(self, frame.client_info)
        self.edge.add(self)
        log.info(
            "registered connector %s conn %d for tunnel %s from %s (%s)",
            self.connector_id[:8],
            self.conn_index,
            self.tunnel_name,
            self.peer,
            frame.client_info or "-",
        )


@dataclass(slots=True)
class _TunnelConns:
    conns: list[EdgeConnection] = field(default_factory=list)
    next: int = 0


class TunnelEdge:
    """Accepts connectors on the tunnel listener and tracks their registered connections."""

    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        check: Callable[[Register], Verdict],
        on_drop: Callable[[str], None],
        on_refused: Callable[[str, str, str], None],
        on_change: Callable[[], None],
        on_handshake_event: Callable[[str], None] = lambda event: None,
        limits: HandshakeLimits = DEFAULT_LIMITS,
        max_streams_bidi: int = endpoint.DEFAULT_MAX_STREAMS,
    ) -> None:
        self.configuration = configuration
        self.max_streams_bidi = max_streams_bidi
        self.limits = limits
        self._on_handshake_event = on_handshake_event
        # a client retrying a wrong secret as fast as it can must not flood the log: a few
        # lines per source and reason, and a few in all for many sources (the counter counts
        # every one)
        self._refusal_log = LogLimiter(burst=REFUSAL_LOG_BURST, period=REFUSAL_LOG_PERIOD)
        self._refusal_log_all = LogLimiter(burst=4 * REFUSAL_LOG_BURST, period=REFUSAL_LOG_PERIOD)
        self.check = check
        self.on_drop = on_drop
        self._on_refused = on_refused
        self._on_change = on_change
        self.edge_id = f"{socket.gethostname()}/{uuid.uuid4().hex[:8]}"
        self.tunnels: dict[str, _TunnelConns] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.server: endpoint.TunnelServer | None = None
        self.sessions: EdgeDatagramSink | None = None  # EdgeSessions, set by the edge
        self.packets: EdgePackets | None = None  # the IP packet path's tunnel end, set by the edge
        # told when a connection's stream slots may have changed: its peer raised MAX_STREAMS,
        # it joined, drained or left (the tunnel off-ramp's waiting flows)
        self.on_slots: Callable[[EdgeConnection], None] | None = None

    async def start(
        self, host: str, port: int, steering: tuple[SteeringGroup, int] | None = None
    ) -> None:
        self.transport, self.server = await endpoint.serve(
            host,
            port,
            configuration=self.configuration,
            create_protocol=lambda quic, **kw: EdgeConnection(quic, edge=self),
            on_drop=self.on_drop,
            on_event=self._on_handshake_event,
            limits=self.limits,
            max_streams_bidi=self.max_streams_bidi,
            steering=steering,
        )

    @property
    def port(self) -> int:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[1]

    def refused(self, conn: EdgeConnection, reason: str, message: str) -> None:
        self._on_refused(reason, conn.peer, message)
        if self.server is not None and conn.peer_addr:
            self.server.registration_refused(conn.peer_addr)
        source = conn.peer_addr[0] if conn.peer_addr else "?"
        if self._refusal_log.allow((source, reason)) and self._refusal_log_all.allow(None):
            left_out = self._refusal_log.suppressed + self._refusal_log_all.suppressed
            log.warning(
                "refused tunnel registration from %s: %s (%s)%s",
                conn.peer,
                reason,
                message,
                f"; {left_out} such lines left out so far" if left_out else "",
            )

    def changed(self) -> None:
        self._on_change()

    def slots_changed(self, conn: EdgeConnection) -> None:
        if self.on_slots is not None:
            self.on_slots(conn)

    def add(self, conn: EdgeConnection) -> None:
        self.tunnels.setdefault(conn.tunnel_id, _TunnelConns()).conns.append(conn)
        conn.watch_stream_credit = True
        self._on_change()
        self.slots_changed(conn)

    def remove(self, conn: EdgeConnection) -> None:
        entry = self.tunnels.get(conn.tunnel_id)
        if entry is not None and conn in entry.conns:
            entry.conns.remove(conn)
            if not entry.conns:
                del self.tunnels[conn.tunnel_id]
            self._on_change()
            self.slots_changed(conn)

    def candidates(self, tunnel_id: str) -> list[EdgeConnection]:
        """Live connections for a tunnel in the order a new flow should try them: round robin,
        so flows spread over connections and connector replicas; fresh ones first."""
        entry = self.tunnels.get(tunnel_id)
        if entry is None:
            return []
        conns = [c for c in entry.conns if c.takes_flows]
        if not conns:
            return []
        start = entry.next % len(conns)
        entry.next += 1
        ordered = conns[start:] + conns[:start]
        now = asyncio.get_running_loop().time()
        return sorted(ordered, key=lambda c: now - c.last_rx > STALE_AFTER)

    def serving(self, tunnel_id: str, replica: str | None = None) -> bool:
        """Whether a live, not draining connection serves the tunnel (and replica, if given);
        unlike candidates() it leaves the round robin alone."""
        entry = self.tunnels.get(tunnel_id)
        return entry is not None and any(
            c.takes_flows and (replica is None or c.connector_id == replica) for c in entry.conns
        )

    def count(self, tunnel_id: str | None = None) -> int:
        if tunnel_id is not None:
            entry = self.tunnels.get(tunnel_id)
            return len(entry.conns) if entry else 0
        return sum(len(e.conns) for e in self.tunnels.values())

    def announce_successor(self, edge_id: str) -> dict[str, int]:
        """Tell every registered connector that can follow it that `edge_id` took over; the
        number of connections told, by tunnel: the successor waits for as many."""
        told: dict[str, int] = {}
        for tid, entry in self.tunnels.items():
            for conn in entry.conns:
                if conn.follows_successor and conn.takes_flows:
                    conn.announce_successor(edge_id)
                    told[tid] = told.get(tid, 0) + 1
        return told

    def serving_counts(self) -> dict[str, int]:
        """Tunnel id: connections that take new flows (not draining, not closed)."""
        counts: dict[str, int] = {}
        for tid, entry in self.tunnels.items():
            n = sum(1 for c in entry.conns if c.takes_flows)
            if n:
                counts[tid] = n
        return counts

    def redial(self, tunnel_id: str, initial_cid: bytes) -> bool:
        """Ask one connection of the tunnel to move (REDIAL): the one with the fewest flows
        among those whose connector can, unless it is the tunnel's last serving one here."""
        entry = self.tunnels.get(tunnel_id)
        serving = [c for c in entry.conns if c.takes_flows] if entry else []
        able = [c for c in serving if c.redials and not c.redial_asked]
        if len(serving) < 2 or not able:
            return False
        conn = min(able, key=lambda c: len(c.bridges) + len(c.sessions))
        log.info(
            "asking connector %s conn %d (tunnel %s) to move to another worker",
            conn.connector_id[:8],
            conn.conn_index,
            conn.tunnel_name,
        )
        conn.ask_redial(initial_cid)
        return True

    def drop_tunnel(self, tunnel_id: str, code: int, reason: str) -> None:
        entry = self.tunnels.pop(tunnel_id, None)
        for conn in list(entry.conns) if entry else []:
            conn.close_with(code, reason)
        if entry:
            self._on_change()
            self.slots_changed(entry.conns[0])  # its waiting flows fail now, not at deadline

    def close(self) -> None:
        for entry in list(self.tunnels.values()):
            for conn in list(entry.conns):
                conn.close_with(CloseCode.SHUTDOWN, "edge shutting down")
        if self.server is not None:
            for proto in self.server.all_protocols():
                proto.close()
        if self.transport is not None:
            self.transport.close()


def server_configuration(
    cert_chain_pem: bytes, key_pem: bytes, idle_timeout: float
) -> QuicConfiguration:
    config = QuicConfiguration(
        is_client=False,
        alpn_protocols=[ALPN],
        idle_timeout=idle_timeout,
        max_datagram_frame_size=65536,
    )
    config.load_cert_chain(cert_chain_pem, key_pem)
    return config


__all__ = [
    "PROTOCOL_VERSION",
    "REGISTRATION_TIMEOUT",
    "STALE_AFTER",
    "EdgeConnection",
    "TunnelEdge",
    "Verdict",
    "server_configuration",
]
