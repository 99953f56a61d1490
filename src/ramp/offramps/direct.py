"""Direct egress: the edge itself dials the destination (only when the edge allows it)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from ramp.flows.flow import Flow, FlowError, FlowResult, Route, parse_ip
from ramp.flows.opener import TcpLeg, UdpSession
from ramp.net.egress import EgressGuard
from ramp.offramps.egress import Egress
from ramp.offramps.tcp import DirectLeg, dial_tcp
from ramp.offramps.udp import UdpOrigin, open_udp_origin
from ramp.tunnel.sessions_edge import EdgeSessions, UdpSessionBase
from ramp.wire import proxy_protocol
from ramp.wire.tunnel import SessionCloseReason


class DirectSession(UdpSessionBase):
    """A UDP session the edge sends out itself: one connected socket. It lives in the edge's
    session table (counting, idle sweep, the session cap) like a tunnel session."""

    origin: UdpOrigin | None = None

    def send(self, payload: bytes) -> None:
        if self.finished:
            return
        self._count_up(payload)
        if self.origin is None or not self.origin.send(payload):
            self._drop("origin_send_failed")

    def _release(self, notify_peer: SessionCloseReason | None) -> None:
        if self.origin is not None:
            self.origin.close()


async def send_proxy_header(sock: socket.socket, flow: Flow, version: str) -> None:
    """The PROXY header for the origin, before any payload byte: the flow's source (the real
    client, after a PROXY header in), the origin as dialled, and for v2 the identity, the
    flow id and the name the client asked for. Raises FlowError."""
    name = flow.destination.host if parse_ip(flow.destination.host) is None else None
    try:
        raw = proxy_protocol.outbound(
            version,
            flow.source,
            sock.getpeername()[:2],
            identity=flow.user,
            flow_id=flow.id,
            authority=name,
        )
        await asyncio.get_running_loop().sock_sendall(sock, raw)
    except OSError as e:
        raise FlowError(FlowResult.RESET, f"origin gone before the PROXY header: {e}") from None


class DirectOffRamp:
    name = "direct"

    def __init__(
        self,
        sessions: EdgeSessions,
        connect_timeout: float,
        guard: EgressGuard | None = None,
        rule_to: Callable[[str], str | None] = lambda rule_id: None,
        on_denied: Callable[[], None] | None = None,
        egress: Egress | None = None,
    ) -> None:
        self.egress = egress  # source addresses and port sharing (ramp.offramps.egress)
        self.sessions = sessions
        self.connect_timeout = connect_timeout
        self.guard = guard if guard is not None else EgressGuard()
        self.rule_to = rule_to  # policy rule id -> its `to`
        self.on_denied = on_denied

    def _check(self, flow: Flow) -> None:
        """Refuse the edge's own and link-local addresses unless the deciding rule names
        them (see ramp.net.egress)."""
        assert flow.resolved is not None
        self.guard.maybe_refresh()
        rule = flow.decision.rule if flow.decision is not None else None
        problem = self.guard.problem(
            flow.resolved, lambda: self.rule_to(rule) if rule is not None else None
        )
        if problem is not None:
            if self.on_denied is not None:
                self.on_denied()
            raise FlowError(FlowResult.NOT_PERMITTED, problem)

    async def open_stream(self, flow: Flow, route: Route) -> TcpLeg:
        self._check(flow)
        assert flow.resolved is not None
        sock = await dial_tcp(
            flow.resolved, flow.destination.port, self.connect_timeout, egress=self.egress
        )
        if route.proxy_protocol is not None:
            try:
                await send_proxy_header(sock, flow, route.proxy_protocol)
            except BaseException:
                sock.close()
                raise
        return DirectLeg(flow, sock)

    async def open_datagram(
        self,
        flow: Flow,
        route: Route,
        receive: Callable[[bytes], None],
        closed: Callable[[str], None],
    ) -> UdpSession:
        self._check(flow)
        assert flow.resolved is not None
        table = self.sessions
        session = DirectSession(table, table.new_id(), flow, receive, closed)
        with table.reserving(session):
            session.origin = await open_udp_origin(
                flow.resolved,
                flow.destination.port,
                session.deliver,
                lambda what: table.metrics_drop(what),
                self.egress,
            )
        table.add(session)
        return session
