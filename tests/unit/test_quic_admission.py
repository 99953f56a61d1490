"""Retry tokens and the handshake admission rules of the tunnel listener."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ramp.quic.admission import (
    MAX_TRACKED_SOURCES,
    REFUSAL_PERIOD,
    Admit,
    Drop,
    HandshakeLimits,
    Penalties,
    SendRetry,
    decide,
)
from ramp.quic.retry import MAX_TOKEN, InvalidToken, RetryTokens

ODCID = bytes.fromhex("0011223344556677")
RSCID = bytes.fromhex("8899aabbccddeeff")


def test_a_token_admits_the_address_it_was_issued_to() -> None:
    tokens = RetryTokens(lifetime=10.0)
    token = tokens.issue("198.51.100.7", ODCID, RSCID, now=100.0)
    assert len(token) <= MAX_TOKEN
    assert tokens.check("198.51.100.7", token, now=105.0) == (ODCID, RSCID)


def test_an_ipv4_client_on_a_dual_stack_socket_is_the_same_address() -> None:
    tokens = RetryTokens(lifetime=10.0)
    token = tokens.issue("::ffff:198.51.100.7", ODCID, RSCID, now=0.0)
    assert tokens.check("198.51.100.7", token, now=0.0) == (ODCID, RSCID)


@pytest.mark.parametrize(
    ("checked_from", "now", "reason"),
    [("198.51.100.7", 110.5, "expired"), ("198.51.100.8", 100.0, "not_authentic")],
    ids=["expired", "another-address"],
)
def test_a_token_is_refused_late_or_from_elsewhere(
    checked_from: str, now: float, reason: str
) -> None:
    tokens = RetryTokens(lifetime=10.0)
    token = tokens.issue("198.51.100.7", ODCID, RSCID, now=100.0)
    with pytest.raises(InvalidToken) as e:
        tokens.check(checked_from, token, now=now)
    assert e.value.reason == reason


def test_another_servers_token_is_refused() -> None:
    token = RetryTokens(lifetime=10.0).issue("198.51.100.7", ODCID, RSCID, now=0.0)
    with pytest.raises(InvalidToken):
        RetryTokens(lifetime=10.0).check("198.51.100.7", token, now=0.0)


@pytest.mark.parametrize("at", [0, 1, 12, 13, 30, -1])
def test_a_tampered_token_is_refused(at: int) -> None:
    tokens = RetryTokens(lifetime=10.0)
    token = bytearray(tokens.issue("198.51.100.7", ODCID, RSCID, now=0.0))
    token[at] ^= 0x01
    with pytest.raises(InvalidToken):
        tokens.check("198.51.100.7", bytes(token), now=0.0)


_TOKENS = RetryTokens(lifetime=10.0, key=bytes(16))
_GOOD = _TOKENS.issue("2001:db8::7", ODCID, RSCID, now=0.0)


@given(
    st.one_of(
        st.binary(max_size=200),
        # a real token with one byte changed, cut short or lengthened
        st.builds(
            lambda at, flip, keep, extra: (
                (_GOOD[:at] + bytes([_GOOD[at] ^ flip]) + _GOOD[at + 1 :])[:keep] + extra
            ),
            st.integers(0, len(_GOOD) - 1),
            st.integers(0, 255),
            st.integers(0, len(_GOOD)),
            st.binary(max_size=8),
        ),
    ),
    st.sampled_from(["2001:db8::7", "198.51.100.7", "not an address", ""]),
)
def test_no_token_crashes_the_check(token: bytes, ip: str) -> None:
    try:
        _TOKENS.check(ip, token, now=0.0)
    except InvalidToken:
        return
    assert token == _GOOD and ip == "2001:db8::7"


# -- admission --------------------------------------------------------------------------------

LIMITS = HandshakeLimits(max_handshakes=8, retry_threshold=4, per_source=2)
DCID = os.urandom(8)


def _decide(
    *,
    token: bytes = b"",
    validated: tuple[bytes, bytes] | None = None,
    handshaking: int = 0,
    held: int = 0,
    limits: HandshakeLimits = LIMITS,
) -> object:
    return decide(
        limits,
        dcid=DCID,
        token=token,
        validated=validated,
        handshaking=handshaking,
        source_held=held,
    )


def test_a_quiet_listener_admits_without_a_retry() -> None:
    assert _decide() == Admit(DCID, None)


def test_past_the_threshold_a_new_client_gets_a_retry() -> None:
    assert _decide(handshaking=4) == SendRetry()
    assert _decide(handshaking=0, limits=HandshakeLimits(retry_threshold=0)) == SendRetry()


def test_a_validated_client_is_admitted_with_the_ids_of_its_token() -> None:
    assert _decide(token=b"t", validated=(ODCID, RSCID), handshaking=7) == Admit(ODCID, RSCID)


def test_a_full_table_drops_even_validated_clients() -> None:
    assert _decide(token=b"t", validated=(ODCID, RSCID), handshaking=8) == Drop("handshake_limit")


def test_a_bad_token_is_dropped_under_pressure_and_ignored_otherwise() -> None:
    assert _decide(token=b"junk", handshaking=4) == Drop("token_invalid")
    assert _decide(token=b"junk", handshaking=0) == Admit(DCID, None)


def test_a_source_over_its_share_must_prove_its_address_then_is_capped() -> None:
    assert _decide(held=2) == SendRetry()
    assert _decide(token=b"t", validated=(ODCID, RSCID), held=2) == Drop("source_limit")
    assert _decide(held=2, limits=HandshakeLimits(per_source=0)) == Admit(DCID, None)


# -- penalties --------------------------------------------------------------------------------


def test_a_source_is_shut_out_after_its_strikes_and_let_back_in_after() -> None:
    p = Penalties(strikes=3, duration=10.0)
    assert not p.strike("198.51.100.7", now=0.0)
    assert not p.strike("198.51.100.7", now=1.0)
    assert not p.blocked("198.51.100.7", now=1.0)
    assert p.strike("198.51.100.7", now=2.0)
    assert p.blocked("198.51.100.7", now=2.0) and p.blocked("198.51.100.7", now=11.9)
    assert not p.blocked("198.51.100.8", now=3.0)
    assert not p.blocked("198.51.100.7", now=12.0)


def test_strikes_far_apart_earn_no_penalty() -> None:
    p = Penalties(strikes=2, duration=10.0)
    assert not p.strike("198.51.100.7", now=0.0)
    assert not p.strike("198.51.100.7", now=REFUSAL_PERIOD + 1)
    assert not p.blocked("198.51.100.7", now=REFUSAL_PERIOD + 1)


def test_no_strikes_setting_means_no_source_is_ever_shut_out() -> None:
    p = Penalties(strikes=0, duration=10.0)
    results = [p.strike("198.51.100.7", now=0.0) for _ in range(100)]
    assert not any(results) and not p.blocked("198.51.100.7", now=0.0)


def test_many_sources_keep_the_tables_bounded() -> None:
    p = Penalties(strikes=1, duration=1000.0)
    for i in range(MAX_TRACKED_SOURCES + 100):
        p.strike(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", now=0.0)
    assert p.tracked <= MAX_TRACKED_SOURCES
    p = Penalties(strikes=5, duration=1000.0)
    for i in range(MAX_TRACKED_SOURCES + 100):
        p.strike(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", now=0.0)
    assert p.tracked <= MAX_TRACKED_SOURCES
