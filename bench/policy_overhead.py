"""What policy rules, virtual networks and Python hooks cost per flow, measured in one run.

    python -m bench.policy_overhead [--seconds S] [--rounds N] [--rules N] [--vnets N]

On the namespace lab of bench/tcp_tunnel.py (client -> SOCKS5 -> edge -> QUIC tunnel ->
connector -> origin), flow setups per second (SOCKS5 login + CONNECT, one byte each way,
close; 32 at a time) for three edges, each started fresh on its own copy of one store:

- none:  the store as `ramp` creates it: rule `default` (allow), the `default` vnet only;
- rules: --rules policy rules (per-user, per-destination-CIDR, group, host name and host
         pattern, source rules) with the one that allows the benchmark's flows LAST, and
         --vnets virtual networks with routes; the benchmark's user is assigned to one of them;
- hook:  the store of `none` and one no-op sync hook (flow_start returns None, flow_end
         does nothing).

Each edge is measured in two phases: `same` (every flow to one destination: after the first
flow the policy decision comes from its memo) and `distinct` (every flow to its own address
in 10.77.0.0/16, which the private namespace answers on: no decision is memoised, so each flow
pays the full rule matching). The configurations run interleaved, round after round.

Besides setups/s it prints the edge's CPU time per flow (from /proc), which the other
processes sharing the machine disturb less, and in-process timings (timeit, no network) of
`Hooks.flow_start`, `Hooks.flow_end` and `Policy.decide`, the precise figures for the hook and
the rule matching.

Needs root (network namespaces). The namespaces are removed on every exit (end, error,
Ctrl-C, SIGTERM, --max-seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import timeit
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.flow_path import run_to_end
from bench.servers import start_in
from bench.tcp_tunnel import BASE_PORT, CONCURRENCY, cpu_seconds, setups
from ramp.flows.flow import Destination, Flow, Identity
from ramp.observe.audit import flow_record
from ramp.policy.engine import PolicyHook, facts_of
from ramp.policy.hooks import Hooks, HookSpec, load_hooks
from ramp.policy.rules import Policy, Rule, validate
from ramp.store.db import Store
from ramp.testing.lab import CLIENT_ADDR, ORIGIN_PREFIX, Lab

USER, PASSWORD = "bench", "bench-pw"
GROUPS = {"team-1": [USER, "user-1"], "team-2": [USER, "user-2"], "ops": ["user-3"]}
ANY_IP_NET = "10.77.0.0/16"  # answered by the private namespace on every address
SAME_DEST = ("10.77.0.1", BASE_PORT + 1)
TUNNEL = "corp"
PHASES = ("same", "distinct")
CONFIGS = ("none", "rules", "hook")
NOOP_HOOK = "def flow_start(flow):\n    return None\n\n\ndef flow_end(record):\n    pass\n"


# --- the store contents ----------------------------------------------------------------------


def policy_rules(count: int) -> list[Rule]:
    """`count` rules a real deployment might have; only the last allows the benchmark user
    to 10.77.0.0/16, and several before it look at the same user, groups or destination."""
    last = Rule("bench-last", "allow", identity=USER, to=ANY_IP_NET, ports=str(BASE_PORT + 1))
    rules: list[Rule] = [
        # about the benchmark's user or destination, but not matching its flows
        Rule("bench-ssh", "deny", identity=USER, to=ANY_IP_NET, ports="22"),
        Rule("bench-udp", "allow", identity=USER, to=ANY_IP_NET, protocol="udp"),
        Rule("bench-other", "allow", identity=USER, to="10.78.0.0/16", ports="443"),
        Rule("bench-http", "allow", identity=USER, onramp="http", to=ANY_IP_NET),
        Rule("other-77", "allow", identity="user-9", to=ANY_IP_NET),
        Rule("dst-77-ssh", "deny", to=ANY_IP_NET, ports="22"),
        Rule("dst-77-host", "deny", to="10.77.0.2/32"),
        Rule("team1-77", "allow", group="team-1", to=ANY_IP_NET, ports="8443"),
        Rule("team2-77", "allow", group="team-2", to=ANY_IP_NET, protocol="udp"),
    ]
    # hostname rules: exact names (indexed) and patterns (looked at for every flow)
    rules += [
        Rule(f"host-{k}", "allow", to=f"db-{k}.corp.example", ports="5432") for k in range(10)
    ]
    rules += [
        Rule(f"pat-{k}", "allow", to=f"*.svc-{k}.corp.example", ports="443") for k in range(10)
    ]
    rules += [
        Rule(f"gpat-{k}", "allow", group="team-1", to=f"*.team-{k}.corp.example") for k in range(5)
    ]
    # source rules (no destination: looked at for every flow)
    rules += [Rule(f"src-{k}", "deny", source=f"100.64.{k}.0/24") for k in range(5)]
    # group rules
    rules += [
        Rule(f"grp-{k}", "allow", group=f"team-{k}", to=f"10.200.{k}.0/24", ports="443")
        for k in range(10)
    ]
    # per-destination rules of several prefix lengths
    n_dest = max(0, (count - len(rules) - 1) // 5)
    lengths = (16, 20, 24, 28, 32)
    for j in range(n_dest):
        plen = lengths[j % len(lengths)]
        net = ipaddress.ip_network((f"172.{16 + j % 16}.{(j * 7) % 256}.0", plen), strict=False)
        action, ports = ("deny", "22") if j % 3 == 0 else ("allow", "80,443,8000-8100")
        rules.append(Rule(f"dst-{j}", action, to=str(net), ports=ports))
    # per-user rules: allow user-N to 10.N.0.0/16-style networks on 443
    i = 0
    while len(rules) < count - 1:
        rules.append(
            Rule(
                f"user-{i}",
                "allow",
                identity=f"user-{i}",
                to=f"10.{i // 256}.{i % 256}.0/24",
                ports="443",
            )
        )
        i += 1
    return [validate(r) for r in [*rules, last][-count:]] if count else []


def fill_store(store: Store, n_rules: int, n_vnets: int) -> str | None:
    """The rules (replacing `default`) and vnets; returns the vnet the user is put in."""
    if n_rules:
        store.delete_rule("default")
        for rule in policy_rules(n_rules):
            store.add_rule(rule)
    if not n_vnets:
        return None
    sites = [store.create_tunnel(f"site-{k}").name for k in range(10)]
    mine = f"tenant-{n_vnets // 2:03d}"
    for k in range(n_vnets):
        name = f"tenant-{k:03d}"
        store.add_vnet(name)
        # tenants reuse the same private ranges, each in its own vnet
        for cidr in ("10.0.0.0/8", "172.16.0.0/12", f"192.168.{k}.0/24", "100.64.0.0/10"):
            store.add_route(cidr, sites[k % len(sites)], vnet=name)
        store.add_route(ANY_IP_NET, TUNNEL if name == mine else sites[k % len(sites)], vnet=name)
        store.assign_vnet(name, f"user-{k}")
    store.assign_vnet(mine, USER)
    return mine


# --- in-process timings ----------------------------------------------------------------------


def _per_call(fn: Callable[[], object], number: int) -> float:
    """Microseconds of CPU per call: the best of five batches."""
    return min(timeit.repeat(fn, timer=time.process_time, number=number, repeat=5)) / number * 1e6


def _paired(a: Callable[[], object], b: Callable[[], object], number: int) -> tuple[float, float]:
    """Microseconds of CPU per call of `a` and of `b` (process time: the other processes on
    the machine do not count), batches alternating so that drift hits both alike; the best
    of 11 batches each."""
    ta, tb = [], []
    for _ in range(11):
        ta.append(timeit.timeit(a, timer=time.process_time, number=number))
        tb.append(timeit.timeit(b, timer=time.process_time, number=number))
    return min(ta) / number * 1e6, min(tb) / number * 1e6


def _flow(address: str) -> Flow:
    return Flow(
        "socks5",
        (CLIENT_ADDR, 40000),
        Destination(address, BASE_PORT + 1),
        Identity(USER, frozenset({"team-1", "team-2"})),
    )


def in_process(n_rules: int, hook_file: Path, number: int) -> dict[str, float]:
    out: dict[str, float] = {}
    flow = _flow(SAME_DEST[0])
    flow.resolved = SAME_DEST[0]
    none_policy = PolicyHook(Policy(default_rules()))
    plain = Hooks([none_policy.as_hook()], 0.05)
    with_noop = Hooks([none_policy.as_hook(), *load_hooks([HookSpec(str(hook_file))])], 0.05)
    assert run_to_end(with_noop.flow_start(flow)).allowed
    (
        out["hooks_flow_start_policy_only_us"],
        out["hooks_flow_start_policy_noop_us"],
    ) = _paired(
        lambda: run_to_end(plain.flow_start(flow)),
        lambda: run_to_end(with_noop.flow_start(flow)),
        number,
    )
    record = flow_record(flow)
    out["hooks_flow_end_none_us"], out["hooks_flow_end_noop_us"] = _paired(
        lambda: plain.flow_end(record), lambda: with_noop.flow_end(record), number
    )
    out["noop_hook_us"] = (
        out["hooks_flow_start_policy_noop_us"]
        - out["hooks_flow_start_policy_only_us"]
        + out["hooks_flow_end_noop_us"]
        - out["hooks_flow_end_none_us"]
    )

    big = PolicyHook(Policy(policy_rules(n_rules)))
    assert big.verdict(flow).rule == "bench-last"
    for label, hook in (("none", none_policy), ("rules", big)):
        same = facts_of(flow)
        hook.policy.decide(same)
        out[f"policy_{label}_memo_hit_us"] = _per_call(
            lambda h=hook, x=same: h.policy.decide(x), number
        )
        # misses: a fresh destination every call, the memo emptied first
        flows = [_flow(str(ipaddress.IPv4Address(0x0A4D0000 + 1 + i))) for i in range(number)]
        for f in flows:
            f.resolved = f.destination.host
        facts = [facts_of(f) for f in flows]
        best = float("inf")
        for _ in range(5):
            hook.policy._cache.clear()
            t0 = time.process_time()
            for x in facts:
                hook.policy.decide(x)
            best = min(best, time.process_time() - t0)
        out[f"policy_{label}_memo_miss_us"] = best / number * 1e6
    out["facts_of_us"] = _per_call(lambda: facts_of(flow), number)
    return out


def default_rules() -> list[Rule]:
    """What a new store holds: one rule `default` allowing everything."""
    return [Rule("default", "allow")]


# --- the lab runs ----------------------------------------------------------------------------


def distinct_destinations() -> Iterator[tuple[str, int]]:
    base = int(ipaddress.IPv4Address("10.77.1.0"))
    i = 0
    while True:
        yield str(ipaddress.IPv4Address(base + i % 65000)), BASE_PORT + 1
        i += 1


def measure(
    lab: Lab, edge_pid: int, phase: str, seconds: float, dests: Iterator[tuple[str, int]]
) -> dict[str, float]:
    target: Any = SAME_DEST if phase == "same" else (lambda: next(dests))
    cpu0, t0 = cpu_seconds(edge_pid), time.perf_counter()
    ok, bad = asyncio.run(setups(lab.client.sockets, target, True, seconds, auth=(USER, PASSWORD)))
    cpu1, t1 = cpu_seconds(edge_pid), time.perf_counter()
    return {
        "setups_per_s": ok / seconds,
        "failed": bad,
        "edge_cpu_us_per_flow": (cpu1 - cpu0) / max(ok, 1) * 1e6,
        "edge_cpu_share": (cpu1 - cpu0) / (t1 - t0),
    }


def run_config(
    lab: Lab,
    store_dir: Path,
    extra: list[str],
    seconds: float,
    dests: Iterator[tuple[str, int]],
    profile: Path | None,
) -> dict[str, dict[str, float]]:
    lab.data_dir = store_dir
    edge = lab.start_edge("--log-level", "warning", "--audit-log", "/dev/null", *extra)
    conn = lab.start_connector(lab.tokens[TUNNEL], "--log-level", "warning", "--grace-period", "0")
    try:
        lab.wait_tunnel_connections(TUNNEL, 4)
        asyncio.run(setups(lab.client.sockets, SAME_DEST, True, 0.5, auth=(USER, PASSWORD)))
        result = {}
        for phase in PHASES:
            spy = None
            if profile is not None and phase == "distinct":
                spy = subprocess.Popen(
                    [
                        "py-spy",
                        "record",
                        "--pid",
                        str(edge.pid),
                        "--format",
                        "raw",
                        "--gil",  # leaves out the event loop waiting in epoll
                        "--rate",
                        "250",
                        "--duration",
                        str(int(seconds)),
                        "-o",
                        str(profile),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            result[phase] = measure(lab, edge.pid, phase, seconds, dests)
            if spy is not None:
                spy.wait(seconds + 30)
        return result
    finally:
        conn.stop()
        edge.stop()
        lab.connectors.remove(conn)


def _range(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{lo:{fmt}}-{hi:{fmt}}"


def _med_range(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({_range(values, fmt)})"


def report(
    runs: dict[str, dict[str, list[dict[str, float]]]], local: dict[str, float], args: Any
) -> dict[str, Any]:
    label = {
        "none": "none (rule default, 1 vnet)",
        "rules": f"{args.rules} rules + {args.vnets} vnets",
        "hook": "no-op sync hook",
    }
    summary: dict[str, Any] = {"in_process": local, "runs": runs}
    print(
        f"flow setups: SOCKS5 login + CONNECT + 1 byte each way, {CONCURRENCY} concurrent, "
        f"{args.seconds:g} s a phase, {args.rounds} rounds interleaved; ranges over rounds, "
        "ratios paired within a round"
    )
    for phase in PHASES:
        memo = "memo hit" if phase == "same" else "memo miss: a new destination every flow"
        print(f"\nphase {phase} ({memo})")
        print(
            f"  {'config':30} {'setups/s: median (range)':>26} {'x none: median (range)':>24} "
            f"{'edge CPU µs/flow':>22}"
        )
        base = runs["none"][phase]
        for cfg in CONFIGS:
            rs = runs[cfg][phase]
            rates = [r["setups_per_s"] for r in rs]
            cpu = [r["edge_cpu_us_per_flow"] for r in rs]
            ratios = [r["setups_per_s"] / b["setups_per_s"] for r, b in zip(rs, base, strict=True)]
            summary[f"{cfg}_{phase}_ratio"] = (min(ratios), statistics.median(ratios), max(ratios))
            print(
                f"  {label[cfg]:30} {_med_range(rates, '.0f'):>26} {_med_range(ratios, '.2f'):>24} "
                f"{_med_range(cpu, '.0f'):>22}"
            )
            fails = sum(r["failed"] for r in rs)
            if fails:
                print(f"  {'':30} ({fails:.0f} failed setups)")
        hook = runs["hook"][phase]
        cost = [
            (1 / h["setups_per_s"] - 1 / b["setups_per_s"]) * 1e6
            for h, b in zip(hook, base, strict=True)
        ]
        cpu_cost = [
            h["edge_cpu_us_per_flow"] - b["edge_cpu_us_per_flow"]
            for h, b in zip(hook, base, strict=True)
        ]
        summary[f"hook_cost_{phase}_us"] = cost
        print(
            f"  no-op hook per flow: 1/rate_hook - 1/rate_none = {_med_range(cost, '.0f')} µs; "
            f"edge CPU difference {_med_range(cpu_cost, '.0f')} µs"
        )
    print("\nin-process (timeit of CPU time, best of 5 or 11 batches, no network)")
    for key, what in (
        ("hooks_flow_start_policy_only_us", "Hooks.flow_start, policy only"),
        ("hooks_flow_start_policy_noop_us", "Hooks.flow_start, policy + no-op hook"),
        ("hooks_flow_end_none_us", "Hooks.flow_end, no hook"),
        ("hooks_flow_end_noop_us", "Hooks.flow_end, no-op hook"),
        ("noop_hook_us", "=> a no-op sync hook costs, per flow"),
    ):
        print(f"  {what:40} {local[key]:7.2f} µs")
    for cfg, what in (("none", "rule default"), ("rules", f"{args.rules} rules")):
        print(
            f"  Policy.decide, {what:12} memo hit {local[f'policy_{cfg}_memo_hit_us']:6.2f} µs, "
            f"miss {local[f'policy_{cfg}_memo_miss_us']:6.2f} µs"
        )
    print(f"  facts_of(flow), what a decision looks at   {local['facts_of_us']:6.2f} µs")
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=3.0, help="duration of each phase")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over the configurations")
    ap.add_argument("--rules", type=int, default=1000, help="policy rules of config `rules`")
    ap.add_argument("--vnets", type=int, default=100, help="virtual networks of config `rules`")
    ap.add_argument("--timeit-number", type=int, default=20000, help="calls per timeit batch")
    ap.add_argument(
        "--profile",
        type=Path,
        help="directory: py-spy raw profiles of the edge in each `distinct` phase",
    )
    ap.add_argument(
        "--max-seconds", type=float, default=900, help="give up (and clean up) after this long"
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.rules < 1 and args.rules != 0:
        ap.error("--rules must be 0 or more")

    def give_up(signum: int, frame: object) -> None:
        raise SystemExit(f"stopped by signal {signum} (or --max-seconds): cleaning up")

    signal.signal(signal.SIGTERM, give_up)
    signal.signal(signal.SIGALRM, give_up)
    signal.setitimer(signal.ITIMER_REAL, args.max_seconds)

    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        c: {p: [] for p in PHASES} for c in CONFIGS
    }
    with tempfile.TemporaryDirectory(prefix="ramp-bench-") as tmp_s:
        tmp = Path(tmp_s)
        hook_file = tmp / "noop_hook.py"
        hook_file.write_text(NOOP_HOOK)
        local = in_process(args.rules, hook_file, args.timeit_number)
        config = tmp / "edge.yaml"
        config.write_text(
            json.dumps({"users": {USER: PASSWORD}, "groups": GROUPS})  # JSON is YAML
        )
        with Lab(tmp / "lab", private_dns=False) as lab:
            lab.private.ip("route", "add", "local", ANY_IP_NET, "dev", "lo")
            start_in(lab.private, "0.0.0.0", BASE_PORT)
            lab.create_tunnel(TUNNEL, [ORIGIN_PREFIX, ANY_IP_NET])
            stores = {name: tmp / f"store-{name}" for name in ("none", "rules")}
            for path in stores.values():
                shutil.copytree(lab.data_dir, path)
            t0 = time.perf_counter()
            with Store(stores["rules"]) as store:
                vnet = fill_store(store, args.rules, args.vnets)
                n_rules = len(store.list_rules())
                n_routes = len(store.list_routes())
            print(
                f"store `rules`: {n_rules} rules, {args.vnets} vnets + default, {n_routes} "
                f"routes, user {USER} in vnet {vnet or 'default'} "
                f"(filled in {time.perf_counter() - t0:.1f} s)",
                flush=True,
            )
            extras = {
                "none": (stores["none"], ["--config", str(config)]),
                "rules": (stores["rules"], ["--config", str(config)]),
                "hook": (stores["none"], ["--config", str(config), "--hooks", str(hook_file)]),
            }
            dests = distinct_destinations()
            for rnd in range(args.rounds):
                order = CONFIGS if rnd % 2 == 0 else tuple(reversed(CONFIGS))
                for cfg in order:
                    store_dir, extra = extras[cfg]
                    prof = None
                    if args.profile is not None:
                        args.profile.mkdir(parents=True, exist_ok=True)
                        prof = args.profile / f"edge-{cfg}-round{rnd + 1}.txt"
                    got = run_config(lab, store_dir, extra, args.seconds, dests, prof)
                    for phase, r in got.items():
                        runs[cfg][phase].append(r)
                    print(
                        f"round {rnd + 1} {cfg:5}: "
                        + ", ".join(
                            f"{p} {r['setups_per_s']:.0f}/s ({r['edge_cpu_us_per_flow']:.0f} µs "
                            f"edge CPU/flow, {r['failed']:.0f} failed)"
                            for p, r in got.items()
                        ),
                        flush=True,
                    )
    signal.setitimer(signal.ITIMER_REAL, 0)
    summary = report(runs, local, args)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
