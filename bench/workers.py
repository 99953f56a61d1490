"""One process against two: `--workers 1` and `--workers 2` on both roles, in one run on the
namespace lab.

    python -m bench.workers [--seconds S] [--bytes N] [--streams K] [--runs R]

For each worker count (the edge and the connector both run that many workers; the connector
holds 4 tunnel connections, spread over the edge's workers by the kernel):

- flow setups/s through the SOCKS5 on-ramp (connect, one byte each way, close; 32 at a time,
  from two load processes so the client is not the limit), and the failures;
- aggregate bulk MB/s of K parallel downloads of N bytes each;
- CPU the edge and the connector (all their processes) spent per flow setup;
- how many flows moved between edge workers (a worker without a connection of the tunnel
  hands the client's socket to one with a connection).

The ratio row divides two workers by one. Bar for this stage (issue "Restarts that drop
nothing, and more than one core"): 2 workers give at least 1.3x the setups/s of one. Needs
root (network namespaces). Traffic stays inside the lab; bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.servers import start_in
from bench.tcp_tunnel import BASE_PORT, MB, cpu_seconds, setups, socks5_handshake
from ramp.testing.lab import EDGE_PUBLIC_ADDR, ORIGIN, SOCKS_PORT, Lab, LabProcess

LOADERS = 2  # load processes for the setup test


def _pids(proc: LabProcess | None) -> set[int]:
    return proc.group_pids() if proc is not None else set()


def _cpu(pids: set[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except (OSError, IndexError):
            pass  # gone
    return total


def load_main(seconds: float) -> int:
    """One load process, run in the client namespace: prints its completed and failed."""
    ok, bad = asyncio.run(
        setups(
            lambda n: [socket.socket() for _ in range(n)],
            (ORIGIN, BASE_PORT + 1),
            True,
            seconds,
        )
    )
    print(json.dumps({"ok": ok, "failed": bad}))
    return 0


def setup_rate(lab: Lab, seconds: float) -> tuple[float, int]:
    procs = [
        lab.client.popen(
            [sys.executable, "-m", "bench.workers", "--load", str(seconds)],
            stdout=subprocess.PIPE,
            env=lab.env,
        )
        for _ in range(LOADERS)
    ]
    ok = bad = 0
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 60)
        got = json.loads(out.decode().strip().splitlines()[-1])
        ok, bad = ok + got["ok"], bad + got["failed"]
    return ok / seconds, bad


def download(lab: Lab, nbytes: int) -> None:
    s = lab.client.socket()
    try:
        s.connect((EDGE_PUBLIC_ADDR, SOCKS_PORT))
        socks5_handshake(s, ORIGIN, BASE_PORT)
        s.sendall(struct.pack("!Q", nbytes))
        got = 0
        while got < nbytes:
            chunk = s.recv(1 << 20)
            if not chunk:
                raise RuntimeError(f"download ended after {got} of {nbytes} bytes")
            got += len(chunk)
    finally:
        s.close()


def bulk_rate(lab: Lab, streams: int, nbytes: int) -> float:
    errors: list[BaseException] = []

    def one() -> None:
        try:
            download(lab, nbytes)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(streams)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    elapsed = time.monotonic() - start
    if errors:
        raise RuntimeError(f"{len(errors)} downloads failed: {errors[0]}")
    return streams * nbytes / elapsed / MB


def measure(workers: int, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="ramp-bench-") as tmp, Lab(Path(tmp)) as lab:
        start_in(lab.private, ORIGIN, BASE_PORT)
        lab.start_standard(
            edge_args=(
                "--workers",
                str(workers),
                "--log-level",
                "warning",
                "--audit-log",
                "/dev/null",
            ),
            connector_args=("--workers", str(workers), "--log-level", "warning"),
            ha_connections=4,
        )
        lab.wait_tunnel_connections("corp", 4)
        assert lab.edge is not None
        edge, connector = lab.edge, lab.connectors[0]
        bulk_rate(lab, 2, 16 * MB)  # warm up
        r: dict[str, float] = {"workers": workers}
        edge_pids, connector_pids = _pids(edge), _pids(connector)
        e0, c0 = _cpu(edge_pids), _cpu(connector_pids)
        r["setups_per_s"], failed = setup_rate(lab, args.seconds)
        r["setups_failed"] = failed
        flows = r["setups_per_s"] * args.seconds
        e1, c1 = _cpu(edge_pids), _cpu(connector_pids)
        r["cpu_us_per_setup"] = (e1 - e0 + c1 - c0) / max(flows, 1) * 1e6
        # cores each role kept busy during the setup test (the load processes use the rest)
        r["edge_cores"] = (e1 - e0) / args.seconds
        r["connector_cores"] = (c1 - c0) / args.seconds
        r["bulk_MBps"] = bulk_rate(lab, args.streams, args.bytes)
        m = edge.metrics()
        r["moved_flows"] = m.value("ramp_flows_moved_total", direction="out")
        _, body = edge.http_get("/ready")
        doc = json.loads(body)
        listed = doc.get("workers")
        r["edge_workers_with_tunnel"] = (
            sum(1 for w in listed if w.get("ready")) if listed else float(bool(doc.get("ready")))
        )
        return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="duration of the setup test")
    ap.add_argument("--bytes", type=int, default=200 * MB, help="bytes of each download")
    ap.add_argument("--streams", type=int, default=8, help="parallel downloads")
    ap.add_argument("--runs", type=int, default=1, help="runs of each worker count")
    ap.add_argument("--load", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load is not None:
        return load_main(args.load)
    runs: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for _ in range(args.runs):
        for workers in (1, 2):
            runs[workers].append(measure(workers, args))
    med = {w: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for w, rs in runs.items()}
    print(
        f"flow setups/s (SOCKS5 -> tunnel, 32 at a time x {LOADERS} loaders, {args.seconds:g} s) "
        f"and {args.streams} parallel downloads of {args.bytes / MB:.0f} MB; medians of "
        f"{args.runs} run(s)"
    )
    print(
        f"{'workers':>8} {'setups/s':>10} {'failed':>7} {'CPU us/setup':>13} "
        f"{'edge cores':>11} {'conn cores':>11} {'bulk MB/s':>10} {'moved':>7} "
        f"{'edge workers w/ tunnel':>23}"
    )
    for w, r in med.items():
        print(
            f"{w:>8} {r['setups_per_s']:>10,.0f} {r['setups_failed']:>7.0f} "
            f"{r['cpu_us_per_setup']:>13,.0f} {r['edge_cores']:>11.2f} "
            f"{r['connector_cores']:>11.2f} {r['bulk_MBps']:>10,.1f} {r['moved_flows']:>7.0f} "
            f"{r['edge_workers_with_tunnel']:>23.0f}"
        )
    print(
        f"   ratio {med[2]['setups_per_s'] / med[1]['setups_per_s']:>10.2f} "
        f"{'':>7} {'':>13} {'':>11} {'':>11} "
        f"{med[2]['bulk_MBps'] / med[1]['bulk_MBps']:>10.2f}   (2 workers / 1; "
        "bar: setups 1.3x)"
    )
    print(json.dumps({str(w): rs for w, rs in runs.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
