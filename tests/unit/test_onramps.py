"""SOCKS5 and HTTP proxy on-ramps on loopback, with a fake FlowOpener standing in for the router."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import shutil
import socket
from collections.abc import AsyncIterator
from typing import Any

import h11
import pytest

from ramp.config import EdgeConfig
from ramp.flows.endpoint import SocketEndpoint, StreamEndpoint, as_endpoint
from ramp.flows.flow import Flow, FlowError, FlowResult
from ramp.flows.relay import relay_streams
from ramp.onramps.http_connect import HttpConnectServer
from ramp.onramps.socks5 import Socks5Server
from ramp.onramps.tcp_listener import TcpOnRamp
from ramp.testing.loopback import LOOPS
from ramp.testing.loopback import run_on_loop as run
from ramp.wire import socks5
from ramp.wire.socks5 import Command, Method, Rep

# -- fakes ----------------------------------------------------------------------------------


class EchoLeg:
    """Stands in for the origin: sends `initial` back, then echoes until the client's EOF."""

    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        self.initial: bytes | None = None
        self.aborted = False

    async def relay(self, client: socket.socket, initial: bytes = b"") -> None:
        loop = asyncio.get_running_loop()
        self.initial = initial
        try:
            if initial:
                await loop.sock_sendall(client, initial)
                self.flow.bytes_down += len(initial)
            while data := await loop.sock_recv(client, 65536):
                self.flow.bytes_up += len(data)
                await loop.sock_sendall(client, data)
                self.flow.bytes_down += len(data)
        finally:
            client.close()

    def abort(self) -> None:
        self.aborted = True


class DirectLeg:
    """A real TCP connection to the destination, copied both ways (for curl tests)."""

    def __init__(self, flow: Flow, origin: socket.socket) -> None:
        self.flow = flow
        self.origin = origin

    async def relay(self, client: socket.socket | StreamEndpoint, initial: bytes = b"") -> None:
        # the relay the direct off-ramp uses for a client end that is not a bare socket
        result = await relay_streams(as_endpoint(client), SocketEndpoint(self.origin), initial)
        self.flow.bytes_up += result.a_to_b
        self.flow.bytes_down += result.b_to_a
        if result.reset:
            self.flow.result = FlowResult.RESET

    def abort(self) -> None:
        self.origin.close()


class FakeOpener:
    def __init__(
        self,
        fail: FlowResult | None = None,
        direct: bool = False,
        origin: tuple[str, int] | None = None,
    ) -> None:
        self.fail = fail
        self.direct = direct or origin is not None
        self.origin = origin  # dial this instead of the destination
        self.opened: list[Flow] = []
        self.legs: list[EchoLeg] = []
        self.finished: list[Flow] = []
        self.bad: list[tuple[str, str]] = []

    async def open_tcp(self, flow: Flow) -> EchoLeg | DirectLeg:
        self.opened.append(flow)
        if self.fail is not None:
            raise FlowError(self.fail, f"test says {self.fail.value}")
        if self.direct:
            loop = asyncio.get_running_loop()
            host, port = self.origin or (flow.destination.host, flow.destination.port)
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, type_, proto, _, addr = infos[0]
            origin = socket.socket(family, type_, proto)
            origin.setblocking(False)
            try:
                await loop.sock_connect(origin, addr)
            except OSError as e:
                origin.close()
                raise FlowError(FlowResult.REFUSED, str(e)) from e
            return DirectLeg(flow, origin)
        leg = EchoLeg(flow)
        self.legs.append(leg)
        return leg

    def flow_finished(self, flow: Flow) -> None:
        assert flow not in self.finished, "flow_finished called twice"
        self.finished.append(flow)

    def bad_input(self, onramp: str, reason: str, peer: tuple[str, int] | None = None) -> None:
        self.bad.append((onramp, reason))

    async def wait_finished(self, n: int = 1) -> None:
        while len(self.finished) < n:
            await asyncio.sleep(0.01)

    async def wait_bad(self, n: int = 1) -> None:
        while len(self.bad) < n:
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def serving(
    cls: type[TcpOnRamp], opener: FakeOpener, **config: Any
) -> AsyncIterator[TcpOnRamp]:
    server = cls(EdgeConfig(**config), opener)
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.close()


async def read_eof(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), 5)


# -- SOCKS5 client --------------------------------------------------------------------------


async def socks_open(
    port: int,
    host: str,
    dport: int,
    *,
    auth: tuple[bytes, bytes] | None = None,
    command: int = Command.CONNECT,
    early: bytes = b"",
    source: str = "127.0.0.1",
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """Handshake up to the reply; returns the stream and REP."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    methods = [Method.USERNAME_PASSWORD] if auth else [Method.NO_AUTH]
    writer.write(socks5.build_greeting(methods))
    assert socks5.parse_method_selection(await reader.readexactly(2)) == methods[0]
    if auth:
        writer.write(socks5.build_auth_request(*auth))
        assert socks5.parse_auth_status(await reader.readexactly(2))
    writer.write(socks5.build_request(command, host, dport) + early)
    return reader, writer, await read_reply(reader)


async def read_reply(reader: asyncio.StreamReader) -> int:
    buf = b""
    while (parsed := socks5.parse_reply(buf)) is None:
        chunk = await reader.read(1)
        assert chunk, f"closed before a complete reply: {buf!r}"
        buf += chunk
    return parsed[0].rep


# -- SOCKS5 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("host", ["192.0.2.7", "2001:db8::7", "app.internal.example"])
def test_socks5_connect_relays_both_ways(loop: str, host: str) -> None:
    async def main() -> None:
        opener = FakeOpener()
        async with serving(Socks5Server, opener) as server:
            reader, writer, rep = await socks_open(server.port, host, 8080)
            assert rep == Rep.SUCCEEDED
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            writer.write_eof()
            assert await read_eof(reader) == b""
            writer.close()
            await opener.wait_finished()
        (flow,) = opener.finished
        assert flow.onramp == "socks5"
        assert (flow.destination.host, flow.destination.port) == (host, 8080)
        assert flow.identity is None
        assert flow.source[0] == "127.0.0.1"
        assert flow.result is FlowResult.OK
        assert flow.bytes_up == 4
        assert opener.bad == []

    run(main, loop)


def test_socks5_early_data_goes_to_the_leg_first() -> None:
    async def main() -> None:
        opener = FakeOpener()
        async with serving(Socks5Server, opener) as server:
            reader, writer, rep = await socks_open(
                server.port, "192.0.2.1", 80, early=b"GET / HTTP/1.0\r\n\r\n"
            )
            assert rep == Rep.SUCCEEDED
            # EchoLeg sends `initial` back first: the early bytes were handed over, once.
            assert await reader.readexactly(18) == b"GET / HTTP/1.0\r\n\r\n"
            writer.close()
            await opener.wait_finished()
        assert opener.legs[0].initial == b"GET / HTTP/1.0\r\n\r\n"

    run(main)


@pytest.mark.parametrize(
    ("result", "rep"),
    [
        (FlowResult.NOT_PERMITTED, 0x02),
        (FlowResult.NET_UNREACHABLE, 0x03),
        (FlowResult.HOST_UNREACHABLE, 0x04),
        (FlowResult.REFUSED, 0x05),
        (FlowResult.TIMEOUT, 0x04),
        (FlowResult.ERROR, 0x01),
        (FlowResult.BUSY, 0x01),
    ],
)
def test_socks5_flow_errors_map_to_rep(result: FlowResult, rep: int) -> None:
    async def main() -> None:
        opener = FakeOpener(fail=result)
        async with serving(Socks5Server, opener) as server:
            reader, writer, got = await socks_open(server.port, "198.51.100.5", 443)
            assert got == rep
            assert await read_eof(reader) == b""  # and the connection closes
            writer.close()
            await opener.wait_finished()
        (flow,) = opener.finished
        assert flow.result is result
        assert flow.reason == f"test says {result.value}"

    run(main)


def test_socks5_auth_accepted_sets_identity() -> None:
    async def main() -> None:
        opener = FakeOpener()
        async with serving(Socks5Server, opener, users={"alice": "s3cret"}) as server:
            _, writer, rep = await socks_open(
                server.port, "192.0.2.1", 22, auth=(b"alice", b"s3cret")
            )
            assert rep == Rep.SUCCEEDED
            writer.close()
            await opener.wait_finished()
        assert opener.finished[0].user == "alice"

    run(main)


@pytest.mark.parametrize("creds", [(b"alice", b"wrong"), (b"mallory", b"s3cret")])
def test_socks5_auth_rejected(creds: tuple[bytes, bytes]) -> None:
    async def main() -> None:
        opener = FakeOpener()
        async with serving(Socks5Server, opener, users={"alice": "s3cret"}) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(socks5.build_greeting([Method.USERNAME_PASSWORD]))
            assert await reader.readexactly(2) == b"\x05\x02"
            writer.write(socks5.build_auth_request(*creds))
            assert await reader.readexactly(2) == b"\x01\x01"
            assert await read_eof(reader) == b""
            writer.close()
            await opener.wait_bad()
        assert opener.bad == [("socks5", "auth_failed")]
        assert opener.opened == []

    run(main)


def test_socks5_auth_required_but_not_offered() -> None:
    async def main() -> None:
        opener = FakeOpener()
        async with serving(Socks5Server, opener, users={"alice": "s3cret"}) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(socks5.build_greeting([Method.NO_AUTH]))
            assert await reader.readexactly(2) == b"\x05\xff"
            assert await read_eof(reader) == b""
            writer.close()
            await opener.wait_bad()
        assert opener.bad == [("socks5", "no_acceptable_method")]

    run(main)


def test_socks5_bind_not_supported() -> None:
    async def main() -> None:
        opener = FakeOpener()
        async with serving(Socks5Server, opener) as server:
            reader, writer, rep = await socks_open(server.port, "0.0.0.0", 0, command=Command.BIND)
            assert rep == Rep.COMMAND_NOT_SUPPORTED
            assert await read_eof(reader) == b""
            writer.close()
            await opener.wait_bad()
        assert opener.bad == [("socks5", "command_not_supported")]
        assert opener.opened == []

    run(main)


@pytest.mark.parametrize(
    ("garbage", "answer", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"", "bad_version"),
        (b"\x05\x01\x00\x05\x01\x00\x07" + b"\x00" * 10, b"\x05\x00" + socks5.build_reply(8), None),
        (b"\x05\x01\x00\x05\x01\x00\x03\x00\x00\x50", b"\x05\x00" + socks5.build_reply(1), None),
    ],
    ids=["http-to-socks", "bad-atyp", "empty-domain"],
)
def test_socks5_garbage_closed_counted_and_others_still_served(
    garbage: bytes, answer: bytes, reason: str | None
) -> None:
    async def main() -> None:
        opener = FakeOpener()
        async with serving(Socks5Server, opener) as server:
            r1, w1 = await asyncio.open_connection("127.0.0.1", server.port)
            w1.write(garbage)
            assert await read_eof(r1) == answer
            w1.close()
            await opener.wait_bad()
            reader, writer, rep = await socks_open(server.port, "192.0.2.1", 80)
            assert rep == Rep.SUCCEEDED
            writer.write(b"still here")
            assert await reader.readexactly(10) == b"still here"
            writer.close()
            await opener.wait_finished()
        assert len(opener.bad) == 1
        assert opener.bad[0][0] == "socks5"
        if reason:
            assert opener.bad[0][1] == reason

    run(main)


def test_socks5_handshake_timeout() -> None:
    async def main() -> None:
        opener = FakeOpener()
        async with serving(Socks5Server, opener, handshake_timeout=0.2) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"\x05\x02\x00")  # one method short
            assert await read_eof(reader) == b""
            writer.close()
            await opener.wait_bad()
        assert opener.bad == [("socks5", "handshake_timeout")]

    run(main)


def test_socks5_connect_and_close_without_bytes_is_not_bad_input() -> None:
    async def main() -> None:
        opener = FakeOpener()
        async with serving(Socks5Server, opener) as server:
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.close()
            r2, w2 = await asyncio.open_connection("127.0.0.1", server.port)
            w2.write(b"\x05")
            w2.write_eof()
            assert await read_eof(r2) == b""
            w2.close()
            await opener.wait_bad()
        assert opener.bad == [("socks5", "incomplete_handshake")]

    run(main)


def test_socks5_max_flows() -> None:
    async def main() -> None:
        opener = FakeOpener()
        async with serving(Socks5Server, opener, max_flows=1) as server:
            _, w1, rep1 = await socks_open(server.port, "192.0.2.1", 80)
            assert rep1 == Rep.SUCCEEDED
            r2, w2, rep2 = await socks_open(server.port, "192.0.2.2", 80)
            assert rep2 == Rep.GENERAL_FAILURE
            assert await read_eof(r2) == b""
            w2.close()
            assert opener.bad == [("socks5", "too_many_flows")]
            w1.close()  # the first flow ends; a new one gets through again
            await opener.wait_finished()
            _, w3, rep3 = await socks_open(server.port, "192.0.2.3", 80)
            assert rep3 == Rep.SUCCEEDED
            w3.close()
            await opener.wait_finished(2)

    run(main)


def test_one_address_holds_only_its_share_of_handshake_slots() -> None:
    async def main() -> None:
        opener = FakeOpener()
        config = {"max_handshakes": 4, "max_handshakes_per_source": 1}
        async with serving(Socks5Server, opener, **config) as server:
            # clients from 127.0.0.1 that never finish their greeting: the first two get in
            # (the slots are not half taken yet), then the share binds
            slow = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
            while server.handshakes < 2:
                await asyncio.sleep(0.01)
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            assert await read_eof(reader) == b""  # closed at once, nothing read
            writer.close()
            await opener.wait_bad()
            assert opener.bad == [("socks5", "too_many_handshakes_from_source")]
            # another address still gets in
            _, w, rep = await socks_open(server.port, "192.0.2.1", 80, source="127.0.0.2")
            assert rep == Rep.SUCCEEDED
            w.close()
            # the others' half is theirs: a second address fills it
            other = await asyncio.open_connection(
                "127.0.0.1", server.port, local_addr=("127.0.0.3", 0)
            )
            while server.handshakes < 3:
                await asyncio.sleep(0.01)
            for _, sw in [*slow, other]:  # the slow ones leave: their address may come back
                sw.close()
            while server.handshakes:
                await asyncio.sleep(0.01)
            _, w, rep = await socks_open(server.port, "192.0.2.1", 80)
            assert rep == Rep.SUCCEEDED
            w.close()
            await opener.wait_finished(2)

    run(main)


def test_close_ends_open_flows_once() -> None:
    async def main() -> None:
        opener = FakeOpener()
        server = Socks5Server(EdgeConfig(), opener)
        await server.start("127.0.0.1", 0)
        port = server.port
        reader, writer, rep = await socks_open(port, "192.0.2.1", 80)
        assert rep == Rep.SUCCEEDED
        await server.close()
        assert await read_eof(reader) == b""
        writer.close()
        assert len(opener.finished) == 1
        assert opener.finished[0].result is FlowResult.ERROR
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    run(main)


def test_listen_on_ipv6_loopback() -> None:
    async def main() -> None:
        opener = FakeOpener()
        server = Socks5Server(EdgeConfig(), opener)
        await server.start("::1", 0)
        try:
            reader, writer = await asyncio.open_connection("::1", server.port)
            writer.write(socks5.build_greeting() + socks5.build_request(1, "192.0.2.1", 80))
            assert await reader.readexactly(2) == b"\x05\x00"
            assert await read_reply(reader) == Rep.SUCCEEDED
            writer.close()
            await opener.wait_finished()
        finally:
            await server.close()
        assert opener.finished[0].source[0] == "::1"

    run(main)


# -- HTTP -----------------------------------------------------------------------------------


async def http_exchange(port: int, request: bytes) -> tuple[bytes, asyncio.StreamReader, Any]:
    """Send a request; returns the response head and the stream."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return head, reader, writer


def status_of(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


def basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(
    ("target", "host", "port"),
    [
        (b"192.0.2.9:443", "192.0.2.9", 443),
        (b"[2001:db8::9]:8443", "2001:db8::9", 8443),
        (b"svc.internal:22", "svc.internal", 22),
    ],
)
def test_http_connect_relays_with_leftover(loop: str, target: bytes, host: str, port: int) -> None:
    async def main() -> None:
        opener = FakeOpener()
        async with serving(HttpConnectServer, opener) as server:
            head, reader, writer = await http_exchange(
                server.port,
                b"CONNECT " + target + b" HTTP/1.1\r\nHost: " + target + b"\r\n\r\nEARLY",
            )
            assert head == b"HTTP/1.1 200 Connection Established\r\n\r\n"
            assert await reader.readexactly(5) == b"EARLY"
            writer.write(b"more")
            assert await reader.readexactly(4) == b"more"
            writer.write_eof()
            assert await read_eof(reader) == b""
            writer.close()
            await opener.wait_finished()
        (flow,) = opener.finished
        assert flow.onramp == "http"
        assert (flow.destination.host, flow.destination.port) == (host, port)
        assert flow.result is FlowResult.OK
        assert opener.legs[0].initial == b"EARLY"

    run(main, loop)


@pytest.mark.parametrize(
    ("result", "status"),
    [
        (FlowResult.NOT_PERMITTED, 403),
        (FlowResult.NET_UNREACHABLE, 502),
        (FlowResult.HOST_UNREACHABLE, 502),
        (FlowResult.REFUSED, 502),
        (FlowResult.TIMEOUT, 504),
        (FlowResult.ERROR, 502),
        (FlowResult.BUSY, 503),
    ],
)
@pytest.mark.parametrize("form", ["connect", "absolute"])
def test_http_flow_errors_map_to_status(result: FlowResult, status: int, form: str) -> None:
    request = (
        b"CONNECT 198.51.100.5:443 HTTP/1.1\r\nHost: 198.51.100.5:443\r\n\r\n"
        if form == "connect"
        else b"GET http://198.51.100.5/ HTTP/1.1\r\nHost: 198.51.100.5\r\n\r\n"
    )

    async def main() -> None:
        opener = FakeOpener(fail=result)
        async with serving(HttpConnectServer, opener) as server:
            head, reader, writer = await http_exchange(server.port, request)
            assert status_of(head) == status
            assert b"Connection: close" in head
            body = await read_eof(reader)
            assert b"198.51.100.5" in body
            writer.close()
            await opener.wait_finished()
        assert opener.finished[0].result is result

    run(main)


def test_http_auth_missing_wrong_and_right() -> None:
    users = {"alice": "s3cret"}
    req = b"CONNECT 192.0.2.1:443 HTTP/1.1\r\nHost: 192.0.2.1:443\r\n"

    async def main() -> None:
        opener = FakeOpener()
        async with serving(HttpConnectServer, opener, users=users) as server:
            head, reader, writer = await http_exchange(server.port, req + b"\r\n")
            assert status_of(head) == 407
            assert b'Proxy-Authenticate: Basic realm="ramp"' in head
            assert b"authentication required" in await read_eof(reader)
            writer.close()
            assert opener.bad == []  # the challenge is normal, not bad input

            wrong = req + b"Proxy-Authorization: " + basic("alice", "nope") + b"\r\n\r\n"
            head, _, writer = await http_exchange(server.port, wrong)
            assert status_of(head) == 407
            writer.close()
            await opener.wait_bad()
            assert opener.bad == [("http", "auth_failed")]

            right = req + b"Proxy-Authorization: " + basic("alice", "s3cret") + b"\r\n\r\n"
            head, _, writer = await http_exchange(server.port, right)
            assert status_of(head) == 200
            writer.close()
            await opener.wait_finished()
        assert [f.user for f in opener.finished] == ["alice"]

    run(main)


class RecordingOrigin:
    """An origin that reads each connection to EOF, keeps what it got, then answers."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> RecordingOrigin:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[:2]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()
        self.received.append(data)
        body = b"origin got %d bytes" % len(data)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()


async def proxy_exchange(port: int, *writes: bytes) -> bytes:
    """Send `writes` to the proxy on one connection; everything it answers, up to its EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for data in writes:
        writer.write(data)
        await writer.drain()
    try:
        return await read_eof(reader)
    finally:
        writer.close()


def test_http_absolute_form_is_forwarded_rewritten() -> None:
    async def main() -> None:
        async with RecordingOrigin() as origin:
            opener = FakeOpener(origin=origin.address)
            async with serving(HttpConnectServer, opener, users={"bob": "pw"}) as server:
                answer = await proxy_exchange(
                    server.port,
                    b"POST http://192.0.2.44:8081/submit?x=1#frag HTTP/1.1\r\n"
                    b"Host: wrong.example\r\n"
                    b"Proxy-Authorization: " + basic("bob", "pw") + b"\r\n"
                    b"Proxy-Connection: Keep-Alive\r\n"
                    b"Connection: keep-alive, X-Secret\r\n"
                    b"X-Secret: dropped\r\n"
                    b"Content-Length: 10\r\n"
                    b"User-Agent: t\r\n\r\n"
                    b"0123",
                    b"456789",
                )
                await opener.wait_finished()
        assert origin.received == [
            b"POST /submit?x=1 HTTP/1.1\r\n"
            b"Host: 192.0.2.44:8081\r\n"
            b"Content-Length: 10\r\n"
            b"User-Agent: t\r\n"
            b"Connection: close\r\n\r\n"
            b"0123456789"
        ]
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        (flow,) = opener.finished
        assert (flow.destination.host, flow.destination.port) == ("192.0.2.44", 8081)
        assert flow.user == "bob"
        assert flow.result is FlowResult.OK

    run(main)


GET = b"GET http://192.0.2.44/%s HTTP/1.1\r\nHost: 192.0.2.44\r\nProxy-Authorization: %s\r\n\r\n"


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("split", [False, True], ids=["one-write", "two-writes"])
def test_http_pipelined_request_never_reaches_the_origin(loop: str, split: bool) -> None:
    """Only the first request is forwarded; the second, with its credentials, stays in the
    proxy, and the client connection closes after the first response. Sent again on a new
    connection, it is a flow of its own."""
    creds = basic("bob", "pw")
    first, second = GET % (b"first", creds), GET % (b"second", creds)

    async def main() -> None:
        async with RecordingOrigin() as origin:
            opener = FakeOpener(origin=origin.address)
            async with serving(HttpConnectServer, opener, users={"bob": "pw"}) as server:
                writes = (first, second) if split else (first + second,)
                answer = await proxy_exchange(server.port, *writes)
                await opener.wait_finished()
                assert answer.count(b"HTTP/1.1 200 OK") == 1
                assert len(origin.received) == 1
                (got,) = origin.received
                assert got.startswith(b"GET /first HTTP/1.1\r\n")
                assert b"second" not in got
                assert b"proxy-authorization" not in got.lower()

                answer = await proxy_exchange(server.port, second)
                await opener.wait_finished(2)
        assert answer.startswith(b"HTTP/1.1 200 OK")
        assert origin.received[1].startswith(b"GET /second HTTP/1.1\r\n")
        assert b"proxy-authorization" not in origin.received[1].lower()
        assert [f.user for f in opener.finished] == ["bob", "bob"]
        assert [f.result for f in opener.finished] == [FlowResult.OK, FlowResult.OK]

    run(main, loop)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("size", [0, 5, 2 * 1024 * 1024 + 3])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_http_post_body_reaches_the_origin_intact(loop: str, size: int, framing: str) -> None:
    body = os.urandom(size)
    if framing == "chunked":
        framed = b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + 70000]), body[i : i + 70000])
            for i in range(0, len(body), 70000)
        )
        framed += b"0\r\n\r\n"
        header = b"Transfer-Encoding: chunked"
    else:
        framed, header = body, b"Content-Length: %d" % size
    head = b"POST http://192.0.2.44/up HTTP/1.1\r\nHost: 192.0.2.44\r\n" + header + b"\r\n\r\n"
    after = GET % (b"second", b"x")

    async def main() -> None:
        async with RecordingOrigin() as origin:
            opener = FakeOpener(origin=origin.address)
            async with serving(HttpConnectServer, opener) as server:
                # the body in pieces that do not line up with chunks, then a pipelined request
                pieces = [head + framed[:3]] + [
                    framed[i : i + 65537] for i in range(3, len(framed), 65537)
                ]
                answer = await proxy_exchange(server.port, *pieces, after)
                await opener.wait_finished()
        assert answer.startswith(b"HTTP/1.1 200 OK")
        (got,) = origin.received
        assert got.startswith(b"POST /up HTTP/1.1\r\n")
        assert header in got.partition(b"\r\n\r\n")[0]
        # the origin parses exactly one request (chunk sizes may differ), with the body sent
        parser = h11.Connection(h11.SERVER)
        parser.receive_data(got)
        parser.receive_data(b"")
        assert isinstance(parser.next_event(), h11.Request)
        received = b""
        while isinstance(ev := parser.next_event(), h11.Data):
            received += ev.data
        assert isinstance(ev, h11.EndOfMessage)
        assert isinstance(parser.next_event(), h11.ConnectionClosed)
        assert hashlib.sha256(received).digest() == hashlib.sha256(body).digest()
        assert opener.finished[0].result is FlowResult.OK

    run(main, loop)


def test_http_body_cut_short_is_not_delivered_as_complete() -> None:
    """A client that closes mid-body: the origin's connection is reset, not finished with
    EOF, so it cannot take a truncated chunked body for a whole one."""
    head = b"POST http://192.0.2.44/up HTTP/1.1\r\nHost: 192.0.2.44\r\n"

    async def main() -> None:
        async with RecordingOrigin() as origin:
            opener = FakeOpener(origin=origin.address)
            async with serving(HttpConnectServer, opener) as server:
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(head + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhel")
                writer.write_eof()
                assert await read_eof(reader) == b""
                writer.close()
                await opener.wait_finished()
        assert opener.finished[0].result is FlowResult.RESET

    run(main)


@pytest.mark.parametrize(
    ("request_bytes", "status", "reason"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n", 400, "bad_request"),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 17000 + b"\r\n\r\n",
            431,
            "header_too_large",
        ),
        (b"CONNECT a:1 HTTP/1.1\r\nHost: x\r\n" + b"X: " + b"a" * 40000, 431, "header_too_large"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "not_a_proxy_request"),
        (b"CONNECT 192.0.2.1 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_target"),
        (b"CONNECT 192.0.2.1:0 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_target"),
        (b"CONNECT bad_host!:80 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_target"),
        (b"CONNECT [::1:80 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_target"),
        (b"GET https://192.0.2.1/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_target"),
        (b"GET http://u:p@192.0.2.1/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_target"),
        (
            b"POST http://192.0.2.1/ HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            "cl_and_te",
        ),
    ],
    ids=lambda v: repr(v)[:40] if isinstance(v, bytes) else str(v),
)
def test_http_bad_requests_answered_counted_and_others_served(
    request_bytes: bytes, status: int, reason: str | None
) -> None:
    async def main() -> None:
        opener = FakeOpener()
        async with serving(HttpConnectServer, opener) as server:
            head, reader, writer = await http_exchange(server.port, request_bytes)
            assert status_of(head) == status
            await read_eof(reader)
            writer.close()
            await opener.wait_bad()
            head, reader, writer = await http_exchange(
                server.port, b"CONNECT 192.0.2.1:443 HTTP/1.1\r\nHost: 192.0.2.1:443\r\n\r\n"
            )
            assert status_of(head) == 200
            writer.close()
            await opener.wait_finished()
        assert len(opener.bad) == 1 and opener.bad[0][0] == "http"
        if reason:
            assert opener.bad[0][1] == reason
        assert len(opener.opened) == 1

    run(main)


def test_http_handshake_timeout() -> None:
    async def main() -> None:
        opener = FakeOpener()
        async with serving(HttpConnectServer, opener, handshake_timeout=0.2) as server:
            head, reader, writer = await http_exchange(server.port, b"CONNECT 192.0.2.1:443 HTTP")
            assert status_of(head) == 408
            await read_eof(reader)
            writer.close()
            await opener.wait_bad()
        assert opener.bad == [("http", "handshake_timeout")]

    run(main)


def test_http_max_flows_gets_503() -> None:
    req = b"CONNECT 192.0.2.1:443 HTTP/1.1\r\nHost: 192.0.2.1:443\r\n\r\n"

    async def main() -> None:
        opener = FakeOpener()
        async with serving(HttpConnectServer, opener, max_flows=1) as server:
            head, _, w1 = await http_exchange(server.port, req)
            assert status_of(head) == 200
            head, _, w2 = await http_exchange(server.port, req)
            assert status_of(head) == 503
            w1.close()
            w2.close()
            await opener.wait_finished()
        assert opener.bad == [("http", "too_many_flows")]

    run(main)


# -- real curl through the on-ramps ---------------------------------------------------------

BODY = os.urandom(3 * 1024 * 1024 + 17)


async def origin_server() -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"GET /file HTTP/1.1\r\n"), head
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(BODY)
        )
        writer.write(BODY)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize(
    ("kind", "args"),
    [
        ("socks5", ["--socks5", "127.0.0.1:{p}"]),
        ("socks5", ["--socks5-hostname", "127.0.0.1:{p}"]),
        ("socks5", ["--proxy", "socks5h://alice:s3cret@127.0.0.1:{p}"]),
        ("http", ["-x", "http://127.0.0.1:{p}"]),
        ("http", ["-x", "http://127.0.0.1:{p}", "--proxytunnel"]),
        ("http", ["-x", "http://alice:s3cret@127.0.0.1:{p}"]),
    ],
)
def test_curl_downloads_through_onramp(kind: str, args: list[str]) -> None:
    auth = any("alice" in a for a in args)

    async def main() -> None:
        origin = await origin_server()
        oport = origin.sockets[0].getsockname()[1]
        opener = FakeOpener(direct=True)
        cls = Socks5Server if kind == "socks5" else HttpConnectServer
        users = {"alice": "s3cret"} if auth else {}
        async with serving(cls, opener, users=users) as server:
            host = "localhost" if "--socks5-hostname" in args else "127.0.0.1"
            proc = await asyncio.create_subprocess_exec(
                "curl",
                "-sS",
                "--fail",
                *[a.format(p=server.port) for a in args],
                f"http://{host}:{oport}/file",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            )
            out, err = await proc.communicate()
            assert proc.returncode == 0, err
            assert hashlib.sha256(out).digest() == hashlib.sha256(BODY).digest()
            await opener.wait_finished()
        origin.close()
        (flow,) = opener.finished
        assert flow.result is FlowResult.OK
        assert flow.destination.port == oport
        assert flow.user == ("alice" if auth else None)
        assert flow.bytes_down >= len(BODY)
        if "--socks5-hostname" in args:
            assert flow.destination.host == "localhost"  # the name, resolved by the edge

    run(main)


class _YieldingOpener(FakeOpener):
    """Opens only after several turns of the loop, so the client watch sees a client EOF
    that was already there before the open began."""

    async def open_tcp(self, flow: Flow) -> Any:
        for _ in range(20):
            await asyncio.sleep(0)
        return await super().open_tcp(flow)


@pytest.mark.parametrize("eof_is_gone", [True, False])
def test_a_client_eof_while_opening_ends_the_open_only_where_it_means_gone(
    eof_is_gone: bool,
) -> None:
    """A SOCKS5 or CONNECT client that half-closes before its reply has left; an HTTP/1.0
    client that half-closes after its complete absolute-form request still waits for the
    answer, so its flow must open."""
    from ramp.flows.flow import Destination

    async def main() -> None:
        server = TcpOnRamp(EdgeConfig(), _YieldingOpener())
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.shutdown(socket.SHUT_WR)
        flow = Flow("test", ("192.0.2.1", 1), Destination("192.0.2.7", 80))
        try:
            if eof_is_gone:
                with pytest.raises(FlowError, match="client went away"):
                    await server._open_watching(ours, flow, eof_is_gone=True)
            else:
                leg = await server._open_watching(ours, flow, eof_is_gone=False)
                assert isinstance(leg, EchoLeg)
        finally:
            ours.close()
            theirs.close()

    run(main)
