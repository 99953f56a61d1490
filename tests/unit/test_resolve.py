"""Name resolution without getaddrinfo: host name validation, /etc/hosts, DNS with a timeout
and a concurrency limit, and dials to IP literals that never wait for a lookup."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path
from typing import Any

import dns.message
import dns.rrset
import pytest
import uvloop

from ramp.edge import Edge
from ramp.flows.flow import FlowError, FlowResult
from ramp.net.resolve import AsyncResolver, HostsFile, hostname_problem
from ramp.offramps.tcp import dial_tcp
from ramp.testing.loopback import loopback_edge_config, run


@pytest.mark.parametrize(
    "name",
    [
        "example.com",
        "a-b.c",
        "x",
        "db_1.corp.",
        "xn--bcher-kva.example",
        "bücher.example",
        "1.2.3.4.5",
    ],
)
def test_valid_host_names(name: str) -> None:
    assert hostname_problem(name) is None


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("a..b", "empty label"),
        ("-foo", "starts or ends with '-'"),
        ("foo-.bar", "starts or ends with '-'"),
        ("a b", "invalid character"),
        ("exa$mple.com", "invalid character"),
        ("a" * 64 + ".com", "longer than 63"),
        (".".join(["a" * 60] * 5), "longer than 253"),
        ("", "empty host name"),
    ],
)
def test_invalid_host_names_say_why(name: str, why: str) -> None:
    problem = hostname_problem(name)
    assert problem is not None and why in problem


class Nameserver(asyncio.DatagramProtocol):
    """Answers A queries with 192.0.2.7 and AAAA with 2001:db8::7, or never answers."""

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.queries: asyncio.Queue[str] = asyncio.Queue()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        q = dns.message.from_wire(data)
        self.queries.put_nowait(q.question[0].name.to_text())
        if not self.answer:
            return
        r = dns.message.make_response(q)
        rdtype = q.question[0].rdtype
        ip = "192.0.2.7" if rdtype == dns.rdatatype.A else "2001:db8::7"
        r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", rdtype, ip))
        self.transport.sendto(r.to_wire(), addr)


async def nameserver(answer: bool) -> tuple[Nameserver, int]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: Nameserver(answer), local_addr=("127.0.0.1", 0)
    )
    return proto, transport.get_extra_info("sockname")[1]


def test_a_and_aaaa_ipv4_first(tmp_path: Path) -> None:
    async def main() -> None:
        _, port = await nameserver(answer=True)
        r = AsyncResolver(2.0, nameservers=["127.0.0.1"], port=port, hosts=HostsFile(tmp_path))
        assert await r.resolve("origin.example") == ["192.0.2.7", "2001:db8::7"]

    run(main())


def test_hosts_file_names_resolve_without_dns(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost  # loopback\n::1 localhost ip6-localhost\n")

    async def main() -> None:
        r = AsyncResolver(1.0, nameservers=[], hosts=HostsFile(hosts))
        assert await r.resolve("LocalHost") == ["127.0.0.1", "::1"]
        with pytest.raises(FlowError, match="no nameserver"):
            await r.resolve("elsewhere.example")

    run(main())


def test_unanswered_lookups_time_out_and_past_the_limit_fail_fast(tmp_path: Path) -> None:
    async def main() -> None:
        server, port = await nameserver(answer=False)
        busy: list[int] = []
        r = AsyncResolver(
            1.0,
            2,
            on_busy=lambda: busy.append(1),
            nameservers=["127.0.0.1"],
            port=port,
            hosts=HostsFile(tmp_path / "none"),
        )
        hung = [asyncio.ensure_future(r.resolve(f"hang{i}.example")) for i in range(2)]
        for _ in range(4):  # A and AAAA of each have reached the nameserver
            await server.queries.get()
        with pytest.raises(FlowError, match="resolver busy") as busy_error:
            await r.resolve("third.example")
        assert busy_error.value.result is FlowResult.HOST_UNREACHABLE
        assert busy == [1]
        for task in hung:
            with pytest.raises(FlowError, match="no answer within 1s") as e:
                await task
            assert e.value.result is FlowResult.HOST_UNREACHABLE
        assert r.in_flight == 0

    run(main())


class NoLookupLoop(uvloop.Loop):  # type: ignore[misc]
    async def getaddrinfo(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"getaddrinfo{args}")


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_dialling_an_ip_never_calls_getaddrinfo(
    kind: str, family: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvloop's sock_connect looks up even numeric addresses in its thread pool, where hung
    name lookups made a dial to an IP wait for seconds."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"socket.getaddrinfo{args}")

    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    lsock = socket.create_server((host, 0), family=family)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if kind == "asyncio":
            monkeypatch.setattr(loop, "getaddrinfo", refuse)
        monkeypatch.setattr(socket, "getaddrinfo", refuse)
        sock = await dial_tcp(host, lsock.getsockname()[1], 5.0)
        assert sock.getpeername()[:2] == lsock.getsockname()[:2]
        sock.close()
        port = lsock.getsockname()[1]
        lsock.close()
        with pytest.raises(FlowError) as e:  # and dial errors still map to results
            await dial_tcp(host, port, 5.0)
        assert e.value.result is FlowResult.REFUSED

    factory = NoLookupLoop if kind == "uvloop" else None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())


async def start_edge(tmp_path: Path) -> Edge:
    edge = Edge(loopback_edge_config(tmp_path, http_listen="127.0.0.1:0", allow_direct_egress=True))
    await edge.start()
    return edge


@pytest.mark.parametrize("name", ["a..b", "-foo"])
def test_invalid_names_get_400_and_socks5_host_unreachable(tmp_path: Path, name: str) -> None:
    async def main() -> None:
        edge = await start_edge(tmp_path)
        socks_port, http_port = (o.port for o in edge.onramps)
        try:
            r, w = await asyncio.open_connection("127.0.0.1", socks_port)
            w.write(b"\x05\x01\x00")
            await r.readexactly(2)
            w.write(
                b"\x05\x01\x00\x03" + bytes([len(name)]) + name.encode() + struct.pack("!H", 80)
            )
            assert (await r.readexactly(10))[1] == 0x04
            w.close()

            r, w = await asyncio.open_connection("127.0.0.1", http_port)
            w.write(f"CONNECT {name}:80 HTTP/1.1\r\nHost: {name}:80\r\n\r\n".encode())
            status = await r.readline()
            assert status.startswith(b"HTTP/1.1 400"), status
            w.close()
        finally:
            await edge.close()
        audit = (tmp_path / "audit.log").read_text()
        assert '"result":"bad_destination"' in audit
        assert "host name" in audit

    run(main())


def test_the_connectors_resolver_is_bounded_like_the_edges() -> None:
    from ramp.tunnel.resolver import Resolver

    async def main() -> None:
        server, port = await nameserver(answer=False)
        busy: list[int] = []
        r = Resolver(f"127.0.0.1:{port}", 1.0, 2, on_busy=lambda: busy.append(1))
        assert r.address == ("127.0.0.1", port)
        hung = [asyncio.ensure_future(r.resolve(f"hang{i}.corp")) for i in range(2)]
        for _ in range(4):
            await server.queries.get()
        with pytest.raises(FlowError, match="resolver busy"):
            await r.resolve("third.corp")
        assert busy == [1]
        assert await r.resolve("10.0.0.5") == ["10.0.0.5"]  # literals never wait
        await asyncio.gather(*hung, return_exceptions=True)
        assert r.in_flight == 0

    run(main())
