"""How fast the edge answers flows it cannot serve, and how fast it recovers from a dead
connector: the timings the tests check only as outcomes.

    python -m bench.answers [--rounds N]

Prints, as JSON, the median and the slowest of N rounds (seconds) for:

- a destination outside every route (SOCKS5, HTTP CONNECT, absolute-form GET): decided at the
  edge, no dial;
- a closed origin port (the same three ways): one round trip through the tunnel to the RST;
- a blackholed origin: should take the connector's --connect-timeout (2 s here), no more;
- kill -9 of the connector, then a new one: until a flow through the new one works;
- kill -9 of the connector carrying a UDP session, with a second replica running: until the
  session's echo comes back through the survivor.

Needs root (network namespaces). Traffic stays inside the lab's namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ramp.testing.clients import socks5_udp_associate, udp_unwrap, udp_wrap
from ramp.testing.lab import (
    BLACKHOLE,
    CLIENT_ADDR,
    CLOSED_PORT,
    HTTP_PORT,
    ORIGIN,
    OUTSIDE,
    UDP_ECHO_PORT,
    Lab,
    wait_until,
)

CONNECT_TIMEOUT = "2"


def _ask(lab: Lab, via: str, host: str, port: int) -> int:
    if via == "socks5":
        code, sock = lab.socks5(host, port, timeout=30)
        sock.close()
        return code
    if via == "connect":
        code, sock = lab.http_connect(host, port, timeout=30)
        sock.close()
        return code
    return lab.http_forward(host, port, timeout=30)


def _timed(fn: Callable[[], object], rounds: int) -> dict[str, float]:
    took = []
    for _ in range(rounds):
        started = time.monotonic()
        fn()
        took.append(time.monotonic() - started)
    return {"median_s": round(statistics.median(took), 4), "max_s": round(max(took), 4)}


def _flow_works(lab: Lab) -> bool:
    try:
        code, sock = lab.socks5(ORIGIN, HTTP_PORT, timeout=2)
    except OSError:
        return False
    sock.close()
    return code == 0


def _udp_ping(udp: socket.socket, timeout: float) -> bool:
    data = os.urandom(32)
    udp.send(udp_wrap(ORIGIN, UDP_ECHO_PORT, data))
    udp.settimeout(timeout)
    try:
        while True:
            if udp_unwrap(udp.recv(70000))[2] == data:
                return True
    except (TimeoutError, ConnectionRefusedError):
        return False


def _udp_session_move(lab: Lab) -> float:
    """Seconds from killing the connector that carries a UDP session to the next echo."""
    earlier = set(lab.udp_owners(UDP_ECHO_PORT))  # sessions of earlier rounds, still open
    ctrl = lab.connect_socks(10)
    udp = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        udp.bind((CLIENT_ADDR, 0))
        udp.connect(socks5_udp_associate(ctrl, *udp.getsockname()))
        wait_until(lambda: _udp_ping(udp, 1.0), 60, what="a first UDP echo")
        by_pid = {pid: c for c in lab.connectors for pid in c.group_pids()}
        ours = [pid for port, pid in lab.udp_owners(UDP_ECHO_PORT).items() if port not in earlier]
        carrier = by_pid[ours[0]]
        carrier.kill()
        killed = time.monotonic()
        wait_until(lambda: _udp_ping(udp, 0.2), 60, interval=0.0, what="the echo to resume")
        return time.monotonic() - killed
    finally:
        udp.close()
        ctrl.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20, help="rounds per measurement")
    args = ap.parse_args()

    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="ramp-bench-") as tmp, Lab(Path(tmp)) as lab:
        lab.start_standard(
            connector_args=("--connect-timeout", CONNECT_TIMEOUT, "--log-level", "warning"),
            edge_args=("--log-level", "warning", "--audit-log", "/dev/null"),
        )
        for via in ("socks5", "connect", "forward"):
            results[f"outside_routes_{via}"] = _timed(
                lambda via=via: _ask(lab, via, OUTSIDE, HTTP_PORT), args.rounds
            )
            results[f"closed_port_{via}"] = _timed(
                lambda via=via: _ask(lab, via, ORIGIN, CLOSED_PORT), args.rounds
            )
        # each round waits the whole connect timeout: a few are enough
        results["blackhole_socks5"] = _timed(
            lambda: _ask(lab, "socks5", BLACKHOLE, HTTP_PORT), min(args.rounds, 3)
        )

        def restart() -> None:
            lab.connectors[-1].kill()
            lab.start_connector(
                lab.tokens["corp"], "--connect-timeout", CONNECT_TIMEOUT, wait=False
            )
            wait_until(lambda: _flow_works(lab), 60, what="a flow through the new connector")

        results["kill_9_then_new_connector"] = _timed(restart, min(args.rounds, 3))

        moves = []
        for _ in range(min(args.rounds, 3)):
            while len([c for c in lab.connectors if c.alive()]) < 2:
                lab.start_connector(lab.tokens["corp"], "--connect-timeout", CONNECT_TIMEOUT)
            moves.append(_udp_session_move(lab))
        results["udp_session_moves_after_kill_9"] = {
            "median_s": round(statistics.median(moves), 4),
            "max_s": round(max(moves), 4),
        }
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
