"""UDP session protocol state, event by event: registration with retries (time advanced by
passing `now`, no sleeps), moves between connections, the idle sweep, and admission."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from ramp.flows.client_shares import ClientShares
from ramp.flows.flow import FlowResult
from ramp.tunnel import session_state as ss
from ramp.tunnel.interfaces import STALE_AFTER
from ramp.tunnel.session_state import SessionAdmission, SessionRegistration, sweep
from ramp.wire.tunnel import (
    SessionError,
    SessionRefused,
    SessionRegistered,
    encode_session_control,
    parse_datagram,
)

MSG = b"register-7"


def reg(now: float = 0.0, timeout: float = 1.0) -> SessionRegistration[str]:
    return SessionRegistration(MSG, now, timeout)


def test_registers_on_the_first_answer() -> None:
    r = reg()
    assert r.start(0.0) == [ss.NeedLink()]
    assert r.link_offered(0.0, "c1") == [
        ss.Bind("c1"),
        ss.SendRegister("c1", MSG),
        ss.WaitUntil(ss.REGISTER_RETRY),
    ]
    assert r.answer(SessionRegistered(7)) == [ss.Attached("c1")]
    assert r.cancel() == []  # attached: the binding stays
    assert r.timer(0.25, False) == []


def test_repeats_every_retry_until_answered() -> None:
    r = reg(timeout=1.0)
    r.start(0.0)
    r.link_offered(0.0, "c1")
    sends = 1
    now = 0.0
    while now + ss.REGISTER_RETRY < 1.0:
        now += ss.REGISTER_RETRY
        actions = r.timer(now, link_closed=False)
        assert actions == [ss.SendRegister("c1", MSG), ss.WaitUntil(min(now + 0.25, 1.0))]
        sends += 1
    assert sends == 4
    assert r.answer(SessionRegistered(7)) == [ss.Attached("c1")]


def test_times_out_and_unbinds() -> None:
    r = reg(timeout=0.5)
    r.start(0.0)
    r.link_offered(0.0, "c1")
    r.timer(0.25, False)
    assert r.timer(0.5, False) == [
        ss.Unbind("c1"),
        ss.RegisterFailed(FlowResult.TIMEOUT, "the connector did not answer the UDP session"),
    ]
    assert r.answer(SessionRegistered(7)) == []  # too late


def test_moves_to_another_connection_when_its_dies() -> None:
    r = reg(timeout=2.0)
    r.start(0.0)
    r.link_offered(0.0, "c1")
    assert r.timer(0.25, link_closed=True) == [ss.Unbind("c1"), ss.NeedLink()]
    assert r.link_offered(0.25, "c2")[:2] == [ss.Bind("c2"), ss.SendRegister("c2", MSG)]
    assert r.answer(SessionRegistered(7)) == [ss.Attached("c2")]


def test_waits_for_a_connection_when_the_tunnel_has_none() -> None:
    r = reg(timeout=0.25)
    r.start(0.0)
    assert r.link_offered(0.0, None) == [ss.WaitUntil(ss.LINK_POLL)]
    assert r.timer(0.1, False) == [ss.NeedLink()]
    assert r.link_offered(0.2, None) == [ss.WaitUntil(0.25)]  # never past the deadline
    assert r.timer(0.25, False)[-1] == ss.RegisterFailed(
        FlowResult.TIMEOUT, "the connector did not answer the UDP session"
    )


@pytest.mark.parametrize(
    ("code", "result"),
    [
        (SessionError.UNREACHABLE, FlowResult.HOST_UNREACHABLE),
        (SessionError.CANNOT_BIND, FlowResult.NET_UNREACHABLE),
        (SessionError.TOO_MANY_SESSIONS, FlowResult.ERROR),
        (SessionError.NOT_PERMITTED, FlowResult.NOT_PERMITTED),
        (SessionError.ERROR, FlowResult.ERROR),
    ],
)
def test_each_refusal_fails_with_its_result(code: SessionError, result: FlowResult) -> None:
    r = reg()
    r.start(0.0)
    r.link_offered(0.0, "c1")
    assert r.answer(SessionRefused(7, code, "")) == [
        ss.Unbind("c1"),
        ss.RegisterFailed(result, code.name.lower()),
    ]
    assert r.cancel() == []


def test_cancel_while_waiting_unbinds() -> None:
    r = reg()
    r.start(0.0)
    r.link_offered(0.0, "c1")
    assert r.cancel() == [ss.Unbind("c1")]
    assert r.timer(0.25, False) == []


def test_a_zero_timeout_fails_at_once() -> None:
    assert reg(timeout=0.0).start(0.0)[0] == ss.RegisterFailed(
        FlowResult.TIMEOUT, "the connector did not answer the UDP session"
    )


# -- sweep --------------------------------------------------------------------------------------


@dataclass
class Sess:
    last_active: float
    replied: bool = True


def test_sweep_expires_idle_sessions_and_moves_off_silent_connections() -> None:
    fresh, idle, on_silent, on_live, direct = (
        Sess(99.0),
        Sess(40.0),
        Sess(99.0),
        Sess(99.0),
        Sess(95.0),
    )
    got_idle, got_stale = sweep(
        100.0,
        30.0,
        [
            (fresh, None),
            (idle, 99.9),  # idle wins over stale: it ends rather than moves
            (on_silent, 100.0 - STALE_AFTER - 0.1),
            (on_live, 100.0 - STALE_AFTER + 0.1),
            (direct, None),
        ],
    )
    assert got_idle == [idle] and got_stale == [on_silent]


def test_sweep_boundary_is_strict() -> None:
    s = Sess(70.0)
    assert sweep(100.0, 30.0, [(s, None)]) == ([], [])
    assert sweep(100.001, 30.0, [(s, None)]) == ([s], [])


def test_sweep_interval() -> None:
    assert ss.sweep_interval(210.0, 1.0) == 1.0
    assert ss.sweep_interval(1.0, 1.0) == 0.25


# -- admission (connector) -----------------------------------------------------------------------


def answers(actions: list[ss.AdmitAction[str, str]]) -> list[tuple[str, object]]:
    return [(a.link, parse_datagram(a.data)) for a in actions if isinstance(a, ss.Answer)]


def test_admission_opens_once_and_answers_repeats() -> None:
    a: SessionAdmission[str, str] = SessionAdmission(limit=2)
    assert a.register("k", "c1", 7) == [ss.OpenOrigin("k")]
    assert a.register("k", "c2", 7) == []  # a repeat while opening: answer on c2 once open
    assert a.link_for("k") == "c2"
    assert answers(a.opened("k", 7)) == [("c2", SessionRegistered(7))]
    assert answers(a.register("k", "c3", 7)) == [("c3", SessionRegistered(7))]
    assert a.closed("k") and not a.closed("k")


def test_admission_limit_and_draining() -> None:
    a: SessionAdmission[str, str] = SessionAdmission(limit=1)
    a.register("k1", "c", 1)
    actions = a.register("k2", "c", 2)
    assert ss.Dropped("too_many_sessions") in actions
    [(_, refusal)] = answers(actions)
    assert isinstance(refusal, SessionRefused) and refusal.code == SessionError.TOO_MANY_SESSIONS
    a.open_failed("k1", 1, SessionError.UNREACHABLE, "no route")
    a.draining = True
    [(_, refusal)] = answers(a.register("k3", "c", 3))
    assert isinstance(refusal, SessionRefused) and refusal.code == SessionError.NOT_PERMITTED


def test_admission_open_failure_refuses_on_the_newest_connection() -> None:
    a: SessionAdmission[str, str] = SessionAdmission(limit=4)
    a.register("k", "c1", 5)
    a.register("k", "c2", 5)
    assert answers(a.open_failed("k", 5, SessionError.UNREACHABLE, "no route")) == [
        ("c2", SessionRefused(5, SessionError.UNREACHABLE, "no route"))
    ]
    assert a.register("k", "c1", 5) == [ss.OpenOrigin("k")]  # a fresh try may open again


def test_answers_are_session_control_datagrams() -> None:
    a: SessionAdmission[str, str] = SessionAdmission(limit=1)
    a.register("k", "c", 9)
    [act] = a.opened("k", 9)
    assert isinstance(act, ss.Answer)
    assert act.data == encode_session_control(SessionRegistered(9))


def test_unreplied_sessions_expire_after_the_short_timeout() -> None:
    # both idle for 40 s: only the one the origin never answered is past its 30 s
    answered, unanswered = Sess(60.0, replied=True), Sess(60.0, replied=False)
    idle, _ = sweep(100.0, 210.0, [(answered, None), (unanswered, None)], 30.0)
    assert idle == [unanswered]
    assert ss.expiry_reason(unanswered) == "unreplied"
    # an answered session stays until the long timeout
    idle, _ = sweep(270.5, 210.0, [(answered, None)], 30.0)
    assert idle == [answered]
    assert ss.expiry_reason(answered) == "idle"
    # the sweep runs often enough for the shorter of the two
    assert ss.sweep_interval(210.0, 1.0, 2.0) == 0.5


def test_an_unreplied_timeout_longer_than_the_idle_one_changes_nothing() -> None:
    s = Sess(60.0, replied=False)
    assert sweep(100.0, 30.0, [(s, None)], 300.0)[0] == [s]


def shared_admission(limit: int = 100) -> SessionAdmission[int, str]:
    return SessionAdmission(limit, ClientShares(per_source=2, per_identity=3))


def refusal(actions: list[object]) -> tuple[str, SessionError]:
    dropped = [a for a in actions if isinstance(a, ss.Dropped)]
    answers = [a for a in actions if isinstance(a, ss.Answer)]
    msg = parse_datagram(answers[0].data)
    assert isinstance(msg, SessionRefused)
    return dropped[0].reason, msg.code


def test_admission_source_share_refuses_only_that_source() -> None:
    a = shared_admission()
    assert a.register(1, "c", 1, "10.0.0.1") == [ss.OpenOrigin(1)]
    assert a.register(2, "c", 2, "10.0.0.1") == [ss.OpenOrigin(2)]
    assert refusal(a.register(3, "c", 3, "10.0.0.1")) == (
        "source_share",
        SessionError.TOO_MANY_SESSIONS,
    )
    # another source still gets in
    assert a.register(4, "c", 4, "10.0.0.2") == [ss.OpenOrigin(4)]
    # a session that ends (opened then closed, or failed to open) gives its unit back
    a.opened(1, 1)
    assert a.closed(1)
    a.open_failed(2, 2, SessionError.UNREACHABLE, "no")
    assert a.register(5, "c", 5, "10.0.0.1") == [ss.OpenOrigin(5)]
    assert a.register(6, "c", 6, "10.0.0.1") == [ss.OpenOrigin(6)]
    a.abandoned(6)
    assert a.shares.sources.held("10.0.0.1") == 1


def test_admission_identity_share_spans_sources() -> None:
    a = shared_admission()
    for key, src in enumerate(("10.0.0.1", "10.0.0.2", "10.0.0.3")):
        assert a.register(key, "c", key, src, "alice") == [ss.OpenOrigin(key)]
    assert refusal(a.register(9, "c", 9, "10.0.0.4", "alice"))[0] == "identity_share"
    # the refused one took nothing from its source's share
    assert a.shares.sources.held("10.0.0.4") == 0
    assert a.register(10, "c", 10, "10.0.0.4", "bob") == [ss.OpenOrigin(10)]


def test_a_repeated_register_takes_no_second_unit() -> None:
    a = shared_admission()
    assert a.register(1, "c", 1, "10.0.0.1") == [ss.OpenOrigin(1)]
    assert a.register(1, "c2", 1, "10.0.0.1") == []
    a.opened(1, 1)
    assert len(a.register(1, "c", 1, "10.0.0.1")) == 1  # answered again
    assert a.shares.sources.held("10.0.0.1") == 1
