"""Direct egress: the edge itself dials the destination (only when the edge allows it)."""

from __future__ import annotations

from collections.abc import Callable

from ramp.flows.flow import Flow, Route
from ramp.flows.opener import TcpLeg, UdpSession
from ramp.offramps.tcp import DirectLeg, dial_tcp
from ramp.tunnel.sessions_edge import EdgeSessions


class DirectOffRamp:
    name = "direct"

    def __init__(self, sessions: EdgeSessions, connect_timeout: float) -> None:
        self.sessions = sessions
        self.connect_timeout = connect_timeout

    async def open_stream(self, flow: Flow, route: Route) -> TcpLeg:
        assert flow.resolved is not None
        sock = await dial_tcp(flow.resolved, flow.destination.port, self.connect_timeout)
        return DirectLeg(flow, sock)

    async def open_datagram(
        self,
        flow: Flow,
        route: Route,
        receive: Callable[[bytes], None],
        closed: Callable[[str], None],
    ) -> UdpSession:
        assert flow.resolved is not None
        return await self.sessions.open_direct(flow, flow.resolved, receive, closed)
