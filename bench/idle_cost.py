"""What ramp costs at rest: memory per idle tunnel connection and per idle flow, and the CPU
an idle edge and connector burn (keepalives, timers), measured on the namespace lab.

    python -m bench.idle_cost [--seconds S] [--connections N] [--idle-flows K]

- RSS per idle tunnel connection: the edge and the connector with one HA connection, then
  with N, the difference over N - 1 (cloudflared users report idle cost; its issue #1415).
- CPU at rest: edge and connector CPU time over S idle seconds with the default 4
  connections (keepalive PINGs every --keepalive-interval, 1 s by default), as a share of one
  core and as milliseconds per second.
- RSS per idle open flow: K SOCKS5 flows through the tunnel to an origin that holds them.

Needs root (network namespaces). Traffic stays inside the lab's namespaces; bounded in time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.servers import start_in
from bench.tcp_tunnel import BASE_PORT, rss_kib, socks5_handshake
from ramp.testing.lab import EDGE_PUBLIC_ADDR, ORIGIN, SOCKS_PORT, Lab

SETTLE = 2.0  # seconds for freed memory and startup work to settle before a reading


def cpu_seconds(pid: int) -> float:
    """CPU time of all of `pid`'s threads, from schedstat (nanoseconds: an idle process uses
    less than the 10 ms clock tick /proc/PID/stat counts in)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def connector_rss(lab: Lab, token: str, connections: int) -> tuple[int, int]:
    """(edge RSS, connector RSS) in KiB with a connector of `connections` HA connections."""
    for old in list(lab.connectors):
        old.stop()
        lab.connectors.remove(old)
    conn = lab.start_connector(
        token, "--log-level", "warning", "--ha-connections", str(connections)
    )
    lab.wait_tunnel_connections("corp", connections)
    time.sleep(SETTLE)
    assert lab.edge is not None
    return rss_kib(lab.edge.pid), rss_kib(conn.pid)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="idle time measured for CPU")
    ap.add_argument("--connections", type=int, default=16, help="HA connections for the RSS test")
    ap.add_argument("--idle-flows", type=int, default=300, help="idle flows for the RSS test")
    args = ap.parse_args()
    r: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ramp-bench-") as tmp, Lab(Path(tmp)) as lab:
        start_in(lab.private, ORIGIN, BASE_PORT)
        quiet = ("--log-level", "warning", "--audit-log", "/dev/null")
        token = lab.start_standard(edge_args=quiet, connector_args=("--log-level", "warning"))
        assert lab.edge is not None
        edge = lab.edge

        # CPU at rest, the default connector (4 connections)
        time.sleep(SETTLE)
        conn = lab.connectors[0]
        e0, c0, t0 = cpu_seconds(edge.pid), cpu_seconds(conn.pid), time.monotonic()
        time.sleep(args.seconds)
        e1, c1, t1 = cpu_seconds(edge.pid), cpu_seconds(conn.pid), time.monotonic()
        r["idle_edge_cpu_ms_per_s"] = (e1 - e0) / (t1 - t0) * 1000
        r["idle_connector_cpu_ms_per_s"] = (c1 - c0) / (t1 - t0) * 1000

        # memory per idle open flow
        before = rss_kib(edge.pid), rss_kib(conn.pid)
        held = []
        for _ in range(args.idle_flows):
            s = lab.edge_ns.socket()
            s.connect((EDGE_PUBLIC_ADDR, SOCKS_PORT))
            socks5_handshake(s, ORIGIN, BASE_PORT + 2)
            held.append(s)
        time.sleep(SETTLE)
        after = rss_kib(edge.pid), rss_kib(conn.pid)
        for s in held:
            s.close()
        r["rss_per_idle_flow_edge_KiB"] = (after[0] - before[0]) / args.idle_flows
        r["rss_per_idle_flow_connector_KiB"] = (after[1] - before[1]) / args.idle_flows

        # memory per idle tunnel connection
        one = connector_rss(lab, token, 1)
        many = connector_rss(lab, token, args.connections)
        per = args.connections - 1
        r["rss_per_connection_edge_KiB"] = (many[0] - one[0]) / per
        r["rss_per_connection_connector_KiB"] = (many[1] - one[1]) / per
        r["rss_connector_1_connection_KiB"] = one[1]

    print(f"CPU at rest ({args.seconds:g} s idle, 4 tunnel connections, 1 s keepalives)")
    edge_ms = r["idle_edge_cpu_ms_per_s"]
    print(f"  edge       {edge_ms:6.2f} ms/s ({edge_ms / 10:.2f} % of a core)")
    print(
        f"  connector  {r['idle_connector_cpu_ms_per_s']:6.2f} ms/s "
        f"({r['idle_connector_cpu_ms_per_s'] / 10:.2f} % of a core)"
    )
    print(f"memory per idle open flow ({args.idle_flows} flows)")
    print(f"  edge       {r['rss_per_idle_flow_edge_KiB']:6.1f} KiB")
    print(f"  connector  {r['rss_per_idle_flow_connector_KiB']:6.1f} KiB")
    print(f"memory per idle tunnel connection (1 against {args.connections})")
    print(f"  edge       {r['rss_per_connection_edge_KiB']:6.1f} KiB")
    print(f"  connector  {r['rss_per_connection_connector_KiB']:6.1f} KiB")
    print(f"  connector with one connection: {r['rss_connector_1_connection_KiB'] / 1024:.1f} MiB")
    print(json.dumps(r, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
