"""Egress as a role uses it: source addresses from the pool, addresses that cannot be bound
skipped, the clear error when every port is used, happy eyeballs across a name's addresses,
and the refusal a UDP session gets through the tunnel when the connector has no port left."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from ramp.flows.flow import Destination, Flow, FlowError, FlowResult
from ramp.net.connectx import PortRange
from ramp.offramps.egress import EXHAUSTED, Egress, SourcePortsExhausted
from ramp.offramps.tcp import dial_tcp, happy_eyeballs, interleave
from ramp.testing.egress_peers import echo_servers, free_ports, port_range
from ramp.testing.loopback import run, tunnel, udp_echo_origin

NOT_LOCAL = "198.51.100.77"  # no interface of the test host has it


def test_udp_sessions_use_the_pool_and_skip_an_address_that_is_not_here(tmp_path: Path) -> None:
    egress = Egress([NOT_LOCAL, "127.0.0.2", "127.0.0.3"])
    with echo_servers(1) as (a,):
        dst = a.getsockname()
        socks = [egress.udp_socket(socket.AF_INET, dst) for _ in range(4)]
        try:
            sources = [s.getsockname()[0] for s in socks]
            assert NOT_LOCAL not in sources
            assert set(sources) == {"127.0.0.2", "127.0.0.3"}
            # an unbindable address is left out, not retried by every flow
            assert list(egress.pool.choose(4)).count(NOT_LOCAL) == 0
        finally:
            for s in socks:
                s.close()


def test_udp_ports_exhausted_is_net_unreachable_and_counted(tmp_path: Path) -> None:
    first = free_ports(2)
    counted: list[str] = []
    egress = Egress(
        ["127.0.0.1", "127.0.0.2"],
        on_exhausted=counted.append,
        ports=port_range(tmp_path, first, first + 1),
    )
    with echo_servers(2) as (a, b):
        socks = [egress.udp_socket(socket.AF_INET, a.getsockname()) for _ in range(4)]
        try:
            assert len({s.getsockname() for s in socks}) == 4  # 2 addresses x 2 ports
            with pytest.raises(SourcePortsExhausted) as caught:
                egress.udp_socket(socket.AF_INET, a.getsockname())
            assert caught.value.result is FlowResult.NET_UNREACHABLE
            assert caught.value.reason.startswith(EXHAUSTED)
            assert counted == ["udp"]
            # another destination still has all of them
            egress.udp_socket(socket.AF_INET, b.getsockname()).close()
        finally:
            for s in socks:
                s.close()


def test_udp_without_a_pool_shares_the_routing_tables_source(tmp_path: Path) -> None:
    first = free_ports(1)
    egress = Egress(ports=port_range(tmp_path, first, first))
    with (
        echo_servers(2) as (a, b),
        egress.udp_socket(socket.AF_INET, a.getsockname()) as s1,
        egress.udp_socket(socket.AF_INET, b.getsockname()) as s2,
    ):
        assert s1.getsockname() == s2.getsockname() == ("127.0.0.1", first)
        with pytest.raises(SourcePortsExhausted):
            egress.udp_socket(socket.AF_INET, a.getsockname())


def test_tcp_dials_from_the_pool(tmp_path: Path) -> None:
    async def main() -> None:
        seen: list[str] = []

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(writer.get_extra_info("peername")[0])
            writer.close()

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        egress = Egress([NOT_LOCAL, "127.0.0.5", "127.0.0.6"])
        for _ in range(4):
            sock = await dial_tcp("127.0.0.1", port, 5.0, egress=egress)
            assert sock.getsockname()[0] in ("127.0.0.5", "127.0.0.6")
            sock.close()
        server.close()
        await server.wait_closed()
        assert sorted(set(seen)) == ["127.0.0.5", "127.0.0.6"]

    run(main())


def test_interleave_alternates_families_from_the_first() -> None:
    v4a, v4b = (socket.AF_INET, ("192.0.2.1", 1)), (socket.AF_INET, ("192.0.2.2", 1))
    v6a = (socket.AF_INET6, ("2001:db8::1", 1, 0, 0))
    assert interleave([v4a, v4b, v6a]) == [v4a, v6a, v4b]
    assert interleave([v6a, v4a, v4b]) == [v6a, v4a, v4b]


def test_happy_eyeballs_moves_on_after_the_delay_and_cancels_the_slow_one() -> None:
    async def main() -> None:
        started: list[str] = []
        cancelled: list[str] = []
        loop = asyncio.get_running_loop()

        async def attempt(family: int, addr: tuple) -> socket.socket:
            started.append(addr[0])
            if addr[0] == "black-hole":
                try:
                    await loop.create_future()  # never answers
                except asyncio.CancelledError:
                    cancelled.append(addr[0])
                    raise
            return socket.socket()

        addrs = [(socket.AF_INET6, ("black-hole", 1)), (socket.AF_INET, ("fine", 1))]
        sock = await happy_eyeballs(addrs, attempt, delay=0.01)
        sock.close()
        assert started == ["black-hole", "fine"]
        await asyncio.sleep(0)
        assert cancelled == ["black-hole"]

    run(main())


def test_happy_eyeballs_starts_the_next_at_once_when_one_fails() -> None:
    async def main() -> None:
        async def attempt(family: int, addr: tuple) -> socket.socket:
            if addr[0] != "third":
                raise FlowError(FlowResult.REFUSED, f"refused by {addr[0]}")
            return socket.socket()

        addrs = [(socket.AF_INET, (n, 1)) for n in ("first", "second", "third")]
        # an hour of delay: the test would hang if a failure did not start the next attempt
        sock = await asyncio.wait_for(happy_eyeballs(addrs, attempt, delay=3600), 30)
        sock.close()
        with pytest.raises(FlowError, match="refused by second"):
            await asyncio.wait_for(happy_eyeballs(addrs[:2], attempt, delay=3600), 30)

    run(main())


def test_a_name_with_a_dead_address_connects_to_the_other() -> None:
    """A name whose first address refuses: the dial goes on to its second (IPv6)."""

    async def main() -> None:
        # the same port on 127.0.0.1 bound and not listening: connects there are refused
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        server = await asyncio.start_server(lambda r, w: w.close(), "::1", port)
        with closed:

            async def both(name: str) -> list[str]:
                return ["127.0.0.1", "::1"]

            sock = await dial_tcp("dual.example", port, 5.0, resolver=both)
            assert sock.family == socket.AF_INET6
            sock.close()
        server.close()
        await server.wait_closed()

    run(main())


def test_a_udp_session_the_connector_has_no_port_for_fails_clearly(tmp_path: Path) -> None:
    """Through the tunnel: the edge's flow fails net_unreachable, 'source ports exhausted',
    and the connector counts it."""

    async def main() -> None:
        transport, port = await udp_echo_origin()
        first = free_ports(1)
        async with tunnel(tmp_path, connector_kw={"egress_source": ["127.0.0.1"]}) as t:
            t.connector.egress.ports = PortRange(
                range_file=_write(tmp_path / "range", f"{first} {first}"),
                reserved_file=tmp_path / "none",
            )
            got: asyncio.Queue[bytes] = asyncio.Queue()
            flow = Flow(
                onramp="test",
                source=("127.0.0.1", 1),
                destination=Destination("127.0.0.1", port),
                protocol="udp",
            )
            session = await t.edge.open_udp(flow, got.put_nowait, lambda why: None)
            session.send(b"one")
            assert await asyncio.wait_for(got.get(), 10) == b"one"
            second = Flow(
                onramp="test",
                source=("127.0.0.1", 2),
                destination=Destination("127.0.0.1", port),
                protocol="udp",
            )
            with pytest.raises(FlowError) as caught:
                await t.edge.open_udp(second, got.put_nowait, lambda why: None)
            assert caught.value.result is FlowResult.NET_UNREACHABLE
            assert caught.value.reason.startswith(EXHAUSTED)
            registry = t.connector.metrics.registry
            assert (
                registry.get_sample_value("ramp_egress_ports_exhausted_total", {"protocol": "udp"})
                == 1
            )
            session.close()
        transport.close()

    run(main())


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_family_without_pool_addresses_gets_the_routing_tables_source() -> None:
    egress = Egress(["127.0.0.2"])  # IPv4 only
    server = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    server.bind(("::1", 0))
    with server, egress.udp_socket(socket.AF_INET6, server.getsockname()) as s:
        assert s.getsockname()[0] == "::1"
        s.send(b"v6")
        data, peer = server.recvfrom(10)
        assert data == b"v6" and peer[:2] == s.getsockname()[:2]
