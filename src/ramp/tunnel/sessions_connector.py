"""UDP sessions at the connector: the edge registers a session, the connector opens one
connected UDP socket to the origin for it, and relays datagrams until idle or closed."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from ramp.flows.client_shares import IDENTITY_SHARE, SOURCE_SHARE, ClientShares
from ramp.flows.flow import FlowError, FlowResult
from ramp.observe.loglimit import LogLimiter
from ramp.offramps.egress import Egress, SourcePortsExhausted
from ramp.offramps.udp import UdpOrigin, open_udp_origin
from ramp.tunnel import session_state as ss
from ramp.tunnel.interfaces import ConnectorLink
from ramp.tunnel.resolver import RESOLVER_HOST, Resolver
from ramp.tunnel.session_state import SessionAdmission, expiry_reason, sweep, sweep_interval
from ramp.wire.tunnel import (
    ProtocolError,
    SessionClose,
    SessionCloseReason,
    SessionError,
    SessionRegister,
    encode_session_control,
    parse_datagram,
    payload_prefix,
)

log = logging.getLogger("ramp.connector.udp")


def share_keys(edge_id: str, metadata: dict[str, str]) -> tuple[Hashable | None, Hashable | None]:
    """Whose shares a session from `edge_id` counts against: the client's address and
    identity as the edge reported them in SESSION_REGISTER (one edge's clients are not
    another's, so the edge is part of each key). An edge that reports no source gets no
    per-source share here: it enforces its own."""
    src = metadata.get("src")
    source = (edge_id, src.rsplit(":", 1)[0]) if src else None
    ident = metadata.get("identity")
    return source, (edge_id, ident) if ident else None


_ERRORS = {
    FlowResult.NOT_PERMITTED: SessionError.NOT_PERMITTED,
    FlowResult.NET_UNREACHABLE: SessionError.UNREACHABLE,
    FlowResult.HOST_UNREACHABLE: SessionError.UNREACHABLE,
}


@dataclass(slots=True)
class SessionEnd:
    destination: str
    source: str
    reason: str
    result: FlowResult
    packets_up: int
    packets_down: int
    bytes_up: int
    bytes_down: int
    duration: float
    metadata: dict[str, str] = field(default_factory=dict)  # what the edge said of the flow


class ConnectorSession:
    def __init__(
        self,
        manager: ConnectorSessions,
        key: tuple[str, int],
        conn: ConnectorLink,
        register: SessionRegister,
        idle_timeout: float,
    ) -> None:
        self.manager = manager
        self.key = key
        self.conn = conn
        self.register = register
        self.prefix = payload_prefix(register.session_id)
        self.idle_timeout = idle_timeout
        self.origin: UdpOrigin | None = None
        self.started = manager.now()
        self.last_active = self.started
        self.replied = False
        self.packets_up = self.packets_down = self.bytes_up = self.bytes_down = 0

    def to_origin(self, payload: bytes) -> None:
        self.last_active = self.manager.now()
        self.packets_up += 1
        self.bytes_up += len(payload)
        self.manager.metrics_datagram("up", len(payload))
        if self.origin is None or not self.origin.send(payload):
            self.manager.metrics_drop("origin_send_failed")

    def to_edge(self, payload: bytes) -> None:
        self.last_active = self.manager.now()
        self.replied = True
        self.packets_down += 1
        self.bytes_down += len(payload)
        self.manager.metrics_datagram("down", len(payload))
        if self.conn.closed:
            # the edge moves the session to another connection; until then replies are lost
            self.manager.metrics_drop("no_connection")
            return
        self.conn.send_datagram(self.prefix + payload)

    def origin_error(self, what: str) -> None:
        self.manager.metrics_drop(f"origin_{what}")


class ConnectorSessions:
    def __init__(
        self,
        *,
        resolver: Resolver,
        limit: int,
        idle_timeout: float,
        on_end: Callable[[SessionEnd], None],
        metrics_datagram: Callable[[str, int], None],
        metrics_drop: Callable[[str], None],
        metrics_active: Callable[[int], None],
        bad_input: Callable[[str], None],
        unreplied_timeout: float | None = None,
        per_source: int = 0,
        per_identity: int = 0,
        metrics_refused: Callable[[str], None] = lambda reason: None,
        metrics_expired: Callable[[str], None] = lambda reason: None,
        egress: Egress | None = None,
    ) -> None:
        self.resolver = resolver
        self.egress = egress
        self.limit = limit
        self.idle_timeout = idle_timeout
        self.unreplied_timeout = unreplied_timeout
        self._metrics_refused = metrics_refused
        self._metrics_expired = metrics_expired
        self._refusal_log = LogLimiter()  # refusals come at the rate a client chooses
        self._on_end = on_end
        self.metrics_datagram = metrics_datagram
        self.metrics_drop = metrics_drop
        self._metrics_active = metrics_active
        self._bad_input = bad_input
        self.sessions: dict[tuple[str, int], ConnectorSession] = {}
        # which registrations to take and where to answer: the sans-I/O part
        self.admission: SessionAdmission[tuple[str, int], ConnectorLink] = SessionAdmission(
            limit, ClientShares(per_source, per_identity)
        )
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper = asyncio.ensure_future(self._sweep())

    def now(self) -> float:
        return self._loop.time()

    @property
    def opening(self) -> dict[tuple[str, int], ConnectorLink]:
        return self.admission.opening

    @property
    def draining(self) -> bool:
        return self.admission.draining

    def datagram(self, conn: ConnectorLink, data: bytes) -> None:
        try:
            msg = parse_datagram(data)
        except ProtocolError as e:
            self._bad_input(str(e))
            return
        if isinstance(msg, tuple):
            session = self.sessions.get((conn.edge_id, msg[0]))
            if session is None:
                self.metrics_drop("unknown_session")
                return
            session.to_origin(msg[1])
            return
        key = (conn.edge_id, msg.session_id)
        if isinstance(msg, SessionRegister):
            self._on_register(conn, key, msg)
        elif isinstance(msg, SessionClose):
            session = self.sessions.get(key)
            if session is not None:
                self._end(session, f"closed by edge ({msg.reason.name.lower()})")
        else:
            self._bad_input(f"unexpected {type(msg).__name__} from the edge")

    def _on_register(self, conn: ConnectorLink, key: tuple[str, int], msg: SessionRegister) -> None:
        source, identity = share_keys(conn.edge_id, msg.metadata)
        self._run(self.admission.register(key, conn, msg.session_id, source, identity), key, msg)

    def _run(
        self,
        actions: list[ss.AdmitAction[ConnectorLink, tuple[str, int]]],
        key: tuple[str, int],
        msg: SessionRegister,
    ) -> None:
        for a in actions:
            if isinstance(a, ss.Answer):
                session = self.sessions.get(key)
                if session is not None:
                    session.conn = a.link  # replies go where the latest answer went
                a.link.send_datagram(a.data)
            elif isinstance(a, ss.Dropped):
                if a.reason in (SOURCE_SHARE, IDENTITY_SHARE):
                    self._metrics_refused(a.reason)
                    if self._refusal_log.allow(a.reason):
                        log.info(
                            "udp session to %s:%d from %s refused: its %s is used up",
                            msg.host,
                            msg.port,
                            msg.metadata.get("src", "-"),
                            a.reason.replace("_", " "),
                        )
                else:
                    self.metrics_drop(a.reason)
            elif isinstance(a, ss.OpenOrigin):
                task = asyncio.ensure_future(self._open(key, msg))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _open(self, key: tuple[str, int], msg: SessionRegister) -> None:
        session: ConnectorSession | None = None
        try:
            ip, port = await self._destination(msg.host, msg.port)
            idle = self.idle_timeout
            if msg.idle_timeout_ms:
                idle = min(idle, msg.idle_timeout_ms / 1000)
            session = ConnectorSession(self, key, self.admission.link_for(key), msg, idle)
            s = session
            session.origin = await open_udp_origin(
                ip, port, lambda d: s.to_edge(d), lambda what: s.origin_error(what), self.egress
            )
        except FlowError as e:
            if self._refusal_log.allow(e.result):  # as often as a client asks: rate-limited
                log.info("udp session to %s:%d refused: %s", msg.host, msg.port, e.reason)
            code = (
                SessionError.CANNOT_BIND
                if isinstance(e, SourcePortsExhausted)
                else _ERRORS.get(e.result, SessionError.ERROR)
            )
            self._run(self.admission.open_failed(key, msg.session_id, code, e.reason), key, msg)
            return
        except asyncio.CancelledError:
            self.admission.abandoned(key)
            raise
        except Exception as e:  # e.g. EMFILE: refuse, and free the slot it held
            log.warning("udp session to %s:%d failed: %r", msg.host, msg.port, e)
            if session is not None and session.origin is not None:
                session.origin.close()
            why = f"cannot open: {e}"
            self._run(
                self.admission.open_failed(key, msg.session_id, SessionError.ERROR, why),
                key,
                msg,
            )
            return
        self.sessions[key] = session
        self._metrics_active(len(self.sessions))
        self._run(self.admission.opened(key, msg.session_id), key, msg)

    async def _destination(self, host: str, port: int) -> tuple[str, int]:
        if host == RESOLVER_HOST:  # the edge means "your resolver", wherever it listens
            addr = self.resolver.address
            if addr is None:
                raise FlowError(FlowResult.HOST_UNREACHABLE, "the connector has no DNS resolver")
            return addr
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return (await self.resolver.resolve(host))[0], port
        return host, port

    def _end(self, session: ConnectorSession, reason: str, notify: bool = False) -> None:
        if self.sessions.pop(session.key, None) is None:
            return
        self.admission.closed(session.key)
        if session.origin is not None:
            session.origin.close()
        if notify and not session.conn.closed:
            session.conn.send_datagram(
                encode_session_control(
                    SessionClose(session.register.session_id, SessionCloseReason.IDLE)
                )
            )
        self._metrics_active(len(self.sessions))
        reg = session.register
        self._on_end(
            SessionEnd(
                destination=f"{reg.host}:{reg.port}",
                source=reg.metadata.get("src", "-"),
                reason=reason,
                result=FlowResult.OK,
                packets_up=session.packets_up,
                packets_down=session.packets_down,
                bytes_up=session.bytes_up,
                bytes_down=session.bytes_down,
                duration=self.now() - session.started,
                metadata={**reg.metadata, "flow": str(reg.flow_id)},
            )
        )

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(sweep_interval(self.idle_timeout, 1.0, self.unreplied_timeout))
            now = self.now()
            # each session has its own timeout (the edge may ask for a shorter one)
            for s in list(self.sessions.values()):
                idle, _ = sweep(now, s.idle_timeout, [(s, None)], self.unreplied_timeout)
                if idle:
                    reason = expiry_reason(s)
                    self._metrics_expired(reason)
                    self._end(s, f"{reason} timeout", notify=True)

    def close(self) -> None:
        self.admission.draining = True
        self._sweeper.cancel()
        for task in list(self._tasks):
            task.cancel()
        for s in list(self.sessions.values()):
            self._end(s, "connector shutting down")
