"""What egress without port exhaustion costs a flow setup, measured in one run on the lab.

    python -m bench.egress [--seconds S] [--rounds N]

Flow setups per second through the tunnel (client -> SOCKS5 -> edge -> connector -> origin:
connect, one byte each way, close; 32 at a time, as bench/tcp_tunnel.py) with a connector that
binds each origin connection to an address of an egress pool with IP_BIND_ADDRESS_NO_PORT
(`--egress-source`, the feature), against the same connector letting the kernel choose the
source (no pool: the baseline), in alternating rounds; the ratio pool/baseline, and the
connector's CPU per setup for both.

Also, in the private namespace directly: microseconds to open one connected UDP origin socket
with connectx (bind, the SO_REUSEADDR lock, the sock_diag check, connect) against a plain
connected UDP socket, the per-session cost of sharing UDP ports.

`run(lab, seconds)` does it on a lab someone else built (an edge is started if none runs) and
returns the figures; `main()` builds its own lab and prints them. Needs root (namespaces).
Traffic stays inside the lab's namespaces.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import tempfile
import time
from pathlib import Path

from bench.servers import start_in
from bench.tcp_tunnel import cpu_seconds, setups
from ramp.net.connectx import PortRange
from ramp.offramps.egress import Egress
from ramp.testing.lab import Lab, LabProcess, wait_until

TUNNEL = "egress-bench"
ORIGIN = "198.51.100.40"  # this benchmark's own origin, routed to its own tunnel
POOL = ("198.51.100.41", "198.51.100.42")
BASE_PORT = 5100  # bench.servers: +1 is the ping origin
UDP_SOCKETS = 2000  # per measurement of the UDP socket cost


def _prepare(lab: Lab) -> str:
    """The origin, the pool addresses, the tunnel and an edge (each once per lab); the
    tunnel's token."""
    if TUNNEL not in lab.tokens:
        p = lab.private
        for addr in (ORIGIN, *POOL):
            p.add_address("lo", f"{addr}/32")
        start_in(p, ORIGIN, BASE_PORT)
        lab.create_tunnel(TUNNEL, [f"{ORIGIN}/32"])
    if lab.edge is None or not lab.edge.alive():
        lab.start_edge("--log-level", "warning", "--audit-log", "/dev/null")
    return lab.tokens[TUNNEL]


def _reaches_origin(lab: Lab) -> bool:
    """One flow through the benchmark's tunnel works (the edge has read its route)."""
    rep, sock = lab.socks5(ORIGIN, BASE_PORT + 1)
    with sock:
        if rep != 0:
            return False
        sock.sendall(b"x")
        return sock.recv(1) == b"x"


def _connector(lab: Lab, token: str, pool: bool) -> LabProcess:
    args = ["--log-level", "warning", "--audit-log", "/dev/null", "--grace-period", "0"]
    if pool:
        args += ["--egress-source", ",".join(POOL)]
    before = lab.edge_metrics().value("ramp_tunnel_connections", tunnel=TUNNEL)
    conn = lab.start_connector(token, *args)
    wait_until(
        lambda: lab.edge_metrics().value("ramp_tunnel_connections", tunnel=TUNNEL) > before,
        30,
        what="the benchmark connector to register",
    )
    wait_until(lambda: _reaches_origin(lab), 30, what="a flow to the benchmark origin")
    return conn


def _setup_round(lab: Lab, token: str, pool: bool, seconds: float) -> tuple[int, int, float]:
    """(setups, failures, connector CPU seconds) of one round."""
    conn = _connector(lab, token, pool)
    try:
        # a short warm-up: QUIC windows, the code's first run
        asyncio.run(setups(lab.client.sockets, (ORIGIN, BASE_PORT + 1), True, 0.3))
        cpu0 = cpu_seconds(conn.pid)
        ok, bad = asyncio.run(setups(lab.client.sockets, (ORIGIN, BASE_PORT + 1), True, seconds))
        return ok, bad, cpu_seconds(conn.pid) - cpu0
    finally:
        conn.stop()
        lab.connectors.remove(conn)


def _udp_socket_cost(count: int) -> dict[str, float]:
    """µs per connected UDP socket to one origin port: connectx from the pool vs plain."""
    dest = (ORIGIN, BASE_PORT + 7)
    out: dict[str, float] = {}
    for name, egress in (
        ("connectx", Egress(POOL, True, ports=PortRange())),
        ("plain", Egress((), False)),
    ):
        socks: list[socket.socket] = []
        t0 = time.perf_counter()
        try:
            for _ in range(count):
                socks.append(egress.udp_socket(socket.AF_INET, dest))
            out[f"udp_socket_{name}_us"] = (time.perf_counter() - t0) / count * 1e6
        finally:
            for s in socks:
                s.close()
    out["udp_socket_ratio"] = out["udp_socket_connectx_us"] / out["udp_socket_plain_us"]
    return out


def run(lab: Lab, seconds: float, rounds: int = 2) -> dict[str, float]:
    """The figures on `lab`: `rounds` rounds of each kind, `seconds` of setups per kind in
    all (alternating, the baseline first); see the module's doc."""
    token = _prepare(lab)
    per_round = seconds / rounds
    totals = {True: [0, 0, 0.0], False: [0, 0, 0.0]}
    for _ in range(rounds):
        for pool in (False, True):
            ok, bad, cpu = _setup_round(lab, token, pool, per_round)
            t = totals[pool]
            t[0] += ok
            t[1] += bad
            t[2] += cpu
    results: dict[str, float] = {}
    for pool, name in ((False, "plain"), (True, "pool")):
        ok, bad, cpu = totals[pool]
        results[f"setups_{name}_per_s"] = ok / seconds
        results[f"setups_{name}_failed"] = bad
        results[f"setups_{name}_connector_cpu_us"] = cpu / max(ok, 1) * 1e6
    results["setups_ratio"] = results["setups_pool_per_s"] / results["setups_plain_per_s"]
    results["setups_connector_cpu_ratio"] = (
        results["setups_pool_connector_cpu_us"] / results["setups_plain_connector_cpu_us"]
    )
    results.update(lab.private.call(_udp_socket_cost, UDP_SOCKETS))
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="seconds of setups per kind")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per kind")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ramp-bench-") as tmp, Lab(Path(tmp)) as lab:
        r = run(lab, args.seconds, args.rounds)
    print(f"flow setups through the tunnel (32 concurrent, {args.seconds:g} s each, alternating)")
    print(
        f"  egress pool + IP_BIND_ADDRESS_NO_PORT  {r['setups_pool_per_s']:8.0f} /s  "
        f"{r['setups_pool_connector_cpu_us']:6.0f} µs connector CPU per setup"
    )
    print(
        f"  kernel's source (baseline)             {r['setups_plain_per_s']:8.0f} /s  "
        f"{r['setups_plain_connector_cpu_us']:6.0f} µs connector CPU per setup"
    )
    print(
        f"  ratio                                  {r['setups_ratio']:8.3f}     "
        f"{r['setups_connector_cpu_ratio']:6.3f} (CPU)"
    )
    print(f"connected UDP origin socket ({UDP_SOCKETS} to one port)")
    print(f"  connectx (pool)      {r['udp_socket_connectx_us']:8.1f} µs")
    print(f"  plain connect        {r['udp_socket_plain_us']:8.1f} µs   (baseline)")
    print(f"  ratio                {r['udp_socket_ratio']:8.2f}")
    print(json.dumps(r, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
