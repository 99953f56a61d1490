"""connectx on loopback with real sockets: UDP sockets share a source port across
destinations but never a 4-tuple, a taken port is retried with the next, and TCP binds an
address without reserving a port."""

from __future__ import annotations

import contextlib
import errno
import socket
from pathlib import Path

import pytest

from ramp.net import netlink
from ramp.net.connectx import PortRange, PortsExhausted, read_port_range, tcp_socket, udp_connectx
from ramp.testing.egress_peers import LOCAL, echo_servers, free_ports, port_range, round_trip


def test_udp_shares_a_port_across_destinations_but_never_a_4tuple(tmp_path: Path) -> None:
    first = free_ports(2)
    ports = port_range(tmp_path, first, first + 1)
    with echo_servers(2) as (a, b), contextlib.ExitStack() as held:
        dst_a, dst_b = a.getsockname(), b.getsockname()
        to_a = [held.enter_context(udp_connectx(socket.AF_INET, LOCAL, dst_a, ports))]
        # the second to the same destination collides on one of the two ports: retried
        to_a.append(held.enter_context(udp_connectx(socket.AF_INET, LOCAL, dst_a, ports)))
        assert {s.getsockname()[1] for s in to_a} == {first, first + 1}
        with pytest.raises(PortsExhausted):
            udp_connectx(socket.AF_INET, LOCAL, dst_a, ports)
        # another destination shares those ports
        to_b = [held.enter_context(udp_connectx(socket.AF_INET, LOCAL, dst_b, ports))]
        to_b.append(held.enter_context(udp_connectx(socket.AF_INET, LOCAL, dst_b, ports)))
        assert {s.getsockname()[1] for s in to_b} == {first, first + 1}
        # every socket gets its own replies: none took over another's 4-tuple
        for i, s in enumerate(to_a):
            assert round_trip(s, a, b"a%d" % i) == b"a%d" % i
        for i, s in enumerate(to_b):
            assert round_trip(s, b, b"b%d" % i) == b"b%d" % i


def test_udp_skips_a_port_another_program_holds_alone(tmp_path: Path) -> None:
    first = free_ports(2)
    ports = port_range(tmp_path, first, first + 1)
    with echo_servers(1) as (a,), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.bind((LOCAL, first))  # no SO_REUSEADDR: nobody may share it
        with udp_connectx(socket.AF_INET, LOCAL, a.getsockname(), ports) as s:
            assert s.getsockname()[1] == first + 1
            with pytest.raises(PortsExhausted):
                udp_connectx(socket.AF_INET, LOCAL, a.getsockname(), ports)


def test_udp_never_overshadows_a_socket_someone_else_connected(tmp_path: Path) -> None:
    """Another cooperating process's socket on (address, port), connected to the same
    destination: connectx must not take its 4-tuple (the newer socket would get its replies)."""
    first = free_ports(1)
    ports = port_range(tmp_path, first, first)
    with echo_servers(2) as (a, b), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind((LOCAL, first))
        other.connect(a.getsockname())
        with pytest.raises(PortsExhausted):
            udp_connectx(socket.AF_INET, LOCAL, a.getsockname(), ports)
        assert round_trip(other, a, b"still mine") == b"still mine"
        with udp_connectx(socket.AF_INET, LOCAL, b.getsockname(), ports) as s:
            assert s.getsockname() == (LOCAL, first)
            assert round_trip(s, b, b"shared port") == b"shared port"
            assert round_trip(other, a, b"and still mine") == b"and still mine"


def test_udp_ipv6(tmp_path: Path) -> None:
    first = free_ports(1, socket.AF_INET6, "::1")
    ports = port_range(tmp_path, first, first)
    with echo_servers(2, socket.AF_INET6, "::1") as (a, b), contextlib.ExitStack() as held:
        s1 = held.enter_context(udp_connectx(socket.AF_INET6, "::1", a.getsockname(), ports))
        s2 = held.enter_context(udp_connectx(socket.AF_INET6, "::1", b.getsockname(), ports))
        assert s1.getsockname()[1] == s2.getsockname()[1] == first
        with pytest.raises(PortsExhausted):
            udp_connectx(socket.AF_INET6, "::1", a.getsockname(), ports)
        assert round_trip(s1, a, b"v6a") == b"v6a"
        assert round_trip(s2, b, b"v6b") == b"v6b"


def test_a_source_that_is_not_local_fails_to_bind(tmp_path: Path) -> None:
    ports = port_range(tmp_path, 40000, 40010)
    with echo_servers(1) as (a,), pytest.raises(OSError) as caught:
        udp_connectx(socket.AF_INET, "198.51.100.77", a.getsockname(), ports)
    assert not isinstance(caught.value, PortsExhausted)
    assert caught.value.errno == errno.EADDRNOTAVAIL


def test_the_kernel_answers_who_would_receive_and_from_which_source() -> None:
    with echo_servers(1) as (a,), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(a.getsockname())
        local = s.getsockname()
        assert netlink.udp_receiver(socket.AF_INET, local, a.getsockname()) == (
            netlink.socket_cookie(s)
        )
        s.close()
        assert netlink.udp_receiver(socket.AF_INET, local, a.getsockname()) is None
    assert netlink.route_source(socket.AF_INET, "127.0.0.1") == "127.0.0.1"


def test_tcp_bind_takes_the_address_only_with_port_sharing() -> None:
    with socket.socket() as listener:
        listener.bind((LOCAL, 0))
        listener.listen(8)
        with tcp_socket(socket.AF_INET, LOCAL, share_port=True) as shared:
            assert shared.getsockname() == (LOCAL, 0)  # no port reserved by bind
            shared.setblocking(True)
            shared.connect(listener.getsockname())
            assert shared.getsockname()[1] != 0
            listener.accept()[0].close()
        # bind took a port for this socket alone: nobody else may bind it
        with tcp_socket(socket.AF_INET, LOCAL, share_port=False) as alone, socket.socket() as other:
            taken = alone.getsockname()
            with pytest.raises(OSError, match="in use"):
                other.bind(taken)


def test_port_range_is_read_as_the_kernel_has_it(tmp_path: Path) -> None:
    (tmp_path / "range").write_text("40000\t40999\n")
    (tmp_path / "reserved").write_text("40001,40010-40012\n")
    (low, high), reserved = read_port_range(tmp_path / "range", tmp_path / "reserved")
    assert (low, high) == (40000, 40999)
    assert reserved == {40001, 40010, 40011, 40012}
    ports = PortRange(range_file=tmp_path / "range", reserved_file=tmp_path / "reserved")
    candidates = list(ports.candidates(tries=2000))
    assert len(candidates) == 996 and not reserved & set(candidates)
    assert len(list(ports.candidates(tries=10))) == 10
