"""The status listener of each role: GET /metrics (Prometheus) and GET /ready.

A deliberately small HTTP/1.1 server on h11: requests are bounded in size and time, and
connections in number, so a misbehaving scraper or a port scan costs nothing but a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import h11
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from ramp.config import parse_hostport
from ramp.net.listen import tcp_listen_socket

log = logging.getLogger(__name__)

ReadyFn = Callable[[], tuple[bool, dict[str, Any]]]
RefreshFn = Callable[[], Awaitable[None]]  # gathers what /metrics and /ready show next

MAX_HEADER_BYTES = 8192
MAX_BODY_BYTES = 4096
REQUEST_TIMEOUT_S = 10.0  # to receive one whole request, also while idle between requests
WRITE_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 64
MAX_REQUESTS_PER_CONNECTION = 100
_TEXT = "text/plain; charset=utf-8"


class _Reject(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class StatusServer:
    """A running status listener; `port` is the bound port (useful with port 0)."""

    def __init__(
        self, registry: Collector, ready: ReadyFn, refresh: RefreshFn | None = None
    ) -> None:
        self._registry = registry
        self._ready = ready
        self._refresh = refresh
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self.host = ""
        self.port = 0

    async def _start(self, host: str, port: int) -> None:
        sock = await tcp_listen_socket(host, port, name="metrics")
        self._server = await asyncio.start_server(self._on_client, sock=sock)
        sockname = self._server.sockets[0].getsockname()
        self.host, self.port = sockname[0], sockname[1]

    def stop_accepting(self) -> None:
        """Close the listener (a successor answers from now on); requests in flight finish."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if len(self._conns) >= MAX_CONNECTIONS:
            log.warning("status: too many connections, closing one from %s", _peer(writer))
            writer.close()
            return
        assert task is not None
        self._conns.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        for _ in range(MAX_REQUESTS_PER_CONNECTION):
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    request = await _read_request(conn, reader)
            except h11.RemoteProtocolError as e:
                log.info("status: bad request from %s: %s", _peer(writer), e)
                status = e.error_status_hint if e.error_status_hint >= 400 else 400
                await self._send(conn, writer, status, b"bad request\n", _TEXT)
                return
            except _Reject as e:
                log.info("status: request from %s refused: %s", _peer(writer), e.reason)
                await self._send(conn, writer, e.status, e.reason.encode() + b"\n", _TEXT)
                return
            if request is None:
                return
            if self._refresh is not None:
                await self._refresh()
            status, body, ctype = self._respond(request)
            head = request.method == b"HEAD"
            await self._send(conn, writer, status, body, ctype, not head)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    def _respond(self, request: h11.Request) -> tuple[int, bytes, str]:
        path = request.target.split(b"?", 1)[0]
        if request.method not in (b"GET", b"HEAD"):
            return 405, b"method not allowed\n", _TEXT
        if path == b"/metrics":
            accept = ""
            for name, value in request.headers:
                if name == b"accept":
                    accept = value.decode("latin-1")
            encoder, ctype = choose_encoder(accept)
            return 200, encoder(self._registry), ctype
        if path == b"/ready":
            try:
                ok, info = self._ready()
                doc = {**info, "ready": bool(ok)}
            except Exception as e:  # the callback is not ours: report, don't die
                log.exception("status: ready() failed")
                ok, doc = False, {"ready": False, "error": f"{type(e).__name__}: {e}"}
            body = json.dumps(doc, default=str, sort_keys=True).encode() + b"\n"
            return (200 if ok else 503), body, "application/json"
        return 404, b"not found\n", _TEXT

    async def _send(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        ctype: str,
        with_body: bool = True,
    ) -> None:
        headers = [
            ("content-type", ctype),
            ("content-length", str(len(body))),
            ("cache-control", "no-store"),
        ]
        if status >= 400 and status not in (404, 405, 503):
            headers.append(("connection", "close"))
        try:
            data = conn.send(
                h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase)
            )
            if with_body and body:
                data += conn.send(h11.Data(data=body))
            data += conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return  # the exchange is beyond answering (e.g. mid-response); just close
        writer.write(data)
        async with asyncio.timeout(WRITE_TIMEOUT_S):
            await writer.drain()


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
    """The next request with its (bounded, discarded) body; None when the client is done."""
    request: h11.Request | None = None
    body_bytes = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(4096)
            conn.receive_data(data)  # b"" = EOF
            continue
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body_bytes += len(event.data)
            if body_bytes > MAX_BODY_BYTES:
                raise _Reject(413, "request body too large")
        elif isinstance(event, h11.EndOfMessage):
            return request


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"


async def start_status_server(
    listen: str, registry: Collector, ready: ReadyFn, *, refresh: RefreshFn | None = None
) -> StatusServer | None:
    """Serve /metrics and /ready on `listen` (HOST:PORT); `"off"` serves nothing."""
    if listen in ("", "off"):
        return None
    host, port = parse_hostport(listen)
    server = StatusServer(registry, ready, refresh)
    await server._start(host, port)
    log.info("status: serving /metrics and /ready on %s:%d", server.host, server.port)
    return server
