"""The per-flow cost of a PROXY protocol header, in and out, measured in one run on the lab.

    python -m bench.proxy_protocol [--seconds S]

Four kinds of flow setups (connect, SOCKS5 CONNECT through the tunnel, one byte each way,
close; 32 at a time), each for S seconds in all (in three rounds, taking turns):

- plain:  a SOCKS5 on-ramp without `proxy_protocol`, to an origin whose route sends no header
          (the baseline);
- in:     the client sends a PROXY v2 header before its SOCKS5 greeting, to an on-ramp with
          `proxy_protocol: {mode: required}` (what a load balancer in front of the edge does);
- in_v1:  the same with a v1 header;
- out:    the route asks for `--proxy-protocol v2`: the connector sends the header to the
          origin before the first byte.

Prints setups/s of each, their ratios to the baseline, and the CPU time the edge and the
connector spend per flow (from /proc, steadier than the rates on a shared machine).

`run(lab, seconds)` does the same on a built Lab with no edge running (the origins up), for a
combined benchmark; it starts its own edge and connector and stops them when done.
Needs root (network namespaces). Traffic stays inside the lab's namespaces.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.tcp_tunnel import CONCURRENCY, cpu_seconds
from ramp.testing.lab import CLIENT_ADDR, EDGE_PUBLIC_ADDR, ORIGIN, Lab, LabError
from ramp.wire import proxy_protocol as pp

PING_PORT = 5011  # an echo of one byte, after an optional PROXY header
PP_ORIGIN = "198.51.100.20"  # routed with --proxy-protocol v2
PLAIN_PORT, PP_IN_PORT = 1180, 1181  # the edge's two SOCKS5 on-ramps for the benchmark
ROUNDS = 3


# --- the origin ------------------------------------------------------------------------------


async def _ping(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """One byte back, after the PROXY header if the connection starts with one."""
    try:
        buf = await r.read(1)
        if buf and pp.signature_state(buf) is not False:
            while (got := pp.parse(buf)) is pp.NEED_DATA:
                more = await r.read(256)
                if not more:
                    return
                buf += more
            assert isinstance(got, tuple)
            buf = buf[got[1] :] or await r.read(1)
        w.write(buf[:1])
        await w.drain()
    except (ConnectionError, pp.ProxyProtocolError):
        pass
    finally:
        w.close()


async def _serve(hosts: list[str], port: int) -> None:
    servers = [await asyncio.start_server(_ping, h, port, backlog=4096) for h in hosts]
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def _start_origin(lab: Lab) -> None:
    proc = lab.private.popen(
        [sys.executable, "-m", "bench.proxy_protocol", "--serve", ORIGIN, PP_ORIGIN],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        env=lab.env,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        raise RuntimeError("bench origin did not start")


# --- the client ------------------------------------------------------------------------------


async def setups(
    lab: Lab, proxy_port: int, dest: tuple[str, int], header: str | None, seconds: float
) -> tuple[int, int]:
    """Completed and failed setups in `seconds`; with `header` ("v1" or "v2"), each
    connection starts with a PROXY header of that version naming a client of its own."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    done = failed = 0
    pool: list[socket.socket] = []
    request = (
        b"\x05\x01\x00",
        b"\x05\x01\x00\x01" + socket.inet_aton(dest[0]) + struct.pack("!H", dest[1]),
    )

    async def one(sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (EDGE_PUBLIC_ADDR, proxy_port))
            first = request[0]
            if header is not None:
                client = (CLIENT_ADDR, random.randrange(1024, 65536))
                first = pp.outbound(header, client, (EDGE_PUBLIC_ADDR, proxy_port)) + first
            await loop.sock_sendall(sock, first)
            await loop.sock_recv(sock, 2)
            await loop.sock_sendall(sock, request[1])
            rep = b""
            while len(rep) < 10:
                chunk = await loop.sock_recv(sock, 10 - len(rep))
                if not chunk:
                    raise ConnectionError("closed")
                rep += chunk
            if rep[1] != 0:
                raise ConnectionError(f"rep {rep[1]}")
            await loop.sock_sendall(sock, b"x")
            if await loop.sock_recv(sock, 1) != b"x":
                raise ConnectionError("no echo")
        finally:
            sock.close()

    async def worker() -> None:
        nonlocal done, failed
        while loop.time() < deadline:
            if not pool:
                pool.extend(lab.client.sockets(64))
            try:
                await one(pool.pop())
                done += 1
            except (OSError, ConnectionError):
                failed += 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return done, failed


# --- the run ---------------------------------------------------------------------------------


def run(lab: Lab, seconds: float) -> dict[str, float]:
    """Setups/s and CPU per flow for plain, PROXY-in and PROXY-out flows (see the module)."""
    if lab.edge is not None and lab.edge.alive():
        raise LabError("bench.proxy_protocol starts its own edge: stop the lab's first")
    lab.private.add_address("lo", f"{PP_ORIGIN}/32")
    _start_origin(lab)
    lab.create_tunnel("ppbench", [f"{ORIGIN}/32"])
    lab.ramp("tunnel", "route", "ip", "add", f"{PP_ORIGIN}/32", "ppbench", "--proxy-protocol", "v2")
    config = lab.write_edge_config(
        {
            "onramps": [
                {"type": "socks5", "listen": f"{EDGE_PUBLIC_ADDR}:{PLAIN_PORT}"},
                {
                    "type": "socks5",
                    "listen": f"{EDGE_PUBLIC_ADDR}:{PP_IN_PORT}",
                    "proxy_protocol": {"mode": "required", "trusted": [f"{CLIENT_ADDR}/32"]},
                },
            ]
        },
        name="proxy-protocol-bench.yaml",
    )
    edge = lab.start_edge(
        "--config", str(config), "--log-level", "warning", "--audit-log", "/dev/null"
    )
    lab.wait_listening(
        lab.edge_ns, [("tcp", f"{EDGE_PUBLIC_ADDR}:{p}") for p in (PLAIN_PORT, PP_IN_PORT)]
    )
    connector = lab.start_connector(lab.token("ppbench"), "--log-level", "warning")
    lab.wait_tunnel_connections("ppbench", 1)
    results: dict[str, float] = {}
    try:
        kinds: dict[str, tuple[int, tuple[str, int], str | None]] = {
            "plain": (PLAIN_PORT, (ORIGIN, PING_PORT), None),
            "in": (PP_IN_PORT, (ORIGIN, PING_PORT), "v2"),
            "in_v1": (PP_IN_PORT, (ORIGIN, PING_PORT), "v1"),
            "out": (PLAIN_PORT, (PP_ORIGIN, PING_PORT), None),
        }
        for port, dest, header in kinds.values():  # warm up each path
            asyncio.run(setups(lab, port, dest, header, min(1.0, seconds / 4)))
        # in rounds, each kind in turn: the machine's other load drifts, and every kind
        # sees the same share of it
        totals = {name: [0, 0, 0.0, 0.0] for name in kinds}  # ok, failed, edge, connector CPU
        for _ in range(ROUNDS):
            for name, (port, dest, header) in kinds.items():
                cpu0 = cpu_seconds(edge.pid), cpu_seconds(connector.pid)
                ok, bad = asyncio.run(setups(lab, port, dest, header, seconds / ROUNDS))
                cpu1 = cpu_seconds(edge.pid), cpu_seconds(connector.pid)
                t = totals[name]
                t[0] += ok
                t[1] += bad
                t[2] += cpu1[0] - cpu0[0]
                t[3] += cpu1[1] - cpu0[1]
        for name, (ok, bad, edge_cpu, conn_cpu) in totals.items():
            results[f"setups_{name}_per_s"] = ok / seconds
            results[f"setups_{name}_failed"] = bad
            results[f"{name}_edge_cpu_us_per_flow"] = edge_cpu / max(ok, 1) * 1e6
            results[f"{name}_connector_cpu_us_per_flow"] = conn_cpu / max(ok, 1) * 1e6
        plain = results["setups_plain_per_s"] or 1.0
        for name in ("in", "in_v1", "out"):
            results[f"{name}_ratio"] = results[f"setups_{name}_per_s"] / plain
    finally:
        connector.stop()
        edge.stop()
        lab.edge = None
        if connector in lab.connectors:
            lab.connectors.remove(connector)
    return results


def report(results: dict[str, float], seconds: float) -> None:
    print(f"flow setups with a PROXY header ({CONCURRENCY} concurrent, {seconds:g} s each)")
    for name, what in (
        ("plain", "no header (baseline)"),
        ("in", "v2 header in, from the client"),
        ("in_v1", "v1 header in, from the client"),
        ("out", "v2 header out, to the origin"),
    ):
        line = f"  {name:6} {results[f'setups_{name}_per_s']:8.0f} /s"
        if name != "plain":
            line += f"  ratio {results[f'{name}_ratio']:5.3f}"
        line += (
            f"  CPU {results[f'{name}_edge_cpu_us_per_flow']:5.0f} µs/flow edge, "
            f"{results[f'{name}_connector_cpu_us_per_flow']:4.0f} connector"
            f"  ({results[f'setups_{name}_failed']:.0f} failed)  {what}"
        )
        print(line)
    print(json.dumps(results, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    ap.add_argument("--serve", nargs="+", metavar="HOST", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:  # the origin, started by run() in the private namespace
        asyncio.run(_serve(args.serve, PING_PORT))
        return 0
    with tempfile.TemporaryDirectory(prefix="ramp-bench-") as tmp, Lab(Path(tmp)) as lab:
        results = run(lab, args.seconds)
    report(results, args.seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
