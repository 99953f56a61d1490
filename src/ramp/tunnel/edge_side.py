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

from ramp.quic import endpoint
from ramp.tunnel.bridge import StreamBridge
from ramp.tunnel.control import ControlStream, route_window
from ramp.tunnel.interfaces import STALE_AFTER, EdgeDatagramSink
from ramp.wire.tunnel import (
    ALPN,
    PROTOCOL_VERSION,
    CloseCode,
    Frame,
    Register,
    Registered,
    RegisterError,
    RegisterRefused,
    Unregister,
    Window,
)

log = logging.getLogger("ramp.edge.tunnel")

REGISTRATION_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the store says about a registration."""

    ok: bool
    tunnel_name: str = ""
    error: RegisterError | None = None
    message: str = ""


class EdgeConnection(endpoint.TunnelConnection):
    def __init__(self, quic: QuicConnection, stream_handler: Any = None, *, edge: TunnelEdge):
        super().__init__(quic)
        self.edge = edge
        self.control: ControlStream | None = None
        self.registered = False
        self.draining = False
        self.tunnel_id = ""
        self.tunnel_name = ""
        self.connector_id = ""
        self.conn_index = 0
        self.bridges: dict[int, StreamBridge] = {}
        self.sessions: dict[int, Any] = {}  # UDP sessions riding this connection, by id
        self._reg_timer: asyncio.TimerHandle | None = None

    def handshake_done(self, alpn: str | None) -> None:
        if alpn != ALPN:
            self.edge.refused(self, "bad_request", f"ALPN {alpn!r} is not {ALPN}")
            self.close_with(CloseCode.PROTOCOL_ERROR, "unsupported ALPN")
            return
        self._reg_timer = self.loop.call_later(REGISTRATION_TIMEOUT, self._registration_timeout)

    def _registration_timeout(self) -> None:
        if not self.registered and not self.closed:
            self.edge.refused(self, "bad_request", "no registration within the time limit")
            self.close_with(CloseCode.REGISTRATION_TIMEOUT, "registration timeout")

    def peer_stream_opened(self, stream_id: int) -> endpoint.StreamHandler | None:
        if self.control is None:
            self.control = ControlStream(self, stream_id, self._on_frame, self._on_error)
            return self.control
        return None  # connectors open no other streams in protocol v1

    def _on_error(self, message: str) -> None:
        log.warning("tunnel connection %s: %s", self.peer, message)
        self.edge.on_drop("protocol_error")

    def _on_frame(self, frame: Frame) -> None:
        if isinstance(frame, Window):
            route_window(self.bridges, frame)
        elif isinstance(frame, Register) and not self.registered:
            self._register(frame)
        elif isinstance(frame, Unregister) and self.registered:
            self.draining = True
            log.info(
                "connector %s conn %d (tunnel %s) is draining",
                self.connector_id[:8],
                self.conn_index,
                self.tunnel_name,
            )
            self.edge.changed()
        else:
            self._on_error(f"unexpected {type(frame).__name__} frame")
            self.close_with(CloseCode.PROTOCOL_ERROR, f"unexpected {type(frame).__name__}")

    def _register(self, frame: Register) -> None:
        assert self.control is not None
        if self._reg_timer is not None:
            self._reg_timer.cancel()
        verdict = self.edge.check(frame)
        if not verdict.ok:
            assert verdict.error is not None
            self.edge.refused(self, verdict.error.name.lower(), verdict.message)
            self.control.send(RegisterRefused(verdict.error, verdict.message))
            # give the refusal a moment to leave before the CONNECTION_CLOSE
            self.loop.call_later(
                0.2, self.close_with, CloseCode.REGISTRATION_REFUSED, verdict.error.name.lower()
            )
            return
        self.registered = True
        self.tunnel_id = str(frame.tunnel_id)
        self.tunnel_name = verdict.tunnel_name
        self.connector_id = str(frame.connector_id)
        self.conn_index = frame.conn_index
        self.control.send(Registered(self.tunnel_name, self.edge.edge_id))
        self.edge.add(self)
        log.info(
            "registered connector %s conn %d for tunnel %s from %s (%s)",
            self.connector_id[:8],
            self.conn_index,
            self.tunnel_name,
            self.peer,
            frame.client_info or "-",
        )

    def terminated(self, error_code: int, reason: str) -> None:
        if self._reg_timer is not None:
            self._reg_timer.cancel()
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
        if self.registered and self.edge.sessions is not None:
            self.edge.sessions.connection_datagram(self, data)
        else:
            self.edge.on_drop("datagram_before_registration")

    def datagram_dropped(self, reason: str) -> None:
        if self.edge.sessions is not None:
            self.edge.sessions.metrics_drop(reason)

    def send_window(self, stream_id: int, increment: int) -> None:
        if self.control is not None and not self.closed:
            self.control.send_window(stream_id, increment)


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
    ) -> None:
        self.configuration = configuration
        self.check = check
        self.on_drop = on_drop
        self._on_refused = on_refused
        self._on_change = on_change
        self.edge_id = f"{socket.gethostname()}/{uuid.uuid4().hex[:8]}"
        self.tunnels: dict[str, _TunnelConns] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self.server: endpoint.TunnelServer | None = None
        self.sessions: EdgeDatagramSink | None = None  # EdgeSessions, set by the edge

    async def start(self, host: str, port: int) -> None:
        self.transport, self.server = await endpoint.serve(
            host,
            port,
            configuration=self.configuration,
            create_protocol=lambda quic, **kw: EdgeConnection(quic, edge=self),
            on_drop=self.on_drop,
        )

    @property
    def port(self) -> int:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[1]

    def refused(self, conn: EdgeConnection, reason: str, message: str) -> None:
        log.warning("refused tunnel registration from %s: %s (%s)", conn.peer, reason, message)
        self._on_refused(reason, conn.peer, message)

    def changed(self) -> None:
        self._on_change()

    def add(self, conn: EdgeConnection) -> None:
        self.tunnels.setdefault(conn.tunnel_id, _TunnelConns()).conns.append(conn)
        self._on_change()

    def remove(self, conn: EdgeConnection) -> None:
        entry = self.tunnels.get(conn.tunnel_id)
        if entry is not None and conn in entry.conns:
            entry.conns.remove(conn)
            if not entry.conns:
                del self.tunnels[conn.tunnel_id]
            self._on_change()

    def candidates(self, tunnel_id: str) -> list[EdgeConnection]:
        """Live connections for a tunnel in the order a new flow should try them: round robin,
        so flows spread over connections and connector replicas; fresh ones first."""
        entry = self.tunnels.get(tunnel_id)
        if entry is None:
            return []
        conns = [c for c in entry.conns if not c.draining and not c.closed]
        if not conns:
            return []
        start = entry.next % len(conns)
        entry.next += 1
        ordered = conns[start:] + conns[:start]
        now = asyncio.get_running_loop().time()
        return sorted(ordered, key=lambda c: now - c.last_rx > STALE_AFTER)

    def count(self, tunnel_id: str | None = None) -> int:
        if tunnel_id is not None:
            entry = self.tunnels.get(tunnel_id)
            return len(entry.conns) if entry else 0
        return sum(len(e.conns) for e in self.tunnels.values())

    def drop_tunnel(self, tunnel_id: str, code: int, reason: str) -> None:
        entry = self.tunnels.pop(tunnel_id, None)
        for conn in list(entry.conns) if entry else []:
            conn.close_with(code, reason)
        if entry:
            self._on_change()

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
    "STALE_AFTER",
    "EdgeConnection",
    "TunnelEdge",
    "Verdict",
    "server_configuration",
]
