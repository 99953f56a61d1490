"""Proxy mode (`ramp client run`, MASQUE) vs. the edge's own SOCKS5 on-ramp vs. a plain veth,
measured in one run on the namespace lab.

    python -m bench.masque_proxy [--bytes N] [--seconds S] [--pings N] [--idle-flows K]

Paths:
- proxy mode: a SOCKS5 client in C -> `ramp client run` on C's loopback -> HTTP/3 CONNECT
  stream (or connect-udp) on one QUIC connection to the edge -> QUIC tunnel -> connector ->
  origin in P;
- edge SOCKS5: the same client code -> the edge's SOCKS5 on-ramp -> tunnel -> connector;
- veth: straight from P to the same origin program in E over the edge<->private veth.

Prints bulk TCP throughput of one flow, flow setups per second (32 at a time), connect-udp
datagrams per second and round-trip times, memory per idle open flow (client and edge), and
the ratios proxy mode / edge SOCKS5 (the bar for this stage: at least 0.8 for bulk and setups).

Needs root (network namespaces). Traffic stays inside the lab's namespaces; every phase is
bounded in time and count.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.servers import start_in
from bench.tcp_tunnel import BASE_PORT, CONCURRENCY, MB, bulk, cpu_seconds, rss_kib, setups
from bench.udp_tunnel import UdpPath, pings, saturate, socks5_udp_path, start_baseline_echo
from bench.udp_tunnel import veth_path as udp_veth_path
from ramp.client_token import decode_client_token
from ramp.policy.identities import secret_text, split_bearer
from ramp.testing.lab import (
    CLIENT_SOCKS_PORT,
    EDGE_PUBLIC_ADDR,
    EDGE_TUNNEL_ADDR,
    ORIGIN,
    SOCKS_PORT,
    Lab,
)

LOCAL = ("127.0.0.1", CLIENT_SOCKS_PORT)
EDGE_SOCKS = (EDGE_PUBLIC_ADDR, SOCKS_PORT)


def socks5_connect(sock: socket.socket, host: str, port: int, auth: tuple[str, str] | None) -> None:
    if auth is None:
        sock.sendall(b"\x05\x01\x00")
        if sock.recv(2) != b"\x05\x00":
            raise RuntimeError("SOCKS5 greeting refused")
    else:
        user, password = (x.encode() for x in auth)
        sock.sendall(b"\x05\x01\x02")
        if sock.recv(2) != b"\x05\x02":
            raise RuntimeError("SOCKS5 proxy does not take a password")
        sock.sendall(bytes([1, len(user)]) + user + bytes([len(password)]) + password)
        if sock.recv(2) != b"\x01\x00":
            raise RuntimeError("SOCKS5 login refused")
    sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port))
    rep = b""
    while len(rep) < 10:
        chunk = sock.recv(10 - len(rep))
        if not chunk:
            raise RuntimeError("SOCKS5 proxy closed")
        rep += chunk
    if rep[1] != 0:
        raise RuntimeError(f"SOCKS5 reply {rep[1]:#x}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", type=int, default=512 * MB, help="bulk transfer size")
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of setups and UDP tests")
    ap.add_argument("--pings", type=int, default=500, help="UDP round trips per path")
    ap.add_argument("--idle-flows", type=int, default=300, help="idle flows for the RSS test")
    ap.add_argument("--size", type=int, default=1200, help="UDP payload bytes")
    args = ap.parse_args()

    r: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ramp-bench-") as tmp, Lab(Path(tmp)) as lab:
        for ns, host in ((lab.private, ORIGIN), (lab.edge_ns, EDGE_TUNNEL_ADDR)):
            start_in(ns, host, BASE_PORT)
        start_baseline_echo(lab)
        quiet = ("--log-level", "warning", "--audit-log", "/dev/null")
        lab.start_standard(connector_args=("--log-level", "warning"), edge_args=quiet)
        token = lab.client_token("bench")
        name, secret = split_bearer(decode_client_token(token).bearer) or ("", b"")
        auth = (name, secret_text(secret))  # the edge's SOCKS5 wants the identity too now
        client = lab.start_client(token, *quiet)
        pids = {
            "client": client.pid,
            "edge": lab.edge.pid if lab.edge else 0,
            "connector": lab.connectors[0].pid,
        }

        def via(
            proxy: tuple[str, int], login: tuple[str, str] | None
        ) -> Callable[[], socket.socket]:
            def make() -> socket.socket:
                s = lab.client.socket()
                s.connect(proxy)
                socks5_connect(s, ORIGIN, BASE_PORT, login)
                return s

            return make

        def veth_sock() -> socket.socket:
            s = lab.private.socket()
            s.connect((EDGE_TUNNEL_ADDR, BASE_PORT))
            return s

        paths = {
            "proxy": via(LOCAL, None),
            "edge_socks5": via(EDGE_SOCKS, auth),
            "veth": veth_sock,
        }
        for make in paths.values():  # warm up (congestion windows, code)
            bulk(make, 32 * MB)
        for key, make in paths.items():
            cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
            r[f"bulk_{key}_MBps"] = args.bytes / bulk(make, args.bytes) / MB
            for k, p in pids.items():
                r[f"bulk_{key}_{k}_cpu_s_per_GB"] = (cpu_seconds(p) - cpu0[k]) / (args.bytes / 1e9)
            # on two cores the ramp processes share the CPU: their sum per GB bounds throughput
            r[f"bulk_{key}_ramp_cpu_s_per_GB"] = sum(
                r[f"bulk_{key}_{k}_cpu_s_per_GB"] for k in pids
            )

        setup_paths = {
            "proxy": (lab.client.sockets, True, LOCAL, None),
            "edge_socks5": (lab.client.sockets, True, EDGE_SOCKS, auth),
        }
        for key, (sockets, socks, proxy, login) in setup_paths.items():
            ok, bad = asyncio.run(
                setups(
                    sockets, (ORIGIN, BASE_PORT + 1), socks, args.seconds, auth=login, proxy=proxy
                )
            )
            r[f"setups_{key}_per_s"] = ok / args.seconds
            r[f"setups_{key}_failed"] = bad
        ok, bad = asyncio.run(
            setups(lab.private.sockets, (EDGE_TUNNEL_ADDR, BASE_PORT + 1), False, args.seconds)
        )
        r["setups_veth_per_s"] = ok / args.seconds

        udp_paths: dict[str, UdpPath] = {
            "proxy": socks5_udp_path(lab, proxy=LOCAL, bind="127.0.0.1", name="proxy"),
            "edge_socks5": socks5_udp_path(lab, auth=auth, name="edge_socks5"),
            "veth": udp_veth_path(lab),
        }
        try:
            for key, path in udp_paths.items():
                sat = saturate(path, args.size, args.seconds, 128)
                r[f"udp_{key}_dgrams_per_s"] = sat["datagrams_per_s"]
                r[f"udp_{key}_loss_pct"] = sat["loss_pct"]
                rtt = pings(path, args.size, args.pings)
                r[f"udp_{key}_rtt_p50_ms"] = rtt["p50_ms"]
                r[f"udp_{key}_rtt_p99_ms"] = rtt["p99_ms"]
        finally:
            for path in udp_paths.values():
                path.close()

        time.sleep(1.0)
        before = {k: rss_kib(p) for k, p in pids.items()}
        held = []
        for _ in range(args.idle_flows):
            s = lab.client.socket()
            s.connect(LOCAL)
            socks5_connect(s, ORIGIN, BASE_PORT + 2, None)
            held.append(s)
        time.sleep(1.0)
        after = {k: rss_kib(p) for k, p in pids.items()}
        for s in held:
            s.close()
        for k in pids:
            r[f"rss_per_open_stream_{k}_KiB"] = (after[k] - before[k]) / args.idle_flows

    for what in ("bulk", "setups"):
        unit = "_MBps" if what == "bulk" else "_per_s"
        r[f"{what}_ratio_proxy_vs_edge_socks5"] = (
            r[f"{what}_proxy{unit}"] / r[f"{what}_edge_socks5{unit}"]
        )
        r[f"{what}_ratio_proxy_vs_veth"] = r[f"{what}_proxy{unit}"] / r[f"{what}_veth{unit}"]
    r["udp_ratio_proxy_vs_edge_socks5"] = (
        r["udp_proxy_dgrams_per_s"] / r["udp_edge_socks5_dgrams_per_s"]
    )

    print(f"bulk TCP, one flow, {args.bytes / MB:.0f} MB")
    for key in ("proxy", "edge_socks5", "veth"):
        print(
            f"  {key:12} {r[f'bulk_{key}_MBps']:8.1f} MB/s   CPU s/GB: client "
            f"{r[f'bulk_{key}_client_cpu_s_per_GB']:.2f}, "
            f"edge {r[f'bulk_{key}_edge_cpu_s_per_GB']:.2f}, "
            f"connector {r[f'bulk_{key}_connector_cpu_s_per_GB']:.2f}, "
            f"all ramp {r[f'bulk_{key}_ramp_cpu_s_per_GB']:.2f}"
        )
    print(f"  proxy / edge SOCKS5 {r['bulk_ratio_proxy_vs_edge_socks5']:.3f}")
    print(f"flow setups ({CONCURRENCY} at a time, {args.seconds:g} s)")
    for key in ("proxy", "edge_socks5", "veth"):
        print(f"  {key:12} {r[f'setups_{key}_per_s']:8.0f} /s")
    print(f"  proxy / edge SOCKS5 {r['setups_ratio_proxy_vs_edge_socks5']:.3f}")
    print(f"UDP ({args.size}-byte datagrams; connect-udp in proxy mode)")
    for key in ("proxy", "edge_socks5", "veth"):
        print(
            f"  {key:12} {r[f'udp_{key}_dgrams_per_s']:8.0f} /s  loss "
            f"{r[f'udp_{key}_loss_pct']:.2f}%  RTT p50 {r[f'udp_{key}_rtt_p50_ms']:.2f} ms "
            f"p99 {r[f'udp_{key}_rtt_p99_ms']:.2f} ms"
        )
    print(f"memory per idle open stream ({args.idle_flows} flows in proxy mode)")
    for k in ("client", "edge"):
        print(f"  {k:8} {r[f'rss_per_open_stream_{k}_KiB']:6.1f} KiB")
    print(json.dumps(r, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
