"""The MASQUE off-ramp: flows leave through an edge's HTTP/3 proxy endpoint.

Each TCP flow is one CONNECT stream and each UDP flow one connect-udp request, all on the one
QUIC connection a `MasqueLink` keeps up (proxy mode, as the client runs it). Names are sent
as they are, so the edge resolves them (private DNS names of the tunnel's DNS routes work).
The edge's refusals come back as a status and a Proxy-Status, which become the flow's result,
so the local on-ramp answers its client as the edge's own on-ramps would.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qh3.quic.configuration import QuicConfiguration

from ramp.config import parse_hostport
from ramp.flows.endpoint import SocketEndpoint, StreamEndpoint, as_endpoint
from ramp.flows.flow import Flow, FlowError, FlowResult, Route
from ramp.flows.http_errors import result_of
from ramp.flows.opener import TcpLeg, UdpSession
from ramp.flows.relay import relay_streams
from ramp.quic import endpoint, qh3compat
from ramp.quic.connect_udp import UdpStream
from ramp.quic.h3 import (
    H3_NO_ERROR,
    H3_REQUEST_CANCELLED,
    H3Peer,
    H3Stream,
    H3StreamEndpoint,
    Headers,
)
from ramp.quic.pin import PinError, check_pin
from ramp.tunnel.slots import QueueFull, SlotQueue
from ramp.wire import masque

log = logging.getLogger("ramp.client")

ALPN = "h3"
SERVER_NAME = "ramp-edge"
SETTINGS_ENABLE_CONNECT_PROTOCOL = 0x8
MAX_DATAGRAM_SIZE = 1452  # an IPv6 packet on a 1,500-byte link, less IP and UDP headers


@dataclass(frozen=True, slots=True)
class EdgeTarget:
    """Where the link dials and how it proves itself: a MASQUE endpoint, the CA it pins, and
    the bearer credential every request carries."""

    addresses: tuple[str, ...]  # HOST:PORT
    ca_fingerprint: str
    bearer: str
    udp_template: str = masque.DEFAULT_UDP_TEMPLATE


def client_configuration(idle_timeout: float) -> QuicConfiguration:
    return QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN],
        idle_timeout=idle_timeout,
        server_name=SERVER_NAME,
        # the chain is checked against the token's pin right after the handshake (check_pin)
        verify_mode=ssl.CERT_NONE,
        max_datagram_frame_size=65536,
        # room for a whole 1,280-byte QUIC packet of a nested hop in one DATAGRAM frame
        # (qh3 probes the path up to it, and stays at 1,280 where the path is smaller)
        max_datagram_size=MAX_DATAGRAM_SIZE,
    )


# A way to get a QUIC connection's packets to an edge: a UDP socket by default; a connect-udp
# session on another edge for nested hops.
Dialer = Callable[[str, int, QuicConfiguration, int], Any]


async def udp_dial(host: str, port: int, configuration: QuicConfiguration, streams: int) -> H3Peer:
    return await endpoint.dial(
        host,
        port,
        configuration=configuration,
        create_protocol=lambda quic: H3Peer(quic),
        max_streams_bidi=streams,
    )


class MasqueLink:
    """One QUIC connection to an edge's MASQUE endpoint, redialled with backoff when lost."""

    def __init__(
        self,
        target: EdgeTarget,
        *,
        idle_timeout: float = 30.0,
        keepalive: float = 10.0,
        dialer: Dialer = udp_dial,
        on_state: Callable[[str], None] = lambda state: None,
        on_drop: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.target = target
        self.idle_timeout = idle_timeout
        self.keepalive = keepalive
        self.dialer = dialer
        self.on_state = on_state
        self.on_drop = on_drop
        self.peer: H3Peer | None = None
        self.state = "connecting"
        self.error = ""
        self.connected_at: float | None = None
        self.dials = 0
        self._up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.slots = SlotQueue(100_000)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._maintain())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self.peer is not None:
            self.peer.close_with(H3_NO_ERROR, "client shutting down")
            transport = getattr(self.peer, "udp_transport", None)
            if transport is not None:
                transport.close()

    def _set(self, state: str, error: str = "") -> None:
        self.state, self.error = state, error
        self.on_state(state)

    async def _maintain(self) -> None:
        backoff = 0.2
        while True:
            try:
                peer = await self._dial()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._set("reconnecting", str(e) or type(e).__name__)
                log.warning("cannot reach the edge: %s (next try in %.1f s)", self.error, backoff)
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.2
            self.peer = peer
            self.connected_at = time.monotonic()
            self._set("connected")
            self._up.set()
            self.slots.wake_all()
            log.info("connected to the edge at %s", peer.peer)
            await peer.wait_closed()
            self._up.clear()
            self.peer = None
            self.connected_at = None
            self._set("reconnecting", peer.close_reason)
            log.warning("edge connection lost: %s", peer.close_reason)
            self.slots.wake_all()

    async def _dial(self) -> H3Peer:
        last: Exception | None = None
        for address in self.target.addresses:
            host, port = parse_hostport(address)
            self.dials += 1
            try:
                async with asyncio.timeout(10):
                    peer: H3Peer = await self.dialer(
                        host, port, client_configuration(self.idle_timeout), 1000
                    )
            except (OSError, TimeoutError, ConnectionError) as e:
                last = e
                continue
            try:
                check_pin(peer.quic, self.target.ca_fingerprint)
                async with asyncio.timeout(10):
                    settings = await peer.settings
            except (PinError, TimeoutError, ConnectionError) as e:
                peer.close_with(0x100, "refused")
                last = e
                continue
            if settings.get(SETTINGS_ENABLE_CONNECT_PROTOCOL) != 1:
                log.info("the edge at %s does not offer extended CONNECT: no UDP", address)
            peer.on_drop = self.on_drop
            peer.on_stream_credit = self.slots.wake_all
            peer.watch_stream_credit = True
            peer.start_keepalive(self.keepalive)
            return peer
        raise last if last is not None else ConnectionError("no edge address")

    @property
    def rtt(self) -> float | None:
        peer = self.peer
        return qh3compat.smoothed_rtt(peer.quic) if peer is not None else None

    async def stream_peer(self, deadline: float) -> H3Peer:
        """The live connection with room for one more request stream, waiting (until the
        loop-time `deadline`) for the connection or for the edge to raise MAX_STREAMS."""
        loop = asyncio.get_running_loop()
        while True:
            peer = self.peer
            if peer is not None and not peer.closed and peer.h3 is not None:
                if peer.can_open_stream() and not self.slots.busy:
                    return peer
            elif not self._up.is_set():
                try:
                    async with asyncio.timeout_at(deadline):
                        await self._up.wait()
                except TimeoutError:
                    raise FlowError(
                        FlowResult.NET_UNREACHABLE,
                        f"no connection to the edge ({self.error or self.state})",
                    ) from None
                continue
            try:
                await self.slots.wait(deadline)
            except QueueFull:
                raise FlowError(FlowResult.BUSY, "too many flows waiting for a stream") from None
            except TimeoutError:
                raise FlowError(
                    FlowResult.TIMEOUT, "no free stream on the edge connection in time"
                ) from None
            if loop.time() >= deadline:
                raise FlowError(FlowResult.TIMEOUT, "no free stream on the edge connection")


class _ConnectStream(H3Stream):
    """A CONNECT stream this side opened: the first headers are the edge's answer."""

    def __init__(self, peer: H3Peer, stream_id: int) -> None:
        super().__init__(peer, stream_id)
        self.response: asyncio.Future[Headers] = peer.loop.create_future()

    def headers(self, headers: Headers, ended: bool) -> None:
        if not self.response.done():
            self.response.set_result(headers)
            if ended:
                self.data(b"", True)
            return
        super().headers(headers, ended)

    def reset(self, code: int) -> None:
        if not self.response.done():
            self.response.set_exception(ConnectionResetError(f"stream reset (0x{code:x})"))
        super().reset(code)

    def connection_lost(self) -> None:
        if not self.response.done():
            self.response.set_exception(ConnectionResetError("edge connection lost"))
        super().connection_lost()


def _refusal(headers: Headers) -> tuple[int, str | None]:
    status, proxy_status = 0, None
    for k, v in headers:
        if k == b":status":
            status = int(v) if v.isdigit() else 0
        elif k == b"proxy-status" and proxy_status is None:
            proxy_status = v.decode("latin-1")
    return status, proxy_status


class MasqueLeg:
    """An opened CONNECT stream, relayed to the local client."""

    def __init__(self, flow: Flow, stream: H3Stream) -> None:
        self.flow = flow
        self.stream = stream

    async def relay(self, client: socket.socket | StreamEndpoint, initial: bytes = b"") -> None:
        local = as_endpoint(client)
        result = await relay_streams(local, H3StreamEndpoint(self.stream), initial)
        self.flow.bytes_up += result.a_to_b
        self.flow.bytes_down += result.b_to_a
        if result.reset:
            self.flow.result = FlowResult.RESET
            self.flow.reason = "connection reset"
        if isinstance(local, SocketEndpoint):
            local.sock.close()

    def abort(self) -> None:
        self.stream.abort()


class EdgeSession(UdpStream):
    """A request stream of ours to the edge (connect-udp, connect-ip): however the stream or
    the connection ends, `response` fails if it is still waiting and `_end(why)` runs once."""

    response: asyncio.Future[Any]

    def stream_ended(self) -> None:
        self._end("the edge ended the session")

    def stream_broken(self, why: str) -> None:
        self._end(f"bad capsule from the edge: {why}")

    def reset(self, code: int) -> None:
        if not self.response.done():
            self.response.set_exception(ConnectionResetError(f"stream reset (0x{code:x})"))
        self._end(f"the edge reset the session (0x{code:x})")

    def stop_sending(self, code: int) -> None:
        self.reset(code)

    def connection_lost(self) -> None:
        if not self.response.done():
            self.response.set_exception(ConnectionResetError("edge connection lost"))
        self._end("edge connection lost")

    def _end(self, why: str) -> None:
        raise NotImplementedError


class MasqueSession(EdgeSession):
    """One connect-udp request: UDP payloads to the edge and back."""

    def __init__(
        self,
        link: MasqueLink,
        peer: H3Peer,
        flow: Flow,
        receive: Callable[[bytes], None],
        closed: Callable[[str], None],
        finished: Callable[[Flow], None],
    ) -> None:
        super().__init__(peer, -1, bad=link.on_drop, drop=link.on_drop)
        self.link = link
        self.flow = flow
        self._receive = receive
        self._closed = closed
        self._finished = finished
        self.response: asyncio.Future[Headers] = peer.loop.create_future()
        self.opened = False  # answered 200: from now on this session reports the flow's end

    # -- UdpSession -----------------------------------------------------------------------

    def send(self, payload: bytes) -> None:
        if self.done:
            return
        self.flow.packets_up += 1
        self.flow.bytes_up += len(payload)
        if not self.send_udp(payload):
            self.flow.drops += 1

    def close(self) -> None:
        self._end(None)

    # -- from the edge --------------------------------------------------------------------

    def headers(self, headers: Headers, ended: bool) -> None:
        if not self.response.done():
            self.response.set_result(headers)
            if ended:
                self._end("the edge ended the session")
            return
        super().headers(headers, ended)

    def udp_received(self, payload: bytes) -> None:
        self.flow.packets_down += 1
        self.flow.bytes_down += len(payload)
        self._receive(payload)

    def _end(self, why: str | None) -> None:
        if self.done:
            return
        if why is None and self.opened:  # our close: FIN, and the edge ends the session
            self.peer.send_data(self.stream_id, b"", end_stream=True)
        self.done = True
        self.peer.forget(self.stream_id)
        if not self.opened:
            return  # open_datagram raises, and the flow path reports the flow
        if why is not None:
            self.flow.fail(FlowResult.OK, why)
            self._closed(why)
        self.flow.fail(FlowResult.OK, "closed")
        self._finished(self.flow)


class MasqueOffRamp:
    name = "masque"

    def __init__(
        self,
        link: MasqueLink,
        connect_timeout: float,
        finished: Callable[[Flow], None],
    ) -> None:
        self.link = link
        self.connect_timeout = connect_timeout
        self._finished = finished

    def _auth(self) -> tuple[bytes, bytes]:
        return (b"proxy-authorization", b"Bearer " + self.link.target.bearer.encode())

    async def _answer(self, response: asyncio.Future[Headers], deadline: float) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                headers = await response
        except TimeoutError:
            raise FlowError(FlowResult.TIMEOUT, "the edge did not answer in time") from None
        except ConnectionError as e:
            raise FlowError(FlowResult.NET_UNREACHABLE, f"edge: {e}") from None
        status, proxy_status = _refusal(headers)
        if status // 100 != 2:
            why = f"edge answered {status}" + (f" ({proxy_status})" if proxy_status else "")
            raise FlowError(result_of(status, proxy_status), why)

    async def open_stream(self, flow: Flow, route: Route) -> TcpLeg:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        peer = await self.link.stream_peer(deadline)
        stream_id = peer.quic.get_next_available_stream_id(is_unidirectional=False)
        stream = _ConnectStream(peer, stream_id)
        headers = [
            (b":method", b"CONNECT"),
            (b":authority", str(flow.destination).encode()),
            self._auth(),
        ]
        peer.open_request(headers, stream)
        try:
            await self._answer(stream.response, deadline)
        except BaseException:
            stream.abort()
            raise
        return MasqueLeg(flow, stream)

    async def open_datagram(
        self,
        flow: Flow,
        route: Route,
        receive: Callable[[bytes], None],
        closed: Callable[[str], None],
    ) -> UdpSession:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        peer = await self.link.stream_peer(deadline)
        session = MasqueSession(self.link, peer, flow, receive, closed, self._finished)
        target = self.link.target
        template = masque.UdpTemplate(target.udp_template)
        headers = [
            (b":method", b"CONNECT"),
            (b":protocol", b"connect-udp"),
            (b":scheme", b"https"),
            (b":authority", SERVER_NAME.encode()),
            (b":path", template.expand(flow.destination.host, flow.destination.port).encode()),
            (b"capsule-protocol", b"?1"),
            self._auth(),
        ]
        session.stream_id = peer.open_request(headers, session)
        try:
            await self._answer(session.response, deadline)
        except BaseException:
            session.done = True
            peer.reset_request(session.stream_id, H3_REQUEST_CANCELLED)
            raise
        if session.done:  # ended between the answer and now
            raise FlowError(FlowResult.RESET, "the edge ended the session at once")
        session.opened = True
        return session
