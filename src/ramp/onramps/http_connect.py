"""The HTTP/1.1 proxy on-ramp: CONNECT tunnels, and absolute-form requests (`GET http://...`).

`curl -x http://E:8080 http://10.1.2.3/` sends an absolute-form GET, not CONNECT (unless
`--proxytunnel`), so both are served. An absolute-form request is forwarded as one request per
client connection: its head is rewritten to origin-form with `Connection: close` and handed to
the relay as the first bytes for the origin; the relay then carries the rest of the body and
the origin's whole response unparsed. What a request means is decided in `ramp.wire.http`;
this module only reads, checks credentials against the config, and sends.
"""

from __future__ import annotations

import logging
import socket

from ramp.flows.answers import ProxyRequest as HookRequest
from ramp.flows.answers import Reply
from ramp.flows.flow import Destination, FlowResult
from ramp.onramps.registry import OnRampContext, OnRampOptions, register
from ramp.onramps.tcp_listener import FlowPlan, TcpOnRamp, check_user
from ramp.wire.http import (
    RequestReader,
    RequestRejected,
    auth_challenge,
    basic_credentials,
    interpret,
    proxy_authorization,
    response,
)

log = logging.getLogger(__name__)

# (status, words for the body, RFC 9209 Proxy-Status error type)
_FAILURES: dict[FlowResult, tuple[int, str, str]] = {
    FlowResult.NOT_PERMITTED: (403, "not permitted by policy", "http_request_denied"),
    FlowResult.NET_UNREACHABLE: (502, "network unreachable", "destination_ip_unroutable"),
    FlowResult.HOST_UNREACHABLE: (502, "host unreachable", "destination_unavailable"),
    FlowResult.REFUSED: (502, "connection refused", "connection_refused"),
    FlowResult.TIMEOUT: (504, "connection timed out", "connection_timeout"),
    FlowResult.ERROR: (502, "proxy error", "proxy_internal_error"),
    FlowResult.RESET: (502, "connection reset", "connection_terminated"),
    FlowResult.BAD_DESTINATION: (400, "not a valid host name", "destination_not_found"),
}


def failure_response(result: FlowResult, dest: Destination) -> bytes:
    status, words, error = _FAILURES.get(result, _FAILURES[FlowResult.ERROR])
    return response(status, f"ramp: {dest}: {words}", (("Proxy-Status", f"ramp; error={error}"),))


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

    async def _handshake(self, sock: socket.socket, peer: tuple[str, int]) -> FlowPlan | None:
        reader = RequestReader()
        try:
            while (head := reader.next_request()) is None:
                reader.receive_data(await self.recv(sock, reader.received > 0))
            identity: str | None = None
            users = self.config.users
            if users:
                value = proxy_authorization(head)
                creds = basic_credentials(value) if value is not None else None
                user = check_user(users, *creds) if creds else None
                if user is None:
                    raise auth_challenge(value)
                identity = user
            request = interpret(head, reader.trailing)
        except RequestRejected as e:
            return await self._reject(sock, peer, e)
        dest = Destination(request.host, request.port)
        return FlowPlan(
            destination=dest,
            identity=identity,
            ok_reply=request.ok_reply,
            error_reply=lambda result: failure_response(result, dest),
            busy_reply=response(503, "ramp: too many flows"),
            initial=request.initial,
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


def hook_reply(reply: Reply) -> bytes:
    """A `connect_request` hook's own answer, as a complete response."""
    return response(reply.status, reply.body, reply.headers)


def _build(ctx: OnRampContext, options: OnRampOptions) -> HttpConnectServer:
    return HttpConnectServer(ctx.config, ctx.opener, options)


register("http", OnRampOptions, _build, "HTTP/1.1 proxy: CONNECT and absolute-form requests")
