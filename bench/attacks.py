"""The legitimate client's latency during each attack of the attack suite, against no attack.

    python -m bench.attacks [--seconds S]

One lab, one edge and connector (set up so every attack applies: direct egress allowed, a
resolver that never answers, a connector that dials the blackhole for a minute). For each
phase the legitimate client (`ramp.testing.attack.LegitClient`, from its own source address)
fetches through SOCKS5, the HTTP proxy and UDP for at least S seconds while the attack repeats
in waves; printed per kind: p50 and p99 in ms, their ratio to the phase without an attack, and
failed requests. The last phase runs the edge again under a 1,024-descriptor limit.

Needs root (network namespaces). Traffic stays inside the lab's namespaces.
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ramp.testing.attack import (
    KINDS,
    Ask,
    FloodInBackground,
    LegitClient,
    SlowHandshakes,
    Summary,
)
from ramp.testing.lab import (
    BLACKHOLE,
    EDGE_METRICS_PORT,
    HTTP_PORT,
    ORIGIN_PREFIX,
    UPSTREAM_DNS_ADDR,
    Lab,
)

SILENT_RESOLVER = "127.0.0.54"
EDGE_ARGS = (
    "--log-level",
    "error",  # the attacks make the edge say a lot; the bench measures, not logs
    "--audit-log",
    "/dev/null",
    "--connect-timeout",
    "12",
    "--allow-direct-egress",
    "--resolve-timeout",
    "10",
    "--resolve-max-concurrent",
    "16",
)
CONNECTOR_ARGS = ("--log-level", "error", "--connect-timeout", "60")
FD_LIMIT = 1024


def waves(lab: Lab, make: Callable[[], list[Ask]], leave: bool = False) -> Callable[[float], None]:
    """An attack that sends `make()` at once, again and again, until the time is up."""

    def run(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            FloodInBackground(lab, make(), leave=leave).join()

    return run


def slow_handshakes(lab: Lab) -> Callable[[float], None]:
    def run(seconds: float) -> None:
        attack = SlowHandshakes(lab, 1200)
        try:
            time.sleep(seconds)
        finally:
            attack.stop()

    return run


def measure(lab: Lab, attack: Callable[[float], None] | None, seconds: float) -> Summary:
    legit = LegitClient(lab).start()
    try:
        legit.wait_requests(2)  # warm
        if attack is None:
            time.sleep(seconds)
        else:
            attack(seconds)
    finally:
        summary = legit.stop()
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="least duration of each phase")
    args = ap.parse_args()

    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="ramp-bench-") as tmp, Lab(Path(tmp)) as lab:
        silent = lab.edge_ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind((SILENT_RESOLVER, 53))  # takes every query, answers none
        lab.edge_ns.set_etc_file("resolv.conf", f"nameserver {SILENT_RESOLVER}\n")
        lab.start_upstream_dns()
        token = lab.create_tunnel("corp", [ORIGIN_PREFIX])
        lab.start_edge(*EDGE_ARGS)
        lab.start_connector(token, *CONNECTOR_ARGS, "--max-streams-per-connection", "100")
        lab.wait_tunnel_connections("corp", 4)
        lab.add_client_address()

        blackhole = [Ask("socks5", BLACKHOLE, HTTP_PORT)] * 500
        names = [Ask("socks5", f"n{i}.never.example", HTTP_PORT) for i in range(200)]
        own = [
            Ask(via, host, port)
            for via in ("socks5", "http")
            for host, port in (
                (UPSTREAM_DNS_ADDR, 53),
                ("127.0.0.1", EDGE_METRICS_PORT),
                ("169.254.169.254", 80),
                ("::ffff:127.0.0.1", 53),
            )
        ] * 25
        phases: list[tuple[str, Callable[[float], None] | None]] = [
            ("no attack", None),
            ("500 CONNECTs to a blackhole", waves(lab, lambda: blackhole)),
            ("500 CONNECTs that leave at once", waves(lab, lambda: blackhole, leave=True)),
            ("200 names, silent resolver", waves(lab, lambda: names)),
            ("200 direct dials to the edge's own", waves(lab, lambda: own)),
        ]
        for name, attack in phases:
            results[name] = _row(measure(lab, attack, args.seconds))

        # the same edge again, under a low descriptor limit
        assert lab.edge is not None
        lab.edge.stop()
        lab.start_edge(*EDGE_ARGS, wrapper=("prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}"))
        lab.wait_tunnel_connections("corp", 4, timeout=60)
        name = f"no attack, {FD_LIMIT} fds"
        results[name] = _row(measure(lab, None, args.seconds))
        name = f"1200 slow handshakes, {FD_LIMIT} fds"
        results[name] = _row(measure(lab, slow_handshakes(lab), args.seconds))
        silent.close()

    base = results["no attack"]
    print(f"legitimate client latency (ms), each phase >= {args.seconds:g} s; ratio to no attack")
    print(
        f"  {'phase':40} {'kind':7} {'p50':>8} {'p99':>9} {'x p50':>7} {'x p99':>7} {'ok':>5} fail"
    )
    for phase, row in results.items():
        for kind in KINDS:
            r = row[kind]
            r["p50_ratio"] = r["p50_ms"] / base[kind]["p50_ms"]
            r["p99_ratio"] = r["p99_ms"] / base[kind]["p99_ms"]
            print(
                f"  {phase:40} {kind:7} {r['p50_ms']:8.1f} {r['p99_ms']:9.1f} "
                f"{r['p50_ratio']:7.2f} {r['p99_ratio']:7.2f} {r['ok']:5.0f} {r['failed']:.0f}"
            )
    print(json.dumps(results, sort_keys=True, default=lambda x: None))
    return 0


def _row(summary: Summary) -> dict[str, dict[str, float]]:
    return {
        kind: {
            "p50_ms": s.p50 * 1000 if not math.isnan(s.p50) else math.inf,
            "p99_ms": s.p99 * 1000 if not math.isnan(s.p99) else math.inf,
            "ok": s.ok,
            "failed": s.failed,
        }
        for kind, s in summary.kinds.items()
    }


if __name__ == "__main__":
    raise SystemExit(main())
