"""The flow path without sockets: table, policy, hooks, router and off-ramp registry."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from ramp.flows.flow import (
    Destination,
    Flow,
    FlowError,
    FlowResult,
    FlowState,
    Identity,
    Route,
)
from ramp.flows.table import FlowTable
from ramp.policy.engine import PolicyHook
from ramp.policy.hooks import Deny, Hooks, LoadedHook, ProxyRequest, Reply
from ramp.policy.pipeline import FlowPipeline
from ramp.policy.router import RouteEntry, Router, RouteTable
from ramp.policy.rules import Policy, Rule, validate


class FakeLeg:
    def __init__(self, flow: Flow, route: Route) -> None:
        self.flow = flow
        self.route = route

    async def relay(self, client: Any, initial: bytes = b"") -> None:
        return None

    def abort(self) -> None:
        return None


class FakeSession:
    def __init__(self, on_close: Callable[[], None]) -> None:
        self._on_close = on_close
        self.closed = False

    def send(self, payload: bytes) -> None:
        return None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._on_close()


class FakeOffRamp:
    def __init__(self, name: str, table: FlowTable) -> None:
        self.name = name
        self.table = table
        self.opened: list[Route] = []

    async def open_stream(self, flow: Flow, route: Route) -> FakeLeg:
        self.opened.append(route)
        return FakeLeg(flow, route)

    async def open_datagram(
        self, flow: Flow, route: Route, receive: Any, closed: Any
    ) -> FakeSession:
        self.opened.append(route)
        return FakeSession(lambda: self.table.end(flow))


async def _resolve(host: str, port: int) -> str:
    return {"web.example": "198.51.100.10"}.get(host, host)


def build(
    rules: list[Rule],
    *,
    user_hooks: list[LoadedHook] = (),  # type: ignore[assignment]
    limit: int = 100,
    direct: bool = False,
    per_source: int = 0,
    per_identity: int = 0,
    opening_per_source: int = 0,
    opening_per_identity: int = 0,
) -> tuple[FlowPipeline, list[Flow], dict[str, FakeOffRamp], list[str]]:
    reported: list[Flow] = []
    rejected: list[str] = []
    table = FlowTable(
        limit,
        reporters=[reported.append],
        on_reject=rejected.append,
        per_source=per_source,
        per_identity=per_identity,
    )
    policy = PolicyHook(Policy(validate(r) for r in rules))
    hooks = Hooks([policy.as_hook(), *user_hooks], timeout=0.05)
    router = Router(_resolve, allow_direct=direct, replicas=lambda tid: ["c1", "c2"])
    entries = [
        RouteEntry(__import__("ipaddress").ip_network("198.51.100.0/24"), "t1", "corp"),
    ]
    router.tables = {"default": RouteTable(entries)}
    offramps = {"tunnel": FakeOffRamp("tunnel", table), "direct": FakeOffRamp("direct", table)}
    pipeline = FlowPipeline(
        table,
        hooks,
        policy,
        router,
        offramps,
        groups=lambda n: frozenset({"staff"}),
        on_reject=rejected.append,
        opening_per_source=opening_per_source,
        opening_per_identity=opening_per_identity,
    )
    return pipeline, reported, offramps, rejected


def flow(
    user: str | None = "alice",
    host: str = "198.51.100.10",
    port: int = 8000,
    source: str = "192.0.2.1",
) -> Flow:
    return Flow(
        onramp="socks5",
        source=(source, 40000),
        destination=Destination(host, port),
        identity=Identity(user) if user else None,
    )


ALLOW_ALL = [Rule("default", "allow")]


def test_a_flow_walks_the_lifecycle_and_is_reported_once() -> None:
    async def main() -> None:
        p, reported, _, _ = build(ALLOW_ALL)
        f = flow()
        leg = await p.open_tcp(f)
        assert isinstance(leg, FakeLeg) and leg.route.tunnel_name == "corp"
        assert f.state is FlowState.OPENED
        assert f.identity == Identity("alice", frozenset({"staff"}))
        assert f.decision is not None and f.decision.rule == "default"
        assert f.route == Route("tunnel", "default", "t1", "corp", "198.51.100.0/24")
        assert f in p.table
        p.flow_finished(f)
        p.flow_finished(f)
        assert reported == [f] and f.result is FlowResult.OK and f.state is FlowState.ENDED
        assert len(p.table) == 0

    asyncio.run(main())


def test_policy_denies_name_the_rule_and_unrouted_is_not_permitted() -> None:
    async def main() -> None:
        rules = [Rule("alice-web", "allow", identity="alice", to="198.51.100.10", ports="8000")]
        p, _, offramps, _ = build(rules)
        with pytest.raises(FlowError) as e:
            await p.open_tcp(flow("bob"))
        assert e.value.result is FlowResult.NOT_PERMITTED and e.value.rule == "implicit-deny"
        f = flow("alice", port=9000)
        with pytest.raises(FlowError) as e:
            await p.open_tcp(f)
        assert f.decision is not None and not f.decision.allowed
        p2, _, _, _ = build(ALLOW_ALL)
        with pytest.raises(FlowError, match=r"no route to 203\.0\.113\.5") as e:
            await p2.open_tcp(flow(host="203.0.113.5"))
        assert e.value.result is FlowResult.NOT_PERMITTED
        assert offramps["tunnel"].opened == []

    asyncio.run(main())


def test_direct_egress_only_outside_routes_and_when_on() -> None:
    async def main() -> None:
        p, _, offramps, _ = build(ALLOW_ALL, direct=True)
        await p.open_tcp(flow(host="203.0.113.5"))
        await p.open_tcp(flow(host="web.example"))
        assert [r.offramp for r in offramps["direct"].opened] == ["direct"]
        assert [r.tunnel_name for r in offramps["tunnel"].opened] == ["corp"]

    asyncio.run(main())


def test_a_full_table_refuses_reports_and_counts() -> None:
    async def main() -> None:
        p, reported, _, rejected = build(ALLOW_ALL, limit=2)
        a, b, c = flow(), flow(), flow()
        await p.open_tcp(a)
        await p.open_tcp(b)
        with pytest.raises(FlowError, match="limit of 2"):
            await p.open_tcp(c)
        assert rejected == ["flow_table_full"] and reported == [c]
        p.flow_finished(a)
        await p.open_tcp(flow())  # a slot came back

    asyncio.run(main())


def test_one_source_or_user_holds_only_its_share_of_the_table() -> None:
    async def main() -> None:
        p, reported, _, rejected = build(ALLOW_ALL, per_source=2, per_identity=3)
        a, b = flow(), flow()
        await p.open_tcp(a)
        await p.open_tcp(b)
        third = flow()
        with pytest.raises(FlowError, match=r"192\.0\.2\.1 already has 2 flows") as e:
            await p.open_tcp(third)
        assert e.value.result is FlowResult.BUSY and reported == [third]
        # another address is not affected; the user's own share still binds across addresses
        await p.open_tcp(flow(source="192.0.2.2"))
        with pytest.raises(FlowError, match="alice already has 3 flows"):
            await p.open_tcp(flow(source="192.0.2.3"))
        await p.open_tcp(flow(user="bob", source="192.0.2.3"))
        assert rejected == ["source_share", "identity_share"]
        p.flow_finished(a)  # the share comes back with the flow's end
        await p.open_tcp(flow())
        # the refused alice flow took nothing from 192.0.2.3: its share of 2 still has room
        await p.open_tcp(flow(user="carol", source="192.0.2.3"))
        assert rejected == ["source_share", "identity_share"]

    asyncio.run(main())


class StuckOffRamp(FakeOffRamp):
    """An off-ramp whose opens hang, like dials to a blackholed address."""

    def __init__(self, name: str, table: FlowTable) -> None:
        super().__init__(name, table)
        self.release = asyncio.Event()

    async def open_stream(self, flow: Flow, route: Route) -> FakeLeg:
        await self.release.wait()
        return await super().open_stream(flow, route)


def test_flows_still_opening_are_capped_per_source_and_come_back() -> None:
    async def main() -> None:
        p, _, offramps, rejected = build(ALLOW_ALL, opening_per_source=2, opening_per_identity=3)
        stuck = StuckOffRamp("tunnel", p.table)
        offramps["tunnel"] = stuck
        hanging = [asyncio.create_task(p.open_tcp(flow())) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(FlowError, match="2 flows opening") as e:
            await p.open_tcp(flow())
        assert e.value.result is FlowResult.BUSY
        other = asyncio.create_task(p.open_tcp(flow(source="192.0.2.2")))
        await asyncio.sleep(0)
        with pytest.raises(FlowError, match="alice already has 3 flows opening"):
            await p.open_tcp(flow(source="192.0.2.3"))
        assert rejected == ["source_opening_share", "identity_opening_share"]
        hanging[0].cancel()  # a client that went away gives its opening slot back
        await asyncio.gather(hanging[0], return_exceptions=True)
        late = asyncio.create_task(p.open_tcp(flow()))
        await asyncio.sleep(0)
        stuck.release.set()
        await asyncio.gather(hanging[1], other, late)
        assert len(p.opening.sources) == 0 and len(p.opening.identities) == 0

    asyncio.run(main())


def _hook(name: str, **functions: Any) -> LoadedHook:
    return LoadedHook(
        name, functions, {k: asyncio.iscoroutinefunction(v) for k, v in functions.items()}
    )


def test_route_hook_picks_a_replica_and_bad_hooks_fail_closed() -> None:
    async def main() -> None:
        def pick(f: Flow, candidates: list[Route]) -> Route:
            return next(c for c in candidates if c.replica == "c2")

        p, _, offramps, _ = build(ALLOW_ALL, user_hooks=[_hook("pin", route=pick)])
        await p.open_tcp(flow())
        assert offramps["tunnel"].opened[-1].replica == "c2"

        def boom(f: Flow) -> None:
            raise RuntimeError("bug")

        p, _, _, _ = build(ALLOW_ALL, user_hooks=[_hook("boom", flow_start=boom)])
        f = flow()
        with pytest.raises(FlowError) as e:
            await p.open_tcp(f)
        assert e.value.rule == "hook:boom" and "hook_error" in e.value.reason

    asyncio.run(main())


def test_connect_request_hook_answers_or_denies_before_routing() -> None:
    async def main() -> None:
        def answer(f: Flow, request: ProxyRequest) -> Reply | Deny | None:
            if request.target.startswith("health"):
                return Reply(200, "ok")
            if request.header("User-Agent") == "bad":
                return Deny("blocked agent")
            return None

        p, _, offramps, _ = build(ALLOW_ALL, user_hooks=[_hook("h", connect_request=answer)])
        f = flow()
        f.request = ProxyRequest("CONNECT", "health:1", ())
        with pytest.raises(FlowError) as e:
            await p.open_tcp(f)
        assert isinstance(e.value.reply, Reply) and e.value.reply.status == 200
        f = flow()
        f.request = ProxyRequest("CONNECT", "x:1", (("user-agent", "bad"),))
        with pytest.raises(FlowError) as e:
            await p.open_tcp(f)
        assert e.value.result is FlowResult.NOT_PERMITTED and e.value.rule == "hook:h"
        f = flow()
        f.request = ProxyRequest("CONNECT", "x:1", ())
        await p.open_tcp(f)
        assert offramps["tunnel"].opened

    asyncio.run(main())


def test_a_policy_change_ends_open_flows_it_now_denies() -> None:
    async def main() -> None:
        p, reported, _, _ = build(ALLOW_ALL)
        tcp = flow("alice")
        await p.open_tcp(tcp)
        stopped: list[tuple[FlowResult, str]] = []
        tcp.stop = lambda result, reason: (
            tcp.fail(result, reason),
            stopped.append((result, reason)),
        )
        other = flow("bob")
        await p.open_tcp(other)
        other.stop = lambda result, reason: stopped.append((result, reason))
        udp = flow("alice", port=53)
        session = await p.open_udp(udp, lambda d: None, lambda r: None)
        p.policy.replace(
            Policy([validate(Rule("no-alice", "deny", identity="alice")), validate(ALLOW_ALL[0])])
        )
        assert p.revoke_denied() == 2
        assert stopped == [(FlowResult.NOT_PERMITTED, "policy changed: denied by no-alice")]
        assert tcp.decision is not None and tcp.decision.rule == "no-alice"
        assert session.closed and udp in reported and udp.result is FlowResult.NOT_PERMITTED
        assert p.revoke_denied() == 0  # already stopped flows are not stopped again

    asyncio.run(main())


def test_datagram_flows_that_fail_to_open_are_reported_by_the_pipeline() -> None:
    async def main() -> None:
        p, reported, _, _ = build([])
        f = flow()
        with pytest.raises(FlowError):
            await p.open_udp(f, lambda d: None, lambda r: None)
        assert reported == [f] and f.result is FlowResult.NOT_PERMITTED

    asyncio.run(main())
