"""The flow path of a role that decides nothing itself: every flow is admitted to the flow
table (limits, metrics, audit) and handed to one off-ramp.

The client is such a role: its edge resolves names, applies policy and routes; the client only
carries each local connection there. It is a `FlowOpener`, so the client runs the very
on-ramps the edge runs.
"""

from __future__ import annotations

from collections.abc import Callable

from ramp.flows.flow import Flow, FlowKind, FlowResult, FlowState, Route
from ramp.flows.opener import TcpLeg, UdpSession
from ramp.flows.table import FlowTable
from ramp.offramps.base import OffRamp


class SingleRoute:
    def __init__(
        self,
        table: FlowTable,
        offramp: OffRamp,
        *,
        bad_input: Callable[[str, str, tuple[str, int] | None], None] | None = None,
    ) -> None:
        self.table = table
        self.offramp = offramp
        self.route = Route(offramp.name)
        self._bad_input = bad_input

    def _admit(self, flow: Flow) -> None:
        self.table.admit(flow)
        flow.route = self.route
        flow.advance(FlowState.ROUTED)

    async def open_tcp(self, flow: Flow) -> TcpLeg:
        self._admit(flow)
        leg = await self.offramp.open_stream(flow, self.route)
        flow.advance(FlowState.OPENED)
        return leg

    async def open_udp(
        self, flow: Flow, receive: Callable[[bytes], None], closed: Callable[[str], None]
    ) -> UdpSession:
        flow.protocol = "udp"
        flow.kind = FlowKind.DATAGRAM
        with self.table.reporting_failures(flow):
            self._admit(flow)
            session = await self.offramp.open_datagram(flow, self.route, receive, closed)
        flow.advance(FlowState.ESTABLISHED)

        def stop(result: FlowResult, reason: str) -> None:
            flow.fail(result, reason)
            session.close()

        flow.stop = stop
        return session

    async def dns_query(self, query: bytes) -> bytes | None:
        return None

    def flow_finished(self, flow: Flow) -> None:
        self.table.end(flow)

    def bad_input(self, onramp: str, reason: str, peer: tuple[str, int] | None = None) -> None:
        if self._bad_input is not None:
            self._bad_input(onramp, reason, peer)
