"""MSS clamping of SYN segments: lowered when bigger, left alone otherwise, never a crash."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from ramp.testing.mutate import mutated
from ramp.wire.tcp_mss import announced_mss, clamp_mss


def _syn(mss: int | None, flags: int = 0x02, pad: bytes = b"") -> bytes:
    options = pad + (struct.pack("!BBH", 2, 4, mss) if mss is not None else b"")
    options += b"\x01" * (-len(options) % 4)
    offset = (20 + len(options)) // 4
    header = struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, offset << 4, flags, 65535, 0, 0)
    return header + options


def test_a_bigger_mss_is_lowered_and_a_smaller_one_kept() -> None:
    assert announced_mss(clamp_mss(_syn(1460), 1200)) == 1200
    assert announced_mss(clamp_mss(_syn(1000), 1200)) == 1000
    # after other options (NOP, NOP, window scale)
    assert announced_mss(clamp_mss(_syn(8960, pad=b"\x01\x01\x03\x03\x07"), 1340)) == 1340


def test_only_syn_segments_are_touched() -> None:
    ack = _syn(1460, flags=0x10)
    assert clamp_mss(ack, 1200) == ack
    assert clamp_mss(_syn(None), 1200) == _syn(None)


@given(
    mutated(st.sampled_from([_syn(1460), _syn(8960, pad=b"\x01\x01\x04\x02")])),
    st.integers(536, 9000),
)
def test_damaged_segments_never_crash_and_never_grow(segment: bytes, mss: int) -> None:
    out = clamp_mss(segment, mss)
    assert len(out) == len(segment)
    got = announced_mss(out)
    before = announced_mss(segment)
    if got is not None and before is not None:
        assert got == min(before, mss)
