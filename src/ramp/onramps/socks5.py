"""The SOCKS5 on-ramp: RFC 1928 CONNECT and UDP ASSOCIATE, RFC 1929 username/password when
users are configured or client identities exist (a client's password is its secret)."""

from __future__ import annotations

import asyncio
import logging
import socket
from functools import partial

from ramp.flows.flow import Destination, FlowResult
from ramp.onramps.registry import OnRampContext, OnRampOptions, register
from ramp.onramps.socks5_udp import AssociationLimits, UdpAssociation, run_association
from ramp.onramps.tcp_listener import FlowPlan, TcpOnRamp
from ramp.wire import socks5
from ramp.wire.socks5 import NEED_DATA, Command, Rep, Socks5Error

log = logging.getLogger(__name__)

# Curl and most clients report 0x04 as "host unreachable / timed out"; 0x06 (TTL expired) is
# what RFC 1928 offers, but clients show it as an obscure routing error.
REP_FOR_RESULT: dict[FlowResult, Rep] = {
    FlowResult.NOT_PERMITTED: Rep.NOT_ALLOWED,
    FlowResult.NET_UNREACHABLE: Rep.NETWORK_UNREACHABLE,
    FlowResult.HOST_UNREACHABLE: Rep.HOST_UNREACHABLE,
    FlowResult.REFUSED: Rep.CONNECTION_REFUSED,
    FlowResult.TIMEOUT: Rep.HOST_UNREACHABLE,
    FlowResult.ERROR: Rep.GENERAL_FAILURE,
    FlowResult.RESET: Rep.GENERAL_FAILURE,
    FlowResult.BAD_DESTINATION: Rep.HOST_UNREACHABLE,
    FlowResult.BUSY: Rep.GENERAL_FAILURE,
}


def reply_for(result: FlowResult) -> bytes:
    return socks5.build_reply(REP_FOR_RESULT.get(result, Rep.GENERAL_FAILURE))


class Socks5Server(TcpOnRamp):
    """SOCKS5 proxy listener: `Socks5Server(config, opener)`, `await start(host, port)`,
    `port`, `await close()`."""

    onramp = "socks5"
    # the edge's, shared by its SOCKS5 listeners (set by the builder); none: no shares
    associations: AssociationLimits | None = None

    async def _handshake(self, sock: socket.socket, peer: tuple[str, int]) -> FlowPlan | None:
        hs = socks5.ServerHandshake(require_auth=self.auth_required())
        identity: str | None = None
        got = False
        request: socks5.Request | None = None
        try:
            while request is None:
                ev = hs.next_event()
                if ev is NEED_DATA:
                    hs.receive_data(await self.recv(sock, got))
                    got = True
                elif isinstance(ev, socks5.Greeting):
                    await self.send(sock, socks5.build_method_selection(ev.method))
                elif isinstance(ev, socks5.AuthRequest):
                    user = self.authenticate(ev.username, ev.password)
                    await self.send(sock, hs.auth_reply(user is not None))
                    if user is None:
                        self.opener.bad_input(self.onramp, "auth_failed", peer)
                        await self.send_final(sock, b"")
                        return None
                    identity = user
                elif isinstance(ev, socks5.Request):
                    request = ev
        except Socks5Error as e:
            log.debug("socks5 %s: %s", peer, e)
            self.opener.bad_input(self.onramp, e.reason, peer)
            await self.send_final(sock, e.reply)
            return None
        if request.command is Command.UDP_ASSOCIATE:
            return FlowPlan(
                destination=Destination(request.host, request.port),
                identity=identity,
                ok_reply=b"",
                error_reply=reply_for,
                busy_reply=socks5.build_reply(Rep.GENERAL_FAILURE),
                serve=partial(self._serve_udp, peer=peer, identity=identity, request=request),
            )
        if request.command is not Command.CONNECT:
            self.opener.bad_input(self.onramp, "command_not_supported", peer)
            await self.send_final(sock, socks5.build_reply(Rep.COMMAND_NOT_SUPPORTED))
            return None
        return FlowPlan(
            destination=Destination(request.host, request.port),
            identity=identity,
            ok_reply=socks5.build_reply(Rep.SUCCEEDED),
            error_reply=reply_for,
            busy_reply=socks5.build_reply(Rep.GENERAL_FAILURE),
            initial=hs.trailing_data,
        )

    async def _serve_udp(
        self,
        sock: socket.socket,
        *,
        peer: tuple[str, int],
        identity: str | None,
        request: socks5.Request,
    ) -> None:
        """One UDP association, for as long as its control connection `sock` lives (and
        carries datagrams: an idle one is closed)."""
        if self.associations is None:
            self.associations = AssociationLimits()
        limits = self.associations
        refused = limits.admit(peer[0], identity)
        if refused is not None:
            # 0x01, not 0x02 ("not allowed by ruleset"): the client is over a resource share,
            # no rule denies it, and it may try again once it holds fewer associations
            self.opener.bad_input(self.onramp, f"udp_association_{refused}", peer)
            await self.send_final(sock, socks5.build_reply(Rep.GENERAL_FAILURE))
            return
        try:
            await self._associate(sock, peer, identity, request, limits)
        finally:
            limits.release(peer[0], identity)

    async def _associate(
        self,
        sock: socket.socket,
        peer: tuple[str, int],
        identity: str | None,
        request: socks5.Request,
        limits: AssociationLimits,
    ) -> None:
        try:
            assoc = UdpAssociation(
                self.opener, sock, identity, (request.host, request.port), limits.idle_timeout
            )
            assoc.vnet = self.options.vnet if self.options is not None else None
            assoc.max_sessions = self.config.max_udp_destinations_per_association
        except OSError as e:
            log.warning("socks5 %s: cannot open a UDP relay socket: %s", peer, e)
            await self.send_final(sock, socks5.build_reply(Rep.GENERAL_FAILURE))
            return
        try:
            host, port = assoc.address
            log.debug("socks5 %s: UDP association on %s:%d", peer, host, port)
            async with asyncio.timeout(self.config.handshake_timeout):
                await self.send(sock, socks5.build_reply(Rep.SUCCEEDED, host, port))
            limits.track(assoc)
            why = await run_association(assoc, sock)
            if why == "idle":
                limits.on_expired()
                log.debug(
                    "socks5 %s: UDP association closed: no datagram for %gs",
                    peer,
                    limits.idle_timeout,
                )
            elif why == "stopped":
                log.info("socks5 %s: UDP association of %s closed: revoked", peer, identity)
        except (OSError, TimeoutError) as e:
            log.debug("socks5 %s: UDP association ended: %s", peer, e)
        finally:
            limits.untrack(assoc)
            assoc.close()


def _build(ctx: OnRampContext, options: OnRampOptions) -> Socks5Server:
    server = Socks5Server(ctx.config, ctx.opener, options, accept_error=ctx.accept_error)
    server.associations = ctx.udp_associations
    server.credentials = ctx.credentials
    server.proxy_header_seen = ctx.proxy_header
    return server


register("socks5", OnRampOptions, _build, "SOCKS5 proxy (RFC 1928): CONNECT and UDP ASSOCIATE")
