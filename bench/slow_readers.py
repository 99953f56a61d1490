"""Memory that slow readers cost the edge and the connector, measured on the namespace lab.

    python -m bench.slow_readers [--flows N] [--budget BYTES]

Each slow reader opens a SOCKS5 flow to an origin that sends a large body, then never reads.
Prints the resident memory each role gains per stalled flow, (RSS with N stalled flows - RSS
idle) / N, and the flow-memory gauges. `--budget` sets `--flow-memory-budget` on both roles.

Needs root (network namespaces). Traffic stays inside the lab's namespaces.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import tempfile
import time
from pathlib import Path

from bench.servers import start_in
from bench.tcp_tunnel import BASE_PORT, rss_kib, socks5_handshake
from ramp.testing.lab import EDGE_PUBLIC_ADDR, ORIGIN, SOCKS_PORT, Lab

BODY = 1 << 30  # far more than any window: the origin always has more to send
SETTLE_ROUNDS = 30  # at most this many 0.5 s rounds for RSS to stop growing


def settled_rss(pids: tuple[int, int]) -> tuple[int, int]:
    """RSS of both processes once it stopped growing (or after SETTLE_ROUNDS)."""
    last = rss_kib(pids[0]), rss_kib(pids[1])
    for _ in range(SETTLE_ROUNDS):
        time.sleep(0.5)
        now = rss_kib(pids[0]), rss_kib(pids[1])
        if all(n - b < 256 for n, b in zip(now, last, strict=True)):
            return now
        last = now
    return last


def gauge(lab_process: object, name: str) -> float | None:
    metrics = lab_process.metrics()  # type: ignore[attr-defined]
    return metrics.value(name) if metrics.has(name) else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=300, help="slow readers (bounded: 1..1000)")
    ap.add_argument("--budget", type=int, default=None, help="flow_memory_budget for both roles")
    args = ap.parse_args()
    flows = max(1, min(args.flows, 1000))
    extra: tuple[str, ...] = ()
    if args.budget is not None:
        extra = ("--flow-memory-budget", str(args.budget))

    results: dict[str, float | None] = {"flows": flows}
    with tempfile.TemporaryDirectory(prefix="ramp-bench-") as tmp, Lab(Path(tmp)) as lab:
        start_in(lab.private, ORIGIN, BASE_PORT)
        lab.start_standard(
            connector_args=("--log-level", "warning", *extra),
            edge_args=("--log-level", "warning", "--audit-log", "/dev/null", *extra),
        )
        assert lab.edge is not None
        pids = lab.edge.pid, lab.connectors[0].pid
        # warm up: one full flow so code paths and the QUIC connection are in place
        s = lab.client.socket()
        s.connect((EDGE_PUBLIC_ADDR, SOCKS_PORT))
        socks5_handshake(s, ORIGIN, BASE_PORT)
        s.sendall(struct.pack("!Q", 1 << 20))
        while s.recv(1 << 16):
            pass
        s.close()
        before = settled_rss(pids)
        held: list[socket.socket] = []
        try:
            for _ in range(flows):
                s = lab.client.socket()
                # a small receive buffer: the client really does not read
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.connect((EDGE_PUBLIC_ADDR, SOCKS_PORT))
                socks5_handshake(s, ORIGIN, BASE_PORT)
                s.sendall(struct.pack("!Q", BODY))
                held.append(s)
            after = settled_rss(pids)
            for role, p in (("edge", lab.edge), ("connector", lab.connectors[0])):
                for name in ("ramp_flow_memory_reserved_bytes", "ramp_flow_memory_budget_bytes"):
                    results[f"{role}_{name}"] = gauge(p, name)
        finally:
            for s in held:
                s.close()
        for i, role in enumerate(("edge", "connector")):
            results[f"rss_idle_{role}_KiB"] = before[i]
            results[f"rss_stalled_{role}_KiB"] = after[i]
            results[f"rss_per_flow_{role}_KiB"] = (after[i] - before[i]) / flows

    budget = "default" if args.budget is None else args.budget
    print(f"slow readers: {flows} flows, budget {budget}")
    for role in ("edge", "connector"):
        print(
            f"  {role:9} {results[f'rss_per_flow_{role}_KiB']:8.1f} KiB/flow "
            f"(RSS {results[f'rss_idle_{role}_KiB']} -> {results[f'rss_stalled_{role}_KiB']} KiB)"
        )
    print(json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
