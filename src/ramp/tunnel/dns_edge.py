"""DNS through a tunnel, edge side: queries for names under a zone routed to a tunnel go to
the connector's resolver over one long-lived UDP session per tunnel (query ids rewritten so
clients' ids never collide), and over TCP through the tunnel when the answer is truncated."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ramp.flows.flow import Destination, Flow, FlowError, FlowResult
from ramp.flows.opener import TcpLeg, UdpSession
from ramp.tunnel.resolver import RESOLVER_HOST
from ramp.wire.dns import (
    HEADER_SIZE,
    answer_for,
    frame_length,
    is_truncated,
    message_id,
    tcp_frame,
    with_id,
)

log = logging.getLogger("ramp.edge.dns")

RETRY_AFTER = 1.0  # seconds before a UDP query is sent once more


@dataclass(frozen=True, slots=True)
class DnsZoneRoute:
    zone: str  # lowercase, no trailing dot
    tunnel_id: str
    tunnel_name: str


class DnsZones:
    """Longest-suffix match of names against routed zones."""

    def __init__(self, routes: list[DnsZoneRoute]) -> None:
        self._zones = {r.zone: r for r in routes}

    def lookup(self, name: str) -> DnsZoneRoute | None:
        labels = name.lower().rstrip(".").split(".")
        for i in range(len(labels)):
            hit = self._zones.get(".".join(labels[i:]))
            if hit is not None:
                return hit
        return None

    def __len__(self) -> int:
        return len(self._zones)


OpenUdp = Callable[[Flow, Callable[[bytes], None], Callable[[str], None]], Awaitable[UdpSession]]
OpenTcp = Callable[[Flow], Awaitable[TcpLeg]]


class TunnelDnsClient:
    """Queries the resolver behind one tunnel."""

    def __init__(
        self,
        route: DnsZoneRoute,
        open_udp: OpenUdp,
        open_tcp: OpenTcp,
        finished: Callable[[Flow], None],
        timeout: float,
    ) -> None:
        self.route = route
        self._open_udp = open_udp
        self._open_tcp = open_tcp
        self._finished = finished
        self.timeout = timeout
        self._session: UdpSession | None = None
        self._opening: asyncio.Future[UdpSession] | None = None
        self._pending: dict[int, asyncio.Future[bytes]] = {}

    def _flow(self) -> Flow:
        return Flow(
            onramp="dns",
            source=("edge", 0),
            destination=Destination(RESOLVER_HOST, 53),
            protocol="udp",
        )

    async def _udp(self) -> UdpSession:
        if self._session is not None:
            return self._session
        if self._opening is None:
            self._opening = asyncio.ensure_future(
                self._open_udp(self._flow(), self._answer, self._session_closed)
            )
        try:
            self._session = await asyncio.shield(self._opening)
        finally:
            if self._opening is not None and self._opening.done():
                self._opening = None
        return self._session

    def _session_closed(self, reason: str) -> None:
        self._session = None

    def _answer(self, data: bytes) -> None:
        if len(data) < HEADER_SIZE:
            return
        fut = self._pending.get(message_id(data))
        if fut is not None and not fut.done():
            fut.set_result(data)

    async def query(self, wire: bytes) -> bytes:
        if len(wire) < HEADER_SIZE:
            raise FlowError(FlowResult.ERROR, "DNS query too short")
        qid = secrets.randbelow(65536)
        while qid in self._pending:
            qid = secrets.randbelow(65536)
        rewritten = with_id(wire, qid)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[qid] = fut
        try:
            session = await self._udp()
            session.send(rewritten)
            try:
                answer = await asyncio.wait_for(asyncio.shield(fut), RETRY_AFTER)
            except TimeoutError:
                session = await self._udp()
                session.send(rewritten)
                answer = await asyncio.wait_for(fut, max(0.1, self.timeout - RETRY_AFTER))
        except TimeoutError:
            raise FlowError(FlowResult.TIMEOUT, "the tunnel's resolver did not answer") from None
        finally:
            self._pending.pop(qid, None)
        if is_truncated(answer):
            answer = await self.query_tcp(rewritten)
        return answer_for(answer, wire)

    async def query_tcp(self, wire: bytes) -> bytes:
        """One query over TCP through the tunnel (for answers too big for UDP)."""
        flow = self._flow()
        flow.protocol = "tcp"
        try:
            leg = await self._open_tcp(flow)
        except FlowError as e:
            flow.result, flow.reason = e.result, e.reason
            self._finished(flow)
            raise
        ours, theirs = socket.socketpair()
        relay = asyncio.ensure_future(leg.relay(theirs))
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_connection(sock=ours)
            writer.write(tcp_frame(wire))
            await writer.drain()
            async with asyncio.timeout(self.timeout):
                n = frame_length(await reader.readexactly(2))
                return await reader.readexactly(n)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as e:
            raise FlowError(FlowResult.ERROR, f"DNS over TCP through the tunnel: {e}") from e
        finally:
            # the transport owns the socket once it exists: close through it
            if writer is not None:
                writer.close()
            else:
                ours.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(relay, 1)
            self._finished(flow)

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
