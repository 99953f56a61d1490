"""The stream bridge's state machine: per-flow credit, half-close and reset, with no I/O.

One flow relays a TCP socket and a tunnel stream. qh3 grants QUIC flow-control credit as soon
as it hands data to us, so the tunnel protocol has its own per-flow credit (WINDOW frames): a
side sends only what the other side granted, and grants more only once earlier bytes left for
the kernel. `BridgeState` decides all of that from events (bytes from either side, credit,
FIN, reset, the TCP write-buffer level) and answers with actions the I/O code
(tunnel/bridge.py) carries out in order. It never touches a socket or a clock, so tests drive
it event by event.
"""

from __future__ import annotations

from dataclasses import dataclass

from ramp.wire.tunnel import StreamError

FLOW_WINDOW = 1024 * 1024  # per-direction credit; bounds user-space bytes per flow
WRITE_HIGH = 256 * 1024  # TCP write buffer above which no credit is granted
WRITE_LOW = 64 * 1024


# -- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendStream:
    """Send bytes (and/or FIN) on the flow's tunnel stream."""

    data: bytes
    fin: bool = False


@dataclass(frozen=True, slots=True)
class ResetStream:
    """Abort both directions of the tunnel stream with `code`."""

    code: int


@dataclass(frozen=True, slots=True)
class ForgetStream:
    """Both directions finished cleanly: the connection may drop its handler."""


@dataclass(frozen=True, slots=True)
class Grant:
    """Give the peer `increment` more bytes of credit (a WINDOW frame)."""

    increment: int


@dataclass(frozen=True, slots=True)
class WriteTcp:
    data: bytes


@dataclass(frozen=True, slots=True)
class WriteTcpEof:
    """Half-close the TCP socket (the peer sent FIN)."""


@dataclass(frozen=True, slots=True)
class PauseTcpReading:
    """No credit for what TCP sends: stop reading until credit comes."""


@dataclass(frozen=True, slots=True)
class ResumeTcpReading:
    pass


@dataclass(frozen=True, slots=True)
class CloseTcp:
    """Close the TCP socket once its buffered bytes are written."""


@dataclass(frozen=True, slots=True)
class AbortTcp:
    """Reset the TCP socket (RST, not FIN: the other side must see that the flow broke)."""


@dataclass(frozen=True, slots=True)
class Finished:
    """The flow is over (exactly once); `BridgeState.reset_by` says whether by a reset."""


BridgeAction = (
    SendStream
    | ResetStream
    | ForgetStream
    | Grant
    | WriteTcp
    | WriteTcpEof
    | PauseTcpReading
    | ResumeTcpReading
    | CloseTcp
    | AbortTcp
    | Finished
)


class BridgeState:
    """Credit and lifecycle of one flow. Every event method returns the actions to carry out.

    `send_credit` is what the peer granted us up front (the window in CONNECT_TCP or
    CONNECT_RESULT); `window` is what we grant the peer, and the most bytes it may have in
    flight towards us at any time.
    """

    def __init__(self, send_credit: int, window: int = FLOW_WINDOW) -> None:
        self.window = window
        # grants withheld for bytes in the TCP write buffer are made when it drains, and only
        # a buffer that went above `write_high` reports draining (resume_writing): with a
        # window smaller than WRITE_HIGH the marks must scale down with it, or a flow whose
        # client paused once would wait forever for credit
        self.write_high = min(WRITE_HIGH, window // 2)
        self.write_low = min(WRITE_LOW, window // 8)
        self.credit = send_credit  # bytes we may still send on the stream
        self.granted = window  # total the peer may send us
        self.received = 0  # total the peer sent us
        self._pending_out = bytearray()  # TCP bytes waiting for credit
        self._pending_in: list[bytes] = []  # stream bytes that came before the TCP socket
        self.tcp_attached = False
        self.tcp_eof = False  # TCP side finished sending
        self.fin_sent = False
        self.fin_received = False
        self.finished = False
        self.bytes_tcp_to_quic = 0
        self.bytes_quic_to_tcp = 0
        self.reset_by: str | None = None  # "tcp" or "tunnel" if the flow ended by a reset

    @property
    def pending_out(self) -> int:
        """TCP bytes held back for lack of credit."""
        return len(self._pending_out)

    @property
    def pending_in(self) -> int:
        """Stream bytes held until the TCP socket is attached."""
        return sum(len(c) for c in self._pending_in)

    # -- TCP side --------------------------------------------------------------------------

    def tcp_attached_event(self) -> list[BridgeAction]:
        """The TCP socket is connected to the bridge. Follow with `tcp_buffer()`."""
        self.tcp_attached = True
        if self.finished:  # the stream died before the socket was attached
            return [AbortTcp()]
        actions: list[BridgeAction] = [WriteTcp(chunk) for chunk in self._pending_in]
        self._pending_in = []
        if self.fin_received:
            actions.append(WriteTcpEof())
        return actions

    def tcp_data(self, data: bytes) -> list[BridgeAction]:
        self.bytes_tcp_to_quic += len(data)
        if self._pending_out or len(data) > self.credit:
            self._pending_out += data
            return self._flush_out()
        self.credit -= len(data)
        if self.credit == 0 and self.tcp_attached and not self.tcp_eof:
            # stop before the next read rather than after: a stalled flow then holds no read
            # chunk here, its bytes wait in the kernel and TCP pushes back on the sender
            return [SendStream(data), PauseTcpReading()]
        return [SendStream(data)]

    def tcp_eof_event(self) -> list[BridgeAction]:
        self.tcp_eof = True
        return self._flush_out()

    def tcp_closed(self, error: bool) -> list[BridgeAction]:
        """The TCP socket is gone; `error` if it reset or failed."""
        self.tcp_attached = False
        if self.finished:
            return []
        actions: list[BridgeAction] = []
        if error or not (self.fin_sent and self.fin_received):
            # the TCP peer reset, or the socket died mid-flow: cut the stream too
            self.reset_by = "tcp"
            actions.append(ResetStream(StreamError.FLOW_RESET))
        return actions + self._finish()

    def tcp_buffer(self, buffered: int) -> list[BridgeAction]:
        """The TCP write buffer holds `buffered` bytes (after writes, or when it drained):
        grant the peer credit for what left for the kernel."""
        if self.fin_received or self.finished or buffered > self.write_high:
            return []
        increment = self.received - buffered + self.window - self.granted
        # grant in quarters of the window: one WINDOW frame per 256 KiB, not per packet
        if increment >= self.window // 4:
            self.granted += increment
            return [Grant(increment)]
        return []

    # -- tunnel side -----------------------------------------------------------------------

    def add_credit(self, increment: int) -> list[BridgeAction]:
        if self.finished:
            return []  # a WINDOW that crossed our reset: nothing may be sent any more
        self.credit += increment
        return self._flush_out()

    def stream_bytes(self, data: bytes) -> list[BridgeAction]:
        """Payload from the tunnel stream. Follow with `tcp_buffer()` if the TCP socket is
        attached."""
        if self.finished or not data:
            return []
        self.received += len(data)
        if self.received > self.granted:
            return self._fail(StreamError.PROTOCOL)  # the peer overran its window
        self.bytes_quic_to_tcp += len(data)
        if not self.tcp_attached:
            self._pending_in.append(data)
            return []
        return [WriteTcp(data)]

    def stream_fin(self) -> list[BridgeAction]:
        if self.finished or self.fin_received:
            return []
        self.fin_received = True
        actions: list[BridgeAction] = [WriteTcpEof()] if self.tcp_attached else []
        return actions + self._check_done()

    def stream_reset(self, code: int) -> list[BridgeAction]:
        return self._reset_by_tunnel([])

    def stop_sending(self, code: int) -> list[BridgeAction]:
        if self.finished:
            return []
        return self._reset_by_tunnel([ResetStream(StreamError.FLOW_RESET)])

    def tunnel_lost(self) -> list[BridgeAction]:
        return self._reset_by_tunnel([])

    def abort(self, code: int = StreamError.FLOW_ABORT) -> list[BridgeAction]:
        """Cut the flow from outside (shutdown, grace period over)."""
        return self._fail(code)

    # -- internals -------------------------------------------------------------------------

    def _reset_by_tunnel(self, first: list[BridgeAction]) -> list[BridgeAction]:
        if self.finished:
            return []
        self.reset_by = "tunnel"
        return [*first, *self._abort_tcp(), *self._finish()]

    def _flush_out(self) -> list[BridgeAction]:
        if self.finished:
            return []
        actions: list[BridgeAction] = []
        if self._pending_out and self.credit > 0:
            n = min(self.credit, len(self._pending_out))
            chunk = bytes(self._pending_out[:n])
            del self._pending_out[:n]
            self.credit -= n
            actions.append(SendStream(chunk))
        if self._pending_out:
            if self.tcp_attached and not self.tcp_eof:
                actions.append(PauseTcpReading())
            return actions
        if self.tcp_eof:
            if not self.fin_sent:
                self.fin_sent = True
                actions.append(SendStream(b"", fin=True))
                actions += self._check_done()
        elif self.tcp_attached:
            actions.append(ResumeTcpReading())
        return actions

    def _check_done(self) -> list[BridgeAction]:
        if not (self.fin_sent and self.fin_received) or self.finished:
            return []
        attached = self.tcp_attached
        actions: list[BridgeAction] = [ForgetStream(), *self._finish()]
        if attached:
            actions.append(CloseTcp())  # flushes what is buffered, then closes
        return actions

    def _fail(self, code: int) -> list[BridgeAction]:
        if self.finished:
            return []
        return [ResetStream(code), *self._abort_tcp(), *self._finish()]

    def _abort_tcp(self) -> list[BridgeAction]:
        return [AbortTcp()] if self.tcp_attached else []

    def _finish(self) -> list[BridgeAction]:
        if self.finished:
            return []
        self.finished = True
        self._pending_out.clear()
        self._pending_in.clear()
        return [Finished()]
