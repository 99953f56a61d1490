"""The HTTP/1.1 proxy on-ramp: CONNECT tunnels, and absolute-form requests (`GET http://...`).

`curl -x http://E:8080 http://10.1.2.3/` sends an absolute-form GET, not CONNECT (unless
`--proxytunnel`), so both are served. What a request means is decided in `ramp.wire.http`;
this module only reads, checks credentials (the config's users, the store's client
identities), and sends.

An absolute-form request is one flow with its own origin connection, and the client
connection serves that one request: the head goes to the origin rewritten to origin-form with
`Connection: close`, then the request's own body (framed by h11: Content-Length or chunked),
then EOF. The origin's response is relayed back unparsed until the origin closes, and then the
client connection closes too. Anything the client sends after the request's body (a pipelined
or keep-alive second request, with its Proxy-Authorization) is read and dropped, never
forwarded: the client sees the connection close after the first response and sends its next
request on a new connection, which curl and browsers do. Each request is thereby decided,
routed, audited and authenticated on its own. The proxy does not keep client connections alive
because it cannot tell where an unparsed response ends (a response without Content-Length ends
only at EOF). Such flows are copied through Python, not spliced.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from functools import partial
from typing import cast

from ramp.flows.answers import ProxyRequest as HookRequest
from ramp.flows.answers import Reply
from ramp.flows.endpoint import ProtocolFactory, SocketEndpoint, StreamEndpoint
from ramp.flows.flow import Destination, FlowResult
from ramp.flows.http_errors import failure, proxy_status
from ramp.onramps.registry import OnRampContext, OnRampOptions, register
from ramp.onramps.tcp_listener import CLIENT_REBUILDERS, FlowPlan, TcpOnRamp
from ramp.wire.http import (
    BadBody,
    RequestBody,
    RequestReader,
    RequestRejected,
    auth_challenge,
    basic_credentials,
    interpret,
    proxy_authorization,
    response,
)

log = logging.getLogger(__name__)


def failure_response(result: FlowResult, dest: Destination) -> bytes:
    status, words, error = failure(result)
    return response(status, f"ramp: {dest}: {words}", (("Proxy-Status", proxy_status(error)),))


class HttpConnectServer(TcpOnRamp):
    """HTTP proxy listener: `HttpConnectServer(config, opener)`, `await start(host, port)`,
    `port`, `await close()`."""

    onramp = "http"

    def _timeout_reply(self) -> bytes:
        return response(408, "ramp: request not received in time")

    async def _reject(
        self, sock: socket.socket, peer: tuple[str, int], rejected: RequestRejected
    ) -> None:
        log.debug("http %s: %d %s", peer, rejected.status, rejected)
        if rejected.reason is not None:
            self.opener.bad_input(self.onramp, rejected.reason, peer)
        await self.send_final(sock, rejected.reply)
        return None

    def _proxy_user(self, value: bytes) -> str | None:
        """The identity a Proxy-Authorization value proves: Basic for config users and
        client identities, Bearer NAME.SECRET for client identities."""
        scheme = value.strip().partition(b" ")[0].lower()
        if scheme == b"bearer":
            return self.credentials.check_bearer(value) if self.credentials is not None else None
        creds = basic_credentials(value)
        return self.authenticate(*creds) if creds else None

    async def _handshake(self, sock: socket.socket, peer: tuple[str, int]) -> FlowPlan | None:
        reader = RequestReader()
        raw = bytearray()  # what was read, for a worker this flow may move to
        try:
            while (head := reader.next_request()) is None:
                data = await self.recv(sock, reader.received > 0)
                raw += data
                reader.receive_data(data)
            identity: str | None = None
            if self.auth_required():
                value = proxy_authorization(head)
                user = self._proxy_user(value) if value is not None else None
                if user is None:
                    raise auth_challenge(value)
                identity = user
            request = interpret(head, reader.trailing)
        except RequestRejected as e:
            return await self._reject(sock, peer, e)
        dest = Destination(request.host, request.port)
        client: Callable[[socket.socket], StreamEndpoint] | None = None
        initial = request.initial
        if not request.connect:
            # interpret() put the bytes past the head after it; the body reader has them too
            head_bytes = initial[: len(initial) - len(reader.trailing)]
            client = partial(OneRequestEndpoint, head=head_bytes, body=RequestBody(reader, head))
            # the endpoint sends the head itself: a tunnel leg takes `initial` only after
            # attaching, behind body bytes the endpoint already passed on
            initial = b""
        return FlowPlan(
            destination=dest,
            identity=identity,
            ok_reply=request.ok_reply,
            error_reply=lambda result: failure_response(result, dest),
            busy_reply=response(503, "ramp: too many flows"),
            initial=initial,
            client=client,
            resume=None if request.connect else (ONE_REQUEST, bytes(raw)),
            eof_is_gone=request.connect,
            request=HookRequest(
                head.method.decode("ascii", "replace"),
                head.target.decode("ascii", "replace"),
                tuple(
                    (n.decode("latin-1"), v.decode("latin-1"))
                    for n, v in head.headers.raw_items()
                    if n.lower() != b"proxy-authorization"
                ),
            ),
            answer=hook_reply,
        )


# Bytes past the request that are read and dropped (so that closing after the response does
# not reset it over unread data) before reading stops: a client that keeps sending them is
# not worth the CPU, and may see its connection end with a reset.
DROP_LIMIT = 65536


class _OneRequest(asyncio.Protocol):
    """Between the client socket and the relay: passes on the head and this request's body,
    then EOF, and drops whatever the client sends after it. Responses pass straight through
    (the relay writes to the client transport itself)."""

    def __init__(self, inner: asyncio.Protocol, head: bytes, body: RequestBody) -> None:
        self._inner = inner
        self._head = head
        self._body = body
        self._transport: asyncio.Transport | None = None
        self._eof_sent = False
        self._broken: str | None = None
        self._dropped = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._inner.connection_made(transport)
        try:
            out = self._body.take()
        except BadBody as e:
            self._forward(self._head)
            self._break(str(e))
            return
        self._forward(self._head + out)

    def data_received(self, data: bytes) -> None:
        if self._broken is not None:
            return
        if self._body.complete:
            self._dropped += len(data)
            if self._dropped > DROP_LIMIT and self._transport is not None:
                self._transport.pause_reading()
            return
        try:
            out = self._body.receive_data(data)
        except BadBody as e:
            self._break(str(e))
            return
        self._forward(out)

    def eof_received(self) -> bool | None:
        if self._eof_sent or self._broken is not None:
            return True  # the response may still be on its way
        # EOF before the body is complete: the origin must not take a cut body as whole
        self._break("client closed before the request body was complete")
        return True

    def _forward(self, out: bytes) -> None:
        if out:
            self._inner.data_received(out)
        if self._body.complete and not self._eof_sent:
            self._eof_sent = True
            self._inner.eof_received()

    def _break(self, reason: str) -> None:
        log.debug("http request body: %s", reason)
        self._broken = reason
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None and self._broken is not None:
            exc = ConnectionResetError(self._broken)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class OneRequestEndpoint:
    """The client socket of an absolute-form request, as the relay's client end."""

    kind = "http-request"

    def __init__(self, sock: socket.socket, head: bytes, body: RequestBody) -> None:
        self._socket = SocketEndpoint(sock)
        self._head = head
        self._body = body

    async def attach(self, factory: ProtocolFactory) -> asyncio.BaseTransport:
        def wrapped() -> asyncio.Protocol:
            return _OneRequest(cast(asyncio.Protocol, factory()), self._head, self._body)

        return await self._socket.attach(wrapped)

    def close(self) -> None:
        self._socket.close()


ONE_REQUEST = "http-request"


def _one_request_again(raw: bytes) -> Callable[[socket.socket], StreamEndpoint]:
    """The client wrapper of an absolute-form request, from the bytes the worker that
    accepted it read (ramp.flows.moved)."""
    reader = RequestReader()
    try:
        reader.receive_data(raw)
        head = reader.next_request()
        if head is None:
            raise ValueError("the moved request is incomplete")
        initial = interpret(head, reader.trailing).initial
    except RequestRejected as e:
        raise ValueError(f"the moved request does not parse: {e}") from None
    head_bytes = initial[: len(initial) - len(reader.trailing)]
    return partial(OneRequestEndpoint, head=head_bytes, body=RequestBody(reader, head))


CLIENT_REBUILDERS[ONE_REQUEST] = _one_request_again


def hook_reply(reply: Reply) -> bytes:
    """A `connect_request` hook's own answer, as a complete response."""
    return response(reply.status, reply.body, reply.headers)


def _build(ctx: OnRampContext, options: OnRampOptions) -> HttpConnectServer:
    server = HttpConnectServer(ctx.config, ctx.opener, options, accept_error=ctx.accept_error)
    server.credentials = ctx.credentials
    server.proxy_header_seen = ctx.proxy_header
    return server


register("http", OnRampOptions, _build, "HTTP/1.1 proxy: CONNECT and absolute-form requests")
