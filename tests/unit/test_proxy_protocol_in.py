"""PROXY protocol in: TCP on-ramps behind a load balancer on loopback, with a fake flow path."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import ValidationError

from ramp.config import EdgeConfig
from ramp.flows.flow import Flow
from ramp.onramps.forward import ForwardOptions, ForwardServer
from ramp.onramps.http_connect import HttpConnectServer
from ramp.onramps.registry import OnRampOptions, parse_entry
from ramp.onramps.socks5 import Socks5Server
from ramp.onramps.tcp_listener import TcpOnRamp
from ramp.testing.loopback import LOOPS
from ramp.testing.loopback import run_on_loop as run
from ramp.wire import proxy_protocol as pp
from ramp.wire import socks5
from ramp.wire.socks5 import Command, Method, Rep

CLIENT = ("203.0.113.7", 40123)
CLIENT6 = ("2001:db8::7", 40123)
EDGE = ("192.0.2.1", 1080)


class EchoLeg:
    def __init__(self, flow: Flow) -> None:
        self.flow = flow

    async def relay(self, client: socket.socket, initial: bytes = b"") -> None:
        loop = asyncio.get_running_loop()
        try:
            if initial:
                await loop.sock_sendall(client, initial)
            while data := await loop.sock_recv(client, 65536):
                await loop.sock_sendall(client, data)
        finally:
            client.close()

    def abort(self) -> None:
        pass


class FakeOpener:
    def __init__(self) -> None:
        self.opened: list[Flow] = []
        self.finished: list[Flow] = []
        self.bad: list[tuple[str, str, tuple[str, int] | None]] = []

    async def open_tcp(self, flow: Flow) -> EchoLeg:
        self.opened.append(flow)
        return EchoLeg(flow)

    def flow_finished(self, flow: Flow) -> None:
        self.finished.append(flow)

    def bad_input(self, onramp: str, reason: str, peer: tuple[str, int] | None = None) -> None:
        self.bad.append((onramp, reason, peer))

    async def wait_bad(self, n: int = 1) -> None:
        async with asyncio.timeout(10):
            while len(self.bad) < n:
                await asyncio.sleep(0.01)

    @property
    def reasons(self) -> list[str]:
        return [r for _, r, _ in self.bad]


def options(kind: str, mode: str = "required", trusted: str = "127.0.0.1/32", **extra: Any):
    entry: dict[str, Any] = {
        "type": kind,
        "listen": "127.0.0.1:0",
        "proxy_protocol": {"mode": mode, "trusted": [trusted], "timeout": 0.5},
        **extra,
    }
    return parse_entry(entry)


@contextlib.asynccontextmanager
async def serving(
    cls: type[TcpOnRamp], opener: FakeOpener, opts: OnRampOptions
) -> AsyncIterator[TcpOnRamp]:
    server = cls(EdgeConfig(), opener, opts)  # type: ignore[arg-type]
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.close()


async def read_eof(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), 5)


async def socks_through(
    port: int, header: bytes, *, source: str = "127.0.0.1", bytewise: bool = False
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    greeting = socks5.build_greeting([Method.NO_AUTH])
    if bytewise:  # a header that arrives in pieces
        for i in range(len(header)):
            writer.write(header[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0.001)
        writer.write(greeting)
    else:
        writer.write(header + greeting)  # one segment: the header and what follows
    method = await reader.readexactly(2)
    assert socks5.parse_method_selection(method) == Method.NO_AUTH
    writer.write(socks5.build_request(Command.CONNECT, "198.51.100.10", 80))
    buf = b""
    while (parsed := socks5.parse_reply(buf)) is None:
        chunk = await reader.read(1)
        assert chunk, "closed before the reply"
        buf += chunk
    return reader, writer, parsed[0].rep


@pytest.mark.parametrize(
    "header, source",
    [
        (pp.encode_v2(CLIENT, EDGE, tlvs=((pp.PP2_TYPE_NOOP, b""),)), CLIENT),
        (pp.encode_v2(CLIENT6, ("2001:db8::1", 1080), checksum=True), CLIENT6),
        (pp.encode_v1(CLIENT, EDGE), CLIENT),
        (pp.encode_v1(CLIENT6, ("2001:db8::1", 1080)), CLIENT6),
    ],
)
@pytest.mark.parametrize("bytewise", [False, True])
@pytest.mark.parametrize("loop", LOOPS)
def test_socks5_flow_source_is_the_header_client(
    header: bytes, source: tuple[str, int], bytewise: bool, loop: str
) -> None:
    async def main() -> None:
        opener = FakeOpener()
        async with serving(Socks5Server, opener, options("socks5")) as server:
            reader, writer, rep = await socks_through(server.port, header, bytewise=bytewise)
            assert rep == Rep.SUCCEEDED
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            writer.close()
        assert [f.source for f in opener.opened] == [source]
        assert opener.bad == []

    run(main, loop)


def test_http_on_ramp_takes_a_v1_header_before_its_request() -> None:
    async def main() -> None:
        opener = FakeOpener()
        async with serving(HttpConnectServer, opener, options("http")) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(
                pp.encode_v1(CLIENT, EDGE)
                + b"CONNECT 198.51.100.10:80 HTTP/1.1\r\nHost: 198.51.100.10:80\r\n\r\nearly"
            )
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            assert await reader.readexactly(5) == b"early"
            writer.close()
        assert [f.source for f in opener.opened] == [CLIENT]

    run(main)


def test_forward_on_ramp_with_a_required_header() -> None:
    async def main() -> None:
        opener = FakeOpener()
        opts = options("forward", to="198.51.100.10:22")
        assert isinstance(opts, ForwardOptions)
        async with serving(ForwardServer, opener, opts) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(pp.encode_v2(CLIENT, EDGE) + b"SSH-2.0-test\r\n")
            assert await reader.readexactly(14) == b"SSH-2.0-test\r\n"
            writer.close()
        assert [f.source for f in opener.opened] == [CLIENT]

    run(main)


def test_local_command_and_unknown_keep_the_peer_address() -> None:
    async def main() -> None:
        opener = FakeOpener()
        seen: list[tuple[str, str, str]] = []
        async with serving(Socks5Server, opener, options("socks5")) as server:
            server.proxy_header_seen = lambda *labels: seen.append(labels)
            for header in (
                pp.encode_v2(command=pp.Command.LOCAL),
                b"PROXY UNKNOWN\r\n",
                pp.encode_v1(CLIENT, EDGE),
            ):
                _, writer, rep = await socks_through(server.port, header)
                assert rep == Rep.SUCCEEDED
                writer.close()
        assert [f.source[0] for f in opener.opened] == ["127.0.0.1", "127.0.0.1", CLIENT[0]]
        assert seen == [
            ("socks5", "v2", "local"),
            ("socks5", "v1", "local"),
            ("socks5", "v1", "client"),
        ]

    run(main)


def test_optional_mode_trusted_peer_with_and_without_a_header() -> None:
    async def main() -> None:
        opener = FakeOpener()
        async with serving(Socks5Server, opener, options("socks5", "optional")) as server:
            _, w1, rep1 = await socks_through(server.port, pp.encode_v2(CLIENT, EDGE))
            _, w2, rep2 = await socks_through(server.port, b"")
            assert rep1 == rep2 == Rep.SUCCEEDED
            w1.close()
            w2.close()
        assert [f.source[0] for f in opener.opened] == [CLIENT[0], "127.0.0.1"]
        assert opener.bad == []

    run(main)


def test_optional_mode_untrusted_peer_is_itself_and_may_not_send_a_header() -> None:
    async def main() -> None:
        opener = FakeOpener()
        opts = options("socks5", "optional", trusted="127.0.0.2/32")
        async with serving(Socks5Server, opener, opts) as server:
            _, w, rep = await socks_through(server.port, b"")
            assert rep == Rep.SUCCEEDED
            w.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(pp.encode_v2(CLIENT, EDGE) + socks5.build_greeting([Method.NO_AUTH]))
            assert await read_eof(reader) == b""
            writer.close()
            await opener.wait_bad()
            # the trusted balancer still gets through
            _, w, rep = await socks_through(
                server.port, pp.encode_v1(CLIENT, EDGE), source="127.0.0.2"
            )
            assert rep == Rep.SUCCEEDED
            w.close()
        assert [f.source[0] for f in opener.opened] == ["127.0.0.1", CLIENT[0]]
        assert opener.reasons == ["proxy_header_untrusted"]
        assert opener.bad[0][2] is not None and opener.bad[0][2][0] == "127.0.0.1"

    run(main)


@pytest.mark.parametrize(
    "trusted, data, reason",
    [
        ("127.0.0.2/32", pp.encode_v2(CLIENT, EDGE), "proxy_source_untrusted"),
        ("127.0.0.0/8", b"\x05\x01\x00", "proxy_header_missing"),
        ("127.0.0.0/8", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", "proxy_header_malformed"),
        ("127.0.0.0/8", pp.V2_SIGNATURE + b"\x21\x11\xff\xff", "proxy_header_malformed"),
        (
            "127.0.0.0/8",
            pp.V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),
            "proxy_header_malformed",
        ),
        ("127.0.0.0/8", pp.encode_v2(CLIENT, EDGE)[:-3], "proxy_header_timeout"),
        ("127.0.0.0/8", b"PROXY TCP4 203.0.113.7", "proxy_header_timeout"),
    ],
)
def test_refused_connections_are_closed_and_counted(trusted: str, data: bytes, reason: str) -> None:
    async def main() -> None:
        opener = FakeOpener()
        async with serving(Socks5Server, opener, options("socks5", trusted=trusted)) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(data)
            assert await read_eof(reader) == b""
            writer.close()
            await opener.wait_bad()
            async with asyncio.timeout(5):  # the slot comes back
                while server.handshakes:
                    await asyncio.sleep(0.01)
        assert opener.reasons == [reason]
        assert opener.opened == []

    run(main)


def test_header_cut_by_the_peer_closing() -> None:
    async def main() -> None:
        opener = FakeOpener()
        async with serving(Socks5Server, opener, options("socks5")) as server:
            raw = pp.encode_v2(CLIENT, EDGE)
            # past the signature the header's bytes are taken as they come, so the close is
            # seen; within the signature they are only looked at (they might begin a
            # request), so the close shows only as the timeout
            cuts = {13: "truncated", 16: "truncated", len(raw) - 1: "truncated", 5: "timeout"}
            for n, cut in enumerate(cuts, 1):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(raw[:cut])
                writer.write_eof()
                assert await read_eof(reader) == b""
                writer.close()
                await opener.wait_bad(n)
        assert opener.reasons == [f"proxy_header_{why}" for why in cuts.values()]

    run(main)


def test_handshake_share_moves_to_the_real_client() -> None:
    async def main() -> None:
        opener = FakeOpener()
        config = EdgeConfig(max_handshakes=6, max_handshakes_per_source=1)
        server = Socks5Server(config, opener, options("socks5"))
        await server.start("127.0.0.1", 0)
        try:
            # clients behind one balancer, all slow in their SOCKS5 greeting: past half the
            # pool, the balancer's own share (1) would refuse the fourth; the clients' do not
            conns = []
            for n in range(1, 5):
                r, w = await asyncio.open_connection("127.0.0.1", server.port)
                w.write(pp.encode_v2((f"203.0.113.{n}", 1000), EDGE))
                conns.append((r, w))
                async with asyncio.timeout(5):
                    while server.handshakes < n:
                        await asyncio.sleep(0.01)
            assert opener.bad == []
            # one real client twice is over its share
            r, w = await asyncio.open_connection("127.0.0.1", server.port)
            w.write(pp.encode_v2(("203.0.113.1", 1001), EDGE))
            assert await read_eof(r) == b""
            await opener.wait_bad()
            assert opener.bad == [
                ("socks5", "too_many_handshakes_from_source", ("203.0.113.1", 1001))
            ]
            for _, cw in conns:
                cw.close()
            w.close()
        finally:
            await server.close()

    run(main)


def test_options_are_checked() -> None:
    with pytest.raises(ValidationError, match="bad CIDR"):
        options("socks5", trusted="10.0.0.0/33")
    with pytest.raises(ValidationError, match="mode"):
        options("socks5", mode="sometimes")
    with pytest.raises(ValueError, match="takes no proxy_protocol"):
        options("dns")
    with pytest.raises(ValueError, match="takes no proxy_protocol"):
        options("masque")
    with pytest.raises(ValidationError):
        parse_entry(
            {"type": "socks5", "listen": "127.0.0.1:0", "proxy_protocol": {"mode": "required"}}
        )


@pytest.mark.parametrize("version", [1, 2])
def test_every_single_bit_flip_is_served_or_closed_and_counted(version: int) -> None:
    """Each damaged header either still parses (the flow goes on, from whatever address it
    now names) or the connection is closed and counted; none hangs the on-ramp or is lost."""
    valid = (
        pp.encode_v1(CLIENT, EDGE)
        if version == 1
        else pp.encode_v2(CLIENT, EDGE, tlvs=((pp.PP2_TYPE_RAMP_IDENTITY, b"alice"),))
    )
    damaged = [
        valid[:i] + bytes([valid[i] ^ (1 << bit)]) + valid[i + 1 :]
        for i in range(len(valid))
        for bit in range(8)
    ]
    greeting = socks5.build_greeting([Method.NO_AUTH])

    async def main() -> None:
        opener = FakeOpener()
        async with serving(Socks5Server, opener, options("socks5")) as server:

            async def one(header: bytes) -> str:
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                try:
                    writer.write(header + greeting)
                    answer = await asyncio.wait_for(reader.read(2), 10)
                    return "served" if answer == b"\x05\x00" else "closed"
                except ConnectionResetError:
                    return "closed"
                finally:
                    writer.close()

            outcomes = await asyncio.gather(*(one(h) for h in damaged))
            # a served client leaves after the method reply: its SOCKS5 handshake is cut
            await opener.wait_bad(len(damaged))
            # the on-ramp still takes a good header
            _, writer, rep = await socks_through(server.port, valid)
            assert rep == Rep.SUCCEEDED
            writer.close()
        proxy = [r for r in opener.reasons if r.startswith("proxy_header_")]
        assert set(proxy) <= {
            "proxy_header_malformed",
            "proxy_header_missing",
            "proxy_header_timeout",
        }
        assert len(proxy) == outcomes.count("closed") > 0
        assert opener.reasons.count("incomplete_handshake") == outcomes.count("served")

    run(main)
