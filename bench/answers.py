"""How fast the edge answers flows it cannot serve, and how fast it recovers from a dead
connector: the timings the tests check only as outcomes.

    python -m bench.answers [--rounds N]

Prints, as JSON, the median and the slowest of N rounds (seconds) for:

- a destination outside every route (SOCKS5, HTTP CONNECT, absolute-form GET): decided at the
  edge, no dial;
- a closed origin port (the same three ways): one round trip through the tunnel to the RST;
- a blackholed origin: should take the connector's --connect-timeout (2 s here), no more;
- kill -9 of the connector, then a new one: until a flow through the new one works.

Needs root (network namespaces). Traffic stays inside the lab's namespaces.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ramp.testing.lab import BLACKHOLE, CLOSED_PORT, HTTP_PORT, ORIGIN, OUTSIDE, Lab, wait_until

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
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
