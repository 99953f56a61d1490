"""A steering group on loopback: datagrams reach the socket their connection id names."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from ramp.net.reuseport import SteeringGroup
from ramp.quic.cookies import CidCookies
from ramp.testing.wait import DEADLINE


@pytest.fixture(params=["ebpf", "cbpf"])
def group(request: pytest.FixtureRequest) -> Iterator[SteeringGroup]:
    g = SteeringGroup.create(mechanism=request.param)
    assert g.mechanism == request.param
    yield g
    g.close()


def short_packet(cid: bytes, tag: bytes) -> bytes:
    return bytes([0x40]) + cid + tag


def initial_packet(dcid: bytes, tag: bytes) -> bytes:
    scid = os.urandom(8)
    return bytes([0xC0]) + b"\x00\x00\x00\x01" + bytes([len(dcid)]) + dcid + b"\x08" + scid + tag


def forged_cid(cookies: CidCookies, slot: int) -> bytes:
    """An id with `slot` in its slot bits but no valid check."""
    while True:
        cid = bytearray(os.urandom(8))
        cid[6] = slot << 2 | cid[6] & 3
        if cookies.slot_of(bytes(cid)) is None:
            return bytes(cid)


def deliver(
    socks: list[socket.socket], packets: list[bytes], *, client_per_packet: bool = False
) -> dict[bytes, int]:
    """Send every packet to the group's port (from one client socket, or each from its own);
    which socket index each arrived at."""
    family = socks[0].family
    target = socks[0].getsockname()[:2]
    with socket.socket(family, socket.SOCK_DGRAM) as client:
        for p in packets:
            if client_per_packet:
                with socket.socket(family, socket.SOCK_DGRAM) as own:
                    own.sendto(p, target)
            else:
                client.sendto(p, target)
    arrived: dict[bytes, int] = {}
    deadline = time.monotonic() + DEADLINE
    while len(arrived) < len(packets):
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(arrived)} of {len(packets)} datagrams arrived"
        ready, _, _ = select.select(socks, [], [], left)
        for s in ready:
            arrived[s.recv(2048)] = socks.index(s)
    return arrived


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_datagrams_follow_their_cookie_and_new_ones_the_working_slot(
    group: SteeringGroup, host: str
) -> None:
    s0 = group.socket(host, 0, 0)
    s1 = group.socket(host, s0.getsockname()[1], 1)
    group.set_working([0])
    c = group.cookies
    to1 = [short_packet(c.issue(1), b"to1-%d" % i) for i in range(20)]
    to0 = [short_packet(c.issue(0), b"to0-%d" % i) for i in range(20)]
    long_to1 = [initial_packet(c.issue(1), b"lto1-%d" % i) for i in range(10)]
    new = [initial_packet(os.urandom(8), b"new-%d" % i) for i in range(20)]
    forged = [short_packet(forged_cid(c, 1), b"forged-%d" % i) for i in range(20)]
    empty_slot = [short_packet(c.issue(5), b"empty-%d" % i) for i in range(10)]
    arrived = deliver([s0, s1], to1 + to0 + long_to1 + new + forged + empty_slot)
    for p in to1 + long_to1:
        assert arrived[p] == 1
    for p in to0 + new + forged + empty_slot:
        assert arrived[p] == 0

    # a new working slot takes new connections; old cookies still reach their socket
    group.set_working([1])
    to0 = [short_packet(c.issue(0), b"again0-%d" % i) for i in range(20)]
    new = [initial_packet(os.urandom(8), b"new1-%d" % i) for i in range(20)]
    arrived = deliver([s0, s1], to0 + new)
    assert all(arrived[p] == 0 for p in to0)
    assert all(arrived[p] == 1 for p in new)


def test_a_successor_joins_through_the_handoff_and_a_released_slot_loses_its_packets(
    group: SteeringGroup,
) -> None:
    s0 = group.socket("127.0.0.1", 0, 0)
    port = s0.getsockname()[1]
    group.set_working([0])
    fds, meta = group.handoff()
    json.dumps(meta)  # it travels as JSON
    successor = SteeringGroup.from_handoff([os.dup(fd) for fd in fds], meta)
    try:
        assert successor.mechanism == group.mechanism
        s1 = successor.socket("127.0.0.1", port, 1)
        successor.set_working([1])
        c = successor.cookies
        old = [short_packet(c.issue(0), b"old-%d" % i) for i in range(20)]
        new = [initial_packet(os.urandom(8), b"new-%d" % i) for i in range(20)]
        arrived = deliver([s0, s1], old + new)
        assert all(arrived[p] == 0 for p in old)
        assert all(arrived[p] == 1 for p in new)

        # the predecessor's slot is gone: its cookies now reach the working socket
        group.release(0)
        successor.release(0)
        old = [short_packet(c.issue(0), b"late-%d" % i) for i in range(20)]
        assert all(i == 0 for i in deliver([s1], old).values())
    finally:
        successor.close()


def test_new_connections_spread_over_several_working_slots(group: SteeringGroup) -> None:
    s0 = group.socket("127.0.0.1", 0, 0)
    port = s0.getsockname()[1]
    s1 = group.socket("127.0.0.1", port, 1)
    s2 = group.socket("127.0.0.1", port, 2)
    group.set_working([1, 2])
    socks = [s0, s1, s2]
    # eBPF spreads by the addresses (each packet from its own client socket), classic BPF by
    # the connection id
    new = [initial_packet(os.urandom(8), b"spread-%d" % i) for i in range(60)]
    to0 = [short_packet(group.cookies.issue(0), b"zero-%d" % i) for i in range(10)]
    arrived = deliver(socks, new + to0, client_per_packet=True)
    assert all(arrived[p] == 0 for p in to0)
    assert {arrived[p] for p in new} == {1, 2}


# a successor process: joins the group it is handed at slot 1, takes the new connections and
# answers every datagram it gets with b"successor:" + the datagram
_SUCCESSOR = """
import json, socket, sys
from ramp.net.reuseport import SteeringGroup
fds, meta, port = json.loads(sys.argv[1])
group = SteeringGroup.from_handoff(fds, meta)
sock = group.socket("127.0.0.1", port, 1)
group.set_working([1])
print("ready", flush=True)
while True:
    data, addr = sock.recvfrom(2048)
    sock.sendto(b"successor:" + data, addr)
"""


def test_a_successor_process_takes_new_connections_and_leaves_the_old(
    group: SteeringGroup,
) -> None:
    s0 = group.socket("127.0.0.1", 0, 0)
    port = s0.getsockname()[1]
    group.set_working([0])
    fds, meta = group.handoff()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen(
        [sys.executable, "-c", _SUCCESSOR, json.dumps([fds, meta, port])],
        pass_fds=fds,
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        c = group.cookies
        old = [short_packet(c.issue(0), b"old-%d" % i) for i in range(20)]
        new = [initial_packet(os.urandom(8), b"new-%d" % i) for i in range(20)]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(DEADLINE)
            for p in old + new:
                client.sendto(p, ("127.0.0.1", port))
            answers = {client.recv(2048) for _ in new}
        assert answers == {b"successor:" + p for p in new}
        s0.settimeout(DEADLINE)
        assert {s0.recv(2048) for _ in old} == set(old)
    finally:
        child.kill()
        child.wait()
