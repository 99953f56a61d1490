"""Connection-id cookies: slots round-trip, forged and random ids rarely decode."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ramp.quic.cookies import MAX_SLOTS, CidCookies

KEY = bytes.fromhex("0123456789abcdef")


@given(st.integers(0, MAX_SLOTS - 1), st.integers(8, 20))
def test_issued_cid_carries_its_slot(slot: int, length: int) -> None:
    cookies = CidCookies(KEY, length)
    cid = cookies.issue(slot)
    assert len(cid) == length
    assert cookies.slot_of(cid) == slot


@given(st.binary(max_size=40))
def test_any_bytes_decode_without_crashing(data: bytes) -> None:
    slot = CidCookies(KEY).slot_of(data)
    assert slot is None or 0 <= slot < MAX_SLOTS


@given(st.integers(0, MAX_SLOTS - 1), st.integers(0, 63), st.integers(0, 255))
def test_mutated_cid_never_crashes(slot: int, pos: int, value: int) -> None:
    cookies = CidCookies(KEY)
    cid = bytearray(cookies.issue(slot))
    cid[pos % len(cid)] = value
    result = cookies.slot_of(bytes(cid))
    assert result is None or 0 <= result < MAX_SLOTS


def test_random_cids_rarely_carry_a_cookie() -> None:
    cookies = CidCookies(KEY)
    valid = sum(cookies.slot_of(os.urandom(8)) is not None for _ in range(20000))
    assert valid < 60  # about 20 expected (one in 1,024)


def test_changing_the_slot_bits_of_a_real_cid_does_not_choose_a_slot() -> None:
    # a client that knows its own id flips the slot bits: the check no longer matches
    cookies = CidCookies(KEY)
    accepted = 0
    for _ in range(2000):
        cid = bytearray(cookies.issue(3))
        cid[6] ^= 5 << 2  # slot 3 -> 6
        accepted += cookies.slot_of(bytes(cid)) == 6
    assert accepted < 15  # about 2 expected


def test_another_key_does_not_read_the_cookie() -> None:
    mine, theirs = CidCookies(KEY), CidCookies(bytes(8))
    matches = sum(theirs.slot_of(mine.issue(7)) == 7 for _ in range(2000))
    assert matches < 15


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        CidCookies(b"short")
    with pytest.raises(ValueError):
        CidCookies(KEY, 4)
    with pytest.raises(ValueError):
        CidCookies(KEY).issue(MAX_SLOTS)
