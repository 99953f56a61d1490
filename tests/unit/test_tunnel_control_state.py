"""Registration and the control stream, event by event: no sockets, no clock."""

from __future__ import annotations

import uuid

import pytest

from ramp.tunnel import control_state as cs
from ramp.tunnel.control_state import ConnectorControl, EdgeControl, Verdict
from ramp.wire.tunnel import (
    ALPN,
    CloseCode,
    FrameDecoder,
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

REGISTER = Register(
    tunnel_id=uuid.UUID(int=1),
    connector_id=uuid.UUID(int=2),
    conn_index=3,
    secret=b"s" * 32,
    client_info="test",
)


def sent_frames(actions: list[cs.ControlAction]) -> list[object]:
    decoder = FrameDecoder()
    frames: list[object] = []
    for a in actions:
        if isinstance(a, cs.SendControl):
            frames += decoder.feed(a.data)
    return frames


OK = Verdict(True, tunnel_name="t1")


def edge(verdict: Verdict = OK) -> tuple[EdgeControl, list[object]]:
    checked: list[object] = []

    def check(frame: Register) -> Verdict:
        checked.append(frame)
        return verdict

    m = EdgeControl(check, "edge-1")
    assert m.handshake_done(ALPN, 100.0) == [cs.SetTimer(110.0, cs.TIMER_REGISTRATION)]
    assert m.peer_stream(0) is True
    return m, checked


def test_edge_accepts_a_registration() -> None:
    m, checked = edge()
    actions = m.control_data(encode_frame(REGISTER), False, 101.0)
    assert checked == [REGISTER]
    assert actions[0] == cs.CancelTimer(cs.TIMER_REGISTRATION)
    assert sent_frames(actions) == [Registered("t1", "edge-1")]
    assert actions[-1] == cs.Accepted(REGISTER, "t1")
    assert m.registered and m.tunnel_name == "t1"
    # the timer that was set fires late (its cancel raced it): nothing happens
    assert m.timer(cs.TIMER_REGISTRATION, 110.0) == []
    # a second REGISTER is a protocol error
    again = m.control_data(encode_frame(REGISTER), False, 102.0)
    assert again[-1] == cs.CloseConnection(CloseCode.PROTOCOL_ERROR, "unexpected Register")


def test_edge_opens_no_second_peer_stream() -> None:
    m, _ = edge()
    assert m.peer_stream(4) is False


@pytest.mark.parametrize("error", list(RegisterError))
def test_edge_refuses_then_closes_after_a_moment(error: RegisterError) -> None:
    m, _ = edge(Verdict(False, error=error, message="no"))
    actions = m.control_data(encode_frame(REGISTER), False, 101.0)
    assert cs.Refused(error.name.lower(), "no") in actions
    assert sent_frames(actions) == [RegisterRefused(error, "no")]
    assert actions[-1] == cs.SetTimer(101.0 + cs.REFUSAL_LINGER, cs.TIMER_REFUSAL)
    assert not m.registered
    assert m.timer(cs.TIMER_REFUSAL, 101.2) == [
        cs.CloseConnection(CloseCode.REGISTRATION_REFUSED, error.name.lower())
    ]


def test_edge_closes_a_connection_that_never_registers() -> None:
    m, _ = edge()
    assert m.timer(cs.TIMER_REGISTRATION, 110.0) == [
        cs.Refused("bad_request", "no registration within the time limit"),
        cs.CloseConnection(CloseCode.REGISTRATION_TIMEOUT, "registration timeout"),
    ]
    assert m.control_data(encode_frame(REGISTER), False, 111.0) == []  # too late


def test_edge_refuses_a_foreign_alpn() -> None:
    m = EdgeControl(lambda f: Verdict(True), "e")
    actions = m.handshake_done("h3", 0.0)
    assert isinstance(actions[0], cs.Refused) and actions[0].reason == "bad_request"
    assert actions[1] == cs.CloseConnection(CloseCode.PROTOCOL_ERROR, "unsupported ALPN")


def test_edge_routes_windows_and_learns_of_draining() -> None:
    m, _ = edge()
    m.control_data(encode_frame(REGISTER), False, 101.0)
    data = encode_frame(Window(4, 1000)) + encode_frame(Unregister()) + encode_frame(Window(8, 5))
    # split mid-frame: the decoder waits for the rest
    first = m.control_data(data[:3], False, 102.0)
    assert first == []
    assert m.control_data(data[3:], False, 102.0) == [
        cs.RouteCredit(4, 1000),
        cs.Draining(),
        cs.RouteCredit(8, 5),
    ]
    assert m.draining


def test_edge_unregister_before_register_is_an_error() -> None:
    m, _ = edge()
    actions = m.control_data(encode_frame(Unregister()), False, 101.0)
    assert actions == [
        cs.ControlError("unexpected Unregister frame"),
        cs.CloseConnection(CloseCode.PROTOCOL_ERROR, "unexpected Unregister"),
    ]


def test_garbage_fin_and_reset_on_the_control_stream_close_the_connection() -> None:
    m, _ = edge()
    bad = m.control_data(b"\x3f\x00", False, 101.0)  # an unknown frame type
    assert isinstance(bad[0], cs.ControlError)
    assert bad[1].code == CloseCode.PROTOCOL_ERROR  # type: ignore[union-attr]
    assert m.control_data(encode_frame(REGISTER), False, 101.0) == []  # closing: ignored

    m, _ = edge()
    assert m.control_data(b"", True, 101.0)[-1] == cs.CloseConnection(
        CloseCode.PROTOCOL_ERROR, "control stream closed"
    )
    m, _ = edge()
    assert m.control_reset(7) == [
        cs.ControlError("control stream reset (7)"),
        cs.CloseConnection(CloseCode.PROTOCOL_ERROR, "control stream reset"),
    ]
    assert m.control_reset(7) == []  # once


def test_edge_frames_after_a_fatal_one_are_ignored() -> None:
    m, _ = edge()
    data = encode_frame(Unregister()) + encode_frame(Window(4, 1))
    assert [type(a) for a in m.control_data(data, False, 101.0)] == [
        cs.ControlError,
        cs.CloseConnection,
    ]


def test_edge_connection_loss_cancels_its_timers() -> None:
    m, _ = edge()
    assert m.connection_lost() == [
        cs.CancelTimer(cs.TIMER_REGISTRATION),
        cs.CancelTimer(cs.TIMER_REFUSAL),
    ]
    assert m.timer(cs.TIMER_REGISTRATION, 110.0) == []
    assert m.window(4, 100) == []


def test_connector_registers() -> None:
    m = ConnectorControl()
    assert not m.accepts_flows
    assert sent_frames(m.start(REGISTER)) == [REGISTER]
    answer = Registered("t1", "edge-1")
    assert m.control_data(encode_frame(answer), False, 0.0) == [cs.RegistrationDone(answer)]
    assert m.accepts_flows and m.edge_id == "edge-1"
    assert sent_frames(m.window(4, 10)) == [Window(4, 10)]
    assert sent_frames(m.unregister()) == [Unregister()]
    assert m.connection_lost("gone") == []  # registered: nothing to fail


@pytest.mark.parametrize("error", list(RegisterError))
def test_connector_learns_of_each_refusal(error: RegisterError) -> None:
    m = ConnectorControl()
    m.start(REGISTER)
    actions = m.control_data(encode_frame(RegisterRefused(error, "why")), False, 0.0)
    assert actions == [cs.RegistrationFailed(error, "why")]
    assert not m.accepts_flows
    assert m.connection_lost("closed") == []  # already failed once


def test_connector_connection_lost_while_registering() -> None:
    m = ConnectorControl()
    m.start(REGISTER)
    assert m.connection_lost("idle timeout") == [cs.RegistrationFailed(None, "idle timeout")]


def test_connector_rejects_a_second_answer_and_windows_before_it_route() -> None:
    m = ConnectorControl()
    m.start(REGISTER)
    answer = Registered("t1", "edge-1")
    data = encode_frame(Window(1, 2)) + encode_frame(answer) + encode_frame(answer)
    actions = m.control_data(data, False, 0.0)
    assert actions[:2] == [cs.RouteCredit(1, 2), cs.RegistrationDone(answer)]
    assert actions[-1] == cs.CloseConnection(CloseCode.PROTOCOL_ERROR, "unexpected Registered")
    assert m.unregister() == []  # closing: nothing more goes out


def test_edge_announces_a_successor_only_on_registered_connections() -> None:
    m, _ = edge()
    assert m.announce_successor("edge-2") == []  # not registered yet: nothing to tell
    m.control_data(encode_frame(REGISTER), False, 101.0)
    assert sent_frames(m.announce_successor("edge-2")) == [Successor("edge-2")]
    m.connection_lost()
    assert m.announce_successor("edge-2") == []


def test_connector_learns_of_a_successor_once_registered() -> None:
    m = ConnectorControl()
    m.start(REGISTER)
    early = m.control_data(encode_frame(Successor("edge-2")), False, 0.0)
    assert early[-1] == cs.CloseConnection(CloseCode.PROTOCOL_ERROR, "unexpected Successor")

    m = ConnectorControl()
    m.start(REGISTER)
    m.control_data(encode_frame(Registered("t1", "edge-1")), False, 0.0)
    actions = m.control_data(encode_frame(Successor("edge-2")), False, 0.0)
    assert actions == [cs.SuccessorServes("edge-2")]
    assert m.accepts_flows  # the old connection keeps serving its flows


def test_edge_refuses_a_successor_frame_from_a_connector() -> None:
    m, _ = edge()
    m.control_data(encode_frame(REGISTER), False, 101.0)
    actions = m.control_data(encode_frame(Successor("x")), False, 102.0)
    assert actions[-1] == cs.CloseConnection(CloseCode.PROTOCOL_ERROR, "unexpected Successor")


def test_edge_asks_a_redial_only_of_registered_connections_that_take_flows() -> None:
    cid = bytes(range(8))
    m, _ = edge()
    assert m.ask_redial(cid) == []  # not registered yet
    m.control_data(encode_frame(REGISTER), False, 101.0)
    assert sent_frames(m.ask_redial(cid)) == [Redial(cid)]
    m.control_data(encode_frame(Unregister()), False, 102.0)
    assert m.ask_redial(cid) == []  # draining: it is going away anyway


def test_connector_takes_a_redial_once_registered() -> None:
    cid = bytes(range(8))
    m = ConnectorControl()
    m.start(REGISTER)
    early = m.control_data(encode_frame(Redial(cid)), False, 0.0)
    assert early[-1] == cs.CloseConnection(CloseCode.PROTOCOL_ERROR, "unexpected Redial")

    m = ConnectorControl()
    m.start(REGISTER)
    m.control_data(encode_frame(Registered("t1", "edge-1")), False, 0.0)
    assert m.control_data(encode_frame(Redial(cid)), False, 0.0) == [cs.RedialAsked(cid)]
    assert m.accepts_flows  # it serves until its replacement registered
