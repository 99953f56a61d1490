"""The control stream's state machines: registration and credit routing, with no I/O.

Each tunnel connection's first bidirectional stream carries REGISTER and its answer, then
WINDOW frames (and UNREGISTER when a connector drains). `EdgeControl` and `ConnectorControl`
are the two ends. They take events (control-stream bytes, the stream's reset, the end of the
TLS handshake, a timer firing, the connection's loss) with the time passed in as `now`, and
return actions for the I/O code (edge_side.py, connector_side.py) to carry out in order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ramp.wire.tunnel import (
    ALPN,
    CloseCode,
    Frame,
    FrameDecoder,
    ProtocolError,
    Redial,
    Register,
    Registered,
    RegisterError,
    RegisterRefused,
    Successor,
    Unregister,
    Window,
    encode_frame,
)

REGISTRATION_TIMEOUT = 10.0  # an edge closes a connection that has not registered by then
REFUSAL_LINGER = 0.2  # the refusal gets this long to leave before the CONNECTION_CLOSE

# timer names (SetTimer.name, and what the I/O code passes back to `timer()`)
TIMER_REGISTRATION = "registration"
TIMER_REFUSAL = "refusal"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the store says about a registration."""

    ok: bool
    tunnel_name: str = ""
    error: RegisterError | None = None
    message: str = ""


# -- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendControl:
    """Send these bytes on the control stream."""

    data: bytes


@dataclass(frozen=True, slots=True)
class CloseConnection:
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class SetTimer:
    """Call `timer(name, now)` at loop time `at` (replacing a timer of that name)."""

    at: float
    name: str


@dataclass(frozen=True, slots=True)
class CancelTimer:
    name: str


@dataclass(frozen=True, slots=True)
class ControlError:
    """The peer broke the protocol on the control stream (to log and count)."""

    message: str


@dataclass(frozen=True, slots=True)
class RouteCredit:
    """A WINDOW frame: give the flow on `stream_id` more send credit."""

    stream_id: int
    increment: int


@dataclass(frozen=True, slots=True)
class Refused:
    """The edge turned a connector away (`reason` is the metric label)."""

    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Accepted:
    """The edge registered the connection: it may carry flows for `frame.tunnel_id`."""

    frame: Register
    tunnel_name: str


@dataclass(frozen=True, slots=True)
class Draining:
    """The connector said UNREGISTER: no new flows on this connection."""


@dataclass(frozen=True, slots=True)
class SuccessorServes:
    """The edge said SUCCESSOR: a new edge process serves; dial it, keep this connection."""

    edge_id: str


@dataclass(frozen=True, slots=True)
class RedialAsked:
    """The edge said REDIAL: dial a connection with this Initial id, then retire this one."""

    initial_cid: bytes


@dataclass(frozen=True, slots=True)
class RegistrationDone:
    """The connector's registration was accepted."""

    answer: Registered


@dataclass(frozen=True, slots=True)
class RegistrationFailed:
    """The connector's registration was refused (`code` set) or its connection was lost."""

    code: RegisterError | None
    message: str


ControlAction = (
    SendControl
    | CloseConnection
    | SetTimer
    | CancelTimer
    | ControlError
    | RouteCredit
    | Refused
    | Accepted
    | Draining
    | SuccessorServes
    | RedialAsked
    | RegistrationDone
    | RegistrationFailed
)


class _Control:
    """What both ends share: framing, credit routing, and the stream's end being fatal."""

    def __init__(self) -> None:
        self._decoder = FrameDecoder()
        self.closing = False  # we asked for the connection to close: ignore the peer

    def control_data(self, data: bytes, fin: bool, now: float) -> list[ControlAction]:
        if self.closing:
            return []
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as e:
            return self._fail(f"control stream: {e}", str(e))
        actions: list[ControlAction] = []
        for frame in frames:
            if self.closing:
                return actions
            if isinstance(frame, Window):
                actions.append(RouteCredit(frame.stream_id, frame.increment))
            else:
                actions += self._frame(frame, now)
        if fin and not self.closing:
            actions += self._fail("control stream closed by peer", "control stream closed")
        return actions

    def control_reset(self, code: int) -> list[ControlAction]:
        """The peer reset the control stream (or stopped reading it)."""
        if self.closing:
            return []
        return self._fail(f"control stream reset ({code})", "control stream reset")

    def window(self, stream_id: int, increment: int) -> list[ControlAction]:
        """Grant the peer's side of a flow more credit."""
        return [] if self.closing else [SendControl(encode_frame(Window(stream_id, increment)))]

    def connection_lost(self) -> list[ControlAction]:
        self.closing = True
        return []

    def _frame(self, frame: Frame, now: float) -> list[ControlAction]:
        raise NotImplementedError

    def _unexpected(self, frame: Frame) -> list[ControlAction]:
        name = type(frame).__name__
        return self._fail(f"unexpected {name} frame", f"unexpected {name}")

    def _fail(self, message: str, reason: str) -> list[ControlAction]:
        self.closing = True
        return [ControlError(message), CloseConnection(CloseCode.PROTOCOL_ERROR, reason)]


class EdgeControl(_Control):
    """The edge's end: waits for REGISTER, asks `check` (the store) for a verdict, answers,
    and closes connections that never register or are refused."""

    def __init__(
        self,
        check: Callable[[Register], Verdict],
        edge_id: str,
        timeout: float = REGISTRATION_TIMEOUT,
    ) -> None:
        super().__init__()
        self._check = check
        self.edge_id = edge_id
        self.timeout = timeout
        self.control_stream: int | None = None
        self.registered = False
        self.draining = False
        self.register: Register | None = None
        self.tunnel_name = ""
        self._refusal: RegisterError | None = None

    def handshake_done(self, alpn: str | None, now: float) -> list[ControlAction]:
        if alpn != ALPN:
            self.closing = True
            return [
                Refused("bad_request", f"ALPN {alpn!r} is not {ALPN}"),
                CloseConnection(CloseCode.PROTOCOL_ERROR, "unsupported ALPN"),
            ]
        return [SetTimer(now + self.timeout, TIMER_REGISTRATION)]

    def peer_stream(self, stream_id: int) -> bool:
        """The connector opened a stream: the first is the control stream, and connectors
        open no other streams in protocol v1 (False: reset it)."""
        if self.control_stream is None:
            self.control_stream = stream_id
            return True
        return False

    def timer(self, name: str, now: float) -> list[ControlAction]:
        if name == TIMER_REGISTRATION and not self.registered and not self.closing:
            self.closing = True
            return [
                Refused("bad_request", "no registration within the time limit"),
                CloseConnection(CloseCode.REGISTRATION_TIMEOUT, "registration timeout"),
            ]
        if name == TIMER_REFUSAL and self._refusal is not None:
            self.closing = True
            return [CloseConnection(CloseCode.REGISTRATION_REFUSED, self._refusal.name.lower())]
        return []

    def connection_lost(self) -> list[ControlAction]:
        super().connection_lost()
        return [CancelTimer(TIMER_REGISTRATION), CancelTimer(TIMER_REFUSAL)]

    def _frame(self, frame: Frame, now: float) -> list[ControlAction]:
        if isinstance(frame, Register) and not self.registered:
            return self._register(frame, now)
        if isinstance(frame, Unregister) and self.registered:
            self.draining = True
            return [Draining()]
        return self._unexpected(frame)

    def announce_successor(self, edge_id: str) -> list[ControlAction]:
        """Tell a registered connector that a successor process took over the listener."""
        if self.closing or not self.registered:
            return []
        return [SendControl(encode_frame(Successor(edge_id)))]

    def ask_redial(self, initial_cid: bytes) -> list[ControlAction]:
        """Ask a registered connector to move this connection (ramp.workers: to the worker
        whose steering cookie `initial_cid` carries)."""
        if self.closing or not self.registered or self.draining:
            return []
        return [SendControl(encode_frame(Redial(initial_cid)))]

    def _register(self, frame: Register, now: float) -> list[ControlAction]:
        actions: list[ControlAction] = [CancelTimer(TIMER_REGISTRATION)]
        verdict = self._check(frame)
        if not verdict.ok:
            assert verdict.error is not None
            self._refusal = verdict.error
            return [
                *actions,
                Refused(verdict.error.name.lower(), verdict.message),
                SendControl(encode_frame(RegisterRefused(verdict.error, verdict.message))),
                SetTimer(now + REFUSAL_LINGER, TIMER_REFUSAL),
            ]
        self.registered = True
        self.register = frame
        self.tunnel_name = verdict.tunnel_name
        return [
            *actions,
            SendControl(encode_frame(Registered(self.tunnel_name, self.edge_id))),
            Accepted(frame, verdict.tunnel_name),
        ]


class ConnectorControl(_Control):
    """The connector's end: sends REGISTER and waits for the edge's answer."""

    def __init__(self) -> None:
        super().__init__()
        self.state = "idle"  # -> registering -> registered | refused | lost
        self.edge_id = ""

    @property
    def accepts_flows(self) -> bool:
        """Flows the edge opens are served only on a registered connection."""
        return self.state == "registered"

    def start(self, register: Register) -> list[ControlAction]:
        self.state = "registering"
        return [SendControl(encode_frame(register))]

    def unregister(self) -> list[ControlAction]:
        """The connector drains: ask the edge to send no new flows here."""
        return [] if self.closing else [SendControl(encode_frame(Unregister()))]

    def connection_lost(self, reason: str = "") -> list[ControlAction]:
        super().connection_lost()
        if self.state in ("idle", "registering"):
            self.state = "lost"
            return [RegistrationFailed(None, reason)]
        return []

    def _frame(self, frame: Frame, now: float) -> list[ControlAction]:
        if isinstance(frame, Registered) and self.state == "registering":
            self.state = "registered"
            self.edge_id = frame.edge_id
            return [RegistrationDone(frame)]
        if isinstance(frame, Successor) and self.state == "registered":
            return [SuccessorServes(frame.edge_id)]
        if isinstance(frame, Redial) and self.state == "registered":
            return [RedialAsked(frame.initial_cid)]
        if isinstance(frame, RegisterRefused) and self.state == "registering":
            self.state = "refused"
            return [RegistrationFailed(frame.code, frame.message)]
        return self._unexpected(frame)
