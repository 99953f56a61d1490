"""The client side of connect-ip (RFC 9484): one extended CONNECT with `:protocol =
connect-ip` on the client's QUIC connection to the edge, kept open while the client runs.

The edge answers with ADDRESS_ASSIGN (the addresses this device uses inside the tunnel) and
ROUTE_ADVERTISEMENT (the prefixes this identity may reach) capsules, and may send either again
at any time; IP packets travel as HTTP Datagrams with context id 0 (RFC 9484 section 6), or as
DATAGRAM capsules on the stream when one does not fit a QUIC DATAGRAM frame (RFC 9297).
`IpTunnel` reopens the request whenever the connection is redialled and tells its owner (the
TUN on-ramp) what it learned, so the device's addresses and routes follow the edge.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from ramp.offramps.masque import SERVER_NAME, EdgeSession, MasqueLink, _refusal
from ramp.quic.h3 import H3_MESSAGE_ERROR, H3_REQUEST_CANCELLED, H3Peer, Headers
from ramp.wire import connect_ip, masque

log = logging.getLogger("ramp.client")

DEFAULT_IP_TEMPLATE = masque.DEFAULT_IP_TEMPLATE

Prefix = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class IpState:
    """What the edge told this device, for the TUN on-ramp and /ready."""

    addresses: list[Prefix] = field(default_factory=list)
    routes: list[Prefix] = field(default_factory=list)


class IpSession(EdgeSession):
    """One connect-ip request stream: IP packets both ways, and the edge's capsules."""

    def __init__(
        self,
        peer: H3Peer,
        *,
        on_packet: Callable[[bytes], None],
        on_addresses: Callable[[list[Prefix]], None],
        on_routes: Callable[[list[Prefix]], None],
        on_end: Callable[[str], None],
        bad: Callable[[str], None],
        drop: Callable[[str], None],
    ) -> None:
        super().__init__(peer, -1, bad=bad, drop=drop)
        self.response: asyncio.Future[Headers] = peer.loop.create_future()
        self.opened = False
        self.why = ""
        self._on_packet = on_packet
        self._on_addresses = on_addresses
        self._on_routes = on_routes
        self._on_end = on_end
        self._ended = peer.loop.create_future()

    # -- to the edge ----------------------------------------------------------------------

    def send_packet(self, packet: bytes) -> bool:
        return self.send_udp(packet)

    def request_addresses(self, prefixes: list[Prefix]) -> None:
        """ADDRESS_REQUEST (RFC 9484 section 4.7.2): the addresses this device would like."""
        if not prefixes or self.done:
            return
        request = connect_ip.AddressRequest([(i + 1, p.version, p) for i, p in enumerate(prefixes)])
        self.peer.send_data(self.stream_id, connect_ip.encode_capsule(request))

    def close(self) -> None:
        if not self.done:
            self.peer.send_data(self.stream_id, b"", end_stream=True)
            self._end("closed by the client")

    async def ended(self) -> str:
        return await asyncio.shield(self._ended)

    # -- from the edge --------------------------------------------------------------------

    def headers(self, headers: Headers, ended: bool) -> None:
        if not self.response.done():
            self.response.set_result(headers)
            if ended:
                self._end("the edge ended the session")
            return
        super().headers(headers, ended)

    def udp_received(self, payload: bytes) -> None:
        self._on_packet(payload)

    def capsule(self, capsule: masque.Capsule) -> bool:
        try:
            parsed = connect_ip.parse_capsule(capsule.type, capsule.value)
        except connect_ip.ConnectIpError as e:
            # RFC 9484 section 4.7: a malformed address or route capsule aborts the stream
            self._bad("malformed_ip_capsule")
            log.warning("bad connect-ip capsule from the edge: %s", e)
            self.peer.reset_request(self.stream_id, H3_MESSAGE_ERROR)
            self._end(f"bad connect-ip capsule from the edge: {e}")
            return True
        if isinstance(parsed, connect_ip.AddressAssign):
            self._on_addresses([entry.prefix for entry in parsed.addresses])
        elif isinstance(parsed, connect_ip.RouteAdvertisement):
            self._on_routes(parsed.networks())
        elif parsed is None:  # a type connect-ip does not define: skipped (RFC 9297 3.2)
            return False
        else:  # ADDRESS_REQUEST from the edge: this side assigns nothing, so none is granted
            self._bad("unexpected_capsule")
        return True

    def _end(self, why: str) -> None:
        if self.done:
            return
        self.done = True
        self.why = why
        self.peer.forget(self.stream_id)
        if not self._ended.done():
            self._ended.set_result(why)
        if self.opened:
            self._on_end(why)


class IpRefused(ConnectionError):
    """The edge answered the connect-ip request with a status other than 2xx."""

    def __init__(self, status: int, proxy_status: str | None) -> None:
        self.status = status
        self.proxy_status = proxy_status
        super().__init__(f"edge answered {status}" + (f" ({proxy_status})" if proxy_status else ""))


class IpTunnel:
    """Keeps one connect-ip session open over a `MasqueLink`, reopening it after a redial
    (with backoff when the edge refuses). Packets sent while no session is open are dropped
    and counted, as a link without carrier drops them."""

    def __init__(
        self,
        link: MasqueLink,
        *,
        template: str = DEFAULT_IP_TEMPLATE,
        request: list[Prefix] | None = None,
        timeout: float = 15.0,
        on_packet: Callable[[bytes], None],
        on_addresses: Callable[[list[Prefix]], None],
        on_routes: Callable[[list[Prefix]], None],
        bad: Callable[[str], None] = lambda reason: None,
        drop: Callable[[str], None] = lambda reason: None,
        on_open: Callable[[], None] = lambda: None,
    ) -> None:
        self.link = link
        self.on_open = on_open
        self.path = masque.IpTemplate(template).expand()  # target and ipproto *: all policy allows
        self.request = list(request or [])
        self.timeout = timeout
        self.on_packet = on_packet
        self.on_addresses = on_addresses
        self.on_routes = on_routes
        self.bad = bad
        self.drop = drop
        self.state = IpState()
        self.session: IpSession | None = None
        self.status = "connecting"
        self.error = ""
        self.opens = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._maintain())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self.session is not None:
            self.session.close()
            self.session = None

    def send(self, packet: bytes) -> bool:
        session = self.session
        if session is None or session.done:
            self.drop("no_session")
            return False
        return session.send_packet(packet)

    def _addresses(self, prefixes: list[Prefix]) -> None:
        self.state.addresses = prefixes
        self.on_addresses(prefixes)

    def _routes(self, prefixes: list[Prefix]) -> None:
        self.state.routes = prefixes
        self.on_routes(prefixes)

    async def _maintain(self) -> None:
        backoff = 0.5
        loop = asyncio.get_running_loop()
        while True:
            deadline = loop.time() + self.timeout
            try:
                session = await self._open(deadline)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.status, self.error = "reconnecting", str(e) or type(e).__name__
                log.warning("connect-ip: %s (next try in %.1f s)", self.error, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            self.session = session
            self.opens += 1
            self.on_open()
            self.status, self.error = "open", ""
            log.info("connect-ip session open (stream %d)", session.stream_id)
            why = await session.ended()
            self.session = None
            self.status, self.error = "reconnecting", why
            log.warning("connect-ip session ended: %s", why)

    async def _open(self, deadline: float) -> IpSession:
        peer = await self.link.stream_peer(deadline)
        session = IpSession(
            peer,
            on_packet=self.on_packet,
            on_addresses=self._addresses,
            on_routes=self._routes,
            on_end=lambda why: None,
            bad=self.bad,
            drop=self.drop,
        )
        headers = [
            (b":method", b"CONNECT"),
            (b":protocol", b"connect-ip"),
            (b":scheme", b"https"),
            (b":authority", SERVER_NAME.encode()),
            (b":path", self.path.encode()),
            (b"capsule-protocol", b"?1"),
            (b"proxy-authorization", b"Bearer " + self.link.target.bearer.encode()),
        ]
        session.stream_id = peer.open_request(headers, session)
        session.request_addresses(self.request)
        try:
            async with asyncio.timeout_at(deadline):
                answer = await session.response
        except BaseException:
            session.done = True
            peer.reset_request(session.stream_id, H3_REQUEST_CANCELLED)
            raise
        status, proxy_status = _refusal(answer)
        if status // 100 != 2:
            session.done = True
            peer.forget(session.stream_id)
            raise IpRefused(status, proxy_status)
        if session.done:
            raise ConnectionError(session.why or "the edge ended the session at once")
        session.opened = True
        return session


__all__ = ["DEFAULT_IP_TEMPLATE", "IpRefused", "IpSession", "IpState", "IpTunnel"]
