"""Any-port listeners, PROXY protocol and egress without port exhaustion, in one run.

    python -m bench.spectrum [--seconds S] [--bytes N]

Runs the three benchmarks of that work one after the other, each on a lab of its own (each
starts the edges it measures), and prints one table:

- `bench.anyport`: flow setups/s and bulk MB/s through an any-port listener, with sk_lookup and
  with TPROXY, against the same edge's SOCKS5 on-ramp;
- `bench.proxy_protocol`: flow setups/s and CPU per flow with a PROXY header in (v2, v1) and
  out (v2), against plain flows;
- `bench.egress`: flow setups/s and connector CPU per setup with the egress pool and shared
  source ports, against the kernel's choice of source; the cost of a connectx UDP socket.

Needs root (network namespaces). Traffic stays inside the labs' namespaces.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench import anyport, egress, proxy_protocol
from bench.tcp_tunnel import MB
from ramp.testing.lab import Lab


def on_a_lab(measure: Callable[[Lab], dict[str, float]]) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="ramp-bench-") as tmp, Lab(Path(tmp)) as lab:
        return measure(lab)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds of each setup test")
    ap.add_argument("--bytes", type=int, default=256 * MB, help="bulk transfer size")
    args = ap.parse_args()

    a = on_a_lab(lambda lab: anyport.run(lab, args.seconds, args.bytes))
    p = on_a_lab(lambda lab: proxy_protocol.run(lab, args.seconds))
    e = on_a_lab(lambda lab: egress.run(lab, args.seconds))

    print("any-port listener against the edge's SOCKS5 on-ramp (same edge, alternating)")
    cols = ("setups/s", "SOCKS5", "ratio", "MB/s", "SOCKS5", "ratio")
    print("  " + " " * 10 + "".join(f"{c:>9}" for c in cols))
    for mech in anyport.MECHANISMS:
        k = f"{mech}_"
        values = (
            f"{a[f'anyport_{k}setups_per_s']:.0f}",
            f"{a[f'socks5_{k}setups_per_s']:.0f}",
            f"{a[f'anyport_{k}setups_ratio']:.2f}",
            f"{a[f'anyport_{k}bulk_MBps']:.1f}",
            f"{a[f'socks5_{k}bulk_MBps']:.1f}",
            f"{a[f'anyport_{k}bulk_ratio']:.2f}",
        )
        print(f"  {mech:10}" + "".join(f"{v:>9}" for v in values))
    print("PROXY protocol: flow setups against plain flows")
    for name, what in (("in", "v2 in"), ("in_v1", "v1 in"), ("out", "v2 out")):
        print(
            f"  {what:7} {p[f'setups_{name}_per_s']:7.0f} /s against "
            f"{p['setups_plain_per_s']:.0f} (ratio {p[f'{name}_ratio']:.2f}); CPU per flow: edge "
            f"{p[f'{name}_edge_cpu_us_per_flow'] - p['plain_edge_cpu_us_per_flow']:+.0f} µs, "
            f"connector "
            f"{p[f'{name}_connector_cpu_us_per_flow'] - p['plain_connector_cpu_us_per_flow']:+.0f}"
            " µs"
        )
    print("egress: flow setups with the pool and shared ports against the kernel's source")
    print(
        f"  {e['setups_pool_per_s']:.0f} /s against {e['setups_plain_per_s']:.0f} (ratio "
        f"{e['setups_ratio']:.2f}); connector CPU per setup {e['setups_pool_connector_cpu_us']:.0f}"
        f" against {e['setups_plain_connector_cpu_us']:.0f} µs; a connectx UDP socket "
        f"{e['udp_socket_connectx_us']:.0f} µs against {e['udp_socket_plain_us']:.0f} µs"
    )
    print(json.dumps({"anyport": a, "proxy_protocol": p, "egress": e}, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
