"""UDP sessions at the edge: each session rides one registered tunnel connection as QUIC
datagrams, is registered with retries, closes on idle or when either side says so, and moves
to another live connection (or connector replica) when its connection dies."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterator

from ramp.flows.client_shares import SOURCE_SHARE, ClientShares
from ramp.flows.flow import Flow, FlowError, FlowResult
from ramp.observe.loglimit import LogLimiter
from ramp.tunnel import session_state as ss
from ramp.tunnel.interfaces import EdgeLink, LinkDirectory
from ramp.tunnel.session_state import (
    SessionRegistration,
    expiry_reason,
    sweep,
    sweep_interval,
)
from ramp.wire.tunnel import (
    ProtocolError,
    SessionClose,
    SessionCloseReason,
    SessionRefused,
    SessionRegister,
    SessionRegistered,
    encode_session_control,
    parse_datagram,
    payload_prefix,
)

log = logging.getLogger("ramp.edge.udp")

INTERNAL_SOURCE = "edge"  # the source address of flows the edge opens itself (dns_edge.py)
PENDING_LIMIT = 64  # datagrams held per session while it (re)registers
MIGRATE_TIMEOUT = 5.0
# a session moved off a draining connection keeps that path for late replies this long
MOVE_LINGER = 2.0


class UdpSessionBase:
    """What every edge UDP session shares: counting, delivery to the on-ramp, and ending
    exactly once with the flow reported."""

    conn: EdgeLink | None = None
    replied = False  # the origin answered at least once: the long idle timeout applies
    shares_held: tuple[str | None, str | None] | None = None  # the (source, identity) it counts on

    def __init__(
        self,
        manager: EdgeSessions,
        session_id: int,
        flow: Flow,
        receive: Callable[[bytes], None],
        closed: Callable[[str], None],
    ) -> None:
        self.manager = manager
        self.id = session_id
        self.flow = flow
        self._receive = receive
        self._closed_cb = closed
        self.finished = False
        self.last_active = manager.now()

    def _count_up(self, payload: bytes) -> None:
        self.last_active = self.manager.now()
        self.flow.packets_up += 1
        self.flow.bytes_up += len(payload)
        self.manager.metrics_datagram("up", len(payload))

    def deliver(self, payload: bytes) -> None:
        """A datagram from the origin."""
        if self.finished:
            return
        self.last_active = self.manager.now()
        self.replied = True
        self.flow.packets_down += 1
        self.flow.bytes_down += len(payload)
        self.manager.metrics_datagram("down", len(payload))
        self._receive(payload)

    def close(self) -> None:
        self._finish(FlowResult.OK, "closed by client", notify_peer=SessionCloseReason.CLOSED)

    def _drop(self, reason: str) -> None:
        self.flow.drops += 1
        self.manager.metrics_drop(reason)

    def _release(self, notify_peer: SessionCloseReason | None) -> None:
        """Free what the session holds (subclasses)."""

    def _finish(
        self, result: FlowResult, reason: str, notify_peer: SessionCloseReason | None
    ) -> None:
        if self.finished:
            return
        self.finished = True
        self._release(notify_peer)
        if self.flow.result is None:
            self.flow.result, self.flow.reason = result, reason
        self.manager.forget(self)
        if notify_peer != SessionCloseReason.CLOSED:  # the client closed: it knows
            try:
                self._closed_cb(reason)
            except Exception:
                log.exception("udp session close callback failed")


class EdgeSession(UdpSessionBase):
    """One UDP session through a tunnel (implements `UdpSession` for on-ramps)."""

    def __init__(
        self,
        manager: EdgeSessions,
        session_id: int,
        flow: Flow,
        tunnel_id: str,
        host: str,
        receive: Callable[[bytes], None],
        closed: Callable[[str], None],
    ) -> None:
        super().__init__(manager, session_id, flow, receive, closed)
        self.tunnel_id = tunnel_id
        self.host = host
        self.prefix = payload_prefix(session_id)
        self.registered = False
        self.pending: deque[bytes] = deque()
        self.answer: asyncio.Future[SessionRegistered | SessionRefused] | None = None
        self._migrating: asyncio.Task[None] | None = None

    def send(self, payload: bytes) -> None:
        if self.finished:
            return
        self._count_up(payload)
        conn = self.conn
        if self.registered and conn is not None and not conn.closed:
            if not conn.send_datagram(self.prefix + payload):
                self.flow.drops += 1  # the connection counted the drop by its reason
            return
        if len(self.pending) >= PENDING_LIMIT:
            self._drop("pending_full")
            return
        self.pending.append(payload)

    def peer_closed(self, reason: SessionCloseReason) -> None:
        result = FlowResult.OK if reason != SessionCloseReason.ERROR else FlowResult.ERROR
        self._finish(result, f"closed by connector ({reason.name.lower()})", notify_peer=None)

    def attach(self, conn: EdgeLink) -> None:
        self.conn = conn
        self.registered = True
        pending, self.pending = self.pending, deque()
        for payload in pending:
            if not conn.send_datagram(self.prefix + payload):
                self.flow.drops += 1

    def register_message(self) -> bytes:
        flow = self.flow
        meta = {"src": f"{flow.source[0]}:{flow.source[1]}", "onramp": flow.onramp}
        if flow.user is not None:
            meta["identity"] = flow.user
        if flow.vnet is not None:
            meta["vnet"] = flow.vnet
        return encode_session_control(
            SessionRegister(
                self.id,
                flow.id,
                self.host,
                flow.destination.port,
                int(self.manager.idle_timeout * 1000),
                meta,
            )
        )

    def connection_lost(self) -> None:
        """Its connection died: re-register on another one, holding datagrams meanwhile."""
        if self.finished or self._migrating is not None:
            return
        self.registered = False
        self.conn = None
        self._migrating = asyncio.ensure_future(self._migrate())

    async def _migrate(self) -> None:
        try:
            await self.manager.register(self, MIGRATE_TIMEOUT)
            log.info("udp session %d moved to another tunnel connection", self.id)
        except FlowError as e:
            self._finish(e.result, f"tunnel connection lost: {e.reason}", notify_peer=None)
        finally:
            self._migrating = None

    def move(self) -> None:
        """Its connection drains (the connector restarts): register on another connection
        while datagrams still go the old way, then switch (make before break)."""
        conn = self.conn
        if self.finished or self._migrating is not None or not self.registered or conn is None:
            return
        self._migrating = asyncio.ensure_future(self._move(conn))

    async def _move(self, old: EdgeLink) -> None:
        try:
            await self.manager.register(self, MIGRATE_TIMEOUT)
        except FlowError as e:
            log.info("udp session %d stays on its draining connection: %s", self.id, e.reason)
            return
        finally:
            self._migrating = None
        log.info("udp session %d moved off a draining tunnel connection", self.id)
        self.manager.metrics_moved()
        await asyncio.sleep(MOVE_LINGER)
        if old.sessions.get(self.id) is self:
            old.sessions.pop(self.id)
            # the same connector moved its side when the new link registered it; another
            # connector (a restart's predecessor) is told to let its side go
            same = getattr(old, "connector_id", None) == getattr(self.conn, "connector_id", "")
            if not old.closed and not same:
                old.send_datagram(
                    encode_session_control(SessionClose(self.id, SessionCloseReason.SHUTDOWN))
                )

    def _release(self, notify_peer: SessionCloseReason | None) -> None:
        if self._migrating is not None:
            self._migrating.cancel()
        if notify_peer is not None and self.conn is not None and self.registered:
            self.conn.send_datagram(encode_session_control(SessionClose(self.id, notify_peer)))
        self.pending.clear()


class EdgeSessions:
    """All UDP sessions of one edge, keyed by session id."""

    def __init__(
        self,
        tunnels: LinkDirectory,
        *,
        idle_timeout: float,
        limit: int = 4096,
        on_finished: Callable[[Flow], None],
        metrics_datagram: Callable[[str, int], None],
        metrics_drop: Callable[[str], None],
        on_bad_input: Callable[[str], None],
        unreplied_timeout: float | None = None,
        per_source: int = 0,
        per_identity: int = 0,
        metrics_refused: Callable[[str], None] = lambda reason: None,
        metrics_expired: Callable[[str], None] = lambda reason: None,
        metrics_moved: Callable[[], None] = lambda: None,
    ) -> None:
        self.tunnels = tunnels
        self.metrics_moved = metrics_moved  # a session moved off a draining connection
        self.idle_timeout = idle_timeout
        self.unreplied_timeout = unreplied_timeout
        self.limit = limit
        self.shares: ClientShares[str] = ClientShares(per_source, per_identity)
        self._metrics_refused = metrics_refused
        self._metrics_expired = metrics_expired
        self._refusal_log = LogLimiter()  # refusals come at the rate a client chooses
        # Sessions opened outside the tunnel (direct egress) are in `sessions` only once their
        # socket is open; until then they hold a slot here (`reserving`).
        self._opening_direct = 0
        self._on_finished = on_finished
        self.metrics_datagram = metrics_datagram
        self.metrics_drop = metrics_drop
        self._bad_input = on_bad_input
        self.sessions: dict[int, UdpSessionBase] = {}
        self._ids = itertools.count(1)
        self._loop = asyncio.get_running_loop()
        self._sweeper = asyncio.ensure_future(self._sweep())

    def now(self) -> float:
        return self._loop.time()

    def _check_limit(self) -> None:
        if len(self.sessions) + self._opening_direct >= self.limit:
            self.metrics_drop("too_many_sessions")
            raise FlowError(FlowResult.ERROR, f"edge at its limit of {self.limit} UDP sessions")

    def _take_share(self, session: UdpSessionBase) -> None:
        """Count `session` against its client's shares, or refuse it (FlowError)."""
        flow = session.flow
        # the edge's own sessions (its DNS client, one per tunnel) have no client to share with
        keys = (None if flow.source[0] == INTERNAL_SOURCE else flow.source[0], flow.user)
        refused = self.shares.try_take(*keys)
        if refused is not None:
            self._metrics_refused(refused)
            share = self.shares.sources if refused == SOURCE_SHARE else self.shares.identities
            why = f"{refused.replace('_', ' ')} of {share.limit} UDP sessions used up"
            if self._refusal_log.allow(refused):
                log.info("udp session from %s to %s refused: %s", keys[0], flow.destination, why)
            raise FlowError(FlowResult.ERROR, why)
        session.shares_held = keys

    def _release_share(self, session: UdpSessionBase) -> None:
        keys, session.shares_held = session.shares_held, None
        if keys is not None:
            self.shares.release(*keys)

    async def open(
        self,
        flow: Flow,
        tunnel_id: str,
        host: str,
        receive: Callable[[bytes], None],
        closed: Callable[[str], None],
        timeout: float,
    ) -> EdgeSession:
        self._check_limit()
        session = EdgeSession(self, next(self._ids), flow, tunnel_id, host, receive, closed)
        self._take_share(session)
        self.sessions[session.id] = session
        try:
            await self.register(session, timeout)
        except BaseException:
            session.finished = True
            self.sessions.pop(session.id, None)
            self._release_share(session)
            raise
        return session

    def new_id(self) -> int:
        return next(self._ids)

    @contextlib.contextmanager
    def reserving(self, session: UdpSessionBase) -> Iterator[None]:
        """Hold a slot under the cap while `session`, not in the table yet, opens (a direct
        session's socket), so concurrent opens cannot overshoot the limit. Its share is taken
        here too and kept once it opens (`add`)."""
        self._check_limit()
        self._take_share(session)
        self._opening_direct += 1
        try:
            yield
        except BaseException:
            self._release_share(session)
            raise
        finally:
            self._opening_direct -= 1

    def add(self, session: UdpSessionBase) -> None:
        """Take an opened session into the table: counted, swept when idle, closed with it."""
        self.sessions[session.id] = session

    async def register(self, session: EdgeSession, timeout: float) -> None:
        """Register `session` on a live connection of its tunnel, repeating until answered.

        SessionRegistration decides; this loop offers it connections, sends, and waits."""
        loop = self._loop
        reg: SessionRegistration[EdgeLink] = SessionRegistration(
            session.register_message(), loop.time(), timeout
        )
        actions = reg.start(loop.time())
        try:
            while actions:
                following: list[ss.RegisterAction[EdgeLink] | ss.RegisterFailed] = []
                for a in actions:
                    if isinstance(a, ss.NeedLink):
                        following = reg.link_offered(loop.time(), self._first_link(session))
                    elif isinstance(a, ss.Bind):
                        session.answer = loop.create_future()
                        a.link.sessions[session.id] = session
                    elif isinstance(a, ss.Unbind):
                        a.link.sessions.pop(session.id, None)
                    elif isinstance(a, ss.SendRegister):
                        a.link.send_datagram(a.data)
                    elif isinstance(a, ss.WaitUntil):
                        following = await self._wait(reg, session, a.at)
                    elif isinstance(a, ss.Attached):
                        session.attach(a.link)
                        return
                    elif isinstance(a, ss.RegisterFailed):
                        raise FlowError(a.result, a.reason)
                actions = following
        finally:
            for a in reg.cancel():  # refused, timed out, cancelled: leave nothing behind
                if isinstance(a, ss.Unbind):
                    a.link.sessions.pop(session.id, None)

    def _first_link(self, session: EdgeSession) -> EdgeLink | None:
        candidates = [c for c in self.tunnels.candidates(session.tunnel_id) if not c.closed]
        return candidates[0] if candidates else None

    async def _wait(
        self, reg: SessionRegistration[EdgeLink], session: EdgeSession, until: float
    ) -> list[ss.RegisterAction[EdgeLink] | ss.RegisterFailed]:
        loop = self._loop
        delay = max(0.0, until - loop.time())
        link = reg.link
        if link is None or session.answer is None:
            await asyncio.sleep(delay)
            return reg.timer(loop.time(), False)
        try:
            answer = await asyncio.wait_for(asyncio.shield(session.answer), delay)
        except TimeoutError:
            return reg.timer(loop.time(), link.closed)
        return reg.answer(answer)

    def connection_datagram(self, conn: EdgeLink, data: bytes) -> None:
        """A tunnel datagram arrived on `conn`."""
        try:
            msg = parse_datagram(data)
        except ProtocolError as e:
            self._bad_input(f"malformed datagram: {e}")
            return
        if isinstance(msg, tuple):
            session = conn.sessions.get(msg[0])
            if session is None:
                self.metrics_drop("unknown_session")
                return
            session.deliver(msg[1])
            return
        session = conn.sessions.get(msg.session_id)
        if session is None:
            if not isinstance(msg, SessionClose):
                self.metrics_drop("unknown_session")
            return
        if isinstance(msg, SessionClose) and session.conn is not conn:
            conn.sessions.pop(msg.session_id, None)  # its old path, after a move: it goes on
            return
        if isinstance(msg, SessionRegistered | SessionRefused):
            if session.answer is not None and not session.answer.done():
                session.answer.set_result(msg)
        elif isinstance(msg, SessionClose):
            session.peer_closed(msg.reason)
        else:
            self._bad_input("unexpected SESSION_REGISTER from a connector")

    def connection_lost(self, conn: EdgeLink) -> None:
        sessions = list(conn.sessions.values())
        conn.sessions.clear()
        for s in sessions:
            if s.answer is not None and not s.answer.done():
                continue  # its register loop notices the closed connection and moves on
            if s.conn is not None and s.conn is not conn:
                continue  # moved to another connection already; this was its old path
            s.connection_lost()

    def connection_draining(self, conn: EdgeLink) -> None:
        """`conn` takes no new flows: its UDP sessions move to the tunnel's other
        connections (a connector restart's successor has registered them already)."""
        for s in list(conn.sessions.values()):
            if isinstance(s, EdgeSession) and s.conn is conn:
                s.move()

    def forget(self, session: UdpSessionBase) -> None:
        self.sessions.pop(session.id, None)
        self._release_share(session)
        if session.conn is not None:
            session.conn.sessions.pop(session.id, None)
        self._on_finished(session.flow)

    async def _sweep(self) -> None:
        """Close sessions idle for longer than the idle timeout, and move sessions off
        connections that went silent (session_state.sweep decides which)."""
        while True:
            await asyncio.sleep(sweep_interval(self.idle_timeout, 0.5, self.unreplied_timeout))
            entries = [(s, self._link_rx(s)) for s in self.sessions.values()]
            idle, stale = sweep(self.now(), self.idle_timeout, entries, self.unreplied_timeout)
            for s in idle:
                reason = expiry_reason(s)
                self._metrics_expired(reason)
                s._finish(FlowResult.OK, f"{reason} timeout", notify_peer=SessionCloseReason.IDLE)
            for s in stale:
                if s.finished or s.conn is None:
                    continue  # ended meanwhile (a close callback above may end others)
                log.info("udp session %d: its connection went silent; moving it", s.id)
                s.conn.sessions.pop(s.id, None)
                s.connection_lost()

    @staticmethod
    def _link_rx(s: UdpSessionBase) -> float | None:
        """When the connection a registered tunnel session rides last heard the connector."""
        if isinstance(s, EdgeSession) and s.conn is not None and s.registered:
            return s.conn.last_rx
        return None

    def close(self) -> None:
        self._sweeper.cancel()
        for s in list(self.sessions.values()):
            s._finish(FlowResult.OK, "edge shutting down", notify_peer=SessionCloseReason.SHUTDOWN)
