"""What an off-ramp is: a way for a decided, routed flow to leave the edge.

The router names the off-ramp in the flow's `Route`; the pipeline looks it up in a registry by
that name, so a new way out (MASQUE to another edge, say) is a new class registered by the role,
with no change to the flow path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from ramp.flows.flow import Flow, Route
from ramp.flows.opener import TcpLeg, UdpSession


class OffRamp(Protocol):
    name: str

    async def open_stream(self, flow: Flow, route: Route) -> TcpLeg:
        """Open the outbound leg of a stream flow; raises FlowError."""
        ...

    async def open_datagram(
        self,
        flow: Flow,
        route: Route,
        receive: Callable[[bytes], None],
        closed: Callable[[str], None],
    ) -> UdpSession:
        """Open a datagram session; the session reports the flow's end when it closes."""
        ...
