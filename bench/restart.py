"""What a restart costs: the time from `ramp edge restart` to the successor serving, and the
latency of a UDP echo through the tunnel while the edge restarts against the same echo with
no restart, measured in one run on the namespace lab.

    python -m bench.restart [--seconds S] [--restarts N] [--rate R]

- restart time: the `ramp edge restart` command's wall time (it includes the command's own
  start), and from the edge's log the time from the request to the successor serving;
- UDP echo: one SOCKS5 UDP association to the origin's UDP echo, R datagrams/s for S
  seconds, each one's round trip; p50/p99/max and losses, once without a restart and once
  with N restarts spread over the run.

Bar for this stage (issue "Restarts that drop nothing"): a restart adds under 5 ms to the p99
echo. Needs root (network namespaces). Traffic stays inside the lab; bounded in time.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

from ramp.testing.clients import socks5_udp_associate, udp_unwrap, udp_wrap
from ramp.testing.lab import (
    EDGE_PUBLIC_ADDR,
    ORIGIN,
    RAMP,
    SOCKS_PORT,
    UDP_ECHO_PORT,
    Lab,
)

SETTLE = 1.0


def echo_client(rate: float, seconds: float) -> dict[str, object]:
    """Run in the client namespace: RTTs (ms) of a paced UDP echo through SOCKS5."""
    control = socket.create_connection((EDGE_PUBLIC_ADDR, SOCKS_PORT), timeout=10)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    udp.bind(("0.0.0.0", 0))
    udp.connect(socks5_udp_associate(control, *udp.getsockname()))
    sent: dict[int, float] = {}
    rtts: list[float] = []
    done = threading.Event()

    def receive() -> None:
        udp.settimeout(0.5)
        while not done.is_set() or len(rtts) < len(sent):
            try:
                data = udp.recv(2048)
            except TimeoutError:
                if done.is_set():
                    return
                continue
            now = time.perf_counter()
            seq = struct.unpack_from("!Q", udp_unwrap(data)[2])[0]
            rtts.append((now - sent[seq]) * 1000)

    reader = threading.Thread(target=receive, daemon=True)
    reader.start()
    interval, start = 1.0 / rate, time.perf_counter()
    seq = 0
    while (now := time.perf_counter()) - start < seconds:
        sent[seq] = now
        udp.send(udp_wrap(ORIGIN, UDP_ECHO_PORT, struct.pack("!Q", seq) + b"x" * 56))
        seq += 1
        time.sleep(max(0.0, start + seq * interval - time.perf_counter()))
    time.sleep(SETTLE)
    done.set()
    reader.join(5)
    control.close()
    return {"sent": len(sent), "rtts": rtts}


def summary(result: dict[str, object]) -> dict[str, float]:
    rtts = sorted(result["rtts"])  # type: ignore[type-var]
    q = statistics.quantiles(rtts, n=100) if len(rtts) > 100 else [float("nan")] * 99
    return {
        "sent": float(result["sent"]),  # type: ignore[arg-type]
        "lost": float(result["sent"]) - len(rtts),  # type: ignore[arg-type]
        "p50_ms": q[49],
        "p99_ms": q[98],
        "max_ms": rtts[-1] if rtts else float("nan"),
    }


def run_echo(lab: Lab, rate: float, seconds: float) -> subprocess.Popen[bytes]:
    code = f"import json, bench.restart as b; print(json.dumps(b.echo_client({rate}, {seconds})))"
    return lab.client.popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, env=lab.env, cwd=Path.cwd()
    )


def restart_times(log: str) -> list[float]:
    """Seconds from each restart request to its successor serving, from the edge's log."""
    found = re.findall(
        r"^(\S+) INFO +ramp\.(?:restart|edge): (restart requested|took over)", log, re.M
    )
    times, asked = [], None
    for stamp, mark in found:
        t = datetime.fromisoformat(stamp).timestamp()
        if mark == "restart requested":
            asked = t
        elif asked is not None:
            times.append(t - asked)
            asked = None
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seconds", type=float, default=12.0, help="length of each echo run")
    ap.add_argument("--restarts", type=int, default=3, help="restarts during the second run")
    ap.add_argument("--rate", type=float, default=500.0, help="echo datagrams per second")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ramp-bench-") as tmp, Lab(Path(tmp)) as lab:
        lab.start_standard(
            edge_args=("--audit-log", "/dev/null"), connector_args=("--log-level", "warning")
        )
        base = run_echo(lab, args.rate, args.seconds)
        quiet = summary(json.loads(base.communicate(timeout=args.seconds + 60)[0]))

        during = run_echo(lab, args.rate, args.seconds)
        walls = []
        gap = args.seconds / (args.restarts + 1)
        t0 = time.monotonic()
        for i in range(args.restarts):
            time.sleep(max(0.0, (i + 1) * gap - (time.monotonic() - t0) - 0.5))
            t = time.monotonic()
            done = lab.edge_ns.run(
                [*RAMP, "edge", "restart", "--data-dir", str(lab.data_dir)],
                check=False,
                env=lab.env,
            )
            walls.append(time.monotonic() - t)
            if done.returncode != 0:
                print(done.stderr.decode(), file=sys.stderr)
                return 1
        restarted = summary(json.loads(during.communicate(timeout=args.seconds + 60)[0]))
        assert lab.edge is not None
        server_side = restart_times(lab.edge.stderr())

    print(f"UDP echo through the tunnel, {args.rate:g}/s for {args.seconds:g} s (SOCKS5 UDP)")
    for name, r in (("no restart", quiet), (f"{args.restarts} restarts", restarted)):
        print(
            f"  {name:12s} p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  "
            f"max {r['max_ms']:7.2f} ms  lost {r['lost']:.0f}/{r['sent']:.0f}"
        )
    print(
        f"  p99 added by restarts: {restarted['p99_ms'] - quiet['p99_ms']:+.2f} ms "
        "(bar: under 5 ms)"
    )
    print("`ramp edge restart` until the successor serves")
    print(f"  command wall time   {', '.join(f'{w:.2f}' for w in walls)} s")
    print(f"  request to serving  {', '.join(f'{w:.2f}' for w in server_side)} s (edge log)")
    print(
        json.dumps(
            {
                "quiet": quiet,
                "restarts": restarted,
                "restart_wall_s": walls,
                "restart_server_s": server_side,
            },
            sort_keys=True,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
