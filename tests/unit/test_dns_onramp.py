"""The edge's DNS listener on loopback, with a fake opener standing in for the tunnels and a
small dnspython responder standing in for the upstream resolver."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.tsigkeyring
import pytest

from ramp.config import EdgeConfig
from ramp.edge import Edge
from ramp.flows.flow import FlowError, FlowResult
from ramp.onramps.dns import DnsServer
from ramp.testing.loopback import loopback_edge_config
from ramp.testing.loopback import run_on_loop as run
from ramp.testing.wait import until

CORP = dns.name.from_text("corp.example")


def a_records(name: dns.name.Name, n: int, first: str = "10.0.") -> dns.rrset.RRset:
    return dns.rrset.from_text_list(
        name, 300, "IN", "A", [f"{first}{i // 250}.{i % 250 + 1}" for i in range(n)]
    )


# -- fakes ----------------------------------------------------------------------------------


class FakeOpener:
    """Answers names under corp.example as a tunnel would; everything else is not routed.

    The answer deliberately carries a different id: the server must put the client's back.
    """

    def __init__(self) -> None:
        self.bad: list[str] = []
        self.queries: list[str] = []

    async def dns_query(self, query: bytes) -> bytes | None:
        q = dns.message.from_wire(query)
        name = q.question[0].name
        self.queries.append(name.to_text(omit_final_dot=True))
        if not name.is_subdomain(CORP):
            return None
        label = name.labels[0].decode()
        if label == "fail":
            raise FlowError(FlowResult.NET_UNREACHABLE, "tunnel corp has no connected connector")
        if label == "hang":
            await asyncio.sleep(3600)
        if label.startswith("slow"):
            await asyncio.sleep(0.3)
        r = dns.message.make_response(q)
        r.id = 0xBEEF
        r.flags |= dns.flags.AA
        r.answer.append(a_records(name, 100 if label == "big" else 1))
        return r.to_wire(max_size=65535)

    def bad_input(self, onramp: str, reason: str, peer: tuple[str, int] | None = None) -> None:
        assert onramp == "dns"
        self.bad.append(reason)

    async def open_tcp(self, flow: Any) -> Any:
        raise AssertionError("the DNS listener opens no TCP flows")

    async def open_udp(self, flow: Any, receive: Any, closed: Any) -> Any:
        raise AssertionError("the DNS listener opens no UDP sessions")

    def flow_finished(self, flow: Any) -> None:
        raise AssertionError("no flows")


class Upstream:
    """A resolver on loopback (UDP and TCP, same port): every name has A 192.0.2.53, except
    `big.other.example`, which over UDP only says "truncated" and over TCP has 40 records."""

    def __init__(self) -> None:
        self.udp_queries = 0
        self.tcp_queries = 0

    def answer(self, wire: bytes, tcp: bool) -> bytes:
        q = dns.message.from_wire(wire)
        r = dns.message.make_response(q)
        name = q.question[0].name
        if name == dns.name.from_text("big.other.example"):
            if tcp:
                r.answer.append(a_records(name, 40, "198.51."))
            else:
                r.flags |= dns.flags.TC
        else:
            r.answer.append(dns.rrset.from_text(name, 300, "IN", "A", "192.0.2.53"))
        return r.to_wire()

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        up = self

        class Proto(asyncio.DatagramProtocol):
            def connection_made(self, transport: Any) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                up.udp_queries += 1
                self.transport.sendto(up.answer(data, tcp=False), addr)

        async def on_tcp(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            (n,) = struct.unpack("!H", await r.readexactly(2))
            up.tcp_queries += 1
            out = up.answer(await r.readexactly(n), tcp=True)
            w.write(struct.pack("!H", len(out)) + out)
            await w.drain()
            w.close()

        self.tcp = await asyncio.start_server(on_tcp, "127.0.0.1", 0)
        port = self.tcp.sockets[0].getsockname()[1]
        self.udp, _ = await loop.create_datagram_endpoint(Proto, local_addr=("127.0.0.1", port))
        return port

    def close(self) -> None:
        self.tcp.close()
        self.udp.close()


def config(**kw: Any) -> EdgeConfig:
    return EdgeConfig(dns_listen="127.0.0.1:0", dns_timeout=kw.pop("dns_timeout", 1.0), **kw)


async def serve(opener: FakeOpener, host: str = "127.0.0.1", **kw: Any) -> DnsServer:
    limits = {k: kw.pop(k) for k in ("max_inflight", "tcp_idle_timeout") if k in kw}
    server = DnsServer(config(**kw), opener, **limits)  # type: ignore[arg-type]
    await server.start(host, 0)
    return server


# -- clients --------------------------------------------------------------------------------


def query(name: str, rdtype: str = "A", qid: int = 0x1234, **kw: Any) -> bytes:
    q = dns.message.make_query(name, rdtype, **kw)
    q.id = qid
    return q.to_wire()


async def udp_ask(
    port: int, wire: bytes, host: str = "127.0.0.1", timeout: float = 3.0
) -> bytes | None:
    """One query from a connected UDP socket (which drops answers from another address)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.connect((host, port))
        await loop.sock_sendall(sock, wire)
        try:
            async with asyncio.timeout(timeout):
                return await loop.sock_recv(sock, 65535)
        except TimeoutError:
            return None
    finally:
        sock.close()


async def tcp_read(reader: asyncio.StreamReader) -> bytes:
    (n,) = struct.unpack("!H", await reader.readexactly(2))
    return await reader.readexactly(n)


async def settled(server: DnsServer) -> int:
    """Queries still in flight once the server finished its bookkeeping (it releases a slot
    just after the answer is sent)."""
    await until(lambda: server.inflight == 0, what="in-flight slots back")
    return server.inflight


def frame(wire: bytes) -> bytes:
    return struct.pack("!H", len(wire)) + wire


def parse(wire: bytes | None) -> dns.message.Message:
    assert wire is not None, "no answer"
    return dns.message.from_wire(wire)


def addresses(msg: dns.message.Message) -> list[str]:
    return [r.address for rrset in msg.answer for r in rrset]


# -- tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_routed_name_answered_by_the_tunnel_with_the_clients_id(loop: str) -> None:
    async def main() -> None:
        opener = FakeOpener()
        server = await serve(opener)
        try:
            r = parse(await udp_ask(server.port, query("db.corp.example", qid=0x0A0B)))
            assert r.id == 0x0A0B
            assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
            assert addresses(r) == ["10.0.0.1"]
            assert r.question[0].name == dns.name.from_text("db.corp.example")
            assert server.stats["tunnel"] == 1
            assert opener.bad == []
        finally:
            await server.close()

    run(main, loop)


def test_other_names_refused_without_an_upstream() -> None:
    async def main() -> None:
        opener = FakeOpener()
        server = await serve(opener)
        try:
            r = parse(await udp_ask(server.port, query("www.other.example", qid=7)))
            assert r.id == 7 and r.rcode() == dns.rcode.REFUSED
            assert r.question[0].name == dns.name.from_text("www.other.example")
            assert r.answer == []
            assert opener.queries == ["www.other.example"]
        finally:
            await server.close()

    run(main)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_other_names_forwarded_to_the_upstream(loop: str) -> None:
    async def main() -> None:
        upstream = Upstream()
        uport = await upstream.start()
        server = await serve(FakeOpener(), dns_upstream=f"127.0.0.1:{uport}")
        try:
            r = parse(await udp_ask(server.port, query("www.other.example", qid=99)))
            assert r.id == 99 and r.rcode() == dns.rcode.NOERROR
            assert addresses(r) == ["192.0.2.53"]
            # The upstream's UDP answer is truncated: the edge asks again over TCP, and the
            # client (EDNS, 4096 bytes) gets the whole answer over UDP.
            big = query("big.other.example", qid=100, use_edns=0, payload=4096)
            r = parse(await udp_ask(server.port, big))
            assert r.id == 100 and not r.flags & dns.flags.TC
            assert len(addresses(r)) == 40
            assert upstream.tcp_queries == 1
            # Routed names still go to the tunnel, never upstream.
            before = upstream.udp_queries
            assert addresses(parse(await udp_ask(server.port, query("x.corp.example")))) == [
                "10.0.0.1"
            ]
            assert upstream.udp_queries == before
            assert server.stats["upstream"] == 2 and server.stats["tunnel"] == 1
        finally:
            await server.close()
            upstream.close()

    run(main, loop)


def test_tunnel_failure_and_timeouts_are_servfail() -> None:
    async def main() -> None:
        # Nothing answers at the upstream address: the query times out.
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        server = await serve(
            FakeOpener(), dns_upstream=f"127.0.0.1:{silent.getsockname()[1]}", dns_timeout=0.3
        )
        try:
            for name in ("fail.corp.example", "hang.corp.example", "nobody.other.example"):
                r = parse(await udp_ask(server.port, query(name, qid=5)))
                assert (r.id, r.rcode()) == (5, dns.rcode.SERVFAIL), name
            assert server.stats["servfail"] == 3
            assert await settled(server) == 0
        finally:
            await server.close()
            silent.close()

    run(main)


def test_malformed_queries_get_formerr_or_are_dropped_and_counted() -> None:
    async def main() -> None:
        opener = FakeOpener()
        server = await serve(opener)
        try:
            # A readable header, then garbage: FORMERR with the client's id and opcode.
            garbage = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + b"\xff\xfe\x00"
            r = await udp_ask(server.port, garbage)
            assert r is not None
            qid, flags = struct.unpack_from("!HH", r)
            assert qid == 0x4242 and flags & 0x8000 and flags & 0xF == dns.rcode.FORMERR
            # Too short for a header, or a response rather than a query: no answer at all.
            assert await udp_ask(server.port, b"\x01\x02\x03", timeout=0.3) is None
            response = dns.message.make_response(dns.message.make_query("a.example", "A"))
            assert await udp_ask(server.port, response.to_wire(), timeout=0.3) is None
            # Two questions: FORMERR too.
            two = dns.message.make_query("a.corp.example", "A")
            two.question.append(dns.rrset.RRset(dns.name.from_text("b.corp.example"), 1, 1))
            r2 = parse(await udp_ask(server.port, two.to_wire()))
            assert r2.rcode() == dns.rcode.FORMERR
            assert opener.bad == ["malformed", "short_message", "not_a_query", "question_count"]
            assert opener.queries == []  # none of it went anywhere
            # ... and the server still answers.
            assert addresses(parse(await udp_ask(server.port, query("ok.corp.example")))) == [
                "10.0.0.1"
            ]
        finally:
            await server.close()

    run(main)


def test_non_query_opcode_is_notimp() -> None:
    async def main() -> None:
        server = await serve(FakeOpener())
        try:
            q = dns.message.make_query("corp.example", "SOA")
            q.set_opcode(dns.opcode.NOTIFY)
            r = parse(await udp_ask(server.port, q.to_wire()))
            assert r.rcode() == dns.rcode.NOTIMP and r.id == q.id
        finally:
            await server.close()

    run(main)


def test_unknown_edns_version_is_badvers_not_forwarded() -> None:
    async def main() -> None:
        opener = FakeOpener()
        server = await serve(opener)
        try:
            q = dns.message.make_query("db.corp.example", "A", use_edns=1)
            r = parse(await udp_ask(server.port, q.to_wire()))
            assert r.rcode() == dns.rcode.BADVERS and r.edns == 0 and r.id == q.id
            assert opener.queries == [] and opener.bad == []
            assert server.stats["badvers"] == 1
        finally:
            await server.close()

    run(main)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_tcp_framing_with_pipelined_queries(loop: str) -> None:
    async def main() -> None:
        upstream = Upstream()
        uport = await upstream.start()
        server = await serve(FakeOpener(), dns_upstream=f"127.0.0.1:{uport}")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            # Two queries in one write; the first is slow, so its answer comes second.
            writer.write(
                frame(query("slow.corp.example", qid=1)) + frame(query("x.corp.example", qid=2))
            )
            answers = {m.id: m for m in [parse(await tcp_read(reader)) for _ in range(2)]}
            assert set(answers) == {1, 2}
            assert all(addresses(m) == ["10.0.0.1"] for m in answers.values())
            # Over TCP nothing is truncated, and a third query on the same connection works,
            # even when it arrives a byte at a time.
            data = frame(query("big.corp.example", qid=3))
            for i in range(len(data)):
                writer.write(data[i : i + 1])
                await writer.drain()
            big = parse(await tcp_read(reader))
            assert big.id == 3 and len(addresses(big)) == 100
            assert not big.flags & dns.flags.TC
            # Unrouted names follow the upstream rule over TCP too.
            writer.write(frame(query("www.other.example", qid=4)))
            r = parse(await tcp_read(reader))
            assert r.id == 4 and addresses(r) == ["192.0.2.53"]
            # A client that sends its last query and half-closes still gets the answer.
            writer.write(frame(query("slow2.corp.example", qid=5)))
            writer.write_eof()
            assert parse(await tcp_read(reader)).id == 5
            assert await reader.read() == b""
            writer.close()
        finally:
            await server.close()
            upstream.close()

    run(main, loop)


def test_tcp_idle_and_truncated_frames_close_the_connection() -> None:
    async def main() -> None:
        opener = FakeOpener()
        server = await serve(opener, tcp_idle_timeout=0.2, handshake_timeout=0.2)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            async with asyncio.timeout(2):
                assert await reader.read() == b""  # idle: closed by the server
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(struct.pack("!H", 100) + b"only part of it")
            async with asyncio.timeout(2):
                assert await reader.read() == b""
            writer.close()
            assert opener.bad == ["truncated_message"]
            assert server.tcp_connections == 0
        finally:
            await server.close()

    run(main)


def test_udp_answer_too_big_is_truncated_with_tc() -> None:
    async def main() -> None:
        server = await serve(FakeOpener())
        try:
            # No EDNS: 512 bytes at most. 100 A records do not fit.
            raw = await udp_ask(server.port, query("big.corp.example", qid=11))
            assert raw is not None and len(raw) <= 512
            r = parse(raw)
            assert r.id == 11 and r.flags & dns.flags.TC
            assert r.answer == []
            assert r.question[0].name == dns.name.from_text("big.corp.example")
            # EDNS with 1232 bytes: still too big, truncated to at most 1232, EDNS kept.
            raw = await udp_ask(
                server.port, query("big.corp.example", qid=12, use_edns=0, payload=1232)
            )
            assert raw is not None and len(raw) <= 1232
            r = parse(raw)
            assert r.flags & dns.flags.TC and r.edns == 0
            # EDNS with 4096 bytes: the whole answer.
            r = parse(
                await udp_ask(
                    server.port, query("big.corp.example", qid=13, use_edns=0, payload=4096)
                )
            )
            assert not r.flags & dns.flags.TC and len(addresses(r)) == 100
            assert server.stats["truncated"] == 2
        finally:
            await server.close()

    run(main)


def test_queries_beyond_the_in_flight_limit_are_refused() -> None:
    async def main() -> None:
        opener = FakeOpener()
        server = await serve(opener, max_inflight=2)
        try:
            slow = [
                asyncio.ensure_future(udp_ask(server.port, query("slow.corp.example", qid=i)))
                for i in (1, 2)
            ]
            await until(lambda: server.inflight == 2, what="both slow queries admitted")
            r = parse(await udp_ask(server.port, query("x.corp.example", qid=3)))
            assert r.id == 3 and r.rcode() == dns.rcode.REFUSED
            assert opener.bad == ["too_many_queries"]
            for t in slow:
                assert addresses(parse(await t)) == ["10.0.0.1"]
            assert await settled(server) == 0
            # Slots came back: the next query is answered.
            assert addresses(parse(await udp_ask(server.port, query("x.corp.example")))) == [
                "10.0.0.1"
            ]
        finally:
            await server.close()

    run(main)


def test_wildcard_listener_answers_from_the_address_asked() -> None:
    async def main() -> None:
        server = await serve(FakeOpener(), host="0.0.0.0")
        try:
            for host in ("127.0.0.2", "127.0.0.1"):
                r = await udp_ask(server.port, query("db.corp.example", qid=21), host=host)
                assert addresses(parse(r)) == ["10.0.0.1"], host
            reader, writer = await asyncio.open_connection("127.0.0.2", server.port)
            writer.write(frame(query("db.corp.example", qid=22)))
            assert parse(await tcp_read(reader)).id == 22
            writer.close()
        finally:
            await server.close()

    run(main)


def test_edge_starts_the_dns_listener(tmp_path: Path) -> None:
    async def main() -> None:
        edge = Edge(loopback_edge_config(tmp_path, socks5_listen="off", dns_listen="127.0.0.1:0"))
        await edge.start()
        try:
            (server,) = [s for s in edge.onramps if isinstance(s, DnsServer)]
            r = parse(await udp_ask(server.port, query("www.other.example", qid=31)))
            assert r.id == 31 and r.rcode() == dns.rcode.REFUSED
        finally:
            await edge.close()

    run(main)


def test_real_dig_over_udp_tcp_and_truncation_from_a_wildcard_listener() -> None:
    async def dig(port: int, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            "dig", "-p", str(port), "+tries=1", "+time=2", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        return out.decode()

    async def main() -> None:
        server = await serve(FakeOpener(), host="0.0.0.0")
        try:
            # dig rejects an answer from an address other than the one it asked.
            out = await dig(server.port, "@127.0.0.2", "+short", "db.corp.example")
            assert out.split() == ["10.0.0.1"], out
            out = await dig(server.port, "@127.0.0.2", "+tcp", "+short", "db.corp.example")
            assert out.split() == ["10.0.0.1"], out
            out = await dig(server.port, "@127.0.0.2", "+noedns", "big.corp.example")
            assert "Truncated, retrying in TCP mode" in out, out
            assert "status: NOERROR" in out and out.count("\tA\t10.0.") == 100, out
            out = await dig(server.port, "@127.0.0.1", "www.other.example")
            assert "status: REFUSED" in out, out
        finally:
            await server.close()

    run(main)


def test_signed_queries_are_refused_not_crashed_on() -> None:
    async def main() -> None:
        opener = FakeOpener()
        server = await serve(opener)
        try:
            q = dns.message.make_query("db.corp.example", "A")
            q.use_tsig(dns.tsigkeyring.from_text({"k.": "c2VjcmV0"}), keyname="k.")
            q.id = 77
            r = await udp_ask(server.port, q.to_wire())
            assert r is not None
            assert struct.unpack_from("!HH", r)[0] == 77
            assert struct.unpack_from("!HH", r)[1] & 0xF == dns.rcode.REFUSED
            assert opener.bad == ["tsig_unsupported"] and opener.queries == []
        finally:
            await server.close()

    run(main)
