"""The edge's flow path: every on-ramp hands its flows here, and they go down the layers once.

    on-ramp -> admit (flow table) -> identity -> connect_request hooks -> resolve and find
    route candidates -> decide (policy and flow_start hooks) -> route hooks -> off-ramp

This is the `FlowOpener` the on-ramps see. The role builds it from parts (table, hooks, router,
off-ramps) and never sits on the path itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from ramp.flows.client_shares import ClientShares
from ramp.flows.flow import (
    Decision,
    Flow,
    FlowError,
    FlowKind,
    FlowResult,
    FlowState,
    Identity,
    Route,
    parse_ip,
)
from ramp.flows.opener import TcpLeg, UdpSession
from ramp.flows.table import FlowTable
from ramp.offramps.base import OffRamp
from ramp.policy.engine import PolicyHook
from ramp.policy.hooks import Deny, Hooks, ProxyRequest, Reply
from ramp.policy.reach import IPNetwork, reachable_prefixes
from ramp.policy.router import DEFAULT_VNET, Router

log = logging.getLogger(__name__)

DnsAnswer = Callable[[bytes], Awaitable[bytes | None]]


class FlowPipeline:
    def __init__(
        self,
        table: FlowTable,
        hooks: Hooks,
        policy: PolicyHook,
        router: Router,
        offramps: dict[str, OffRamp],
        *,
        groups: Callable[[str], frozenset[str]] = lambda name: frozenset(),
        vnet_of: Callable[[str], str | None] = lambda name: None,
        dns: DnsAnswer | None = None,
        bad_input: Callable[[str, str, tuple[str, int] | None], None] | None = None,
        on_decision: Callable[[bool], None] | None = None,
        on_setup: Callable[[float], None] | None = None,
        on_revoked: Callable[[], None] | None = None,
        on_open: Callable[[Flow], None] | None = None,
        on_reject: Callable[[str], None] | None = None,
        opening_per_source: int = 0,
        opening_per_identity: int = 0,
    ) -> None:
        self.table = table
        self.hooks = hooks
        self.policy = policy
        self.router = router
        self.offramps = offramps
        self._groups = groups
        self._vnet_of = vnet_of
        self._dns = dns
        self._bad_input = bad_input
        self._on_decision = on_decision
        self._on_setup = on_setup
        self._on_revoked = on_revoked
        self._on_open = on_open
        self._on_reject = on_reject
        # Flows still opening (resolving, deciding, waiting for a stream slot, waiting for the
        # connector's dial) hold the scarce things: resolver slots, stream slots, the origin's
        # patience. A client flooding a blackholed address keeps its flows here the longest.
        self.opening: ClientShares[str] = ClientShares(opening_per_source, opening_per_identity)
        # Identities whose credentials were revoked (client identities): a flow that was
        # still opening when its identity was revoked must not become established after.
        self.revoked: set[str] = set()
        # Called after each policy or store change, once open flows were checked: on-ramps
        # that told clients what they may reach (connect-ip routes) tell them again.
        self.on_policy_change: list[Callable[[], None]] = []

    # -- the path ---------------------------------------------------------------------------

    def _refuse_revoked(self, flow: Flow) -> None:
        name = flow.user
        if name is not None and name in self.revoked:
            raise FlowError(FlowResult.NOT_PERMITTED, f"client {name} revoked")

    def _admit(self, flow: Flow) -> None:
        self._refuse_revoked(flow)
        self.table.admit(flow)
        ident = flow.identity
        if ident is not None and not ident.groups:
            groups = self._groups(ident.name)
            if groups:
                flow.identity = Identity(ident.name, groups)
        flow.advance(FlowState.AUTHENTICATED)

    def _vnet(self, flow: Flow) -> str:
        assigned = self._vnet_of(flow.identity.name) if flow.identity is not None else None
        return assigned or flow.vnet or "default"

    async def _decide_and_route(self, flow: Flow) -> Any:
        if flow.request is not None and self.hooks.has("connect_request"):
            assert isinstance(flow.request, ProxyRequest)
            answer = await self.hooks.connect_request(flow, flow.request)
            if isinstance(answer, Deny):
                self._deny(flow, Decision(False, answer.rule, answer.reason))
            if isinstance(answer, Reply):
                flow.reason = f"answered by a connect_request hook ({answer.status})"
                raise FlowError(FlowResult.OK, flow.reason, reply=answer)
        vnet = self._vnet(flow)
        flow.vnet = vnet
        candidates = await self.router.candidates(flow, vnet, replicas=self.hooks.has("route"))
        decision = await self.hooks.flow_start(flow)
        flow.decision = decision
        if self._on_decision is not None:
            self._on_decision(decision.allowed)
        if not decision.allowed:
            self._deny(flow, decision)
        flow.advance(FlowState.DECIDED)
        if not candidates:
            raise FlowError(
                FlowResult.NOT_PERMITTED,
                f"no route to {flow.resolved or flow.destination.host} in virtual network "
                f"{vnet}, and direct egress is off",
            )
        route = await self.hooks.route(flow, candidates) if len(candidates) > 1 else candidates[0]
        if isinstance(route, Deny):
            self._deny(flow, Decision(False, route.rule, route.reason))
        flow.route = route
        flow.advance(FlowState.ROUTED)
        offramp = self.offramps.get(route.offramp)
        if offramp is None:
            raise FlowError(FlowResult.ERROR, f"no off-ramp {route.offramp!r} on this edge")
        return route, offramp

    def _take_opening(self, flow: Flow) -> None:
        """Take one of the source's and the identity's opening slots (FlowError BUSY when
        either share is used up); `_release_opening` gives it back. Not a context manager:
        this is on the path of every flow."""
        why = self.opening.try_take(flow.source[0], flow.user)
        if why is None:
            return
        if self._on_reject is not None:
            self._on_reject(why.replace("_share", "_opening_share"))
        over = self.opening.over(why, flow.source[0], flow.user)
        raise FlowError(FlowResult.BUSY, f"{over} flows opening")

    def _release_opening(self, flow: Flow) -> None:
        self.opening.release(flow.source[0], flow.user)

    @staticmethod
    def _deny(flow: Flow, decision: Decision) -> None:
        flow.decision = decision
        raise FlowError(
            FlowResult.NOT_PERMITTED,
            f"denied by {decision.rule or 'policy'}: {decision.reason}",
            rule=decision.rule,
        )

    async def open_tcp(self, flow: Flow) -> TcpLeg:
        return await self._open_stream(flow, self._decide_and_route)

    async def open_moved(self, flow: Flow) -> TcpLeg:
        """A flow another worker decided and routed (ramp.flows.moved): admitted here, its
        stream opened on this worker's connections, with no second policy decision."""
        return await self._open_stream(flow, self._moved_route)

    async def _moved_route(self, flow: Flow) -> Any:
        route = flow.route
        if route is None:
            raise FlowError(FlowResult.ERROR, "a moved flow without a route")
        flow.advance(FlowState.ROUTED)
        offramp = self.offramps.get(route.offramp)
        if offramp is None:
            raise FlowError(FlowResult.ERROR, f"no off-ramp {route.offramp!r} on this edge")
        return route, offramp

    async def _open_stream(self, flow: Flow, route_of: Callable[[Flow], Awaitable[Any]]) -> TcpLeg:
        started = time.monotonic()
        self._admit(flow)
        self._take_opening(flow)
        try:
            route, offramp = await route_of(flow)
            leg: TcpLeg = await offramp.open_stream(flow, route)
        finally:
            self._release_opening(flow)
        try:
            self._refuse_revoked(flow)  # revoked while the leg opened
        except FlowError:
            leg.abort()
            raise
        flow.advance(FlowState.OPENED)
        if self._on_open is not None:
            self._on_open(flow)
        if self._on_setup is not None:
            self._on_setup(time.monotonic() - started)
        return leg

    async def open_udp(
        self, flow: Flow, receive: Callable[[bytes], None], closed: Callable[[str], None]
    ) -> UdpSession:
        flow.protocol = "udp"
        flow.kind = FlowKind.DATAGRAM
        # a datagram flow that fails while opening is reported here: the on-ramp only sees
        # the exception
        with self.table.reporting_failures(flow):
            self._admit(flow)
            self._take_opening(flow)
            try:
                route, offramp = await self._decide_and_route(flow)
                session: UdpSession = await offramp.open_datagram(flow, route, receive, closed)
            finally:
                self._release_opening(flow)
            try:
                self._refuse_revoked(flow)  # revoked while the session opened
            except FlowError:
                session.close()
                raise
        flow.advance(FlowState.ESTABLISHED)
        if self._on_open is not None:
            self._on_open(flow)

        def stop(result: FlowResult, reason: str) -> None:
            flow.fail(result, reason)
            session.close()

        flow.stop = stop
        return session

    async def open_packet(self, flow: Flow) -> Route:
        """Admit, decide and route a packet flow whose packets the caller carries itself
        (ICMP echo over the tunnel's IP-packet datagrams): the same table, hooks and policy
        as every flow, no off-ramp. Only a tunnel route will do. Raises FlowError, the flow
        then reported here."""
        flow.kind = FlowKind.PACKET
        started = time.monotonic()
        with self.table.reporting_failures(flow):
            self._admit(flow)
            self._take_opening(flow)
            try:
                route, _ = await self._decide_and_route(flow)
            finally:
                self._release_opening(flow)
            if route.offramp != "tunnel":
                raise FlowError(
                    FlowResult.NOT_PERMITTED,
                    f"{flow.protocol} packets go to tunnels only, not {route.offramp}",
                )
            self._refuse_revoked(flow)
        flow.advance(FlowState.ESTABLISHED)
        if self._on_open is not None:
            self._on_open(flow)
        if self._on_setup is not None:
            self._on_setup(time.monotonic() - started)
        return route

    def reachable(
        self,
        identity: str | None,
        source: str,
        *,
        onramp: str,
        vnet: str | None = None,
        scope: IPNetwork | None = None,
        ipproto: int | None = None,
    ) -> list[IPNetwork]:
        """The prefixes this identity's packets may reach: its virtual network's routes that
        the built-in policy allows (ramp.policy.reach). Hooks still decide each flow."""
        groups = self._groups(identity) if identity is not None else frozenset()
        assigned = self._vnet_of(identity) if identity is not None else None
        return reachable_prefixes(
            self.policy.policy,
            self.router.tables.get(assigned or vnet or DEFAULT_VNET),
            identity=identity,
            groups=groups,
            onramp=onramp,
            source=parse_ip(source),
            scope=scope,
            ipproto=ipproto,
        )

    async def dns_query(self, query: bytes) -> bytes | None:
        return await self._dns(query) if self._dns is not None else None

    def flow_finished(self, flow: Flow) -> None:
        self.table.end(flow)

    def bad_input(self, onramp: str, reason: str, peer: tuple[str, int] | None = None) -> None:
        if self._bad_input is not None:
            self._bad_input(onramp, reason, peer)

    # -- policy changes ---------------------------------------------------------------------

    def revoke_denied(self) -> int:
        """End the open flows the current policy denies; returns how many."""
        ended = 0
        for flow in self.table:
            if flow.decision is None or not flow.decision.allowed or flow.stop is None:
                continue
            if flow.identity is not None:  # group membership may have changed (SIGHUP)
                flow.identity = Identity(flow.identity.name, self._groups(flow.identity.name))
            verdict = self.policy.verdict(flow)
            if verdict.allowed:
                continue
            flow.decision = Decision(False, verdict.rule, verdict.why)
            log.info(
                "flow %d (%s -> %s): policy changed, now denied by %s",
                flow.id,
                flow.user,
                flow.destination,
                verdict.rule,
            )
            try:
                flow.stop(FlowResult.NOT_PERMITTED, f"policy changed: denied by {verdict.rule}")
            except Exception:
                log.exception("ending flow %d failed", flow.id)
            ended += 1
            if self._on_revoked is not None:
                self._on_revoked()
        for notify in list(self.on_policy_change):
            try:
                notify()
            except Exception:
                log.exception("a policy change listener failed")
        return ended

    def end_identity(self, names: Iterable[str]) -> int:
        """End the open flows of identities `names` (revoked client identities) and refuse
        their flows still opening; returns how many open flows were ended."""
        gone = set(names)
        if not gone:
            return 0
        self.revoked |= gone
        ended = 0
        for flow in list(self.table):
            name = flow.user
            if name is None or name not in gone or flow.stop is None:
                continue
            try:
                flow.stop(FlowResult.NOT_PERMITTED, f"client {name} revoked")
            except Exception:
                log.exception("ending flow %d failed", flow.id)
            ended += 1
        return ended
