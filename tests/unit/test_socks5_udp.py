"""SOCKS5 UDP ASSOCIATE on loopback: a real client socket talks to the edge's SOCKS5 listener and
its UDP relay, a fake FlowOpener stands in for the router and echoes every datagram back.

The client side runs in a thread with blocking sockets and the helpers from ramp.testing.clients,
which are written from RFC 1928 independently of the codec the relay uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from ramp.config import EdgeConfig
from ramp.flows.flow import Flow, FlowError, FlowResult
from ramp.onramps.socks5 import Socks5Server
from ramp.onramps.socks5_udp import AssociationLimits, IdleWatch, UdpAssociation
from ramp.testing.clients import ProxyError, socks5_udp_associate, udp_unwrap, udp_wrap
from ramp.testing.loopback import LOOPS
from ramp.testing.loopback import run_on_loop as run

TIMEOUT = 15.0  # for things that do happen; silence is checked with `silent`


# -- fakes ----------------------------------------------------------------------------------


class EchoSession:
    """An origin that sends every datagram straight back, like `socat UDP-RECVFROM ... PIPE`."""

    def __init__(
        self,
        opener: UdpOpener,
        flow: Flow,
        receive: Callable[[bytes], None],
        closed: Callable[[str], None],
    ) -> None:
        self.opener = opener
        self.flow = flow
        self.receive = receive
        self.closed = closed
        self.got: list[bytes] = []
        self.closed_by_client = False
        self.finished = False

    def send(self, payload: bytes) -> None:
        if self.finished:
            return
        self.flow.packets_up += 1
        self.flow.bytes_up += len(payload)
        self.got.append(payload)
        asyncio.get_running_loop().call_soon(self._echo, payload)

    def _echo(self, payload: bytes) -> None:
        if not self.finished:
            self.flow.packets_down += 1
            self.flow.bytes_down += len(payload)
            self.receive(payload)

    def close(self) -> None:
        if not self.finished:
            self.closed_by_client = True
            self._finish(FlowResult.OK, "closed by client")

    def expire(self, reason: str = "idle timeout") -> None:
        """The session ends on its own (idle timeout, connector gone)."""
        self._finish(FlowResult.OK, reason)
        self.closed(reason)

    def _finish(self, result: FlowResult, reason: str) -> None:
        self.finished = True
        self.flow.result, self.flow.reason = result, reason
        self.opener.flow_finished(self.flow)


class UdpOpener:
    """open_udp echoes; `fail` makes the next opens fail, `gate` holds opens until it is set."""

    def __init__(self, fail: int = 0, gate: asyncio.Event | None = None) -> None:
        self.fail = fail
        self.gate = gate
        self.opened: list[Flow] = []
        self.sessions: list[EchoSession] = []
        self.finished: list[Flow] = []
        self.bad: list[tuple[str, str]] = []

    async def open_tcp(self, flow: Flow) -> Any:
        raise AssertionError("no TCP flows in these tests")

    async def open_udp(
        self, flow: Flow, receive: Callable[[bytes], None], closed: Callable[[str], None]
    ) -> EchoSession:
        assert flow.protocol == "udp"
        self.opened.append(flow)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            self.fail -= 1
            flow.result, flow.reason = FlowResult.NET_UNREACHABLE, "test says no"
            self.flow_finished(flow)
            raise FlowError(flow.result, flow.reason)
        session = EchoSession(self, flow, receive, closed)
        self.sessions.append(session)
        return session

    async def dns_query(self, query: bytes) -> bytes | None:
        return None

    def flow_finished(self, flow: Flow) -> None:
        assert flow not in self.finished, "flow_finished called twice"
        self.finished.append(flow)

    def bad_input(self, onramp: str, reason: str, peer: tuple[str, int] | None = None) -> None:
        self.bad.append((onramp, reason))

    def bad_reasons(self) -> list[str]:
        return [reason for onramp, reason in self.bad if onramp == "socks5-udp"]


async def until(cond: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not cond():
            await asyncio.sleep(0.005)
    assert cond(), what


@contextlib.asynccontextmanager
async def serving(
    opener: UdpOpener, host: str = "127.0.0.1", **config: Any
) -> AsyncIterator[Socks5Server]:
    server = Socks5Server(EdgeConfig(**config), opener)
    await server.start(host, 0)
    try:
        yield server
    finally:
        await server.close()


# -- client side (runs in a thread) ---------------------------------------------------------


@contextlib.contextmanager
def control(port: int, host: str = "127.0.0.1") -> Iterator[socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect((host, port))
        yield sock


def udp_socket(host: str = "127.0.0.1", timeout: float = TIMEOUT) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((host, 0))
    sock.settimeout(timeout)
    return sock


def exchange(
    sock: socket.socket, relay: tuple[str, int], host: str, port: int, data: bytes
) -> bytes:
    """Send one datagram through the relay and return the raw answer (checked to be from it)."""
    sock.sendto(udp_wrap(host, port, data), relay)
    packet, src = sock.recvfrom(70000)
    assert src[:2] == relay, f"answer from {src}, not from the relay {relay}"
    return packet


def echo(sock: socket.socket, relay: tuple[str, int], host: str, port: int, data: bytes) -> None:
    assert udp_unwrap(exchange(sock, relay, host, port, data)) == (host, port, data)


def silent(sock: socket.socket, wait: float = 0.3) -> bool:
    """Nothing arrives within `wait` seconds."""
    sock.settimeout(wait)
    try:
        sock.recvfrom(70000)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(TIMEOUT)
    return False


# -- the association ------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_round_trip_of_many_sizes(loop: str) -> None:
    rng = random.Random(7)
    sizes = [1, 2, 3, 100, 512, 1200, 1472, 1473, 1500, 4096, 8192, 9000, 16384, 32768]
    sizes += [65000, 65000 - 1, 60000] + [rng.randint(1, 65000) for _ in range(60)]

    async def main() -> None:
        opener = UdpOpener()
        async with serving(opener) as server:

            def client() -> None:
                with control(server.port) as ctl, udp_socket() as u:
                    relay = socks5_udp_associate(ctl)
                    # The relay listens where the client reached the proxy, on its own port.
                    assert relay[0] == "127.0.0.1"
                    assert relay[1] not in (0, server.port)
                    for size in sizes:
                        echo(u, relay, "192.0.2.7", 7, os.urandom(size))

            await asyncio.to_thread(client)
            await until(lambda: len(opener.finished) == 1, "session closed with the association")
        (flow,) = opener.opened
        assert flow.onramp == "socks5-udp" and flow.protocol == "udp"
        assert (flow.destination.host, flow.destination.port) == ("192.0.2.7", 7)
        assert flow.source[0] == "127.0.0.1" and flow.source[1] != 0
        assert flow.identity is None
        assert flow.packets_up == flow.packets_down == len(sizes)
        assert flow.bytes_up == sum(sizes)
        assert opener.bad == []

    run(main, loop)


def test_ipv6_listener_relays_on_ipv6() -> None:
    async def main() -> None:
        opener = UdpOpener()
        async with serving(opener, host="::1") as server:

            def client() -> None:
                with control(server.port, "::1") as ctl, udp_socket("::1") as u:
                    relay = socks5_udp_associate(ctl)
                    assert relay[0] == "::1"
                    echo(u, relay, "2001:db8::7", 5353, b"over v6")
                    echo(u, relay, "192.0.2.7", 53, b"v4 destination, v6 client")

            await asyncio.to_thread(client)
        assert [f.destination.host for f in opener.opened] == ["2001:db8::7", "192.0.2.7"]

    run(main)


def test_wildcard_listener_relays_from_the_address_the_client_reached() -> None:
    async def main() -> None:
        opener = UdpOpener()
        async with serving(opener, host="0.0.0.0") as server:

            def client(addr: str) -> None:
                with control(server.port, addr) as ctl, udp_socket() as u:
                    relay = socks5_udp_associate(ctl)
                    assert relay[0] == addr
                    # `echo` checks the answer comes from exactly that address and port.
                    echo(u, relay, "192.0.2.7", 7, addr.encode())

            await asyncio.to_thread(client, "127.0.0.2")
            await asyncio.to_thread(client, "127.0.0.3")

    run(main)


def test_pipelined_datagrams_arrive_in_order() -> None:
    async def main() -> None:
        opener = UdpOpener()
        async with serving(opener) as server:

            def client() -> None:
                with control(server.port) as ctl, udp_socket() as u:
                    relay = socks5_udp_associate(ctl)
                    echo(u, relay, "192.0.2.7", 7, b"open")
                    for i in range(50):
                        u.sendto(udp_wrap("192.0.2.7", 7, struct.pack("!I", i) * 100), relay)
                    got = [udp_unwrap(u.recv(70000))[2] for _ in range(50)]
                    assert got == [struct.pack("!I", i) * 100 for i in range(50)]

            await asyncio.to_thread(client)

    run(main)


def test_each_destination_is_a_session_and_answers_with_its_own_address() -> None:
    async def main() -> None:
        opener = UdpOpener()
        async with serving(opener) as server:

            def client() -> None:
                with control(server.port) as ctl, udp_socket() as u:
                    relay = socks5_udp_associate(ctl)
                    dests = [
                        ("192.0.2.7", 53),
                        ("192.0.2.7", 5353),
                        ("2001:db8::53", 53),
                        ("app.corp.example", 53),
                    ]
                    for _ in range(3):
                        for host, port in dests:
                            echo(u, relay, host, port, f"to {host} {port}".encode())

            await asyncio.to_thread(client)
            await until(lambda: len(opener.finished) == 4, "all sessions closed")
        assert len(opener.opened) == 4
        assert all(f.packets_up == 3 for f in opener.opened)

    run(main)


def test_domain_name_destination_is_kept_in_the_reply_header() -> None:
    async def main() -> None:
        opener = UdpOpener()
        async with serving(opener) as server:

            def client() -> None:
                with control(server.port) as ctl, udp_socket() as u:
                    relay = socks5_udp_associate(ctl)
                    packet = exchange(u, relay, "db.corp.example", 5353, b"query")
                    assert packet == b"\0\0\0\x03\x0fdb.corp.example\x14\xe9query"
                    assert udp_unwrap(packet) == ("db.corp.example", 5353, b"query")
                    # A name that looks like an address is still a name, byte for byte.
                    wire = b"\0\0\0\x03\x09192.0.2.1\x00\x35" + b"payload"
                    u.sendto(wire, relay)
                    assert u.recv(70000) == wire

            await asyncio.to_thread(client)
        hosts = [f.destination.host for f in opener.opened]
        assert hosts == ["db.corp.example", "192.0.2.1"]

    run(main)


def test_fragments_are_dropped_and_counted() -> None:
    async def main() -> None:
        opener = UdpOpener()
        async with serving(opener) as server:

            def client() -> None:
                with control(server.port) as ctl, udp_socket() as u:
                    relay = socks5_udp_associate(ctl)
                    for frag in (1, 0x81, 0xFF):
                        u.sendto(udp_wrap("192.0.2.8", 9, b"fragment", frag=frag), relay)
                    echo(u, relay, "192.0.2.7", 7, b"whole")

            await asyncio.to_thread(client)
        assert opener.bad_reasons() == ["fragment"] * 3
        assert [f.destination.host for f in opener.opened] == ["192.0.2.7"]
        assert opener.sessions[0].got == [b"whole"]

    run(main)


def test_truncated_and_malformed_headers_are_counted() -> None:
    bad = [
        (b"", "truncated_header"),
        (b"\0\0", "truncated_header"),
        (b"\0\0\0\x01\x7f", "truncated_header"),
        (b"\0\0\0\x04" + bytes(10), "truncated_header"),
        (b"\0\0\0\x03\x10short", "truncated_header"),
        (b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x35", "bad_reserved"),
        (b"\0\0\0\x09\x7f\x00\x00\x01\x00\x35", "bad_address_type"),
        (b"\0\0\0\x01\x7f\x00\x00\x01\x00\x00data", "bad_port"),
    ]

    async def main() -> None:
        opener = UdpOpener()
        async with serving(opener) as server:

            def client() -> None:
                with control(server.port) as ctl, udp_socket() as u:
                    relay = socks5_udp_associate(ctl)
                    for packet, _ in bad:
                        u.sendto(packet, relay)
                    echo(u, relay, "192.0.2.7", 7, b"still fine")

            await asyncio.to_thread(client)
        assert opener.bad_reasons() == [reason for _, reason in bad]
        assert len(opener.opened) == 1

    run(main)


def test_datagrams_from_other_sources_are_ignored() -> None:
    async def main() -> None:
        opener = UdpOpener()
        async with serving(opener) as server:

            def client() -> None:
                with (
                    control(server.port) as ctl,
                    udp_socket() as u,
                    udp_socket() as other_port,
                    udp_socket("127.0.0.2") as other_ip,
                ):
                    relay = socks5_udp_associate(ctl)
                    # Another IP is refused even before the client has sent anything.
                    other_ip.sendto(udp_wrap("192.0.2.66", 7, b"intruder"), relay)
                    echo(u, relay, "192.0.2.7", 7, b"first")  # locks the client's port
                    other_port.sendto(udp_wrap("192.0.2.7", 7, b"same host, other port"), relay)
                    other_ip.sendto(udp_wrap("192.0.2.7", 7, b"intruder"), relay)
                    echo(u, relay, "192.0.2.7", 7, b"second")
                    assert silent(other_port) and silent(other_ip)

            await asyncio.to_thread(client)
        assert opener.bad_reasons() == ["foreign_source"] * 3
        assert opener.sessions[0].got == [b"first", b"second"]

    run(main)


def test_announced_source_port_is_the_only_one_accepted() -> None:
    async def main() -> None:
        opener = UdpOpener()
        async with serving(opener) as server:

            def client() -> None:
                with control(server.port) as ctl, udp_socket() as u, udp_socket() as other:
                    relay = socks5_udp_associate(ctl, "127.0.0.1", u.getsockname()[1])
                    other.sendto(udp_wrap("192.0.2.7", 7, b"not announced"), relay)
                    echo(u, relay, "192.0.2.7", 7, b"announced")
                    assert silent(other)

            await asyncio.to_thread(client)
        assert opener.bad_reasons() == ["foreign_source"]

    run(main)


def test_announced_address_of_another_host_does_not_open_the_relay_to_it() -> None:
    async def main() -> None:
        opener = UdpOpener()
        async with serving(opener) as server:

            def client() -> None:
                with (
                    control(server.port) as ctl,
                    udp_socket() as u,
                    udp_socket("127.0.0.2") as other_ip,
                ):
                    # As a client behind NAT would: an address the relay never sees.
                    announced = other_ip.getsockname()
                    relay = socks5_udp_associate(ctl, *announced)
                    other_ip.sendto(udp_wrap("192.0.2.7", 7, b"not the client"), relay)
                    echo(u, relay, "192.0.2.7", 7, b"the client")
                    assert silent(other_ip)

            await asyncio.to_thread(client)
        assert opener.bad_reasons() == ["foreign_source"]

    run(main)


@pytest.mark.parametrize("how", ["close", "half-close", "reset", "server-close"])
def test_association_ends_with_its_control_connection(how: str) -> None:
    async def main() -> None:
        opener = UdpOpener()
        async with serving(opener) as server:
            ctl = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
            u = udp_socket()
            try:
                relay = await asyncio.to_thread(socks5_udp_associate, ctl)
                await asyncio.to_thread(echo, u, relay, "192.0.2.7", 7, b"alive")
                await asyncio.to_thread(echo, u, relay, "app.corp.example", 53, b"alive")
                assert server.flows == 1  # one association, counted like one flow
                if how == "close":
                    ctl.close()
                elif how == "half-close":
                    ctl.shutdown(socket.SHUT_WR)
                elif how == "reset":
                    ctl.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    ctl.close()
                else:
                    await server.close()
                await until(
                    lambda: all(s.closed_by_client for s in opener.sessions),
                    "sessions closed with the association",
                )
                assert len(opener.sessions) == 2
                assert server.flows == 0

                def relay_gone() -> None:
                    u.connect(relay)
                    u.send(udp_wrap("192.0.2.7", 7, b"anyone?"))
                    # Loopback answers a closed port with ICMP port unreachable.
                    with pytest.raises(ConnectionRefusedError):
                        u.recv(70000)

                await asyncio.to_thread(relay_gone)
            finally:
                ctl.close()
                u.close()
        assert len(opener.opened) == 2  # nothing reopened after the end

    run(main)


def test_bytes_on_the_control_connection_do_not_end_the_association() -> None:
    async def main() -> None:
        opener = UdpOpener()
        async with serving(opener) as server:

            def client() -> None:
                with control(server.port) as ctl, udp_socket() as u:
                    relay = socks5_udp_associate(ctl)
                    ctl.sendall(b"chatter the RFC gives no meaning to" * 100)
                    echo(u, relay, "192.0.2.7", 7, b"still here")

            await asyncio.to_thread(client)

    run(main)


def test_closed_session_is_reopened_by_the_next_datagram() -> None:
    async def main() -> None:
        opener = UdpOpener()
        async with serving(opener) as server:
            with control(server.port) as ctl, udp_socket() as u:
                relay = await asyncio.to_thread(socks5_udp_associate, ctl)
                await asyncio.to_thread(echo, u, relay, "192.0.2.7", 7, b"one")
                opener.sessions[0].expire("idle timeout")
                await asyncio.to_thread(echo, u, relay, "192.0.2.7", 7, b"two")
                assert len(opener.opened) == 2
                first, second = opener.sessions
                assert first.got == [b"one"] and second.got == [b"two"]
                assert not first.closed_by_client  # it ended on its own, nobody closed it twice
                assert first.flow.id != second.flow.id

    run(main)


def test_failed_open_drops_queued_datagrams_and_retries_after_a_pause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(UdpAssociation, "retry_interval", 0.3)

    async def main() -> None:
        opener = UdpOpener(fail=1)
        async with serving(opener) as server:
            with control(server.port) as ctl, udp_socket() as u:
                relay = await asyncio.to_thread(socks5_udp_associate, ctl)
                u.sendto(udp_wrap("192.0.2.7", 7, b"lost"), relay)
                await until(lambda: opener.bad_reasons() == ["open_failed"], "drop counted")
                # Within the pause the destination is not tried again.
                u.sendto(udp_wrap("192.0.2.7", 7, b"too soon"), relay)
                await until(lambda: len(opener.bad) == 2, "second drop counted")
                assert opener.bad_reasons() == ["open_failed", "open_failed"]
                assert len(opener.opened) == 1
                # Other destinations are not held back.
                await asyncio.to_thread(echo, u, relay, "192.0.2.8", 7, b"elsewhere")
                await asyncio.sleep(0.35)
                await asyncio.to_thread(echo, u, relay, "192.0.2.7", 7, b"later")
                assert [f.destination.host for f in opener.opened] == [
                    "192.0.2.7",
                    "192.0.2.8",
                    "192.0.2.7",
                ]
                assert opener.opened[0].result is FlowResult.NET_UNREACHABLE
                assert [s.got for s in opener.sessions] == [[b"elsewhere"], [b"later"]]

    run(main)


def test_datagrams_wait_in_a_bounded_queue_while_the_session_opens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(UdpAssociation, "open_queue", 64)

    async def main() -> None:
        gate = asyncio.Event()
        opener = UdpOpener(gate=gate)
        async with serving(opener) as server:
            with control(server.port) as ctl, udp_socket() as u:
                relay = await asyncio.to_thread(socks5_udp_associate, ctl)
                for i in range(70):
                    u.sendto(udp_wrap("192.0.2.7", 7, b"%04d" % i), relay)
                await until(lambda: len(opener.bad) == 6, "overflow counted")
                assert opener.bad_reasons() == ["queue_full"] * 6
                assert len(opener.opened) == 1
                gate.set()

                def receive_all() -> list[bytes]:
                    got = [udp_unwrap(u.recv(70000))[2] for _ in range(64)]
                    assert silent(u)
                    return got

                got = await asyncio.to_thread(receive_all)
        assert got == [b"%04d" % i for i in range(64)]

    run(main)


def test_sessions_per_association_are_capped() -> None:
    async def main() -> None:
        opener = UdpOpener()
        async with serving(opener, max_udp_destinations_per_association=2) as server:
            with control(server.port) as ctl, udp_socket() as u:
                relay = await asyncio.to_thread(socks5_udp_associate, ctl)
                await asyncio.to_thread(echo, u, relay, "192.0.2.1", 7, b"a")
                await asyncio.to_thread(echo, u, relay, "192.0.2.2", 7, b"b")
                u.sendto(udp_wrap("192.0.2.3", 7, b"c"), relay)
                await until(lambda: opener.bad_reasons() == ["too_many_sessions"], "cap counted")
                assert await asyncio.to_thread(silent, u)
                # A session that ends makes room.
                opener.sessions[0].expire()
                await asyncio.to_thread(echo, u, relay, "192.0.2.3", 7, b"c")
        assert [f.destination.host for f in opener.opened] == [
            "192.0.2.1",
            "192.0.2.2",
            "192.0.2.3",
        ]

    run(main)


def test_associations_count_against_max_flows() -> None:
    async def main() -> None:
        opener = UdpOpener()
        async with serving(opener, max_flows=1) as server:

            def client() -> None:
                with control(server.port) as first:
                    socks5_udp_associate(first)
                    # connect the second only now: while the first was still in its handshake
                    # it would have been refused by the handshake cap instead
                    with (
                        control(server.port) as second,
                        pytest.raises(ProxyError, match="REP 0x1"),
                    ):
                        socks5_udp_associate(second)

            await asyncio.to_thread(client)
        assert opener.bad == [("socks5", "too_many_flows")]

    run(main)


def test_authenticated_user_is_the_sessions_identity() -> None:
    async def main() -> None:
        opener = UdpOpener()
        async with serving(opener, users={"alice": "s3cret"}) as server:

            def client() -> None:
                with control(server.port) as ctl, udp_socket() as u:
                    with (
                        pytest.raises(ProxyError, match="method selection"),
                        control(server.port) as anonymous,
                    ):
                        socks5_udp_associate(anonymous)
                    relay = socks5_udp_associate(ctl, user="alice", password="s3cret")
                    echo(u, relay, "192.0.2.7", 7, b"hello")

            await asyncio.to_thread(client)
        (flow,) = opener.opened
        assert flow.user == "alice"

    run(main)


# -- shares and idle expiry -----------------------------------------------------------------


def test_idle_watch_expires_only_after_a_quiet_timeout() -> None:
    watch = IdleWatch(60.0, now=0.0)
    assert watch.interval == 15.0
    assert not watch.expired(45.0)
    watch.active = True  # a datagram
    assert not watch.expired(59.0)  # seen now: the timeout counts from here
    assert not watch.expired(118.0)
    assert watch.expired(119.0)


def test_association_share_per_source_refuses_with_general_failure() -> None:
    async def main() -> None:
        opener = UdpOpener()
        refused: list[str] = []
        async with serving(opener) as server:
            server.associations = AssociationLimits(per_source=2, on_refused=refused.append)

            limits = server.associations

            def crowd() -> None:
                with control(server.port) as a, control(server.port) as b:
                    socks5_udp_associate(a)
                    socks5_udp_associate(b)
                    with control(server.port) as c, pytest.raises(ProxyError, match="0x1"):
                        socks5_udp_associate(c)

            def back_in() -> None:
                with control(server.port) as d, udp_socket() as u:
                    echo(u, socks5_udp_associate(d), "192.0.2.7", 7, b"back in")

            await asyncio.to_thread(crowd)
            # the two ended: their units are free again
            await until(lambda: limits.active == 0, "associations released")
            await asyncio.to_thread(back_in)
        assert refused == ["source_share"]
        assert ("socks5", "udp_association_source_share") in opener.bad

    run(main)


def test_idle_association_is_closed_with_its_control_connection() -> None:
    async def main() -> None:
        opener = UdpOpener()
        expired: list[bool] = []
        async with serving(opener) as server:
            server.associations = AssociationLimits(
                idle_timeout=0.4, on_expired=lambda: expired.append(True)
            )

            def client() -> None:
                with control(server.port) as ctl, udp_socket() as u:
                    relay = socks5_udp_associate(ctl)
                    echo(u, relay, "192.0.2.7", 7, b"used once")
                    # then nothing: the edge closes the control connection (EOF here)
                    assert ctl.recv(1) == b""

            await asyncio.to_thread(client)
            await until(lambda: server.flows == 0, "the association's slot freed")
            await until(lambda: all(s.closed_by_client for s in opener.sessions), "sessions end")
        assert expired == [True]

    run(main)


def test_association_share_per_identity_spans_connections_of_that_user() -> None:
    async def main() -> None:
        opener = UdpOpener()
        refused: list[str] = []
        async with serving(opener, users={"alice": "a-pw", "bob": "b-pw"}) as server:
            server.associations = AssociationLimits(per_identity=1, on_refused=refused.append)

            def client() -> None:
                with control(server.port) as a, udp_socket() as u:
                    relay = socks5_udp_associate(a, user="alice", password="a-pw")
                    with control(server.port) as b, pytest.raises(ProxyError, match="0x1"):
                        socks5_udp_associate(b, user="alice", password="a-pw")
                    with control(server.port) as c:
                        socks5_udp_associate(c, user="bob", password="b-pw")
                    echo(u, relay, "192.0.2.7", 7, b"alice still relays")

            await asyncio.to_thread(client)
        assert refused == ["identity_share"]

    run(main)
