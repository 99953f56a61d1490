"""The example hooks in examples/hooks, loaded as the edge loads them and driven with flows."""

from __future__ import annotations

import ast
import asyncio
import datetime as dt
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from ramp.flows.flow import Decision, Destination, Flow, Identity, Route
from ramp.flows.table import FlowTable
from ramp.observe.audit import flow_record
from ramp.policy.hooks import (
    Allow,
    Deny,
    HookLoadError,
    Hooks,
    HookSpec,
    LoadedHook,
    ProxyRequest,
    Reply,
    load_hooks,
)
from ramp.policy.router import RouteEntry, Router, VnetRoutes

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "hooks"


def allow_except(*hosts: str) -> LoadedHook:
    """A stand-in for the built-in policy: allows every flow except to `hosts`."""

    def decide(flow: Flow) -> Allow | Deny:
        if flow.destination.host in hosts:
            return Deny("no rule allows it", "default")
        return Allow("allowed", "allow-rest")

    return LoadedHook("policy", {"flow_start": decide}, {"flow_start": False})


class Errors(list[tuple[str, str, str]]):
    def __call__(self, hook: str, point: str, kind: str) -> None:
        self.append((hook, point, kind))


def example(name: str, policy: LoadedHook | None = None, **options: Any) -> Hooks:
    loaded = load_hooks([HookSpec(str(EXAMPLES / f"{name}.py"), options)])
    hooks = Hooks([policy or allow_except(), *loaded], 0.05, on_error=Errors())
    return hooks


def errors(hooks: Hooks) -> Errors:
    assert isinstance(hooks._on_error, Errors)
    return hooks._on_error


def module_globals(hooks: Hooks, name: str) -> dict[str, Any]:
    """The namespace of a loaded example, to replace what it allows replacing (its clock)."""
    hook = next(h for h in hooks.hooks if h.name == name)
    fn = next(iter(hook.functions.values()))
    namespace: dict[str, Any] = fn.__globals__
    return namespace


def flow(
    user: str | None = "alice",
    groups: frozenset[str] = frozenset(),
    source: str = "192.0.2.10",
    host: str = "10.1.2.3",
    port: int = 80,
    request: ProxyRequest | None = None,
) -> Flow:
    return Flow(
        onramp="http" if request is not None else "socks5",
        source=(source, 40000),
        destination=Destination(host, port),
        identity=Identity(user, groups) if user is not None else None,
        request=request,
    )


def start(hooks: Hooks, f: Flow) -> Decision:
    return asyncio.run(hooks.flow_start(f))


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.py")), ids=lambda p: p.name)
def test_every_example_says_what_it_does_and_how_to_configure_it(path: Path) -> None:
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc is not None and len(doc.splitlines()) > 5
    assert "hooks:" in doc and f"examples/hooks/{path.name}" in doc
    assert f"`{path.name}`" in (EXAMPLES.parents[1] / "docs" / "hooks.md").read_text()


# -- concurrent_limit ------------------------------------------------------------------------


def test_concurrent_limit_allows_n_then_denies_then_allows_after_an_end() -> None:
    hooks = example("concurrent_limit", max_flows=2)
    first, second, third = flow(), flow(), flow()
    assert start(hooks, first).allowed
    assert start(hooks, second).allowed
    assert start(hooks, third) == Decision(
        False, "hook:concurrent_limit", "alice has 2 flows open, the limit is 2"
    )
    assert start(hooks, flow(user="bob")).allowed  # a limit per identity

    hooks.flow_end(flow_record(first))
    assert start(hooks, flow()).allowed
    assert not start(hooks, flow()).allowed


def test_concurrent_limit_counts_anonymous_flows_per_source_ip() -> None:
    hooks = example("concurrent_limit", max_flows=1)
    assert start(hooks, flow(user=None, source="192.0.2.10")).allowed
    denied = start(hooks, flow(user=None, source="192.0.2.10"))
    assert denied.reason == "192.0.2.10 has 1 flows open, the limit is 1"
    assert start(hooks, flow(user=None, source="192.0.2.11")).allowed


def test_concurrent_limit_releases_only_flows_it_counted() -> None:
    hooks = example("concurrent_limit", max_flows=1)
    counted = flow()
    assert start(hooks, counted).allowed
    refused = flow()
    assert not start(hooks, refused).allowed
    hooks.flow_end(flow_record(refused))  # its end must not free a slot it never took
    assert not start(hooks, flow()).allowed
    hooks.flow_end(flow_record(counted))
    hooks.flow_end(flow_record(counted))  # reported twice by mistake: still one release
    assert start(hooks, flow()).allowed
    assert not start(hooks, flow()).allowed


def test_concurrent_limit_does_not_count_flows_the_policy_denied() -> None:
    hooks = example("concurrent_limit", allow_except("10.9.9.9"), max_flows=1)
    assert start(hooks, flow(host="10.9.9.9")) == Decision(False, "default", "no rule allows it")
    assert start(hooks, flow()).allowed


def test_concurrent_limit_overrides_and_the_edges_flow_table() -> None:
    hooks = example("concurrent_limit", max_flows=1, overrides={"robot": 3})
    # the edge reports each ended flow once, from its flow table, as an audit record
    table = FlowTable(100, reporters=[lambda f: hooks.flow_end(flow_record(f))])
    robot = [flow(user="robot") for _ in range(4)]
    for f in robot:
        table.admit(f)
    assert [start(hooks, f).allowed for f in robot] == [True, True, True, False]
    table.end(robot[3])
    table.end(robot[0])
    assert start(hooks, flow(user="robot")).allowed
    assert not start(hooks, flow(user="robot")).allowed
    assert errors(hooks) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "max_flows is required"),
        ({"max_flows": 0}, "max_flows must be a whole number >= 1, not 0"),
        ({"max_flows": "10"}, "max_flows must be a whole number"),
        ({"max_flows": True}, "max_flows must be a whole number"),
        ({"max_flows": 5, "max": 3}, "unknown options: max"),
        ({"max_flows": 5, "overrides": {"bob": -1}}, r"overrides\[bob\]"),
    ],
)
def test_concurrent_limit_refuses_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(HookLoadError, match=message):
        example("concurrent_limit", **options)


# -- office_hours ----------------------------------------------------------------------------


def office(**options: Any) -> tuple[Hooks, dict[str, Any]]:
    hooks = example("office_hours", **options)
    return hooks, module_globals(hooks, "office_hours")


def at(ns: dict[str, Any], *when: int) -> None:
    """Set the example's clock to this UTC time."""
    instant = dt.datetime(*when, tzinfo=dt.UTC)
    ns["now"] = lambda: instant


BERLIN = {"timezone": "Europe/Berlin", "days": ["mon", "tue", "wed", "thu", "fri"]}


def test_office_hours_allow_inside_and_deny_outside_in_their_timezone() -> None:
    hooks, ns = office(**BERLIN, hours="08:00-18:00")
    at(ns, 2026, 11, 30, 7, 30)  # Monday 08:30 in Berlin (CET, UTC+1)
    assert start(hooks, flow()).allowed
    at(ns, 2026, 11, 30, 17, 30)  # Monday 18:30 in Berlin
    assert start(hooks, flow()) == Decision(
        False,
        "hook:office_hours",
        "outside office hours (mon-fri 08:00-18:00 Europe/Berlin); it is mon 18:30 there",
    )
    at(ns, 2026, 12, 5, 10, 0)  # Saturday
    assert "it is sat 11:00 there" in start(hooks, flow()).reason


def test_office_hours_follow_the_zones_daylight_saving_time() -> None:
    hooks, ns = office(**BERLIN, hours="08:00-18:00")
    at(ns, 2026, 7, 6, 6, 30)  # Monday 08:30 CEST (UTC+2)
    assert start(hooks, flow()).allowed
    at(ns, 2026, 11, 30, 6, 30)  # Monday 07:30 CET (UTC+1)
    assert not start(hooks, flow()).allowed


def test_the_same_instant_is_judged_in_the_configured_zone() -> None:
    utc, ns_utc = office(days=["mon-fri"], hours="08:00-18:00")  # timezone defaults to UTC
    tokyo, ns_tokyo = office(timezone="Asia/Tokyo", days=["mon-fri"], hours="08:00-18:00")
    for ns in (ns_utc, ns_tokyo):
        at(ns, 2026, 11, 30, 2, 0)  # Monday 02:00 UTC, 11:00 in Tokyo
    assert not start(utc, flow()).allowed
    assert start(tokyo, flow()).allowed


def test_office_hours_only_restrict_the_identities_and_groups_in_scope() -> None:
    hooks, ns = office(**BERLIN, groups=["contractors"], identities=["temp-carol"])
    at(ns, 2026, 12, 5, 10, 0)  # Saturday
    assert not start(hooks, flow(user="alice", groups=frozenset({"contractors"}))).allowed
    assert not start(hooks, flow(user="temp-carol")).allowed
    assert start(hooks, flow(user="bob", groups=frozenset({"staff"}))).allowed
    assert start(hooks, flow(user=None)).allowed  # anonymous: not in scope


def test_office_hours_without_scope_restrict_anonymous_flows_too() -> None:
    hooks, ns = office(**BERLIN)
    at(ns, 2026, 12, 5, 10, 0)
    assert not start(hooks, flow(user=None)).allowed


def test_a_window_past_midnight_belongs_to_the_day_it_starts() -> None:
    hooks, ns = office(days=["fri"], hours="22:00-06:00")
    for when, allowed in [
        ((2026, 12, 4, 23, 0), True),  # Friday night
        ((2026, 12, 5, 5, 59), True),  # Saturday early: still Friday's window
        ((2026, 12, 5, 6, 0), False),  # the end is exclusive
        ((2026, 12, 4, 5, 0), False),  # Friday early: Thursday's window, not configured
        ((2026, 12, 5, 23, 0), False),  # Saturday night
    ]:
        at(ns, *when)
        assert start(hooks, flow()).allowed is allowed, when


def test_day_ranges_and_a_whole_day() -> None:
    hooks, ns = office(days=["fri-mon"], hours="00:00-24:00")
    for day, allowed in [(4, True), (5, True), (6, True), (7, True), (8, False), (3, False)]:
        at(ns, 2026, 12, day, 12, 0)  # 4 Dec 2026 is a Friday
        assert start(hooks, flow()).allowed is allowed, day
    at(ns, 2026, 12, 3, 23, 59)
    assert "(fri-mon 00:00-24:00 UTC)" in start(hooks, flow()).reason
    hooks, ns = office(days=["sat", "mon", "wed"])
    at(ns, 2026, 12, 3, 12, 0)
    assert "(mon,wed,sat 08:00-18:00 UTC)" in start(hooks, flow()).reason


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"timezone": "Mars/Olympus"}, "unknown timezone 'Mars/Olympus'"),
        ({"days": ["mon", "funday"]}, "'funday' is not a weekday"),
        ({"days": []}, "days must be a list"),
        ({"hours": "8-18"}, "hours start must be HH:MM"),
        ({"hours": "08:00"}, "hours must be"),
        ({"hours": "08:00-25:00"}, "is not a time of day"),
        ({"hours": "09:00-09:00"}, "empty window"),
        ({"groups": "contractors"}, "groups must be a list"),
        ({"timezones": "UTC"}, "unknown options: timezones"),
    ],
)
def test_office_hours_refuse_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(HookLoadError, match=message):
        example("office_hours", **options)


# -- pin_replica -----------------------------------------------------------------------------

DB = "1a2b3c4d-0000-4000-8000-00000000000d"
WEB = "5e6f7a8b-0000-4000-8000-00000000000e"
OTHER = "9c9c9c9c-0000-4000-8000-00000000000f"
ANY = Route("tunnel", "default", "t1", "corp", "corp.example")


def replicas(*ids: str) -> list[Route]:
    """What the router offers: the tunnel itself, then one Route per connected replica."""
    return [ANY, *(Route("tunnel", "default", "t1", "corp", "corp.example", i) for i in ids)]


def route(hooks: Hooks, f: Flow, candidates: list[Route]) -> Route | Deny:
    return asyncio.run(hooks.route(f, candidates))


def test_pin_replica_routes_matching_hosts_to_the_configured_replica() -> None:
    hooks = example("pin_replica", rules=[{"host": "*.db.corp.example", "replica": DB}])
    f = flow(host="Orders.DB.corp.example")
    assert route(hooks, f, replicas(WEB, DB, OTHER)).replica == DB
    assert f.annotations == {"replica": DB}
    other = flow(host="www.corp.example")
    assert route(hooks, other, replicas(WEB, DB)) == ANY  # no rule: the edge's choice
    assert other.annotations == {}


def test_pin_replica_accepts_the_logged_id_prefix_and_a_preference_list() -> None:
    hooks = example("pin_replica", rules=[{"host": "10.20.*", "replica": ["1A2B3C4D", WEB[:8]]}])
    assert route(hooks, flow(host="10.20.0.5"), replicas(WEB, DB)).replica == DB
    assert route(hooks, flow(host="10.20.0.5"), replicas(OTHER, WEB)).replica == WEB


def test_pin_replica_falls_back_to_any_replica_when_its_own_is_not_connected() -> None:
    hooks = example("pin_replica", rules=[{"host": "*.db.corp.example", "replica": DB}])
    f = flow(host="orders.db.corp.example")
    assert route(hooks, f, replicas(WEB, OTHER)) == ANY
    assert f.annotations == {"replica_fallback": f"{DB} not connected"}


def test_pin_replica_can_refuse_instead_of_falling_back() -> None:
    rules = [{"host": "*.db.corp.example", "replica": DB, "fallback": "deny"}]
    hooks = example("pin_replica", rules=rules)
    assert route(hooks, flow(host="orders.db.corp.example"), replicas(WEB)) == Deny(
        f"replica {DB} for orders.db.corp.example is not connected", "hook:pin_replica"
    )


def test_pin_replica_can_fall_back_to_a_stable_choice() -> None:
    rules = [{"host": "*", "replica": DB, "fallback": "stable"}]
    hooks = example("pin_replica", rules=rules)
    picks = {route(hooks, flow(), replicas(WEB, OTHER)).replica for _ in range(5)}
    assert len(picks) == 1 and picks <= {WEB, OTHER}


def test_stable_keeps_a_client_on_its_replica_and_spreads_clients() -> None:
    hooks = example("pin_replica", rules=[{"host": "*", "replica": "stable"}])
    sources = [f"192.0.2.{i}" for i in range(1, 101)]
    three = replicas(WEB, DB, OTHER)
    first = {s: route(hooks, flow(source=s), three).replica for s in sources}
    again = {s: route(hooks, flow(source=s), list(reversed(three))).replica for s in sources}
    assert first == again  # the same client, the same replica, whatever the order
    assert set(first.values()) == {WEB, DB, OTHER}
    # a replica going away moves only the clients it had
    without_other = {s: route(hooks, flow(source=s), replicas(WEB, DB)).replica for s in sources}
    assert all(without_other[s] == r for s, r in first.items() if r != OTHER)
    assert all(without_other[s] in (WEB, DB) for s in sources)


def test_stable_by_identity_follows_the_user_across_addresses() -> None:
    hooks = example("pin_replica", rules=[{"host": "*", "replica": "stable", "by": "identity"}])
    many = replicas(WEB, DB, OTHER)
    picks = {route(hooks, flow(user="alice", source=f"198.51.100.{i}"), many) for i in range(30)}
    assert len(picks) == 1


def test_the_first_matching_rule_is_used() -> None:
    rules = [
        {"host": "*.db.corp.example", "replica": DB},
        {"host": "*.corp.example", "replica": WEB},
    ]
    hooks = example("pin_replica", rules=rules)
    assert route(hooks, flow(host="a.db.corp.example"), replicas(WEB, DB)).replica == DB
    assert route(hooks, flow(host="a.corp.example"), replicas(WEB, DB)).replica == WEB


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "rules must be a non-empty list"),
        ({"rules": [{"host": "*"}]}, r"rules\[0\]: replica must be"),
        ({"rules": [{"replica": DB}]}, r"rules\[0\]: host must be a pattern"),
        ({"rules": [{"host": "*", "replica": "1a2b"}]}, "shorter than 8 characters"),
        ({"rules": [{"host": "*", "replica": DB, "fallback": "maybe"}]}, "fallback must be"),
        ({"rules": [{"host": "*", "replica": ["stable", DB]}]}, "cannot be mixed"),
        ({"rules": [{"host": "*", "replica": DB, "hosts": "x"}]}, "unknown keys hosts"),
    ],
)
def test_pin_replica_refuses_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(HookLoadError, match=message):
        example("pin_replica", **options)


# -- http_guard ------------------------------------------------------------------------------


def connect(hooks: Hooks, method: str, target: str, host: str, port: int) -> Reply | Deny | None:
    request = ProxyRequest(method, target, (("Host", target),))
    return asyncio.run(hooks.connect_request(flow(host=host, port=port, request=request), request))


def test_http_guard_answers_its_health_url_itself() -> None:
    hooks = example("http_guard")
    answer = connect(hooks, "GET", "http://EDGE.internal/health", "edge.internal", 80)
    assert answer == Reply(200, "ok", (("Cache-Control", "no-store"),))
    assert connect(hooks, "GET", "http://edge.internal/other", "edge.internal", 80) is None


def test_http_guard_blocks_smtp_ports_by_default() -> None:
    hooks = example("http_guard")
    assert connect(hooks, "CONNECT", "mail.example:25", "mail.example", 25) == Deny(
        "port 25 is blocked on this proxy", "hook:http_guard"
    )
    assert connect(hooks, "CONNECT", "mail.example:443", "mail.example", 443) is None


def test_http_guard_keeps_connect_to_the_listed_ports() -> None:
    hooks = example("http_guard", connect_ports=[443], health_url=None, blocked_ports=[])
    assert connect(hooks, "CONNECT", "db.corp:5432", "db.corp", 5432) == Deny(
        "CONNECT to port 5432 is not allowed (only to 443)", "hook:http_guard"
    )
    assert connect(hooks, "CONNECT", "db.corp:443", "db.corp", 443) is None
    assert connect(hooks, "GET", "http://db.corp:5432/", "db.corp", 5432) is None  # not CONNECT
    assert connect(hooks, "GET", "http://edge.internal/health", "edge.internal", 80) is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"health_url": "https://edge.internal/health"}, "must be an http:// URL"),
        ({"blocked_ports": [0]}, "blocked_ports must be a list of port numbers"),
        ({"connect_ports": "443"}, "connect_ports must be a list"),
    ],
)
def test_http_guard_refuses_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(HookLoadError, match=message):
        example("http_guard", **options)


def test_pin_replica_with_the_routers_own_candidates() -> None:
    async def resolve(host: str, port: int) -> str:
        return "10.1.2.3"

    connected = [DB, WEB]
    r = Router(resolve, replicas=lambda tunnel_id: list(connected))
    r.tables = VnetRoutes(
        [RouteEntry(ipaddress.ip_network("10.0.0.0/8"), "t1", "corp", "default")]
    ).tables
    hooks = example("pin_replica", rules=[{"host": "orders.db.corp.example", "replica": DB}])

    async def routed() -> Route | Deny:
        f = flow(host="orders.db.corp.example")
        return await hooks.route(f, await r.candidates(f, "default", replicas=hooks.has("route")))

    chosen = asyncio.run(routed())
    assert isinstance(chosen, Route) and (chosen.tunnel_name, chosen.replica) == ("corp", DB)
    connected.remove(DB)
    chosen = asyncio.run(routed())
    assert isinstance(chosen, Route) and (chosen.tunnel_name, chosen.replica) == ("corp", None)
