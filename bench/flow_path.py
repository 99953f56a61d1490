"""CPU the edge's own flow path costs per flow, in process, no network.

    python -m bench.flow_path [--flows N] [--distinct]

Opens and finishes N flows through the edge's flow path with a stub off-ramp that answers at
once: admission, routing, the policy decision and hooks (where the code has them), metrics and
the audit record (written to /dev/null). No on-ramp, no tunnel: what is left is the code that
decides and accounts for a flow. It runs against whichever ramp is on PYTHONPATH, the current
one (FlowPipeline) or the code before the framework (dc950af, `Edge.open_tcp`), so the two can
be compared exactly:

    PYTHONPATH=/tmp/ramp-before/src python3 -m bench.flow_path
    PYTHONPATH=src python3 -m bench.flow_path

CPU time (process time, best of 7 batches), so other load on the machine hardly matters. With
--distinct every flow goes to its own destination, so the policy memo never hits.
"""

from __future__ import annotations

import argparse
import ipaddress
import tempfile
import time
from collections.abc import Callable
from typing import Any

from ramp.config import EdgeConfig
from ramp.edge import Edge
from ramp.flows.flow import Destination, Flow

NET = "10.77.0.0/16"
CLIENT = "203.0.113.2"


def run_to_end(coro: Any) -> Any:
    """Drive a coroutine that never waits to its end."""
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value
    coro.close()
    raise RuntimeError("the flow path waited")


class _StubOffRamp:
    async def open_stream(self, flow: Flow, route: object) -> None:
        return None


def _path(edge: Any) -> tuple[str, Callable[[Flow], None], Callable[[], None]]:
    """(which code, open-and-finish one flow, forget memoised decisions)."""
    if hasattr(edge, "pipeline"):
        from ramp.policy.router import RouteEntry, VnetRoutes

        entry = RouteEntry(ipaddress.ip_network(NET), "tunnel-id", "corp")
        edge.router.tables = VnetRoutes([entry]).tables
        edge.offramps["tunnel"] = _StubOffRamp()

        def one(flow: Flow) -> None:
            run_to_end(edge.pipeline.open_tcp(flow))
            edge.pipeline.flow_finished(flow)

        return "FlowPipeline", one, edge.policy.policy._cache.clear
    from ramp.policy.router import RouteEntry, RouteTable  # the code before the framework

    edge.routes = RouteTable([RouteEntry(ipaddress.ip_network(NET), "tunnel-id", "corp")])

    async def via_tunnel(flow: Flow, route: object) -> None:
        return None

    edge._open_via_tunnel = via_tunnel

    def one_before(flow: Flow) -> None:
        run_to_end(edge.open_tcp(flow))
        edge.flow_finished(flow)

    return "Edge.open_tcp (before the framework)", one_before, lambda: None


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--flows", type=int, default=20000, help="flows per batch")
    ap.add_argument("--distinct", action="store_true", help="a new destination every flow")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ramp-flow-path-") as tmp:
        config = EdgeConfig(data_dir=tmp, audit_log="/dev/null", metrics_listen="off")
        edge = Edge(config)
        if hasattr(edge, "reload_store"):
            edge.reload_store()
        which, one, forget = _path(edge)
        base = int(ipaddress.ip_network(NET).network_address) + 256
        best = float("inf")
        for _ in range(7):
            flows = [
                Flow(
                    "socks5",
                    (CLIENT, 40000 + i % 20000),
                    Destination(
                        str(ipaddress.IPv4Address(base + (i if args.distinct else 0))), 5001
                    ),
                )
                for i in range(args.flows)
            ]
            forget()
            t0 = time.process_time()
            for flow in flows:
                one(flow)
            best = min(best, time.process_time() - t0)
        edge.store.close()
    dest = "a new destination every flow" if args.distinct else "one destination"
    print(f"{which}, {dest}: {best / args.flows * 1e6:.1f} µs CPU per flow (open + finish)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
