"""The steering group's programs and its fallback when eBPF cannot be loaded."""

from __future__ import annotations

import errno
import logging
import os
import struct

import pytest

from ramp.net import bpf, reuseport
from ramp.net.reuseport import SteeringGroup, cbpf_program, program

KEY = bytes(range(8))


def test_the_program_is_the_same_bytes_every_time() -> None:
    assert program(3, 4, KEY).assemble() == program(3, 4, KEY).assemble()
    assert program(3, 4, KEY).assemble() != program(3, 4, bytes(8)).assemble()


def test_the_printed_program_is_the_assembled_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert reuseport.main([]) == 0
    printed = "".join(line.split()[1] for line in capsys.readouterr().out.splitlines())
    assert bytes.fromhex(printed) == program(0, 0, bytes(8)).assemble()


def test_the_classic_program_fits_its_jumps_with_every_slot_in_use() -> None:
    code = cbpf_program(KEY, 8, {s: s for s in range(64)}, list(range(64)))
    assert len(code) % 8 == 0


def test_a_group_falls_back_to_classic_bpf_when_ebpf_is_refused(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*args: object, **kw: object) -> int:
        raise bpf.BpfError(errno.EINVAL, "loading BPF program ramp_reuseport", "R1 invalid")

    monkeypatch.setattr(bpf, "prog_load", refuse)
    with caplog.at_level(logging.WARNING, "ramp.net.reuseport"):
        group = SteeringGroup.create()
    try:
        assert group.mechanism == "cbpf"
        assert "classic BPF" in caplog.text and "R1 invalid" in caplog.text
        sock = group.socket("127.0.0.1", 0, 0)
        group.set_working([0])
        assert sock.getsockname()[1] > 0
    finally:
        group.close()


def test_the_environment_forces_a_mechanism(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(reuseport.MECHANISM_ENV, "cbpf")
    with caplog.at_level(logging.WARNING, "ramp.net.reuseport"):
        group = SteeringGroup.create()
    group.close()
    assert group.mechanism == "cbpf"
    assert "classic BPF" in caplog.text


def test_the_handoff_carries_the_cookie_key() -> None:
    group = SteeringGroup.create(mechanism="none")
    fds, meta = group.handoff()
    successor = SteeringGroup.from_handoff(fds, meta)
    cid = group.cookies.issue(9)
    assert successor.cookies.slot_of(cid) == 9
    assert successor.mechanism == "none"


def test_bad_slots_are_refused() -> None:
    group = SteeringGroup.create(mechanism="none", max_slots=4)
    with pytest.raises(ValueError):
        group.socket("127.0.0.1", 0, 4)
    with pytest.raises(ValueError):
        group.set_working([7])
    sock = group.socket("127.0.0.1", 0, 1)
    with pytest.raises(ValueError):
        group.socket("127.0.0.1", sock.getsockname()[1], 1)
    group.close()


def test_a_given_socket_joins_only_with_reuseport() -> None:
    group = SteeringGroup.create(mechanism="ebpf")
    try:
        plain = reuseport.udp_socket("127.0.0.1", 0)
        with pytest.raises(ValueError, match="ReusePort"):
            group.adopt(plain, 0)
        plain.close()
        given = reuseport.udp_socket("127.0.0.1", 0, reuse_port=True)
        group.adopt(given, 0)
        # the group's next socket shares the given one's port
        mine = group.socket("127.0.0.1", given.getsockname()[1], 1)
        assert mine.getsockname() == given.getsockname()
    finally:
        group.close()


@pytest.mark.parametrize("mechanism", ["ebpf", "cbpf"])
def test_a_successor_keeps_its_working_slot_when_the_predecessor_leaves(mechanism: str) -> None:
    old = SteeringGroup.create(mechanism=mechanism)
    first = old.socket("127.0.0.1", 0, 0)
    port = first.getsockname()[1]
    old.set_working([0])
    fds, meta = old.handoff()
    new = SteeringGroup.from_handoff([os.dup(fd) for fd in fds], meta)
    new.socket("127.0.0.1", port, 1)
    old.joined(1)
    old.set_working([1])  # the predecessor moves new connections to the successor
    new.assume_working([1])
    old.release(0)  # it has drained and goes
    old.close()
    new.release(0)  # the successor forgets the predecessor's slot
    assert new.working == [1]
    if mechanism == "ebpf":
        work = new._fds[2]
        count = bpf.map_lookup(work, struct.pack("<I", 0), 4)
        first_slot = bpf.map_lookup(work, struct.pack("<I", 1), 4)
        assert count is not None and struct.unpack("<I", count)[0] == 1
        assert first_slot is not None and struct.unpack("<I", first_slot)[0] == 1
    new.close()
