"""The stream bridge's state machine, event by event, and as a Hypothesis state machine.

No sockets and no sleeps: a test plays the TCP socket, the kernel's write buffer and the
tunnel peer, and checks what BridgeState asks for.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from ramp.tunnel import bridge_state as bs
from ramp.tunnel.bridge_state import BridgeState
from ramp.wire.tunnel import StreamError


def kinds(actions: list[bs.BridgeAction]) -> list[type]:
    return [type(a) for a in actions]


def test_sends_only_what_the_peer_granted() -> None:
    s = BridgeState(send_credit=10, window=100)
    s.tcp_attached_event()
    assert s.tcp_data(b"0123456789abc") == [bs.SendStream(b"0123456789"), bs.PauseTcpReading()]
    assert s.pending_out == 3
    assert s.add_credit(2) == [bs.SendStream(b"ab"), bs.PauseTcpReading()]
    assert s.add_credit(5) == [bs.SendStream(b"c"), bs.ResumeTcpReading()]
    assert s.credit == 4


def test_reading_stops_when_the_credit_is_used_up_exactly_and_resumes_with_more() -> None:
    # a stalled peer then leaves nothing held back here: the bytes wait in the kernel
    s = BridgeState(send_credit=10, window=100)
    s.tcp_attached_event()
    assert s.tcp_data(b"0123456789") == [bs.SendStream(b"0123456789"), bs.PauseTcpReading()]
    assert s.pending_out == 0
    assert s.add_credit(5) == [bs.ResumeTcpReading()]
    assert s.tcp_data(b"abc") == [bs.SendStream(b"abc")]


def test_a_small_window_gets_credit_back_once_a_paused_client_drains() -> None:
    # the client stopped reading for a moment: everything granted sits in the write buffer,
    # the peer has no credit left, and only the drain (resume_writing) can grant more
    window = 64 * 1024
    s = BridgeState(send_credit=0, window=window)
    s.tcp_attached_event()
    s.stream_bytes(b"x" * window)
    assert s.tcp_buffer(window) == []
    assert window > s.write_high  # so the transport did call pause_writing
    assert s.tcp_buffer(s.write_low) == [bs.Grant(window - s.write_low)]


def test_grants_in_quarters_once_bytes_left_for_the_kernel() -> None:
    s = BridgeState(send_credit=0, window=100)
    s.tcp_attached_event()
    assert s.stream_bytes(b"x" * 30) == [bs.WriteTcp(b"x" * 30)]
    assert s.tcp_buffer(30) == []  # still in the write buffer: no credit
    assert s.tcp_buffer(10) == []  # 20 drained: under a quarter window
    assert s.tcp_buffer(0) == [bs.Grant(30)]
    assert s.granted == 130
    assert s.tcp_buffer(bs.WRITE_HIGH + 1) == []


def test_overrun_resets_with_protocol_error() -> None:
    s = BridgeState(send_credit=0, window=8)
    s.tcp_attached_event()
    assert s.stream_bytes(b"12345678") == [bs.WriteTcp(b"12345678")]
    assert kinds(s.stream_bytes(b"9")) == [bs.ResetStream, bs.AbortTcp, bs.Finished]
    assert s.stream_bytes(b"more") == [] and s.stream_fin() == []


def test_bytes_before_the_socket_are_written_first() -> None:
    s = BridgeState(send_credit=0, window=100)
    assert s.stream_bytes(b"early") == []
    assert s.stream_fin() == []
    assert s.tcp_attached_event() == [bs.WriteTcp(b"early"), bs.WriteTcpEof()]
    assert s.tcp_buffer(0) == []  # the peer finished: no more credit for it


def test_both_fins_finish_cleanly_once() -> None:
    s = BridgeState(send_credit=100, window=100)
    s.tcp_attached_event()
    assert s.tcp_eof_event() == [bs.SendStream(b"", fin=True)]
    assert s.stream_fin() == [bs.WriteTcpEof(), bs.ForgetStream(), bs.Finished(), bs.CloseTcp()]
    assert s.reset_by is None
    assert s.tcp_closed(error=False) == []
    assert s.stream_reset(0) == [] and s.abort() == []


def test_fin_waits_for_held_back_bytes() -> None:
    s = BridgeState(send_credit=2, window=100)
    s.tcp_attached_event()
    assert s.tcp_data(b"abcd") == [bs.SendStream(b"ab"), bs.PauseTcpReading()]
    assert s.tcp_eof_event() == []
    assert not s.fin_sent
    assert s.add_credit(10) == [bs.SendStream(b"cd"), bs.SendStream(b"", fin=True)]


def test_tcp_closing_mid_flow_resets_the_stream() -> None:
    s = BridgeState(send_credit=100)
    s.tcp_attached_event()
    assert s.tcp_closed(error=False) == [bs.ResetStream(StreamError.FLOW_RESET), bs.Finished()]
    assert s.reset_by == "tcp"


def test_stop_sending_resets_and_aborts_once() -> None:
    s = BridgeState(send_credit=100)
    s.tcp_attached_event()
    assert s.stop_sending(1) == [
        bs.ResetStream(StreamError.FLOW_RESET),
        bs.AbortTcp(),
        bs.Finished(),
    ]
    assert s.reset_by == "tunnel"
    assert s.stream_reset(1) == [] and s.tunnel_lost() == [] and s.stop_sending(1) == []


def test_stream_dying_before_the_socket_aborts_it_on_attach() -> None:
    s = BridgeState(send_credit=100)
    assert s.tunnel_lost() == [bs.Finished()]
    assert s.tcp_attached_event() == [bs.AbortTcp()]


def test_credit_after_the_end_sends_nothing() -> None:
    s = BridgeState(send_credit=0)
    s.tcp_attached_event()
    s.tcp_data(b"held")
    s.abort()
    assert s.add_credit(100) == []
    assert s.pending_out == 0


class BridgeModel(RuleBasedStateMachine):
    """Plays the TCP socket, the kernel write buffer and a tunnel peer against BridgeState.

    Invariants: bytes arrive in order both ways; we never send more than we were granted, the
    peer never has more than one window in flight; FIN, RESET and the end happen at most once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.state: BridgeState | None = None

    @initialize(
        credit=st.integers(min_value=0, max_value=64),
        window=st.integers(min_value=4, max_value=64),
    )
    def start(self, credit: int, window: int) -> None:
        self.state = BridgeState(send_credit=credit, window=window)
        self.window = window
        self.credit_total = credit  # what the peer allowed us to send
        self.grant_total = window  # what we allowed the peer to send
        self.attached = False
        self.reading = True
        self.tcp_eof = False
        self.peer_fin = False
        self.tcp_fed = bytearray()  # what the TCP socket gave the bridge
        self.stream_sent = bytearray()  # what the bridge sent on the tunnel stream
        self.peer_sent = bytearray()  # what the peer sent on the tunnel stream
        self.tcp_written = bytearray()  # what the bridge wrote to the TCP socket
        self.buffered = 0  # of tcp_written, still in the write buffer
        self.fins = self.resets = self.ends = 0
        self.counter = 0

    def _run(self, actions: list[bs.BridgeAction]) -> None:
        for a in actions:
            if isinstance(a, bs.SendStream | bs.Grant | bs.WriteTcp):
                assert self.ends == 0, f"{a} after the end"
            if isinstance(a, bs.SendStream):
                assert self.fins == 0, "bytes after FIN"
                self.stream_sent += a.data
                if a.fin:
                    self.fins += 1
                    assert self.stream_sent == self.tcp_fed, "FIN before every byte was sent"
            elif isinstance(a, bs.Grant):
                assert a.increment > 0
                self.grant_total += a.increment
            elif isinstance(a, bs.WriteTcp):
                assert self.attached
                self.tcp_written += a.data
                self.buffered += len(a.data)
            elif isinstance(a, bs.PauseTcpReading):
                self.reading = False
            elif isinstance(a, bs.ResumeTcpReading):
                self.reading = True
            elif isinstance(a, bs.ResetStream):
                self.resets += 1
            elif isinstance(a, bs.Finished):
                self.ends += 1

    def _bytes(self, n: int) -> bytes:
        out = bytes((self.counter + i) % 251 for i in range(n))
        self.counter += n
        return out

    def _live(self) -> bool:
        return self.state is not None and not self.state.finished

    @rule()
    @precondition(lambda self: self._live() and not self.attached)
    def attach(self) -> None:
        assert self.state is not None
        self.attached = True
        self._run(self.state.tcp_attached_event())
        self._run(self.state.tcp_buffer(self.buffered))

    @rule(n=st.integers(min_value=1, max_value=40))
    @precondition(lambda self: self._live() and self.attached and self.reading and not self.tcp_eof)
    def tcp_sends(self, n: int) -> None:
        assert self.state is not None
        data = self._bytes(n)
        self.tcp_fed += data
        self._run(self.state.tcp_data(data))

    @rule()
    @precondition(lambda self: self._live() and self.attached and self.reading and not self.tcp_eof)
    def tcp_half_closes(self) -> None:
        assert self.state is not None
        self.tcp_eof = True
        self._run(self.state.tcp_eof_event())

    @rule(n=st.integers(min_value=1, max_value=40))
    @precondition(lambda self: self._live())
    def peer_grants(self, n: int) -> None:
        assert self.state is not None
        self.credit_total += n
        self._run(self.state.add_credit(n))

    @rule(data=st.data())
    @precondition(
        lambda self: self._live() and not self.peer_fin and self.grant_total > len(self.peer_sent)
    )
    def peer_sends(self, data: st.DataObject) -> None:
        assert self.state is not None
        room = self.grant_total - len(self.peer_sent)
        n = data.draw(st.integers(min_value=1, max_value=room))
        chunk = bytes((len(self.peer_sent) + i) % 253 for i in range(n))
        self.peer_sent += chunk
        self._run(self.state.stream_bytes(chunk))
        if self.attached:
            self._run(self.state.tcp_buffer(self.buffered))

    @rule()
    @precondition(lambda self: self._live() and not self.peer_fin)
    def peer_fins(self) -> None:
        assert self.state is not None
        self.peer_fin = True
        self._run(self.state.stream_fin())

    @rule(n=st.integers(min_value=1, max_value=64))
    @precondition(lambda self: self.state is not None and self.attached and self.buffered > 0)
    def kernel_drains(self, n: int) -> None:
        assert self.state is not None
        self.buffered -= min(n, self.buffered)
        self._run(self.state.tcp_buffer(self.buffered))

    @rule()
    @precondition(lambda self: self._live() and self.grant_total >= len(self.peer_sent))
    def peer_overruns(self) -> None:
        assert self.state is not None
        extra = self.grant_total - len(self.peer_sent) + 1
        self.peer_sent += b"\0" * extra
        before = self.resets
        self._run(self.state.stream_bytes(b"\0" * extra))
        assert self.resets == before + 1 and self.state.finished

    @rule(code=st.integers(min_value=0, max_value=0x1FF))
    @precondition(lambda self: self.state is not None)
    def peer_resets(self, code: int) -> None:
        assert self.state is not None
        self._run(self.state.stream_reset(code))

    @rule(code=st.integers(min_value=0, max_value=0x1FF))
    @precondition(lambda self: self.state is not None)
    def peer_stops_sending(self, code: int) -> None:
        assert self.state is not None
        self._run(self.state.stop_sending(code))

    @rule()
    @precondition(lambda self: self.state is not None)
    def tunnel_dies(self) -> None:
        assert self.state is not None
        self._run(self.state.tunnel_lost())

    @rule(error=st.booleans())
    @precondition(lambda self: self.state is not None and self.attached)
    def tcp_goes_away(self, error: bool) -> None:
        assert self.state is not None
        self.attached = False
        self._run(self.state.tcp_closed(error))

    @rule()
    @precondition(lambda self: self.state is not None)
    def aborted(self) -> None:
        assert self.state is not None
        self._run(self.state.abort())

    @invariant()
    def in_order_and_within_credit(self) -> None:
        s = self.state
        if s is None:
            return
        assert len(self.stream_sent) <= self.credit_total, "sent more than the peer granted"
        assert self.tcp_fed.startswith(self.stream_sent), "stream bytes out of order"
        assert self.peer_sent.startswith(self.tcp_written), "TCP bytes out of order"
        if not s.finished:
            assert len(self.stream_sent) + s.pending_out == len(self.tcp_fed)
            assert len(self.tcp_written) + s.pending_in == len(self.peer_sent)
        assert s.granted == self.grant_total
        drained = len(self.tcp_written) - self.buffered
        assert self.grant_total <= drained + self.window, "peer may have over a window in flight"

    @invariant()
    def at_most_once(self) -> None:
        assert self.fins <= 1 and self.resets <= 1 and self.ends <= 1
        if self.state is not None:
            assert self.ends == (1 if self.state.finished else 0)
            if self.state.reset_by is not None:
                assert self.state.finished


BridgeModel.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_bridge_state_machine = BridgeModel.TestCase


class _End:
    """One side of a flow in the two-bridge model: a BridgeState and the TCP socket it
    writes to (bytes in the kernel's write buffer are `buffered`)."""

    def __init__(self, send_credit: int, window: int) -> None:
        self.state = BridgeState(send_credit=send_credit, window=window)
        self.tcp_fed = bytearray()
        self.tcp_written = bytearray()
        self.buffered = 0
        self.reading = True
        self.eof = False
        self.stream_out: list[tuple[bytes, bool]] = []  # to the other end, in order
        self.windows_out: list[int] = []  # WINDOW frames to the other end
        self.reset_out: list[int] = []
        self.resets = 0  # resets this end sent (an abort sets no reset_by on its own side)
        self.ends = 0


class TwoBridges(RuleBasedStateMachine):
    """Edge and connector bridges joined by an in-order stream and a control channel, as
    through the tunnel. Honest peers never overrun a window (no PROTOCOL reset), bytes arrive
    in order both ways, and once every byte and both FINs are through both ends finish."""

    @initialize(
        w_edge=st.integers(min_value=4, max_value=48),
        w_conn=st.integers(min_value=4, max_value=48),
    )
    def start(self, w_edge: int, w_conn: int) -> None:
        # each side's initial send credit is the other's window (CONNECT_TCP / CONNECT_RESULT)
        self.ends = {"edge": _End(w_conn, w_edge), "conn": _End(w_edge, w_conn)}
        for end in self.ends.values():
            self._run(end, end.state.tcp_attached_event())
            self._run(end, end.state.tcp_buffer(0))
        self.counter = 0

    def _other(self, name: str) -> _End:
        return self.ends["conn" if name == "edge" else "edge"]

    def _run(self, end: _End, actions: list[bs.BridgeAction]) -> None:
        for a in actions:
            if isinstance(a, bs.SendStream):
                end.stream_out.append((a.data, a.fin))
            elif isinstance(a, bs.Grant):
                end.windows_out.append(a.increment)
            elif isinstance(a, bs.WriteTcp):
                end.tcp_written += a.data
                end.buffered += len(a.data)
            elif isinstance(a, bs.PauseTcpReading):
                end.reading = False
            elif isinstance(a, bs.ResumeTcpReading):
                end.reading = True
            elif isinstance(a, bs.ResetStream):
                assert a.code != StreamError.PROTOCOL, "an honest peer overran a window"
                end.reset_out.append(a.code)
                end.resets += 1
            elif isinstance(a, bs.Finished):
                end.ends += 1

    names = st.sampled_from(["edge", "conn"])

    @rule(name=names, n=st.integers(min_value=1, max_value=30))
    def tcp_sends(self, name: str, n: int) -> None:
        end = self.ends[name]
        if end.state.finished or not end.reading or end.eof:
            return
        data = bytes((self.counter + i) % 256 for i in range(n))
        self.counter += n
        end.tcp_fed += data
        self._run(end, end.state.tcp_data(data))

    @rule(name=names)
    def tcp_eof(self, name: str) -> None:
        end = self.ends[name]
        if end.state.finished or not end.reading or end.eof:
            return
        end.eof = True
        self._run(end, end.state.tcp_eof_event())

    @rule(name=names, k=st.integers(min_value=1, max_value=4))
    def deliver_stream(self, name: str, k: int) -> None:
        """The tunnel delivers up to k chunks from `name` to the other end."""
        src, dst = self.ends[name], self._other(name)
        for _ in range(min(k, len(src.stream_out))):
            data, fin = src.stream_out.pop(0)
            if data:
                self._run(dst, dst.state.stream_bytes(data))
                self._run(dst, dst.state.tcp_buffer(dst.buffered))
            if fin:
                self._run(dst, dst.state.stream_fin())

    @rule(name=names)
    def deliver_windows(self, name: str) -> None:
        src, dst = self.ends[name], self._other(name)
        while src.windows_out:
            self._run(dst, dst.state.add_credit(src.windows_out.pop(0)))

    @rule(name=names)
    def deliver_reset(self, name: str) -> None:
        src, dst = self.ends[name], self._other(name)
        if src.reset_out:
            src.reset_out.pop(0)
            src.stream_out.clear()  # a reset discards what was in flight
            self._run(dst, dst.state.stream_reset(StreamError.FLOW_RESET))

    @rule(name=names, n=st.integers(min_value=1, max_value=64))
    def kernel_drains(self, name: str, n: int) -> None:
        end = self.ends[name]
        end.buffered -= min(n, end.buffered)
        self._run(end, end.state.tcp_buffer(end.buffered))

    @rule(name=names)
    def aborted(self, name: str) -> None:
        end = self.ends[name]
        self._run(end, end.state.abort())

    @rule()
    def settle(self) -> None:
        """The network and both kernels deliver everything queued (until nothing moves)."""
        for _ in range(1000):
            busy = any(e.stream_out or e.windows_out or e.buffered for e in self.ends.values())
            if not busy:
                return
            for name in ("edge", "conn"):
                self.deliver_stream(name, 1000)
                self.kernel_drains(name, 1 << 20)
                self.deliver_windows(name)
        raise AssertionError("the two bridges never settle")

    @invariant()
    def in_order_and_within_windows(self) -> None:
        for name, end in self.ends.items():
            other = self._other(name)
            assert end.tcp_fed.startswith(other.tcp_written), "bytes out of order"
            # what the other end holds for its TCP socket never exceeds its window
            held = other.state.received - (len(other.tcp_written) - other.buffered)
            if not other.state.finished:
                assert held <= other.state.window
            assert end.ends <= 1

    @invariant()
    def everything_through_means_done(self) -> None:
        edge, conn = self.ends["edge"], self.ends["conn"]
        quiet = not any(e.stream_out or e.windows_out or e.reset_out for e in (edge, conn))
        clean = not (edge.resets or conn.resets or edge.state.reset_by or conn.state.reset_by)
        if (
            quiet
            and clean
            and edge.eof
            and conn.eof
            and edge.state.fin_sent
            and conn.state.fin_sent
        ):
            assert edge.state.finished and conn.state.finished
            assert conn.tcp_written == edge.tcp_fed and edge.tcp_written == conn.tcp_fed


TwoBridges.TestCase.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
test_two_bridges_through_a_tunnel = TwoBridges.TestCase


def test_two_bridges_clean_exchange_finishes_both() -> None:
    """One deterministic run of the model: bytes both ways past several windows, both FINs."""
    m = TwoBridges()
    m.start(w_edge=8, w_conn=8)
    for _ in range(6):
        m.tcp_sends("edge", 5)
        m.tcp_sends("conn", 7)
        for _ in range(4):
            for name in ("edge", "conn"):
                m.deliver_stream(name, 4)
                m.kernel_drains(name, 64)
                m.deliver_windows(name)
    m.tcp_eof("edge")
    m.tcp_eof("conn")
    for _ in range(20):
        for name in ("edge", "conn"):
            m.deliver_stream(name, 4)
            m.kernel_drains(name, 64)
            m.deliver_windows(name)
        m.tcp_sends("edge", 1)  # refused once at EOF: the model skips it
    m.in_order_and_within_windows()
    edge, conn = m.ends["edge"], m.ends["conn"]
    assert len(edge.tcp_fed) == 30 and len(conn.tcp_fed) == 42
    assert conn.tcp_written == edge.tcp_fed and edge.tcp_written == conn.tcp_fed
    assert edge.state.finished and conn.state.finished
    assert edge.resets == conn.resets == 0
    m.everything_through_means_done()
