"""The edge's MASQUE endpoint driven by a stack that is not ours: aioquic's HTTP/3 client does
CONNECT and connect-udp against an in-process edge (tunnel on loopback), and sends it the bad
input a careless or hostile client would."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3Connection
from aioquic.h3.events import DatagramReceived, DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent

from ramp.testing.loopback import Tunnel, run, tunnel, udp_echo_origin
from ramp.testing.wait import until
from ramp.wire import masque
from ramp.wire.varint import encode_varint

AUTH = b"Basic " + base64.b64encode(b"u:p")
WRONG = b"Basic " + base64.b64encode(b"u:x")
UDP_PATH = "/.well-known/masque/udp/"
ENABLE_CONNECT_PROTOCOL = 0x8
H3_DATAGRAM = 0x33


class Client(QuicConnectionProtocol):
    """aioquic's HTTP/3 client; events per stream, datagrams per stream."""

    webtransport = False  # aioquic advertises H3_DATAGRAM only with WebTransport on

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.h3 = H3Connection(self._quic, enable_webtransport=self.webtransport)
        self.streams: dict[int, asyncio.Queue[H3Event]] = {}
        self.datagrams: dict[int, asyncio.Queue[bytes]] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        for ev in self.h3.handle_event(event):
            if isinstance(ev, DatagramReceived):
                self.datagrams.setdefault(ev.stream_id, asyncio.Queue()).put_nowait(ev.data)
            elif isinstance(ev, HeadersReceived | DataReceived):
                self.streams.setdefault(ev.stream_id, asyncio.Queue()).put_nowait(ev)

    def request(self, headers: list[tuple[bytes, bytes]], end: bool = False) -> int:
        sid = self._quic.get_next_available_stream_id()
        self.h3.send_headers(sid, headers, end_stream=end)
        self.transmit()
        return sid

    def send(self, sid: int, data: bytes, end: bool = False) -> None:
        self.h3.send_data(sid, data, end_stream=end)
        self.transmit()

    async def next(self, sid: int) -> H3Event:
        queue = self.streams.setdefault(sid, asyncio.Queue())
        return await asyncio.wait_for(queue.get(), 10)

    async def status(self, sid: int) -> tuple[int, dict[bytes, bytes]]:
        ev = await self.next(sid)
        assert isinstance(ev, HeadersReceived), ev
        headers = dict(ev.headers)
        return int(headers[b":status"]), headers


class DatagramClient(Client):
    webtransport = True


def connect_headers(authority: str, auth: bytes | None = AUTH) -> list[tuple[bytes, bytes]]:
    out = [(b":method", b"CONNECT"), (b":authority", authority.encode())]
    return out + ([(b"proxy-authorization", auth)] if auth is not None else [])


def udp_headers(port: int, path: str | None = None) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"CONNECT"),
        (b":protocol", b"connect-udp"),
        (b":scheme", b"https"),
        (b":authority", b"edge"),
        (b":path", (path or f"/.well-known/masque/udp/127.0.0.1/{port}/").encode()),
        (b"capsule-protocol", b"?1"),
        (b"proxy-authorization", AUTH),
    ]


@asynccontextmanager
async def edge(tmp_path: Path, **kw: Any) -> AsyncIterator[tuple[Tunnel, int]]:
    async with tunnel(tmp_path, masque_listen="127.0.0.1:0", users={"u": "p"}, **kw) as t:
        server = next(o for o in t.edge.onramps if o.onramp == "masque")
        yield t, server.port


@asynccontextmanager
async def h3_client(port: int, kind: type[Client] = Client) -> AsyncIterator[Client]:
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=["h3"],
        verify_mode=ssl.CERT_NONE,  # the edge's own CA; ramp's client pins it
        max_datagram_frame_size=65536,
        max_datagram_size=1350,  # aioquic's 1,200-byte packets hold no 1,200-byte payload
    )
    async with connect("127.0.0.1", port, configuration=config, create_protocol=kind) as c:
        assert isinstance(c, Client)
        yield c


async def echo_origin() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def counter(t: Tunnel, name: str, *labels: str) -> float:
    metric = getattr(t.edge.metrics, name)
    return float(metric.labels(*labels)._value.get())


# --- CONNECT ------------------------------------------------------------------------------


def test_connect_carries_a_mebibyte_both_ways_and_half_close(tmp_path: Path) -> None:
    async def go() -> None:
        origin, oport = await echo_origin()
        async with edge(tmp_path) as (t, port), h3_client(port) as c:
            settings = await until(lambda: c.h3.received_settings, what="the edge's SETTINGS")
            assert settings.get(ENABLE_CONNECT_PROTOCOL) == 1
            assert settings.get(H3_DATAGRAM) == 1
            sid = c.request(connect_headers(f"127.0.0.1:{oport}"))
            assert (await c.status(sid))[0] == 200
            data = os.urandom(1 << 20)
            c.send(sid, data, end=True)  # FIN: the origin sees EOF, echoes, and closes
            got = bytearray()
            while True:
                ev = await c.next(sid)
                assert isinstance(ev, DataReceived)
                got += ev.data
                if ev.stream_ended:
                    break
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
            records = await until(lambda: [f for f in audit(t) if f["onramp"] == "masque"])
            assert records[0]["identity"] == "u" and records[0]["result"] == "ok"
        origin.close()

    run(go())


def audit(t: Tunnel) -> list[dict[str, Any]]:
    import json

    path = t.data_dir / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- connect-udp ---------------------------------------------------------------------------


def _capsules(payloads: list[bytes]) -> bytes:
    return b"".join(
        masque.encode_capsule(masque.CAPSULE_DATAGRAM, encode_varint(0) + p) for p in payloads
    )


def test_connect_udp_with_datagrams_and_with_capsules(tmp_path: Path) -> None:
    async def go() -> None:
        echo, uport = await udp_echo_origin()
        async with edge(tmp_path) as (_, port):
            # aioquic with H3_DATAGRAM: the echo comes back in QUIC DATAGRAM frames, and a
            # 1,200-byte payload fits one (QUIC can run inside connect-udp)
            async with h3_client(port, DatagramClient) as c:
                sid = c.request(udp_headers(uport))
                status, headers = await c.status(sid)
                assert status == 200 and headers.get(b"capsule-protocol") == b"?1"
                for size in (1, 500, 1200):
                    data = os.urandom(size)
                    c.h3.send_datagram(sid, b"\x00" + data)
                    c.transmit()
                    got = await asyncio.wait_for(
                        c.datagrams.setdefault(sid, asyncio.Queue()).get(), 10
                    )
                    assert got == b"\x00" + data
                # too big for a DATAGRAM frame: sent as a capsule, it comes back as one
                big = os.urandom(4000)
                c.send(sid, _capsules([big]))
                decoder = masque.CapsuleDecoder()
                caps: list[masque.Capsule] = []
                while not caps:
                    ev = await c.next(sid)
                    assert isinstance(ev, DataReceived)
                    caps += decoder.feed(ev.data)
                assert caps == [masque.Capsule(0, b"\x00" + big)]
            # without H3_DATAGRAM from the client, the edge answers in capsules only
            async with h3_client(port) as c:
                sid = c.request(udp_headers(uport))
                assert (await c.status(sid))[0] == 200
                c.send(sid, _capsules([b"ping"]))
                decoder = masque.CapsuleDecoder()
                caps = []
                while not caps:
                    ev = await c.next(sid)
                    assert isinstance(ev, DataReceived)
                    caps += decoder.feed(ev.data)
                assert caps == [masque.Capsule(0, b"\x00ping")]
        echo.close()

    run(go())


# --- bad input ----------------------------------------------------------------------------


def test_refusals_carry_status_and_proxy_status_and_are_counted(tmp_path: Path) -> None:
    async def go() -> None:
        async with edge(tmp_path) as (t, port), h3_client(port) as c:
            closed = socket.socket()
            closed.bind(("127.0.0.1", 0))
            cport = closed.getsockname()[1]
            closed.close()
            cases: list[tuple[list[tuple[bytes, bytes]], int, str]] = [
                (connect_headers(f"127.0.0.1:{cport}", auth=None), 407, "http_request_denied"),
                (
                    connect_headers(
                        f"127.0.0.1:{cport}", auth=b"Basic " + base64.b64encode(b"u:x")
                    ),
                    407,
                    "http_request_denied",
                ),
                (connect_headers(f"127.0.0.1:{cport}"), 502, "connection_refused"),
                (connect_headers("bad..name:80"), 400, "destination_not_found"),
                (
                    [
                        (b":method", b"GET"),
                        (b":scheme", b"https"),
                        (b":authority", b"e"),
                        (b":path", b"/"),
                        (b"proxy-authorization", AUTH),
                    ],
                    405,
                    "http_request_denied",
                ),
                (
                    [
                        (b":method", b"CONNECT"),
                        (b":protocol", b"websocket"),
                        (b":scheme", b"https"),
                        (b":authority", b"e"),
                        (b":path", b"/"),
                        (b"proxy-authorization", AUTH),
                    ],
                    501,
                    "http_request_denied",
                ),
                (
                    udp_headers(0, "/.well-known/masque/udp/127.0.0.1/99999/"),
                    400,
                    "destination_not_found",
                ),
                (udp_headers(0, "/elsewhere/"), 404, "http_request_denied"),
            ]
            for headers, want, error in cases:
                sid = c.request(headers)
                status, got = await c.status(sid)
                assert status == want, (headers, got)
                assert f"error={error}".encode() in got[b"proxy-status"], got
                if want == 407:
                    assert b"proxy-authenticate" in got
            assert counter(t, "bad_input", "masque", "auth_failed") == 1
            assert counter(t, "bad_input", "masque", "bad_target") == 1  # the bad port
            # the same connection still works
            origin, oport = await echo_origin()
            sid = c.request(connect_headers(f"127.0.0.1:{oport}"))
            assert (await c.status(sid))[0] == 200
            origin.close()

    run(go())


def test_bad_capsules_and_datagrams_are_dropped_and_counted(tmp_path: Path) -> None:
    async def go() -> None:
        echo, uport = await udp_echo_origin()
        async with edge(tmp_path) as (t, port), h3_client(port, DatagramClient) as c:
            drops: Callable[[str], float] = lambda why: counter(t, "udp_drops", why)  # noqa: E731
            sid = c.request(udp_headers(uport))
            assert (await c.status(sid))[0] == 200
            # an unknown capsule type is skipped; the session keeps working
            c.send(sid, masque.encode_capsule(0x2A, b"??") + _capsules([b"after"]))
            # (the echo comes back as a datagram: this client takes them)
            queue = c.datagrams.setdefault(sid, asyncio.Queue())
            assert await asyncio.wait_for(queue.get(), 10) == b"\x00after"
            assert counter(t, "bad_input", "masque", "unknown_capsule") == 1
            # unknown context id, and a datagram for a stream never opened
            c.h3.send_datagram(sid, b"\x07ctx")
            c._quic.send_datagram_frame(encode_varint(1000) + b"\x00x")
            c.transmit()
            await until(lambda: drops("unknown_context") >= 1 and drops("unknown_stream") >= 1)
            # a capsule longer than the limit: the edge resets that stream
            c.send(sid, encode_varint(0) + encode_varint(masque.MAX_CAPSULE + 1))
            await until(lambda: counter(t, "bad_input", "masque", "malformed_capsule") == 1)
            # and a new session on the same connection works
            sid2 = c.request(udp_headers(uport))
            assert (await c.status(sid2))[0] == 200
        echo.close()

    run(go())


def test_a_flood_of_streams_meets_the_limit_and_the_edge_raises_it_as_they_close(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        origin, oport = await echo_origin()
        async with (
            edge(tmp_path, masque_max_streams_per_connection=50) as (_, port),
            h3_client(port) as c,
        ):
            # 60 requests: aioquic holds back those past the edge's MAX_STREAMS of 50
            sids = [c.request(connect_headers(f"127.0.0.1:{oport}")) for _ in range(60)]
            assert [(await c.status(s))[0] for s in sids[:50]] == [200] * 50
            assert all(c.streams.setdefault(s, asyncio.Queue()).empty() for s in sids[50:])
            for s in sids[:10]:
                c.send(s, b"", end=True)
                while not getattr(await c.next(s), "stream_ended", False):
                    pass
            # the edge raised MAX_STREAMS as those closed: the ten held back go through
            assert [(await c.status(s))[0] for s in sids[50:]] == [200] * 10
        origin.close()

    run(go())


def test_garbage_on_the_udp_port_is_counted_and_clients_still_connect(tmp_path: Path) -> None:
    async def go() -> None:
        async with edge(tmp_path) as (t, port):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for junk in (
                    b"",
                    b"\x00",
                    os.urandom(40),
                    b"\xc0" + os.urandom(1300),
                    b"\x40" + os.urandom(100),
                ):
                    s.sendto(junk, ("127.0.0.1", port))
            await until(
                lambda: (
                    sum(
                        counter(t, "bad_input", "masque", f"quic_{r}")
                        for r in ("malformed", "unknown_connection", "unsupported_version")
                    )
                    >= 3
                ),
                what="the edge to count the garbage",
            )
            async with h3_client(port) as c:
                origin, oport = await echo_origin()
                sid = c.request(connect_headers(f"127.0.0.1:{oport}"))
                assert (await c.status(sid))[0] == 200
                origin.close()

    run(go())
