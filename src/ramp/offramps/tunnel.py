"""Tunnel off-ramp: a flow leaves the edge as a stream on a connector's QUIC connection."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from ramp.flows.budget import MemoryBudget, reserve, unbudgeted
from ramp.flows.endpoint import StreamEndpoint, as_endpoint
from ramp.flows.flow import Flow, FlowError, FlowResult, Route
from ramp.flows.moved import FlowMoved
from ramp.flows.opener import UdpSession
from ramp.tunnel.bridge import FLOW_WINDOW, StreamBridge, TunnelSide
from ramp.tunnel.control import CODE_TO_RESULT
from ramp.tunnel.edge_side import STALE_AFTER, EdgeConnection, TunnelEdge
from ramp.tunnel.flow_open import ConnectionGone
from ramp.tunnel.flow_open import PendingFlow as _PendingFlow
from ramp.tunnel.sessions_edge import EdgeSessions
from ramp.tunnel.slots import QueueFull, SlotQueue
from ramp.wire.tunnel import (
    META_PROXY_PROTOCOL,
    ConnectCode,
    ConnectResult,
    ConnectTcp,
    StreamError,
    encode_frame,
    proxy_sent,
)

STALE_CHECK = 0.25
DEFAULT_MAX_WAITING = 10000  # flows per tunnel waiting for a stream slot
DRAIN_TIMEOUT = 60.0  # a client that stops reading after the end of a flow is cut after this


async def open_tunnel_flow(
    conn: EdgeConnection, flow: Flow, timeout: float, budget: MemoryBudget | None = None
) -> TunnelLeg:
    """Ask the connector behind `conn` to dial `flow.destination`; raises FlowError."""
    if conn.closed or not conn.can_open_stream():
        raise ConnectionGone()  # checked right before opening: a refused open burns a slot
    reservation = reserve(budget, FLOW_WINDOW)
    try:
        leg = await _open(conn, flow, timeout, reservation.window)
    except BaseException:
        reservation.release()
        raise
    leg.reservation = reservation
    return leg


async def _open(conn: EdgeConnection, flow: Flow, timeout: float, window: int) -> TunnelLeg:
    pending = _PendingFlow(window)
    stream_id = conn.open_stream(pending)
    host = flow.resolved or flow.destination.host
    meta = {"src": f"{flow.source[0]}:{flow.source[1]}", "onramp": flow.onramp}
    if flow.user is not None:
        meta["identity"] = flow.user
    if flow.vnet is not None:
        meta["vnet"] = flow.vnet
    if flow.resolved and flow.resolved != flow.destination.host:
        meta["host"] = flow.destination.host
    proxy = flow.route.proxy_protocol if flow.route is not None else None
    if proxy is not None:
        meta[META_PROXY_PROTOCOL] = proxy
    header = ConnectTcp(flow.id, host, flow.destination.port, window, meta)
    conn.send(stream_id, encode_frame(header))
    try:
        answer = await _await_answer(conn, pending.result, timeout)
    except TimeoutError:
        conn.reset(stream_id, StreamError.FLOW_ABORT)
        raise FlowError(
            FlowResult.TIMEOUT, f"no answer from the connector within {timeout:g}s"
        ) from None
    except FlowError:
        conn.reset(stream_id, StreamError.PROTOCOL)
        raise
    except (ConnectionGone, asyncio.CancelledError):
        conn.reset(stream_id, StreamError.FLOW_ABORT)
        raise
    if answer.code != ConnectCode.OK:
        conn.reset(stream_id, StreamError.FLOW_ABORT)
        raise FlowError(CODE_TO_RESULT[answer.code], answer.message or answer.code.name.lower())
    if proxy is not None and answer.message != proxy_sent(proxy):
        # a connector from before PROXY protocol support dialled without sending the header:
        # the origin must not take the connector for the client
        conn.reset(stream_id, StreamError.FLOW_ABORT)
        raise FlowError(
            FlowResult.ERROR,
            f"the route asks for a PROXY {proxy} header and this connector does not send "
            "one: upgrade the connector",
        )
    bridge = StreamBridge(
        conn, stream_id, send_credit=answer.window, grant=conn.send_window, window=window
    )
    conn.handlers[stream_id] = TunnelSide(bridge)
    conn.bridges[stream_id] = bridge
    bridge.done.add_done_callback(lambda _: conn.bridges.pop(stream_id, None))
    for chunk in pending.extra:
        bridge.stream_data(chunk, False)
    if pending.fin:
        bridge.stream_data(b"", True)
    # a reset or connection loss that came in the same batch as the answer
    if pending.lost or conn.closed:
        bridge.connection_lost_tunnel()
    elif pending.reset_code is not None:
        bridge.stream_reset(pending.reset_code)
    return TunnelLeg(flow, bridge)


async def _await_answer(
    conn: EdgeConnection, result: asyncio.Future[ConnectResult], timeout: float
) -> ConnectResult:
    """Wait for CONNECT_RESULT, giving up on the connection early if it went silent.

    A live connector acknowledges the request at once and pings every second while it dials,
    so a connection that stays silent was probably killed (kill -9, lost host) and has not hit
    its idle timeout yet: the flow moves on to another connection instead of waiting it out.
    One timer per waiting flow does the checks (this is on the path of every flow setup).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    def check() -> None:
        nonlocal timer
        if result.done():
            return
        now = loop.time()
        if now >= deadline:
            result.set_exception(TimeoutError())
        elif now - conn.last_rx > STALE_AFTER:
            result.set_exception(ConnectionGone())
        else:
            timer = loop.call_later(min(STALE_CHECK, deadline - now), check)

    timer = loop.call_later(min(STALE_CHECK, timeout), check)
    try:
        return await result
    finally:
        timer.cancel()


class TunnelLeg:
    def __init__(self, flow: Flow, bridge: StreamBridge) -> None:
        self.flow = flow
        self.bridge = bridge
        self.relaying = False
        # the flow's window in the memory budget: held until the last bytes left for the
        # client (after `done`, up to a window may still wait in the socket's write buffer)
        self.reservation = unbudgeted(0)
        bridge.done.add_done_callback(self._done)

    def _done(self, _: object) -> None:
        if not self.relaying:  # never attached to a client: nothing left to drain
            self.reservation.release()

    async def relay(self, client: socket.socket | StreamEndpoint, initial: bytes = b"") -> None:
        loop = asyncio.get_running_loop()
        bridge = self.bridge
        endpoint = as_endpoint(client)
        self.relaying = True
        try:
            await endpoint.attach(lambda: bridge)
            bridge.feed_initial(initial)
            await asyncio.shield(bridge.done)
            if not bridge.tcp_closed.done():
                # let the last bytes reach the client before the caller closes the socket
                timer = loop.call_later(DRAIN_TIMEOUT, bridge.abort_tcp)
                try:
                    await asyncio.shield(bridge.tcp_closed)
                finally:
                    timer.cancel()
        except asyncio.CancelledError:
            bridge.abort()
            raise
        except OSError:
            bridge.abort()
            endpoint.close()
        finally:
            self.reservation.release()
            self.flow.bytes_up += bridge.bytes_tcp_to_quic
            self.flow.bytes_down += bridge.bytes_quic_to_tcp
            if bridge.reset_by is not None and self.flow.result is None:
                self.flow.result = FlowResult.RESET
                self.flow.reason = f"reset by {'client' if bridge.reset_by == 'tcp' else 'origin'}"

    def abort(self) -> None:
        self.bridge.abort()


class TunnelOffRamp:
    """Flows leave through a connector: streams on its QUIC connections, datagrams in its
    UDP sessions."""

    name = "tunnel"

    def __init__(
        self,
        tunnels: TunnelEdge,
        sessions: EdgeSessions,
        connect_timeout: float,
        max_waiting: int = DEFAULT_MAX_WAITING,
        on_reject: Callable[[str], None] | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.budget = budget
        self.tunnels = tunnels
        self.sessions = sessions
        self.connect_timeout = connect_timeout
        self.max_waiting = max_waiting
        self._on_reject = on_reject
        # flows waiting for a stream slot, by (tunnel id, replica or None)
        self.waiting: dict[tuple[str, str | None], SlotQueue] = {}
        tunnels.on_slots = self._slots_changed
        # with workers: the worker that holds connections of a tunnel this one has none of
        self.elsewhere: Callable[[str], int | None] | None = None

    def _candidates(self, route: Route) -> list[EdgeConnection]:
        assert route.tunnel_id is not None
        conns = self.tunnels.candidates(route.tunnel_id)
        if route.replica is not None:
            conns = [c for c in conns if c.connector_id == route.replica]
        return conns

    def _free_slots(self, key: tuple[str, str | None]) -> int:
        entry = self.tunnels.tunnels.get(key[0])
        if entry is None:
            return 0
        return sum(
            c.free_streams()
            for c in entry.conns
            if not c.draining and (key[1] is None or c.connector_id == key[1])
        )

    def _wake(self, key: tuple[str, str | None], queue: SlotQueue, reserve: int = 0) -> None:
        """Wake as many waiters as the free slots can serve, less those already woken (and
        `reserve`, the caller's own); one that finds its slot taken goes back to the front."""
        if not self.tunnels.serving(*key):
            queue.wake_all()  # nothing left to wait for: they fail at once
        elif len(queue):
            queue.wake(self._free_slots(key) - queue.woken - reserve)

    def _slots_changed(self, conn: EdgeConnection) -> None:
        tunnel_id = conn.tunnel_id
        for key in ((tunnel_id, None), (tunnel_id, conn.connector_id)):
            queue = self.waiting.get(key)
            if queue is not None and len(queue):
                self._wake(key, queue)

    def _may_open(self, key: tuple[str, str | None], waited: bool) -> bool:
        # first come, first served: a newcomer does not overtake flows already waiting
        queue = self.waiting.get(key)
        return waited or queue is None or not queue.busy

    def _moved(self, route: Route) -> None:
        """Raise FlowMoved when this worker has no connection of the route's tunnel and
        another worker has."""
        if self.elsewhere is None or route.replica is not None:
            return
        assert route.tunnel_id is not None
        if self.tunnels.tunnels.get(route.tunnel_id) is not None and self._candidates(route):
            return
        worker = self.elsewhere(route.tunnel_id)
        if worker is not None:
            raise FlowMoved(worker, route.tunnel_name or route.tunnel_id)

    async def open_stream(self, flow: Flow, route: Route) -> TunnelLeg:
        candidates = self._candidates(route)
        if not candidates:
            self._moved(route)
            raise FlowError(
                FlowResult.NET_UNREACHABLE,
                f"tunnel {route.tunnel_name} has no connected connector"
                + (f" {route.replica}" if route.replica else ""),
            )
        assert route.tunnel_id is not None
        key = (route.tunnel_id, route.replica)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        waited = False
        while True:
            if self._may_open(key, waited):
                for conn in candidates:
                    if not conn.can_open_stream():
                        continue
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        return await open_tunnel_flow(conn, flow, remaining, self.budget)
                    except ConnectionGone:
                        continue  # that connection died under us: the next one may be alive
            if loop.time() >= deadline:
                raise FlowError(FlowResult.TIMEOUT, "no tunnel connection answered in time")
            if not self.tunnels.serving(*key):
                raise FlowError(
                    FlowResult.NET_UNREACHABLE,
                    f"tunnel {route.tunnel_name} lost its connections while opening the flow",
                )
            candidates = self._candidates(route)
            if self._may_open(key, waited) and any(c.can_open_stream() for c in candidates):
                continue  # a connection joined or got slots while we tried the others
            # every connection is at the connector's stream limit (or flows wait ahead of
            # this one): wait in line until MAX_STREAMS brings a slot
            await self._wait_for_slot(route, key, deadline, front=waited)
            waited = True
            candidates = self._candidates(route)

    async def _wait_for_slot(
        self, route: Route, key: tuple[str, str | None], deadline: float, *, front: bool
    ) -> None:
        queue = self.waiting.get(key)
        if queue is None:
            queue = self.waiting[key] = SlotQueue(self.max_waiting)
        try:
            await queue.wait(deadline, front=front)
            # more slots than woken waiters (a newcomer queued behind us meanwhile): wake them
            # now, counting the one this flow is about to take
            self._wake(key, queue, reserve=1)
        except QueueFull:
            if self._on_reject is not None:
                self._on_reject("stream_queue_full")
            raise FlowError(
                FlowResult.ERROR,
                f"tunnel {route.tunnel_name}: {len(queue)} flows already wait for a stream "
                "slot (every connection is at the connector's stream limit)",
            ) from None
        except TimeoutError:
            raise FlowError(
                FlowResult.TIMEOUT,
                f"no tunnel stream slot came free within {self.connect_timeout:g}s (every "
                "connection is at the connector's stream limit)",
            ) from None
        finally:
            if not queue.busy and self.waiting.get(key) is queue:
                del self.waiting[key]

    async def open_datagram(
        self,
        flow: Flow,
        route: Route,
        receive: Callable[[bytes], None],
        closed: Callable[[str], None],
    ) -> UdpSession:
        assert route.tunnel_id is not None
        if not self._candidates(route):
            self._moved(route)
        host = flow.resolved or flow.destination.host
        return await self.sessions.open(
            flow, route.tunnel_id, host, receive, closed, self.connect_timeout
        )
