"""The any-port on-ramp (sk_lookup and TPROXY) against the edge's SOCKS5 on-ramp, in one run.

    python -m bench.anyport [--bytes N] [--seconds S]

Both paths end the same way (edge -> QUIC tunnel -> connector -> origin in P); they differ in
how the client gets in: the any-port listener takes a plain TCP connection to any port of
203.0.113.64/26 (steered by the BPF sk_lookup program, or by the nftables TPROXY rule), the
SOCKS5 on-ramp takes a connection to 203.0.113.1:1080 and a SOCKS5 request. For each
mechanism, with the SOCKS5 figure measured by the same edge process just before:

- flow setups per second (connect, one byte each way, close; 32 at a time), each to a random
  address and port of the prefix, and the ratio anyport / SOCKS5;
- bulk throughput of TCP transfers, one at a time (MB/s), and the ratio.

The two paths alternate in ROUNDS rounds (setups for seconds/ROUNDS each, a transfer of
nbytes/ROUNDS each), so that the drift of a shared machine falls on both alike.

`run(lab, seconds, nbytes)` does the same on a built lab with no edge running (it starts and
stops its own edges, one per mechanism, and a connector if there is none) and returns the
figures; it may be called again on the same lab. Needs root (network namespaces, BPF,
nftables). Traffic stays inside the lab.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import socket
import tempfile
from pathlib import Path

from bench.servers import start_in
from bench.tcp_tunnel import MB, bulk, setups, socks5_handshake
from ramp.testing.lab import (
    ANYPORT_PREFIX,
    EDGE_PUBLIC_ADDR,
    ORIGIN,
    ORIGIN_PREFIX,
    SOCKS_PORT,
    Lab,
)

BASE_PORT = 5100  # bench.servers: +0 source, +1 ping
PING_NET = "203.0.113.64/27"  # any port -> the ping origin
SOURCE_NET = "203.0.113.96/27"  # any port -> the bulk source
MECHANISMS = ("sk_lookup", "tproxy")
ROUNDS = 3  # setups and transfers alternate between the two paths this many times


def _random_target(network: str) -> tuple[str, int]:
    hosts = list(ipaddress.ip_network(network).hosts())
    return str(random.choice(hosts)), random.randint(1024, 65535)


def _prepare(lab: Lab) -> None:
    if ("tcp", f"{ORIGIN}:{BASE_PORT}") not in lab.listening(lab.private):
        start_in(lab.private, ORIGIN, BASE_PORT)
    routes = lab.client.run(["ip", "route"]).stdout.decode()
    if ANYPORT_PREFIX not in routes:
        lab.route_to_edge()
    if "corp" not in lab.tokens:
        lab.create_tunnel("corp", [ORIGIN_PREFIX])


def _start_edge(lab: Lab, mechanism: str) -> None:
    config = lab.write_edge_config(
        {
            "onramps": [
                {
                    "type": "anyport",
                    "prefix": ANYPORT_PREFIX,
                    "mechanism": mechanism,
                    "to": [
                        {"addresses": PING_NET, "to": f"{ORIGIN}:{BASE_PORT + 1}"},
                        {"addresses": SOURCE_NET, "to": f"{ORIGIN}:{BASE_PORT}"},
                    ],
                }
            ]
        },
        name="bench-anyport.yaml",
    )
    lab.start_edge("--config", str(config), "--log-level", "warning", "--audit-log", "/dev/null")
    if not any(c.alive() for c in lab.connectors):
        lab.start_connector(lab.tokens["corp"], "--log-level", "warning")
    lab.wait_tunnel_connections("corp", 1)


def run(lab: Lab, seconds: float, nbytes: int) -> dict[str, float]:
    """anyport_{mechanism}_{setups_per_s,bulk_MBps}, socks5_{mechanism}_{...} (the baseline,
    same edge process) and their ratios."""
    _prepare(lab)
    results: dict[str, float] = {}

    def socks_sock() -> socket.socket:
        s = lab.client.socket()
        s.connect((EDGE_PUBLIC_ADDR, SOCKS_PORT))
        socks5_handshake(s, ORIGIN, BASE_PORT)
        return s

    def anyport_sock() -> socket.socket:
        s = lab.client.socket()
        s.connect(_random_target(SOURCE_NET))
        return s

    for mechanism in MECHANISMS:
        _start_edge(lab, mechanism)
        try:
            bulk(socks_sock, 16 * MB)  # warm up the tunnel's congestion window
            bulk(anyport_sock, 16 * MB)
            # interleaved rounds: a shared machine's drift hits both paths alike
            socks_ok = any_ok = failed = 0
            socks_t = any_t = 0.0
            part = seconds / ROUNDS
            for _ in range(ROUNDS):
                ok, _ = asyncio.run(setups(lab.client.sockets, (ORIGIN, BASE_PORT + 1), True, part))
                socks_ok += ok
                ok, bad = asyncio.run(
                    setups(lab.client.sockets, lambda: _random_target(PING_NET), False, part)
                )
                any_ok, failed = any_ok + ok, failed + bad
                socks_t += bulk(socks_sock, nbytes // ROUNDS)
                any_t += bulk(anyport_sock, nbytes // ROUNDS)
            socks_setups, any_setups = socks_ok / seconds, any_ok / seconds
            socks_bulk = nbytes // ROUNDS * ROUNDS / socks_t / MB
            any_bulk = nbytes // ROUNDS * ROUNDS / any_t / MB
        finally:
            assert lab.edge is not None
            lab.edge.stop()
        p = f"{mechanism}_"
        results[f"anyport_{p}setups_per_s"] = any_setups
        results[f"anyport_{p}setups_failed"] = failed
        results[f"socks5_{p}setups_per_s"] = socks_setups
        results[f"anyport_{p}setups_ratio"] = any_setups / socks_setups
        results[f"anyport_{p}bulk_MBps"] = any_bulk
        results[f"socks5_{p}bulk_MBps"] = socks_bulk
        results[f"anyport_{p}bulk_ratio"] = any_bulk / socks_bulk
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", type=int, default=256 * MB, help="bulk transfer size")
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each setup test")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ramp-bench-") as tmp, Lab(Path(tmp)) as lab:
        results = run(lab, args.seconds, args.bytes)
    for mechanism in MECHANISMS:
        p = f"{mechanism}_"
        print(f"any-port listener with {mechanism}")
        print(
            f"  flow setups  anyport {results[f'anyport_{p}setups_per_s']:7.0f} /s   "
            f"socks5 {results[f'socks5_{p}setups_per_s']:7.0f} /s (baseline)   "
            f"ratio {results[f'anyport_{p}setups_ratio']:.3f}"
        )
        print(
            f"  bulk         anyport {results[f'anyport_{p}bulk_MBps']:7.1f} MB/s "
            f"socks5 {results[f'socks5_{p}bulk_MBps']:7.1f} MB/s (baseline) "
            f"ratio {results[f'anyport_{p}bulk_ratio']:.3f}"
        )
    print(json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
