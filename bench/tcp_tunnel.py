"""TCP through the tunnel vs. a plain veth, measured in one run on the namespace lab.

    python -m bench.tcp_tunnel [--bytes N] [--seconds S] [--idle-flows K]

Prints, for the tunnel path (client -> SOCKS5 -> edge -> QUIC tunnel -> connector -> origin)
and for the baseline (the same transfer over the plain edge<->private veth, no proxy):

- bulk throughput of one TCP transfer (MB/s) and the ratio tunnel/baseline;
- flow setups per second (connect, one byte each way, close; 32 at a time) and the ratio;
- CPU time the edge and the connector spend per GB of the transfer and per flow setup (from
  /proc; less disturbed by other load on the machine than the rates);
- resident memory per idle open flow in the edge and the connector.

Needs root (network namespaces). Traffic stays inside the lab's namespaces.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.servers import start_in
from ramp.testing.lab import (
    EDGE_PUBLIC_ADDR,
    EDGE_TUNNEL_ADDR,
    ORIGIN,
    SOCKS_PORT,
    Lab,
)

BASE_PORT = 5000
CONCURRENCY = 32
MB = 1_000_000


def socks5_handshake(sock: socket.socket, host: str, port: int) -> None:
    sock.sendall(b"\x05\x01\x00")
    if sock.recv(2) != b"\x05\x00":
        raise RuntimeError("SOCKS5 greeting refused")
    sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port))
    rep = b""
    while len(rep) < 10:
        chunk = sock.recv(10 - len(rep))
        if not chunk:
            raise RuntimeError("SOCKS5 proxy closed")
        rep += chunk
    if rep[1] != 0:
        raise RuntimeError(f"SOCKS5 reply {rep[1]:#x}")


def bulk(make_sock: Callable[[], socket.socket], nbytes: int) -> float:
    """Seconds to receive `nbytes` from the source origin."""
    sock = make_sock()
    try:
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        t0 = time.perf_counter()
        sock.sendall(struct.pack("!Q", nbytes))
        got = 0
        while got < nbytes:
            n = sock.recv_into(view)
            if n == 0:
                raise RuntimeError(f"transfer ended early at {got} bytes")
            got += n
        return time.perf_counter() - t0
    finally:
        sock.close()


async def setups(
    new_socket: Callable[[int], list[socket.socket]],
    addr: tuple[str, int] | Callable[[], tuple[str, int]],
    via_socks: bool,
    seconds: float,
    *,
    auth: tuple[str, str] | None = None,
    proxy: tuple[str, int] = (EDGE_PUBLIC_ADDR, SOCKS_PORT),
) -> tuple[int, int]:
    """Completed and failed flow setups in `seconds`, CONCURRENCY at a time.

    `addr` is the destination of every flow, or a function giving each flow its own; with
    `auth` (user, password) the SOCKS5 handshake authenticates (RFC 1929); `proxy` is the
    SOCKS5 proxy's address (the edge's on-ramp by default)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    done = failed = 0
    pool: list[socket.socket] = []
    greeting = b"\x05\x01\x02" if auth else b"\x05\x01\x00"
    login = b""
    if auth:
        user, password = (x.encode() for x in auth)
        login = bytes([1, len(user)]) + user + bytes([len(password)]) + password

    async def one(sock: socket.socket) -> None:
        sock.setblocking(False)
        dest = addr() if callable(addr) else addr
        try:
            if via_socks:
                await loop.sock_connect(sock, proxy)
                await loop.sock_sendall(sock, greeting)
                await loop.sock_recv(sock, 2)
                if login:
                    await loop.sock_sendall(sock, login)
                    if await loop.sock_recv(sock, 2) != b"\x01\x00":
                        raise ConnectionError("SOCKS5 login refused")
                await loop.sock_sendall(
                    sock,
                    b"\x05\x01\x00\x01" + socket.inet_aton(dest[0]) + struct.pack("!H", dest[1]),
                )
                rep = b""
                while len(rep) < 10:
                    chunk = await loop.sock_recv(sock, 10 - len(rep))
                    if not chunk:
                        raise ConnectionError("closed")
                    rep += chunk
                if rep[1] != 0:
                    raise ConnectionError(f"rep {rep[1]}")
            else:
                await loop.sock_connect(sock, dest)
            await loop.sock_sendall(sock, b"x")
            if await loop.sock_recv(sock, 1) != b"x":
                raise ConnectionError("no echo")
        finally:
            sock.close()

    async def worker() -> None:
        nonlocal done, failed
        while loop.time() < deadline:
            if not pool:
                pool.extend(new_socket(64))
            try:
                await one(pool.pop())
                done += 1
            except (OSError, ConnectionError):
                failed += 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return done, failed


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", type=int, default=1 << 30, help="bulk transfer size")
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of the setup test")
    ap.add_argument("--idle-flows", type=int, default=300, help="idle flows for the RSS test")
    args = ap.parse_args()

    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ramp-bench-") as tmp, Lab(Path(tmp)) as lab:
        for ns, host in ((lab.private, ORIGIN), (lab.edge_ns, EDGE_TUNNEL_ADDR)):
            start_in(ns, host, BASE_PORT)
        lab.start_standard(
            connector_args=("--log-level", "warning"),
            edge_args=("--log-level", "warning", "--audit-log", "/dev/null"),
        )
        edge_pid = lab.edge.pid if lab.edge else 0
        conn_pid = lab.connectors[0].pid

        def tunnel_sock() -> socket.socket:
            s = lab.client.socket()
            s.connect((EDGE_PUBLIC_ADDR, SOCKS_PORT))
            socks5_handshake(s, ORIGIN, BASE_PORT)
            return s

        def veth_sock() -> socket.socket:
            s = lab.private.socket()
            s.connect((EDGE_TUNNEL_ADDR, BASE_PORT))
            return s

        # warm up both paths (QUIC congestion window, page cache of the code)
        bulk(tunnel_sock, 32 * MB)
        bulk(veth_sock, 32 * MB)
        cpu0 = cpu_seconds(edge_pid), cpu_seconds(conn_pid)
        t_tunnel = bulk(tunnel_sock, args.bytes)
        cpu1 = cpu_seconds(edge_pid), cpu_seconds(conn_pid)
        results["bulk_edge_cpu_s_per_GB"] = (cpu1[0] - cpu0[0]) / (args.bytes / 1e9)
        results["bulk_connector_cpu_s_per_GB"] = (cpu1[1] - cpu0[1]) / (args.bytes / 1e9)
        t_veth = bulk(veth_sock, args.bytes)
        results["bulk_tunnel_MBps"] = args.bytes / t_tunnel / MB
        results["bulk_veth_MBps"] = args.bytes / t_veth / MB
        results["bulk_ratio"] = results["bulk_tunnel_MBps"] / results["bulk_veth_MBps"]

        cpu0 = cpu_seconds(edge_pid), cpu_seconds(conn_pid)
        ok, bad = asyncio.run(
            setups(lab.client.sockets, (ORIGIN, BASE_PORT + 1), True, args.seconds)
        )
        cpu1 = cpu_seconds(edge_pid), cpu_seconds(conn_pid)
        results["setups_tunnel_per_s"] = ok / args.seconds
        results["setups_edge_cpu_us_per_flow"] = (cpu1[0] - cpu0[0]) / max(ok, 1) * 1e6
        results["setups_connector_cpu_us_per_flow"] = (cpu1[1] - cpu0[1]) / max(ok, 1) * 1e6
        results["setups_tunnel_failed"] = bad
        ok, bad = asyncio.run(
            setups(lab.private.sockets, (EDGE_TUNNEL_ADDR, BASE_PORT + 1), False, args.seconds)
        )
        results["setups_veth_per_s"] = ok / args.seconds
        results["setups_veth_failed"] = bad
        results["setups_ratio"] = results["setups_tunnel_per_s"] / results["setups_veth_per_s"]

        time.sleep(1.0)
        before = rss_kib(edge_pid), rss_kib(conn_pid)
        held = []
        for _ in range(args.idle_flows):
            s = lab.client.socket()
            s.connect((EDGE_PUBLIC_ADDR, SOCKS_PORT))
            socks5_handshake(s, ORIGIN, BASE_PORT + 2)
            held.append(s)
        time.sleep(1.0)
        after = rss_kib(edge_pid), rss_kib(conn_pid)
        for s in held:
            s.close()
        results["idle_flows"] = args.idle_flows
        results["rss_per_flow_edge_KiB"] = (after[0] - before[0]) / args.idle_flows
        results["rss_per_flow_connector_KiB"] = (after[1] - before[1]) / args.idle_flows
        results["rss_per_flow_total_KiB"] = (
            results["rss_per_flow_edge_KiB"] + results["rss_per_flow_connector_KiB"]
        )

    print(f"bulk transfer ({args.bytes / MB:.0f} MB, one TCP flow)")
    print(f"  tunnel   {results['bulk_tunnel_MBps']:9.1f} MB/s")
    print(f"  veth     {results['bulk_veth_MBps']:9.1f} MB/s   (baseline)")
    print(f"  ratio    {results['bulk_ratio']:9.3f}")
    print(
        f"  CPU      {results['bulk_edge_cpu_s_per_GB']:9.2f} s/GB edge, "
        f"{results['bulk_connector_cpu_s_per_GB']:.2f} s/GB connector"
    )
    print(f"flow setups ({CONCURRENCY} concurrent, {args.seconds:g} s)")
    print(
        f"  tunnel   {results['setups_tunnel_per_s']:9.0f} /s  "
        f"({results['setups_tunnel_failed']:.0f} failed)"
    )
    print(f"  veth     {results['setups_veth_per_s']:9.0f} /s   (baseline)")
    print(f"  ratio    {results['setups_ratio']:9.3f}")
    print(
        f"  CPU      {results['setups_edge_cpu_us_per_flow']:9.0f} µs/flow edge, "
        f"{results['setups_connector_cpu_us_per_flow']:.0f} µs/flow connector"
    )
    print(f"memory per idle flow ({args.idle_flows} flows)")
    print(f"  edge      {results['rss_per_flow_edge_KiB']:8.1f} KiB")
    print(f"  connector {results['rss_per_flow_connector_KiB']:8.1f} KiB")
    print(f"  total     {results['rss_per_flow_total_KiB']:8.1f} KiB")
    print(json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
