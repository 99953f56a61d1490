"""The MASQUE on-ramp: an HTTP/3 proxy endpoint (CONNECT, connect-udp, connect-ip) on a UDP
port. connect-ip (RFC 9484, whole IP packets) lives in ramp.onramps.connect_ip.

Each CONNECT stream (RFC 9114 section 4.4) is a stream flow whose client end is the QUIC
stream itself; each connect-udp request (RFC 9298) is a datagram flow whose UDP payloads ride
HTTP Datagrams (RFC 9297) in QUIC DATAGRAM frames, or DATAGRAM capsules on the request stream
when a payload does not fit a frame. Both go through the same flow path as the SOCKS5 and HTTP
on-ramps: table, policy, hooks, router, off-ramps, audit. Every request carries credentials
(`Proxy-Authorization`); failures get a status and a `Proxy-Status` (RFC 9209).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from pydantic import Field
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection

from ramp.flows.answers import ProxyRequest as HookRequest
from ramp.flows.answers import Reply
from ramp.flows.flow import Destination, Flow, FlowError, FlowResult, FlowState, Identity
from ramp.flows.http_errors import failure, proxy_status
from ramp.flows.ip_pool import DEFAULT_IP_POOL, AddressPool
from ramp.flows.opener import UdpSession
from ramp.observe.packet_metrics import PacketMetrics
from ramp.onramps.connect_ip import ConnectIp, IpSession
from ramp.onramps.registry import OnRampContext, OnRampOptions, register
from ramp.onramps.tcp_listener import CLIENT_GONE, check_user
from ramp.quic import endpoint
from ramp.quic.admission import HandshakeLimits
from ramp.quic.connect_udp import UdpStream
from ramp.quic.h3 import (
    H3_DATAGRAM_ERROR,
    H3_NO_ERROR,
    H3_REQUEST_CANCELLED,
    H3Peer,
    H3Stream,
    H3StreamEndpoint,
    Headers,
)
from ramp.wire import masque
from ramp.wire.http import basic_credentials

log = logging.getLogger(__name__)

ALPN = "h3"
PENDING_DATAGRAMS = 64  # UDP payloads a client may send before its request is answered


class MasqueOptions(OnRampOptions):
    takes_proxy_protocol = False

    udp_template: str = Field(
        masque.DEFAULT_UDP_TEMPLATE,
        description="connect-udp URI template path, with {target_host} and {target_port}.",
    )
    ip_template: str = Field(
        masque.DEFAULT_IP_TEMPLATE,
        description="connect-ip URI template path, with {target} and {ipproto}; 'off' = none.",
    )
    ip_pool: list[str] = Field(
        default_factory=lambda: list(DEFAULT_IP_POOL),
        description="connect-ip address pool: one prefix per IP version.",
    )
    ip_mtu: int = Field(
        1400, ge=1280, le=65535, description="Largest IP packet a connect-ip client may send."
    )


def _headers(status: int, *extra: tuple[str, str]) -> Headers:
    out = [(b":status", str(status).encode())]
    out += [(k.lower().encode(), v.encode()) for k, v in extra]
    return out


class MasqueServer:
    """The HTTP/3 endpoint: `await start(host, port)`, `port`, `await close()`."""

    onramp = "masque"

    def __init__(self, ctx: OnRampContext, options: MasqueOptions) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.opener = ctx.opener
        self.options = options
        self.template = masque.UdpTemplate(options.udp_template)
        self.ip_template = (
            masque.IpTemplate(options.ip_template) if options.ip_template != "off" else None
        )
        self.connect_ip: ConnectIp | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self.server: endpoint.TunnelServer | None = None
        self.peers: set[H3Peer] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.flows = 0

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> None:
        c = self.config
        configuration = QuicConfiguration(
            is_client=False,
            alpn_protocols=[ALPN],
            idle_timeout=c.masque_idle_timeout,
            max_datagram_frame_size=65536,
            # qh3's 1,280-byte packets leave 1,229 bytes of UDP payload per DATAGRAM frame
            # (RFC 9298's 1,200 fit); a client whose Initial held 1,280 bytes or more gets
            # 1,452-byte packets (endpoint.LARGE_DATAGRAM_SIZE), one with a 1,200-byte Initial
            # (aioquic's) these, as qh3 cannot build its first flight to it with more
        )
        assert self.ctx.tls is not None, "the MASQUE on-ramp needs the edge's certificate"
        chain, key = self.ctx.tls
        configuration.load_cert_chain(chain, key)
        self._transport, self.server = await endpoint.serve(
            host,
            port,
            configuration=configuration,
            create_protocol=self._new_peer,
            on_drop=lambda reason: self._bad("quic_" + reason),
            name="masque",
            steering=self.ctx.steering("masque") if self.ctx.steering else None,
            limits=HandshakeLimits(
                max_handshakes=c.quic_max_handshakes,
                retry_threshold=c.quic_retry_threshold,
                per_source=c.quic_max_handshakes_per_source,
                timeout=c.quic_handshake_timeout,
                token_lifetime=c.quic_retry_token_lifetime,
                refusals_per_source=c.quic_refusals_per_source,
                refusal_penalty=c.quic_refusal_penalty,
            ),
            max_streams_bidi=c.masque_max_streams_per_connection,
        )
        if self.ip_template is not None:
            self.connect_ip = ConnectIp(
                self,
                AddressPool(options_pool(self.options)),
                self.options.ip_mtu,
                max_flows=getattr(c, "masque_ip_max_flows", 65536),
                udp_idle=getattr(c, "udp_idle_timeout", 210.0),
                packets=self.ctx.packets,
                metrics=PacketMetrics(self.ctx.registry) if self.ctx.registry else None,
            )
            self.connect_ip.start()
        log.info("masque on-ramp listening on %s:%d/udp (HTTP/3)", host, self.port)

    @property
    def port(self) -> int:
        assert self._transport is not None
        return int(self._transport.get_extra_info("sockname")[1])

    def packet_from_tunnel(self, tunnel_id: str, packet: bytes) -> bool:
        """A connector's packet for a connect-ip client: True when one of ours took it."""
        if self.connect_ip is None:
            return False
        return self.connect_ip.packet_from_tunnel(tunnel_id, packet)

    async def close(self) -> None:
        if self.connect_ip is not None:
            self.connect_ip.close()
        for peer in list(self.peers):
            peer.close_with(H3_NO_ERROR, "edge shutting down")
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # -- connections ------------------------------------------------------------------------

    def _new_peer(self, quic: QuicConnection, stream_handler: Any = None) -> H3Peer:
        peer = H3Peer(quic)
        peer.on_request = self._request
        peer.on_bad_input = self._bad
        peer.on_drop = self._dropped
        peer.on_lost = self.peers.discard
        self.peers.add(peer)
        return peer

    def _bad(self, reason: str, peer: H3Peer | None = None) -> None:
        self.opener.bad_input(self.onramp, reason, _source(peer) if peer is not None else None)

    def _dropped(self, reason: str) -> None:
        if self.ctx.datagram_dropped is not None:
            self.ctx.datagram_dropped(reason)

    def _authenticate(self, value: bytes | None) -> str | None:
        """The identity a Proxy-Authorization value proves, or None."""
        if value is None:
            return None
        creds = self.ctx.credentials
        text = value.decode("latin-1").strip()
        scheme, _, rest = text.partition(" ")
        if scheme.lower() == "bearer" and creds is not None:
            return creds.check_bearer(rest.strip())  # type: ignore[no-any-return]
        basic = basic_credentials(value)
        if basic is None:
            return None
        user = check_user(self.config.users, *basic) if self.config.users else None
        if user is None and creds is not None:
            user = creds.check_password(*basic)
        return user

    def _refuse(
        self, peer: H3Peer, stream_id: int, status: int, error: str, words: str, ended: bool
    ) -> None:
        del ended  # whether the client finished its side changes nothing in the answer
        extra = [("proxy-status", proxy_status(error, words))]
        if status == 407:
            extra.append(("proxy-authenticate", 'Bearer realm="ramp"'))
        # no STOP_SENDING after it: a client may see that before the answer and take it
        # for a reset; what it still sends on the stream is read and dropped
        peer.send_headers(stream_id, _headers(status, *extra), end_stream=True)

    def _request(
        self, peer: H3Peer, stream_id: int, headers: Headers, ended: bool
    ) -> Any:  # Request | None
        try:
            req = masque.parse_request(headers, self.template, self.ip_template)
        except masque.RequestRefused as e:
            if e.bad_input is not None:
                self._bad(e.bad_input, peer)
            self._refuse(peer, stream_id, e.status, e.error, e.words, ended)
            return None
        identity = self._authenticate(req.authorization)
        if identity is None:
            if req.authorization is not None:
                self._bad("auth_failed", peer)
            self._refuse(peer, stream_id, 407, "http_request_denied", "credentials required", ended)
            return None
        if self.flows >= self.config.max_flows:
            self._bad("too_many_flows", peer)
            self._refuse(peer, stream_id, 503, "connection_limit_reached", "too many flows", ended)
            return None
        if isinstance(req, masque.IpRequest):
            return self._connect_ip(peer, stream_id, identity, req, ended)
        flow = Flow(
            onramp=self.onramp,
            source=_source(peer),
            destination=Destination(req.host, req.port),
            identity=Identity(identity),
            vnet=self.options.vnet,
            request=HookRequest(
                "CONNECT",
                str(Destination(req.host, req.port)),
                tuple(
                    (k.decode("latin-1"), v.decode("latin-1"))
                    for k, v in headers
                    if k != b"proxy-authorization"
                ),
            ),
        )
        if isinstance(req, masque.ConnectRequest):
            if ended:  # a CONNECT stream that ended with its headers carries nothing
                self._refuse(peer, stream_id, 400, "http_request_error", "stream ended", True)
                return None
            stream = H3Stream(peer, stream_id)
            self._spawn(self._run_connect(peer, stream, flow))
            return stream
        udp = UdpRequest(self, peer, stream_id, flow)
        self._spawn(udp.run())
        return udp

    def _connect_ip(
        self, peer: H3Peer, stream_id: int, identity: str, req: masque.IpRequest, ended: bool
    ) -> Any:
        service = self.connect_ip
        if service is None or ended:
            self._refuse(peer, stream_id, 400, "http_request_error", "stream ended", ended)
            return None
        session = IpSession(service, peer, stream_id, identity, req.scope, _source(peer))
        if not session.start():
            self._refuse(
                peer, stream_id, 503, "connection_limit_reached", "address pool exhausted", False
            )
            return None
        return session

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- CONNECT ----------------------------------------------------------------------------

    async def _run_connect(self, peer: H3Peer, stream: H3Stream, flow: Flow) -> None:
        task = asyncio.current_task()
        gone = False

        def lost(_: H3Stream) -> None:
            nonlocal gone
            gone = True
            if task is not None:
                task.cancel()

        self.flows += 1
        stream.on_done = lost  # the client reset the stream while the flow opens
        try:
            try:
                leg = await self.opener.open_tcp(flow)
            except asyncio.CancelledError:
                if gone and task is not None and task.uncancel() == 0:
                    flow.result, flow.reason = FlowResult.ERROR, CLIENT_GONE
                    return
                raise
            except FlowError as e:
                flow.result, flow.reason = e.result, e.reason
                self._answer_failure(peer, stream, flow, e)
                return
            except Exception as e:
                log.exception("masque flow %d: opening failed", flow.id)
                flow.result, flow.reason = FlowResult.ERROR, f"internal error: {e!r}"
                self._answer_failure(peer, stream, flow, FlowError(FlowResult.ERROR))
                return
            stream.on_done = None
            if gone or not peer.send_headers(stream.stream_id, _headers(200)):
                leg.abort()
                flow.result, flow.reason = FlowResult.ERROR, CLIENT_GONE
                return

            def stop(result: FlowResult, reason: str) -> None:
                flow.fail(result, reason)
                if task is not None:
                    task.cancel()

            flow.stop = stop
            flow.advance(FlowState.ESTABLISHED)
            try:
                await leg.relay(H3StreamEndpoint(stream))
            except asyncio.CancelledError:
                stream.abort()
                raise
            except Exception as e:
                log.exception("masque flow %d: relay failed", flow.id)
                flow.fail(FlowResult.ERROR, f"relay error: {e!r}")
            if flow.result is None:
                flow.result = FlowResult.RESET if stream.reset_code is not None else FlowResult.OK
        except asyncio.CancelledError:
            flow.fail(FlowResult.ERROR, "cancelled")
        finally:
            self.flows -= 1
            if flow.result is None:
                flow.result, flow.reason = FlowResult.ERROR, flow.reason or "cancelled"
            try:
                self.opener.flow_finished(flow)
            except Exception:
                log.exception("masque flow %d: flow_finished failed", flow.id)

    def _answer_failure(self, peer: H3Peer, stream: H3Stream, flow: Flow, e: FlowError) -> None:
        if stream.is_closing():
            return
        reply = e.reply
        if isinstance(reply, Reply):  # a connect_request hook's own answer
            headers = _headers(reply.status, *reply.headers)
            peer.send_headers(stream.stream_id, headers, end_stream=not reply.body)
            if reply.body:
                peer.send_data(stream.stream_id, reply.body.encode(), end_stream=True)
        else:
            status, words, error = failure(e.result)
            self._refuse(peer, stream.stream_id, status, error, words, False)
        stream.on_done = None
        peer.forget(stream.stream_id)


class UdpRequest(UdpStream):
    """One connect-udp request: the `Request` handler of its stream and the client side of
    its UDP session."""

    def __init__(self, server: MasqueServer, peer: H3Peer, stream_id: int, flow: Flow) -> None:
        super().__init__(
            peer, stream_id, bad=lambda why: server._bad(why, peer), drop=server._dropped
        )
        self.server = server
        self.flow = flow
        self.session: UdpSession | None = None
        self.pending: deque[bytes] = deque()
        self.answered = False
        self._task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        self._task = asyncio.current_task()
        try:
            session = await self.server.opener.open_udp(self.flow, self._down, self._closed)
        except FlowError as e:
            if not self.done:
                status, words, error = failure(e.result)
                self.server._refuse(self.peer, self.stream_id, status, error, words, False)
                self._end()
            return
        except asyncio.CancelledError:
            self._end()
            return
        if self.done:
            session.close()
            return
        self.session = session
        self.answered = True
        self.peer.send_headers(self.stream_id, _headers(200, ("capsule-protocol", "?1")))
        while self.pending:
            session.send(self.pending.popleft())

    # -- from the client ------------------------------------------------------------------

    def udp_received(self, payload: bytes) -> None:
        if self.session is not None:
            self.session.send(payload)
        elif len(self.pending) < PENDING_DATAGRAMS:
            self.pending.append(payload)
        else:
            self.server._dropped("not_yet_open")

    def stream_ended(self) -> None:  # the client is done with the session
        self.peer.send_data(self.stream_id, b"", end_stream=True)
        self._end()

    def stream_broken(self, why: str) -> None:
        log.debug("connect-udp stream %d from %s: %s", self.stream_id, self.peer.peer, why)
        self._end()

    def reset(self, code: int) -> None:
        self._end()

    def stop_sending(self, code: int) -> None:
        self._end()

    def connection_lost(self) -> None:
        self._end()

    # -- from the origin ------------------------------------------------------------------

    def _down(self, payload: bytes) -> None:
        if not self.send_udp(payload):
            self.flow.drops += 1

    def _closed(self, reason: str) -> None:
        """The session ended on the edge's side (idle, tunnel gone): finish the stream."""
        self.session = None
        if not self.done:
            self.peer.send_data(self.stream_id, b"", end_stream=True)
            self._end()

    def _end(self) -> None:
        if self.done:
            return
        self.done = True
        self.pending.clear()
        self.peer.forget(self.stream_id)
        if self.session is not None:
            session, self.session = self.session, None
            session.close()
        elif self._task is not None and not self.answered:
            self._task.cancel()


def _source(peer: H3Peer) -> tuple[str, int]:
    addr = peer.peer_addr
    if isinstance(addr, tuple) and len(addr) >= 2:
        return str(addr[0]).removeprefix("::ffff:"), int(addr[1])
    return "?", 0


def options_pool(options: MasqueOptions) -> list[str]:
    return list(options.ip_pool)


def _build(ctx: OnRampContext, options: OnRampOptions) -> MasqueServer:
    assert isinstance(options, MasqueOptions)
    return MasqueServer(ctx, options)


register(
    "masque",
    MasqueOptions,
    _build,
    "HTTP/3 proxy (MASQUE): CONNECT (RFC 9114), connect-udp (RFC 9298) and connect-ip "
    "(RFC 9484), UDP port",
)

__all__ = ["ALPN", "H3_DATAGRAM_ERROR", "H3_REQUEST_CANCELLED", "MasqueOptions", "MasqueServer"]
