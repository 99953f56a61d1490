"""UDP sessions' protocol state, with no I/O: the edge's registration with retries, the idle
and stale-connection sweep, and the connector's admission of new sessions.

A UDP session is registered with SESSION_REGISTER datagrams, which may be lost: the edge
repeats them every REGISTER_RETRY until the connector answers or the deadline passes, moving to
another connection if its connection dies. These machines take the time as `now` and return
actions; sessions_edge.py and sessions_connector.py carry them out.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from ramp.flows.client_shares import SOURCE_SHARE, ClientShares
from ramp.flows.flow import FlowResult
from ramp.tunnel.interfaces import STALE_AFTER
from ramp.wire.tunnel import (
    SessionError,
    SessionRefused,
    SessionRegistered,
    encode_session_control,
)

REGISTER_RETRY = 0.25  # seconds between SESSION_REGISTER repeats while unanswered
LINK_POLL = 0.1  # how often to look again for a connection when the tunnel has none

SESSION_RESULTS = {
    SessionError.UNREACHABLE: FlowResult.HOST_UNREACHABLE,
    # the connector has no source port left for the destination (ramp.offramps.egress)
    SessionError.CANNOT_BIND: FlowResult.NET_UNREACHABLE,
    SessionError.TOO_MANY_SESSIONS: FlowResult.ERROR,
    SessionError.NOT_PERMITTED: FlowResult.NOT_PERMITTED,
    SessionError.ERROR: FlowResult.ERROR,
}

L = TypeVar("L")  # a connection, opaque to the machines


# -- the edge's registration -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NeedLink:
    """Offer the first live connection of the session's tunnel to `link_offered()`."""


@dataclass(frozen=True, slots=True)
class Bind(Generic[L]):
    """Route this session's answers on `link` to the registration."""

    link: L


@dataclass(frozen=True, slots=True)
class Unbind(Generic[L]):
    link: L


@dataclass(frozen=True, slots=True)
class SendRegister(Generic[L]):
    """Send SESSION_REGISTER (`data`) on `link`."""

    link: L
    data: bytes


@dataclass(frozen=True, slots=True)
class WaitUntil:
    """Wait for an answer (if bound) until loop time `at`, then call `timer()`."""

    at: float


@dataclass(frozen=True, slots=True)
class Attached(Generic[L]):
    """The connector took the session on `link`: datagrams may flow."""

    link: L


@dataclass(frozen=True, slots=True)
class RegisterFailed:
    result: FlowResult
    reason: str


RegisterAction = NeedLink | Bind[L] | Unbind[L] | SendRegister[L] | WaitUntil | Attached[L]


class SessionRegistration(Generic[L]):
    """One registration of one session: repeat SESSION_REGISTER on a connection until the
    connector answers, the connection dies (then try another), or the deadline passes."""

    def __init__(
        self, message: bytes, now: float, timeout: float, retry: float = REGISTER_RETRY
    ) -> None:
        self.message = message
        self.deadline = now + timeout
        self.retry = retry
        self.link: L | None = None
        self.finished = False

    def start(self, now: float) -> list[RegisterAction[L] | RegisterFailed]:
        return self._timed_out() if now >= self.deadline else [NeedLink()]

    def link_offered(self, now: float, link: L | None) -> list[RegisterAction[L] | RegisterFailed]:
        """The first live connection of the tunnel, or None when it has none right now."""
        if self.finished:
            return []
        if link is None:
            return [WaitUntil(min(now + LINK_POLL, max(now, self.deadline)))]
        self.link = link
        return [Bind(link), *self._send(now)]

    def timer(self, now: float, link_closed: bool) -> list[RegisterAction[L] | RegisterFailed]:
        """A wait ended without an answer; `link_closed` if the bound connection died."""
        if self.finished:
            return []
        actions: list[RegisterAction[L] | RegisterFailed] = []
        if self.link is not None:
            if not link_closed and now < self.deadline:
                return self._send(now)  # the datagram or its answer was lost: repeat
            actions.append(Unbind(self.link))
            self.link = None
        if now >= self.deadline:
            return [*actions, *self._timed_out()]
        return [*actions, NeedLink()]

    def answer(
        self, msg: SessionRegistered | SessionRefused
    ) -> list[RegisterAction[L] | RegisterFailed]:
        if self.finished or self.link is None:
            return []
        link, self.link, self.finished = self.link, None, True
        if isinstance(msg, SessionRegistered):
            return [Attached(link)]  # stays bound: its datagrams come through the binding
        result = SESSION_RESULTS.get(msg.code, FlowResult.ERROR)
        return [Unbind(link), RegisterFailed(result, msg.message or msg.code.name.lower())]

    def cancel(self) -> list[RegisterAction[L] | RegisterFailed]:
        """Given up from outside (the flow was cancelled): leave nothing behind."""
        self.finished = True
        link, self.link = self.link, None
        return [Unbind(link)] if link is not None else []

    def _send(self, now: float) -> list[RegisterAction[L] | RegisterFailed]:
        assert self.link is not None
        return [
            SendRegister(self.link, self.message),
            WaitUntil(min(now + self.retry, self.deadline)),
        ]

    def _timed_out(self) -> list[RegisterAction[L] | RegisterFailed]:
        self.finished = True
        return [RegisterFailed(FlowResult.TIMEOUT, "the connector did not answer the UDP session")]


# -- the sweep ----------------------------------------------------------------------------------


class Sweepable(Protocol):
    @property
    def last_active(self) -> float: ...

    @property
    def replied(self) -> bool:
        """Whether the origin has answered at least once."""
        ...


S = TypeVar("S", bound=Sweepable)


def sweep_interval(
    idle_timeout: float, cap: float, unreplied_timeout: float | None = None
) -> float:
    """How often to sweep: often enough that idle sessions end close to their timeout."""
    shortest = idle_timeout if unreplied_timeout is None else min(idle_timeout, unreplied_timeout)
    return min(cap, shortest / 4)


def expiry_reason(session: Sweepable) -> str:
    """The label an expired session is counted under."""
    return "idle" if session.replied else "unreplied"


def sweep(
    now: float,
    idle_timeout: float,
    sessions: Iterable[tuple[S, float | None]],
    unreplied_timeout: float | None = None,
) -> tuple[list[S], list[S]]:
    """(sessions idle past their timeout, sessions to move off a silent connection).

    Each entry is a session and the last time its connection heard the peer, or None if it
    rides no registered connection (or needs none: direct egress). A session the origin never
    answered may only stay idle for `unreplied_timeout` (conntrack's unreplied UDP entries):
    datagrams sprayed at many destinations that never answer must not hold the table for the
    long timeout that real conversations get.
    """
    cutoff = now - idle_timeout
    short = cutoff if unreplied_timeout is None else now - min(idle_timeout, unreplied_timeout)
    idle: list[S] = []
    stale: list[S] = []
    for session, link_rx in sessions:
        if session.last_active < (cutoff if session.replied else short):
            idle.append(session)
        elif link_rx is not None and now - link_rx > STALE_AFTER:
            # a killed connector is noticed here in about 2.5 s, long before QUIC's idle timeout
            stale.append(session)
    return idle, stale


# -- the connector's admission -----------------------------------------------------------------

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Answer(Generic[L]):
    """Send this session-control datagram on `link`."""

    link: L
    data: bytes


@dataclass(frozen=True, slots=True)
class OpenOrigin(Generic[K]):
    """Open the origin socket for the session `key` (then call `opened` or `open_failed`)."""

    key: K


@dataclass(frozen=True, slots=True)
class Dropped:
    """A counter to move (why a session was turned away)."""

    reason: str


AdmitAction = Answer[L] | OpenOrigin[K] | Dropped


class SessionAdmission(Generic[K, L]):
    """Which SESSION_REGISTERs the connector takes, and on which connection it answers.

    A repeat (its answer was lost) or the same session moving to another connection is
    answered again without a second origin socket; while the socket opens, the answer goes to
    the newest connection the edge asked on. A session's replies go on the connection its
    latest answer went on.
    """

    def __init__(self, limit: int, shares: ClientShares[Hashable] | None = None) -> None:
        self.limit = limit
        self.open: set[K] = set()
        self.opening: dict[K, L] = {}  # key -> the newest connection the edge asked on
        self.draining = False
        self.shares: ClientShares[Hashable] = shares or ClientShares(0, 0)
        self._holders: dict[K, tuple[Hashable | None, Hashable | None]] = {}

    def register(
        self,
        key: K,
        link: L,
        session_id: int,
        source: Hashable | None = None,
        identity: Hashable | None = None,
    ) -> list[AdmitAction[L, K]]:
        """`source` and `identity` name whose shares the session counts against (None: no
        share of that kind)."""
        if key in self.open:
            return [Answer(link, encode_session_control(SessionRegistered(session_id)))]
        if key in self.opening:
            self.opening[key] = link  # answer on the newest connection once open
            return []
        if self.draining:
            return [
                self._refusal(
                    link, session_id, SessionError.NOT_PERMITTED, "connector is shutting down"
                )
            ]
        if len(self.open) + len(self.opening) >= self.limit:
            return [
                Dropped("too_many_sessions"),
                self._refusal(
                    link,
                    session_id,
                    SessionError.TOO_MANY_SESSIONS,
                    f"limit of {self.limit} sessions",
                ),
            ]
        refused = self.shares.try_take(source, identity)
        if refused is not None:
            share = self.shares.sources if refused == SOURCE_SHARE else self.shares.identities
            return [
                Dropped(refused),
                self._refusal(
                    link,
                    session_id,
                    SessionError.TOO_MANY_SESSIONS,
                    f"{refused.replace('_', ' ')} of {share.limit} sessions",
                ),
            ]
        self._holders[key] = (source, identity)
        self.opening[key] = link
        return [OpenOrigin(key)]

    def link_for(self, key: K) -> L:
        """The connection an opening session will be answered on."""
        return self.opening[key]

    def opened(self, key: K, session_id: int) -> list[AdmitAction[L, K]]:
        link = self.opening.pop(key)
        self.open.add(key)
        return [Answer(link, encode_session_control(SessionRegistered(session_id)))]

    def open_failed(
        self, key: K, session_id: int, code: SessionError, why: str
    ) -> list[AdmitAction[L, K]]:
        link = self.opening.pop(key)
        self._release(key)
        return [self._refusal(link, session_id, code, why)]

    def abandoned(self, key: K) -> None:
        """The open was cancelled (shutdown)."""
        if self.opening.pop(key, None) is not None:
            self._release(key)

    def closed(self, key: K) -> bool:
        """The session ended; False if it was not open (ended already)."""
        if key not in self.open:
            return False
        self.open.discard(key)
        self._release(key)
        return True

    def _release(self, key: K) -> None:
        holder = self._holders.pop(key, None)
        if holder is not None:
            self.shares.release(*holder)

    @staticmethod
    def _refusal(link: L, session_id: int, code: SessionError, why: str) -> Answer[L]:
        return Answer(link, encode_session_control(SessionRefused(session_id, code, why)))
