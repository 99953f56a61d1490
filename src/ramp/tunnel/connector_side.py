"""The connector's end of the tunnel: dial out to the edge, register, serve the flows the edge
opens, and keep `ha_connections` connections per edge alive with backoff."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection

from ramp import __version__
from ramp.flows.budget import MemoryBudget, reserve
from ramp.flows.flow import FlowError, FlowResult
from ramp.offramps.egress import Egress
from ramp.offramps.tcp import dial_tcp
from ramp.quic import endpoint
from ramp.quic.pin import PinError, check_pin
from ramp.tunnel import control_state as cs
from ramp.tunnel import flow_state as fs
from ramp.tunnel.bridge import FLOW_WINDOW, StreamBridge, TunnelSide
from ramp.tunnel.control import RESULT_TO_CODE, ControlStream, carry_out_shared
from ramp.tunnel.control_state import ConnectorControl
from ramp.tunnel.flow_state import FlowAccept
from ramp.tunnel.interfaces import ConnectorDatagramSink, ConnectorPacketSink
from ramp.tunnel.resolver import RESOLVER_HOST, Resolver
from ramp.wire import proxy_protocol
from ramp.wire.tunnel import (
    ALPN,
    CAP_IP_PACKETS,
    CAP_REDIAL,
    CAP_SUCCESSOR,
    META_PROXY_PROTOCOL,
    CloseCode,
    ConnectCode,
    ConnectTcp,
    Register,
    Registered,
    RegisterError,
    StreamError,
    is_packet_datagram,
    proxy_sent,
    with_capabilities,
)

log = logging.getLogger("ramp.connector")

BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
REGISTER_TIMEOUT = 10.0
SUCCESSOR_FOLLOW_TIMEOUT = 30.0  # trying to reach an edge's successor, then keep the old
SUCCESSOR_RETRY = 0.2
REDIAL_ATTEMPTS = 3  # dials of a REDIAL's new connection before the old one just stays
REDIAL_DRAIN = 60.0  # a moved connection's flows may run this long before it is cut
EDGE_SERVER_NAME = "ramp-edge"


class RegistrationRefused(Exception):
    def __init__(self, code: RegisterError, message: str) -> None:
        super().__init__(f"{code.name.lower()}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class FlowEnd:
    """What the connector reports about each finished flow (metrics and log)."""

    stream_id: int
    destination: str
    source: str
    result: FlowResult
    reason: str
    bytes_up: int
    bytes_down: int
    duration: float
    metadata: dict[str, str] = field(default_factory=dict)  # what the edge said of the flow


def client_configuration(idle_timeout: float) -> QuicConfiguration:
    return QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN],
        idle_timeout=idle_timeout,
        server_name=EDGE_SERVER_NAME,
        # the chain is checked against the token's pin right after the handshake (check_pin)
        verify_mode=ssl.CERT_NONE,
        max_datagram_frame_size=65536,
    )


def split_source(text: str) -> tuple[str, int] | None:
    """`HOST:PORT` (the edge's `src` metadata; an IPv6 host is bare) as a pair, or None."""
    host, _, port = text.rpartition(":")
    return (host, int(port)) if host and port.isdigit() and int(port) <= 65535 else None


async def send_proxy_header(sock: socket.socket, header: ConnectTcp, version: str) -> None:
    """Tell the origin whom the flow is from, before any payload byte: the client's address
    as the edge saw it, the origin's own as dialled; v2 adds the identity, the flow id and
    the name the client asked for. Raises FlowError."""
    meta = header.metadata
    try:
        raw = proxy_protocol.outbound(
            version,
            split_source(meta.get("src", "")),
            sock.getpeername()[:2],
            identity=meta.get("identity"),
            flow_id=header.flow_id,
            authority=meta.get("host"),
        )
    except ValueError as e:
        raise FlowError(FlowResult.ERROR, str(e)) from None
    except OSError as e:
        raise FlowError(FlowResult.RESET, f"origin gone before the PROXY header: {e}") from None
    try:
        await asyncio.get_running_loop().sock_sendall(sock, raw)
    except OSError as e:
        raise FlowError(FlowResult.RESET, f"origin gone before the PROXY header: {e}") from None


class ConnectorConnection(endpoint.TunnelConnection):
    """One connection to an edge: the I/O face of a ConnectorControl machine."""

    def __init__(self, quic: QuicConnection, *, owner: TunnelClient, index: int) -> None:
        super().__init__(quic)
        self.owner = owner
        self.index = index
        self.machine = ConnectorControl()
        self.control: ControlStream | None = None
        self.bridges: dict[int, StreamBridge] = {}
        self.registered: asyncio.Future[Registered] = self.loop.create_future()
        # nobody awaits it when a dial is abandoned during shutdown: mark it retrieved
        self.registered.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.flow_tasks: set[asyncio.Task[None]] = set()
        self.edge_id = ""
        self.successor = asyncio.Event()  # the edge said SUCCESSOR: a new process serves
        self.successor_id = ""
        self.redial_cid: bytes | None = None  # the edge said REDIAL: move to this Initial id

    def start_registration(self, frame: Register) -> None:
        sid = self.open_stream(None)  # type: ignore[arg-type]
        self.control = ControlStream(sid, self.machine, self._run, self.loop.time)
        self.handlers[sid] = self.control
        self._run(self.machine.start(frame))

    def _run(self, actions: list[cs.ControlAction]) -> None:
        for a in actions:
            if carry_out_shared(self, a):
                continue
            if isinstance(a, cs.ControlError):
                log.warning("edge connection %d: %s", self.index, a.message)
            elif isinstance(a, cs.RegistrationDone):
                if not self.registered.done():
                    self.edge_id = a.answer.edge_id
                    self.registered.set_result(a.answer)
            elif isinstance(a, cs.SuccessorServes):
                log.info(
                    "edge %s says its successor %s serves: dialling it (connection %d stays)",
                    self.edge_id,
                    a.edge_id,
                    self.index,
                )
                self.successor_id = a.edge_id
                self.successor.set()
            elif isinstance(a, cs.RedialAsked):
                log.info(
                    "edge %s asks connection %d to move to another of its workers",
                    self.edge_id,
                    self.index,
                )
                self.redial_cid = a.initial_cid
                self.successor.set()
            elif isinstance(a, cs.RegistrationFailed) and not self.registered.done():
                if a.code is None:
                    self.registered.set_exception(ConnectionError(a.message))
                else:
                    self.registered.set_exception(RegistrationRefused(a.code, a.message))

    def peer_stream_opened(self, stream_id: int) -> endpoint.StreamHandler | None:
        if not self.machine.accepts_flows:
            return None
        return _IncomingFlow(self, stream_id)

    def terminated(self, error_code: int, reason: str) -> None:
        self._run(self.machine.connection_lost(reason or f"closed ({error_code})"))
        self.bridges.clear()

    def send_window(self, stream_id: int, increment: int) -> None:
        if self.control is not None and not self.closed:
            self._run(self.machine.window(stream_id, increment))

    def tunnel_datagram(self, data: bytes) -> None:
        if not self.edge_id:
            return
        if self.owner.packets is not None and is_packet_datagram(data):
            self.owner.packets.datagram(self, data)
        elif self.owner.sessions is not None:
            self.owner.sessions.datagram(self, data)

    def datagram_dropped(self, reason: str) -> None:
        if self.owner.sessions is not None:
            self.owner.sessions.metrics_drop(reason)

    def unregister(self) -> None:
        if self.control is not None and not self.closed:
            self._run(self.machine.unregister())


class _IncomingFlow:
    """Stream handler for a flow stream until its origin is dialled: the I/O face of a
    FlowAccept machine (it starts the dial task and cancels it)."""

    def __init__(self, conn: ConnectorConnection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.state = FlowAccept(FLOW_WINDOW)
        self.bridge: StreamBridge | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def header(self) -> ConnectTcp | None:
        return self.state.header

    @property
    def gone(self) -> bool:
        return self.state.gone

    def stream_data(self, data: bytes, fin: bool) -> None:
        self._run(self.state.stream_data(data, fin))

    def stream_reset(self, code: int) -> None:
        self._run(self.state.stream_reset(code))

    def stop_sending(self, code: int) -> None:
        self._run(self.state.stop_sending(code))

    def connection_lost(self) -> None:
        self._run(self.state.connection_lost())

    def _run(self, actions: list[fs.AcceptAction]) -> None:
        for a in actions:
            if isinstance(a, fs.DialRequested):
                # the window CONNECT_RESULT grants comes out of the budget for the flow's life
                reservation = reserve(self.conn.owner.budget, self.state.window)
                self.state.window = reservation.window
                self.task = asyncio.ensure_future(self.conn.owner.serve_flow(self))
                self.task.add_done_callback(reservation.release_when_done)
                self.conn.flow_tasks.add(self.task)
                self.task.add_done_callback(self.conn.flow_tasks.discard)
            elif isinstance(a, fs.AcceptError):
                log.warning("flow stream %d: %s", self.stream_id, a.message)
                self.conn.owner.metrics_bad_input("tunnel", "protocol_error")
                self.conn.reset(self.stream_id, a.code)
            elif isinstance(a, fs.CancelDial):
                if self.task is not None:
                    self.task.cancel()
            elif isinstance(a, fs.ResetFlow):
                self.conn.reset(self.stream_id, a.code)
            elif isinstance(a, fs.ForgetFlow):
                self.conn.forget(self.stream_id)


UDP_MOVE_WAIT = 4.0  # a drain waits this long for the edge to move the UDP sessions away


class TunnelClient:
    """All of a connector's connections to its edges."""

    def __init__(
        self,
        *,
        tunnel_id: str,
        secret: bytes,
        ca_fingerprint: str,
        edges: list[tuple[str, int]],
        ha_connections: int,
        connect_timeout: float,
        idle_timeout: float,
        keepalive: float,
        on_flow_end: Callable[[FlowEnd], None],
        on_connections: Callable[[int], None],
        on_refused: Callable[[RegistrationRefused], None],
        on_dial_failure: Callable[[str], None],
        metrics_bad_input: Callable[[str, str], None],
        max_streams_bidi: int = endpoint.DEFAULT_MAX_STREAMS,
        budget: MemoryBudget | None = None,
    ) -> None:
        self.budget = budget  # flow windows across all connections
        self.tunnel_id = uuid.UUID(tunnel_id)
        self.secret = secret
        self.ca_fingerprint = ca_fingerprint
        self.edges = edges
        self.ha_connections = ha_connections
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.keepalive = keepalive
        self.max_streams_bidi = max_streams_bidi  # flows the edge may open per connection
        self.connector_id = uuid.uuid4()
        self.on_flow_end = on_flow_end
        self._on_connections = on_connections
        self._on_refused = on_refused
        self._on_dial_failure = on_dial_failure
        self.metrics_bad_input = metrics_bad_input
        self.live: set[ConnectorConnection] = set()
        self.draining = False
        self.fatal: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()
        self._supervisors: list[asyncio.Task[None]] = []
        self._retiring: set[asyncio.Task[None]] = set()  # connections left to an old edge
        self.active_flows = 0
        self.sessions: ConnectorDatagramSink | None = None  # UDP sessions, set by the connector
        self.packets: ConnectorPacketSink | None = None  # ICMP, set by the connector
        self.resolver: Resolver | None = None
        self.egress: Egress | None = None  # source addresses and port sharing for origins

    first_index = 0  # a worker's connections are numbered from its own base

    def start(self) -> None:
        index = self.first_index
        for host, port in self.edges:
            for _ in range(self.ha_connections):
                task = asyncio.ensure_future(self._supervise(host, port, index))
                self._supervisors.append(task)
                index += 1

    async def _supervise(self, host: str, port: int, index: int) -> None:
        """Keep one connection up: dial, register, serve, and redial with backoff. When the
        edge announces a successor, make before break: register a new connection (the
        edge's steering sends it to the successor) and let the old one end with its edge."""
        attempt = 0
        while not self.draining:
            conn: ConnectorConnection | None = None
            try:
                conn = await self._connect(host, port, index)
                attempt = 0
                while not await self._closed_or_successor(conn):
                    conn = await self._follow(conn, host, port, index)
                if not self.draining:
                    log.warning(
                        "connection %d to %s:%d lost (%s); redialling",
                        index,
                        host,
                        port,
                        conn.close_reason,
                    )
            except asyncio.CancelledError:
                if conn is not None:
                    conn.close_with(CloseCode.SHUTDOWN, "connector shutting down")
                raise
            except RegistrationRefused as e:
                self._on_refused(e)
                if e.code.permanent:
                    if not self.fatal.done():
                        self.fatal.set_result(e)
                    return
                self._on_dial_failure("refused_transient")
            except PinError as e:
                if not self.fatal.done():
                    self.fatal.set_result(e)
                return
            except (OSError, ConnectionError, TimeoutError) as e:
                reason = "timeout" if isinstance(e, TimeoutError) else "network"
                self._on_dial_failure(reason)
                log.warning(
                    "connection %d to %s:%d failed: %s",
                    index,
                    host,
                    port,
                    str(e) or type(e).__name__,
                )
            except Exception:  # never let one slot die silently: log, back off, redial
                self._on_dial_failure("internal")
                log.exception("connection %d to %s:%d failed unexpectedly", index, host, port)
            finally:
                if conn is not None:
                    self._drop(conn)
            if self.draining:
                return
            attempt += 1
            # full jitter (AWS architecture blog): spreads reconnect storms after an edge restart
            delay = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(attempt - 1, 10)))
            await asyncio.sleep(delay)

    async def _closed_or_successor(self, conn: ConnectorConnection) -> bool:
        """Wait until the connection closes (True) or its edge announces a successor."""
        closed = asyncio.ensure_future(conn.wait_closed())
        told = asyncio.ensure_future(conn.successor.wait())
        try:
            await asyncio.wait({closed, told}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            told.cancel()
        return conn.closed or self.draining

    async def _follow(
        self, old: ConnectorConnection, host: str, port: int, index: int
    ) -> ConnectorConnection:
        """Register a connection with the successor; the old one serves its flows until its
        edge closes it. Returns the connection to watch from now on."""
        if old.redial_cid is not None:
            return await self._move(old, host, port, index, old.redial_cid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SUCCESSOR_FOLLOW_TIMEOUT
        while not old.closed and not self.draining and loop.time() < deadline:
            try:
                new = await self._connect(host, port, index)
            except (OSError, ConnectionError, TimeoutError, RegistrationRefused) as e:
                log.warning("connection %d: dialling the successor failed: %s", index, e)
                await asyncio.sleep(SUCCESSOR_RETRY)
                continue
            if new.edge_id == old.edge_id:  # the old process took it: no steering there
                log.warning(
                    "connection %d: the new connection reached the old edge process again",
                    index,
                )
            task = asyncio.ensure_future(self._retire(old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            return new
        old.successor.clear()
        return old

    async def _move(
        self, old: ConnectorConnection, host: str, port: int, index: int, cid: bytes
    ) -> ConnectorConnection:
        """REDIAL: register a connection whose Initial carries `cid`, then retire the old
        one ourselves (its edge process keeps serving): UNREGISTER, let its flows end, close.
        If the new one cannot be had, the old one stays."""
        old.successor.clear()
        old.redial_cid = None
        for attempt in range(REDIAL_ATTEMPTS):
            if old.closed or self.draining:
                return old
            try:
                new = await self._connect(host, port, index, initial_cid=cid)
            except (OSError, ConnectionError, TimeoutError, RegistrationRefused) as e:
                log.warning("connection %d: the redial failed (try %d): %s", index, attempt + 1, e)
                await asyncio.sleep(SUCCESSOR_RETRY)
                continue
            task = asyncio.ensure_future(self._wind_down(old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
            return new
        log.warning("connection %d: could not move it; it stays where it is", index)
        return old

    async def _wind_down(self, conn: ConnectorConnection) -> None:
        """A connection replaced by a redial: the edge opens no new flows on it after
        UNREGISTER and moves its UDP sessions; close it once those are gone."""
        conn.unregister()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REDIAL_DRAIN
        udp_deadline = loop.time() + UDP_MOVE_WAIT

        def busy() -> bool:
            if conn.flow_tasks or conn.bridges:
                return True
            return loop.time() < udp_deadline and any(
                getattr(s, "conn", None) is conn
                for s in getattr(self.sessions, "sessions", {}).values()
            )

        try:
            while not conn.closed and busy() and loop.time() < deadline:
                await asyncio.sleep(0.1)
            if not conn.closed:
                conn.close_with(CloseCode.NO_ERROR, "moved to another edge worker")
        finally:
            self._drop(conn)

    async def _retire(self, conn: ConnectorConnection) -> None:
        """The old edge process closes its connections once it has drained."""
        try:
            await conn.wait_closed()
        finally:
            self._drop(conn)

    async def _connect(
        self, host: str, port: int, index: int, initial_cid: bytes | None = None
    ) -> ConnectorConnection:
        config = client_configuration(self.idle_timeout)
        async with asyncio.timeout(REGISTER_TIMEOUT):
            conn = await endpoint.dial(
                host,
                port,
                configuration=config,
                create_protocol=lambda quic: ConnectorConnection(quic, owner=self, index=index),
                max_streams_bidi=self.max_streams_bidi,
                initial_cid=initial_cid,
            )
        assert isinstance(conn, ConnectorConnection)
        try:
            check_pin(conn.quic, self.ca_fingerprint)
            conn.start_registration(
                Register(
                    tunnel_id=self.tunnel_id,
                    connector_id=self.connector_id,
                    conn_index=index,
                    secret=self.secret,
                    client_info=self.client_info(),
                )
            )
            async with asyncio.timeout(REGISTER_TIMEOUT):
                answer = await conn.registered
        except BaseException:
            conn.close_with(CloseCode.SHUTDOWN, "registration abandoned")
            conn.udp_transport.close()  # type: ignore[attr-defined]
            raise
        conn.start_keepalive(self.keepalive)
        self.live.add(conn)
        self._on_connections(len(self.live))
        log.info(
            "connection %d registered with edge %s at %s:%d (tunnel %s)",
            index,
            answer.edge_id,
            host,
            port,
            answer.tunnel_name,
        )
        return conn

    def client_info(self) -> str:
        """REGISTER's client info: version, host, and the optional features served here."""
        caps = {CAP_SUCCESSOR, CAP_REDIAL}
        if self.packets is not None:
            caps.add(CAP_IP_PACKETS)
        return with_capabilities(f"ramp/{__version__} {socket.gethostname()}", caps)

    def _drop(self, conn: ConnectorConnection) -> None:
        if conn in self.live:
            self.live.discard(conn)
            self._on_connections(len(self.live))
        transport = getattr(conn, "udp_transport", None)
        if transport is not None and conn.closed:
            transport.close()

    async def serve_flow(self, flow: _IncomingFlow) -> None:
        conn = flow.conn
        header = flow.header
        assert header is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        dest = f"{header.host}:{header.port}"
        source = header.metadata.get("src", "-")
        result, reason = FlowResult.OK, ""
        bridge: StreamBridge | None = None
        self.active_flows += 1
        try:
            # served while draining too: the edge sends no flow after it has read UNREGISTER,
            # so one that arrives now was sent before; it finishes within the grace period
            sock = await self._dial(header.host, header.port)
            if flow.gone or conn.closed:
                sock.close()
                result, reason = FlowResult.ERROR, "edge gave up before the origin answered"
                return
            message = ""
            version = header.metadata.get(META_PROXY_PROTOCOL)
            if version is not None:
                try:
                    await send_proxy_header(sock, header, version)
                except BaseException:
                    sock.close()
                    raise
                message = proxy_sent(version)
            bridge = StreamBridge(
                conn,
                flow.stream_id,
                send_credit=header.window,
                grant=conn.send_window,
                window=flow.state.window,
            )
            flow.bridge = bridge
            answer, early, fin = flow.state.succeeded(message)
            # bytes that came before the bridge go first, then the bridge takes the stream
            for chunk in early:
                bridge.stream_data(chunk, False)
            if fin:
                bridge.stream_data(b"", True)
            conn.handlers[flow.stream_id] = TunnelSide(bridge)
            conn.bridges[flow.stream_id] = bridge
            conn.send(flow.stream_id, answer)
            await loop.connect_accepted_socket(lambda: bridge, sock=sock)
            await asyncio.shield(bridge.done)
            if bridge.reset_by is not None:
                result = FlowResult.RESET
                reason = "reset by " + ("origin" if bridge.reset_by == "tcp" else "edge")
        except FlowError as e:
            result, reason = e.result, e.reason
            if not flow.gone and not conn.closed:
                refusal = FlowAccept.refusal(RESULT_TO_CODE[e.result], e.reason)
                conn.send(flow.stream_id, refusal, fin=True)
            conn.forget(flow.stream_id)
        except asyncio.CancelledError:
            result, reason = FlowResult.ERROR, "cancelled"
            if bridge is not None:
                bridge.abort()
            else:
                conn.reset(flow.stream_id, StreamError.FLOW_ABORT)
            raise
        except Exception as e:  # a bug or an OS error outside the dial: answer, never hang
            log.exception("flow to %s failed", dest)
            result, reason = FlowResult.ERROR, f"internal error: {e!r}"
            if bridge is not None:
                bridge.abort()
            elif not flow.gone and not conn.closed:
                refusal = FlowAccept.refusal(ConnectCode.ERROR, "connector internal error")
                conn.send(flow.stream_id, refusal, fin=True)
                conn.forget(flow.stream_id)
        finally:
            self.active_flows -= 1
            conn.bridges.pop(flow.stream_id, None)
            self.on_flow_end(
                FlowEnd(
                    flow.stream_id,
                    dest,
                    source,
                    result,
                    reason,
                    bridge.bytes_quic_to_tcp if bridge else 0,
                    bridge.bytes_tcp_to_quic if bridge else 0,
                    loop.time() - started,
                    {**header.metadata, "flow": str(header.flow_id)},
                )
            )

    async def _dial(self, host: str, port: int) -> socket.socket:
        resolver = self.resolver
        if host == RESOLVER_HOST:  # DNS over TCP to the connector's resolver
            if resolver is None or resolver.address is None:
                raise FlowError(FlowResult.HOST_UNREACHABLE, "the connector has no DNS resolver")
            host, port = resolver.address
        return await dial_tcp(
            host, port, self.connect_timeout, resolver.resolve if resolver else None, self.egress
        )

    async def drain(self, grace: float) -> None:
        """Stop taking flows, tell the edges, and let open flows finish for `grace` seconds."""
        self.draining = True
        for conn in list(self.live):
            conn.unregister()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # UDP sessions have no end to wait for, but the edge moves them to the tunnel's other
        # connections (a restart's successor) and then closes them here: wait for that
        udp_deadline = loop.time() + min(grace, UDP_MOVE_WAIT)

        def udp_open() -> bool:
            return bool(getattr(self.sessions, "sessions", None)) and loop.time() < udp_deadline

        while (self.active_flows or udp_open()) and loop.time() < deadline:
            await asyncio.sleep(0.1)
        if self.active_flows:
            log.warning("grace period over: cutting %d open flows", self.active_flows)

    async def close(self) -> None:
        self.draining = True
        for task in self._supervisors:
            task.cancel()
        for conn in list(self.live):
            for task in list(conn.flow_tasks):
                task.cancel()
            conn.close_with(CloseCode.SHUTDOWN, "connector shutting down")
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        for conn in list(self.live):
            self._drop(conn)

    def connections(self) -> list[dict[str, Any]]:
        return [{"index": c.index, "rtt_ms": None} for c in self.live]
