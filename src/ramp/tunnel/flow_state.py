"""Opening a flow stream, both ends, as sans-I/O state machines.

The edge opens a bidirectional stream and sends CONNECT_TCP; the connector dials the origin
and answers CONNECT_RESULT, after which the stream carries raw payload. Payload may follow
either frame at once, before the other side answered (up to the window granted), and a reset
or the connection's loss may race the answer. `FlowOpen` (edge) and `FlowAccept` (connector)
take the stream's events and say what happened; the I/O code waits, dials and bridges.
"""

from __future__ import annotations

from dataclasses import dataclass

from ramp.tunnel.bridge_state import FLOW_WINDOW
from ramp.wire.tunnel import (
    ConnectCode,
    ConnectResult,
    ConnectTcp,
    FrameDecoder,
    ProtocolError,
    StreamError,
    encode_frame,
)

# -- what the edge learns ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answered:
    """CONNECT_RESULT arrived (ok or not: see `result.code`)."""

    result: ConnectResult


@dataclass(frozen=True, slots=True)
class OpenFailed:
    """The stream broke before an answer: malformed, closed or reset by the connector."""

    reason: str


@dataclass(frozen=True, slots=True)
class OpenLost:
    """The connection died before an answer: the flow may try another connection."""


OpenEvent = Answered | OpenFailed | OpenLost


class FlowOpen:
    """The edge's end of a flow stream until the bridge takes it over."""

    def __init__(self) -> None:
        self.answered = False
        self.failed = False
        self.extra: list[bytes] = []  # origin bytes right behind the answer
        self.extra_len = 0
        self.fin = False
        self.reset_code: int | None = None  # a reset, also one after the answer
        self.lost = False
        self._decoder = FrameDecoder()

    @property
    def waiting(self) -> bool:
        return not (self.answered or self.failed or self.lost)

    def stream_data(self, data: bytes, fin: bool) -> list[OpenEvent]:
        if self.answered:
            # origin bytes that came right behind the answer, before the bridge took over
            self.extra.append(data)
            self.extra_len += len(data)
            self.fin = self.fin or fin
            return []
        if not self.waiting:
            return []
        try:
            frame = self._decoder.feed_one(data)
        except ProtocolError as e:
            return self._fail(f"tunnel protocol: {e}")
        if frame is None:
            return self._fail("connector closed the stream") if fin else []
        if not isinstance(frame, ConnectResult):
            return self._fail("tunnel protocol: expected CONNECT_RESULT")
        rest = self._decoder.take_rest()
        if rest:
            self.extra.append(rest)
            self.extra_len += len(rest)
        self.fin = fin
        self.answered = True
        return [Answered(frame)]

    def stream_reset(self, code: int) -> list[OpenEvent]:
        self.reset_code = code  # also after the answer: the bridge must learn of it
        return self._fail(f"connector reset ({code})") if self.waiting else []

    def stop_sending(self, code: int) -> list[OpenEvent]:
        return self.stream_reset(code)

    def connection_lost(self) -> list[OpenEvent]:
        was_waiting = self.waiting
        self.lost = True
        return [OpenLost()] if was_waiting else []

    def _fail(self, reason: str) -> list[OpenEvent]:
        self.failed = True
        return [OpenFailed(reason)]


# -- what the connector learns -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DialRequested:
    """CONNECT_TCP arrived: dial `header`'s destination."""

    header: ConnectTcp


@dataclass(frozen=True, slots=True)
class AcceptError:
    """The edge broke the protocol: reset the stream with `code` (and count it)."""

    message: str
    code: int = StreamError.PROTOCOL


@dataclass(frozen=True, slots=True)
class ForgetFlow:
    """The stream ended before a whole CONNECT_TCP: drop its handler, nothing to answer."""


@dataclass(frozen=True, slots=True)
class CancelDial:
    """The edge gave up (reset, connection lost) while the origin was being dialled."""


@dataclass(frozen=True, slots=True)
class ResetFlow:
    code: int


AcceptAction = DialRequested | AcceptError | ForgetFlow | CancelDial | ResetFlow


class FlowAccept:
    """The connector's end of a flow stream until the bridge takes it over.

    States: reading the header -> dialling -> bridged, or gone (reset, lost, broken).
    """

    def __init__(self, window: int = FLOW_WINDOW) -> None:
        self.window = window  # the credit CONNECT_RESULT will grant: early bytes must fit
        self.header: ConnectTcp | None = None
        self.early: list[bytes] = []
        self.early_len = 0
        self.fin = False
        self.gone = False
        self.bridged = False
        self._decoder = FrameDecoder()

    def stream_data(self, data: bytes, fin: bool) -> list[AcceptAction]:
        if self.gone:
            return []
        if self.header is not None:
            # payload before we answered: allowed up to the window we are about to grant
            self.early.append(data)
            self.early_len += len(data)
            self.fin = self.fin or fin
            if self.early_len > self.window:
                return self._error("payload before CONNECT_RESULT exceeds the window")
            return []
        try:
            frame = self._decoder.feed_one(data)
        except ProtocolError as e:
            return self._error(str(e))
        if frame is None:
            return [ForgetFlow()] if fin else []
        if not isinstance(frame, ConnectTcp):
            return self._error("expected a CONNECT_TCP frame")
        self.header = frame
        rest = self._decoder.take_rest()
        if rest:
            self.early.append(rest)
            self.early_len += len(rest)
        self.fin = fin
        return [DialRequested(frame)]

    def stream_reset(self, code: int) -> list[AcceptAction]:
        dialling = self.header is not None and not self.bridged and not self.gone
        self.gone = True
        return [CancelDial()] if dialling else []

    def stop_sending(self, code: int) -> list[AcceptAction]:
        return [*self.stream_reset(code), ResetFlow(StreamError.FLOW_ABORT)]

    def connection_lost(self) -> list[AcceptAction]:
        return self.stream_reset(0)

    def succeeded(self, message: str = "") -> tuple[bytes, list[bytes], bool]:
        """The origin answered: (CONNECT_RESULT to send, early bytes for the bridge, FIN).
        `message` rides in the OK answer (what the connector did: `proxy-protocol v2`)."""
        self.bridged = True
        early, self.early = self.early, []
        answer = encode_frame(ConnectResult(ConnectCode.OK, self.window, message))
        return answer, early, self.fin

    @staticmethod
    def refusal(code: ConnectCode, message: str) -> bytes:
        """The CONNECT_RESULT that says the dial failed (sent with FIN)."""
        return encode_frame(ConnectResult(code, 0, message))

    def _error(self, message: str) -> list[AcceptAction]:
        dialling = self.header is not None and not self.bridged
        self.gone = True
        actions: list[AcceptAction] = [AcceptError(message)]
        return [*actions, CancelDial()] if dialling else actions
