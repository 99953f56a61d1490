"""Opening a flow stream, event by event, both ends: CONNECT_TCP -> CONNECT_RESULT, bytes
right behind either, and resets racing the answer."""

from __future__ import annotations

import pytest

from ramp.tunnel import flow_state as fs
from ramp.tunnel.control import CODE_TO_RESULT
from ramp.tunnel.flow_state import FlowAccept, FlowOpen
from ramp.wire.tunnel import ConnectCode, ConnectResult, ConnectTcp, StreamError, encode_frame

HEADER = ConnectTcp(7, "origin.internal", 443, 1 << 20, {"src": "10.0.0.1:5000"})


# -- edge: FlowOpen ---------------------------------------------------------------------------


def test_open_ok_with_payload_right_behind_the_answer() -> None:
    m = FlowOpen()
    answer = ConnectResult(ConnectCode.OK, 4096)
    data = encode_frame(answer) + b"hello"
    # the answer arrives in two pieces; the first is not enough
    assert m.stream_data(data[:2], False) == []
    assert m.waiting
    assert m.stream_data(data[2:], False) == [fs.Answered(answer)]
    assert m.extra == [b"hello"]
    assert m.stream_data(b" world", True) == []
    assert m.extra == [b"hello", b" world"] and m.fin


@pytest.mark.parametrize("code", [c for c in ConnectCode if c != ConnectCode.OK])
def test_open_each_error_code_is_an_answer(code: ConnectCode) -> None:
    m = FlowOpen()
    answer = ConnectResult(code, 0, "nope")
    assert m.stream_data(encode_frame(answer), True) == [fs.Answered(answer)]
    assert code in CODE_TO_RESULT  # the edge maps every code to a flow result


def test_open_reset_before_the_answer_fails_once() -> None:
    m = FlowOpen()
    assert m.stream_reset(0x101) == [fs.OpenFailed("connector reset (257)")]
    assert m.stream_data(encode_frame(ConnectResult(ConnectCode.OK, 1)), False) == []
    assert m.connection_lost() == []


def test_open_reset_right_after_the_answer_is_kept_for_the_bridge() -> None:
    m = FlowOpen()
    m.stream_data(encode_frame(ConnectResult(ConnectCode.OK, 1)), False)
    assert m.stream_reset(0x102) == []
    assert m.reset_code == 0x102


def test_open_connection_lost_before_the_answer() -> None:
    m = FlowOpen()
    assert m.connection_lost() == [fs.OpenLost()]
    assert m.lost


def test_open_connection_lost_after_the_answer_is_recorded() -> None:
    m = FlowOpen()
    m.stream_data(encode_frame(ConnectResult(ConnectCode.OK, 1)), False)
    assert m.connection_lost() == []
    assert m.lost


def test_open_wrong_frame_garbage_and_early_fin() -> None:
    assert FlowOpen().stream_data(encode_frame(HEADER), False) == [
        fs.OpenFailed("tunnel protocol: expected CONNECT_RESULT")
    ]
    bad = FlowOpen().stream_data(b"\x3f\x00", False)
    assert len(bad) == 1 and bad[0].reason.startswith("tunnel protocol:")  # type: ignore[union-attr]
    assert FlowOpen().stream_data(b"", True) == [fs.OpenFailed("connector closed the stream")]


# -- connector: FlowAccept --------------------------------------------------------------------


def test_accept_header_then_early_bytes_then_answer() -> None:
    m = FlowAccept(window=100)
    data = encode_frame(HEADER) + b"GET /"
    assert m.stream_data(data[:5], False) == []
    assert m.stream_data(data[5:], False) == [fs.DialRequested(HEADER)]
    assert m.stream_data(b" HTTP/1.1", True) == []
    answer, early, fin = m.succeeded()
    assert answer == encode_frame(ConnectResult(ConnectCode.OK, 100))
    assert b"".join(early) == b"GET / HTTP/1.1" and fin
    # once bridged, a reset does not cancel anything (the bridge handles it)
    assert m.stream_reset(0) == []


def test_accept_early_bytes_beyond_the_window_are_a_protocol_error() -> None:
    m = FlowAccept(window=10)
    m.stream_data(encode_frame(HEADER), False)
    assert m.stream_data(b"x" * 10, False) == []
    assert m.stream_data(b"y", False) == [
        fs.AcceptError("payload before CONNECT_RESULT exceeds the window"),
        fs.CancelDial(),
    ]
    assert m.gone and m.stream_data(b"z", False) == []


def test_accept_reset_while_dialling_cancels_the_dial() -> None:
    m = FlowAccept()
    m.stream_data(encode_frame(HEADER), False)
    assert m.stream_reset(0x101) == [fs.CancelDial()]
    assert m.gone
    assert m.connection_lost() == []


def test_accept_stop_sending_cancels_and_resets() -> None:
    m = FlowAccept()
    m.stream_data(encode_frame(HEADER), False)
    assert m.stop_sending(0) == [fs.CancelDial(), fs.ResetFlow(StreamError.FLOW_ABORT)]


def test_accept_fin_before_a_whole_header_forgets_the_stream() -> None:
    m = FlowAccept()
    assert m.stream_data(encode_frame(HEADER)[:3], True) == [fs.ForgetFlow()]


def test_accept_wrong_frame_and_garbage() -> None:
    m = FlowAccept()
    assert m.stream_data(encode_frame(ConnectResult(ConnectCode.OK, 1)), False) == [
        fs.AcceptError("expected a CONNECT_TCP frame")
    ]
    m = FlowAccept()
    [err] = m.stream_data(b"\x3f\x00", False)
    assert isinstance(err, fs.AcceptError) and err.code == StreamError.PROTOCOL


def test_accept_refusal_is_a_result_frame() -> None:
    from ramp.wire.tunnel import FrameDecoder

    frame = FrameDecoder().feed(FlowAccept.refusal(ConnectCode.REFUSED, "closed port"))
    assert frame == [ConnectResult(ConnectCode.REFUSED, 0, "closed port")]


def test_pending_flow_handler_resolves_its_future_once() -> None:
    """The edge's asyncio face of FlowOpen: the first outcome wins, later ones are recorded."""
    import asyncio

    from ramp.flows.flow import FlowError
    from ramp.tunnel.flow_open import ConnectionGone, PendingFlow

    async def run() -> None:
        ok = PendingFlow(1 << 20)
        answer = ConnectResult(ConnectCode.OK, 10)
        ok.stream_data(encode_frame(answer) + b"x", False)
        ok.stream_reset(5)  # races the answer: kept for the bridge
        assert ok.result.result() == answer and ok.extra == [b"x"] and ok.reset_code == 5

        reset = PendingFlow(1 << 20)
        reset.stream_reset(5)
        reset.connection_lost()
        assert isinstance(reset.result.exception(), FlowError)

        lost = PendingFlow(1 << 20)
        lost.connection_lost()
        assert isinstance(lost.result.exception(), ConnectionGone)

        gave_up = PendingFlow(1 << 20)
        gave_up.result.set_exception(TimeoutError())  # the waiter's own timeout
        gave_up.stream_data(encode_frame(answer), False)  # no InvalidStateError
        assert isinstance(gave_up.result.exception(), TimeoutError)

    asyncio.run(run())
