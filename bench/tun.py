"""The TUN path (`ramp client run --tun`, connect-ip) vs. proxy mode vs. a plain veth, and
OpenVPN as a peer, measured in one run on the namespace lab.

    python -m bench.tun [--seconds S] [--pings N] [--bytes N] [--udp-rate MBIT]

Paths:
- tun: a program in C uses the TUN device ramp0 (MTU 1,400: every packet one QUIC DATAGRAM)
  with no proxy settings -> connect-ip on the client's QUIC connection -> edge (ICMP as whole
  packets down the tunnel, TCP upgraded to a kernel socket, UDP as tunnel UDP sessions) ->
  connector -> origin in P;
- tun_large: the same from a second client namespace whose device has a 65,000-byte MTU (the
  edge's `masque_ip_mtu` raised to match): packets that do not fit a QUIC DATAGRAM ride
  capsules; the edge clamps upgraded TCP's MSS to one DATAGRAM frame, so this shows what a
  larger device MTU changes (for TCP: little);
- proxy: the same bulk client through `ramp client run`'s SOCKS5 listener (HTTP/3 CONNECT);
- veth: straight between P and E over their veth pair, no ramp;
- openvpn (if Debian's `openvpn` is installed): a static-key point-to-point TUN VPN between C
  and E, user space like ramp's client, one process each side.

Prints ping RTT p50/p99 (and the microseconds the TUN path adds to the veth), one TCP flow's
bulk throughput (the bench's own client on tun, proxy and veth; iperf3 on tun, veth and
openvpn), iperf3 UDP datagrams/s and loss, and the ratios. The bar for this stage: added ping
p50 under 1 ms and TUN TCP at least 100 MB/s.

Needs root (network namespaces). Traffic stays inside the lab's namespaces; every phase is
bounded in time and count.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.masque_proxy import LOCAL, socks5_connect
from bench.servers import start_in
from bench.tcp_tunnel import BASE_PORT, MB, bulk
from ramp.net.netns import Netns
from ramp.testing.lab import EDGE_TUNNEL_ADDR, ORIGIN, ORIGIN_PREFIX, Lab, LabProcess, wait_until

IPERF_PORT = 5201
TUN = "ramp0"
# OpenVPN's point-to-point addresses: the benchmarking range (RFC 2544)
OVPN_E, OVPN_C = "198.18.250.1", "198.18.250.2"
OVPN_PORT = 1194
LARGE_MTU = 65000


def ping_rtts(ns: Netns, target: str, count: int) -> list[float]:
    """Round trips in ms of `count` echo requests 10 ms apart."""
    proc = ns.run(
        ["ping", "-n", "-c", str(count), "-i", "0.01", "-W", "2", target],
        check=False,
        timeout=count * 0.5 + 30,
    )
    rtts = []
    for line in proc.stdout.decode().splitlines():
        if "time=" in line:
            rtts.append(float(line.rsplit("time=", 1)[1].split()[0]))
    if not rtts:
        raise RuntimeError(f"ping {target} got no reply: {proc.stdout[-300:]!r}")
    return rtts


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def iperf(
    lab: Lab, server_ns: Netns, client_ns: Netns, host: str, seconds: float, *extra: str
) -> dict[str, Any]:
    server = lab.start_process(
        "iperf3", server_ns, ["iperf3", "-s", "-1", "-B", host, "-p", str(IPERF_PORT)]
    )
    try:
        lab.wait_listening(server_ns, [("tcp", f"{host}:{IPERF_PORT}")])
        proc = client_ns.run(
            ["iperf3", "-c", host, "-p", str(IPERF_PORT), "-t", str(seconds), "-J", *extra],
            check=False,
            timeout=seconds + 60,
        )
        report = json.loads(proc.stdout or b"{}")
        if proc.returncode != 0:
            raise RuntimeError(f"iperf3 to {host}: {report.get('error') or proc.stderr!r}")
        return report  # type: ignore[no-any-return]
    finally:
        server.stop()


def tcp_mbps(report: dict[str, Any]) -> float:
    return float(report["end"]["sum_received"]["bits_per_second"]) / 8 / MB


def udp_figures(report: dict[str, Any], seconds: float) -> tuple[float, float]:
    """(datagrams/s that arrived, loss %)."""
    s = report["end"]["sum"]
    return (s["packets"] - s["lost_packets"]) / seconds, float(s["lost_percent"])


def start_openvpn(lab: Lab, workdir: Path) -> list[LabProcess]:
    key = workdir / "ovpn.key"
    subprocess.run(["openvpn", "--genkey", "secret", str(key)], check=True, capture_output=True)
    common = [
        "openvpn",
        "--dev",
        "ovpn0",
        "--dev-type",
        "tun",
        "--proto",
        "udp",
        "--secret",
        str(key),
        "--cipher",
        "AES-256-CBC",
        "--disable-dco",  # user space, as ramp's client is
        "--verb",
        "1",
        "--port",
        str(OVPN_PORT),
    ]
    server = lab.start_process(
        "openvpn-e", lab.edge_ns, [*common, "--ifconfig", OVPN_E, OVPN_C, "--local", "203.0.113.1"]
    )
    client = lab.start_process(
        "openvpn-c", lab.client, [*common, "--ifconfig", OVPN_C, OVPN_E, "--remote", "203.0.113.1"]
    )
    wait_until(
        lambda: safe(lambda: ping_rtts(lab.client, OVPN_E, 1)),
        30,
        interval=0.5,
        what=lambda: f"the OpenVPN tunnel\n{server.tail()}\n{client.tail()}",
    )
    return [server, client]


def safe(f: Callable[[], Any]) -> Any:
    try:
        return f()
    except RuntimeError:
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="each iperf3 run")
    ap.add_argument("--pings", type=int, default=300, help="echo requests per path")
    ap.add_argument("--bytes", type=int, default=256 * MB, help="bench bulk transfer size")
    ap.add_argument("--udp-rate", default="200M", help="iperf3 -u target bit rate")
    args = ap.parse_args()
    r: dict[str, float] = {}
    notes: list[str] = []

    with tempfile.TemporaryDirectory(prefix="ramp-bench-") as tmp, Lab(Path(tmp)) as lab:
        start_in(lab.private, ORIGIN, BASE_PORT)
        start_in(lab.edge_ns, EDGE_TUNNEL_ADDR, BASE_PORT)
        quiet = ("--log-level", "warning", "--audit-log", "/dev/null")
        edge_args = (*quiet, "--masque-ip-mtu", str(LARGE_MTU))  # the default 1,400 client too
        lab.start_standard(connector_args=("--log-level", "warning"), edge_args=edge_args)
        client = lab.start_client(
            lab.client_token("bench"), "--tun", "--tun-mtu", "1400", "--log-level", "warning"
        )
        large_ns = lab.add_client_namespace("client2")
        large = lab.start_client(
            lab.client_token("bench-large"),
            "--tun",
            "--tun-mtu",
            str(LARGE_MTU),
            "--log-level",
            "warning",
            ns=large_ns,
            metrics_port=20244,
        )
        for ns, proc in ((lab.client, client), (large_ns, large)):
            wait_until(
                lambda ns=ns: ORIGIN_PREFIX in ns.ip("route", "show", "dev", TUN),  # type: ignore[misc]
                30,
                interval=0.2,
                what=lambda proc=proc: f"the route to the origins on {TUN}\n{proc.tail()}",  # type: ignore[misc]
            )

        # -- ping ---------------------------------------------------------------------------
        ping_rtts(lab.client, ORIGIN, 20)  # warm up: flows, NAT slots, code paths
        paths_ping = {
            "tun": (lab.client, ORIGIN),
            "veth": (lab.private, EDGE_TUNNEL_ADDR),
        }
        for key, (ns, target) in paths_ping.items():
            rtts = ping_rtts(ns, target, args.pings)
            r[f"ping_{key}_p50_ms"] = statistics.median(rtts)
            r[f"ping_{key}_p99_ms"] = percentile(rtts, 0.99)
            r[f"ping_{key}_replies"] = len(rtts)

        # -- TCP ----------------------------------------------------------------------------
        def tun_sock() -> socket.socket:
            s = lab.client.socket()
            s.connect((ORIGIN, BASE_PORT))
            return s

        def large_sock() -> socket.socket:
            s = large_ns.socket()
            s.connect((ORIGIN, BASE_PORT))
            return s

        def proxy_sock() -> socket.socket:
            s = lab.client.socket()
            s.connect(LOCAL)
            socks5_connect(s, ORIGIN, BASE_PORT, None)
            return s

        def veth_sock() -> socket.socket:
            s = lab.private.socket()
            s.connect((EDGE_TUNNEL_ADDR, BASE_PORT))
            return s

        bulk_paths = {
            "tun": tun_sock,
            "tun_large": large_sock,
            "proxy": proxy_sock,
            "veth": veth_sock,
        }
        for make in bulk_paths.values():
            bulk(make, 16 * MB)
        for key, make in bulk_paths.items():
            r[f"bulk_{key}_MBps"] = args.bytes / bulk(make, args.bytes) / MB

        # iperf3 sends from the client: C -> origin over the TUN, P -> E over the veth
        r["iperf_tcp_tun_MBps"] = tcp_mbps(
            iperf(lab, lab.private, lab.client, ORIGIN, args.seconds)
        )
        r["iperf_tcp_tun_large_MBps"] = tcp_mbps(
            iperf(lab, lab.private, large_ns, ORIGIN, args.seconds)
        )
        r["iperf_tcp_veth_MBps"] = tcp_mbps(
            iperf(lab, lab.edge_ns, lab.private, EDGE_TUNNEL_ADDR, args.seconds)
        )
        udp = ("-u", "-b", args.udp_rate, "-l", "1200")
        for key, (server_ns, client_ns, host) in {
            "tun": (lab.private, lab.client, ORIGIN),
            "veth": (lab.edge_ns, lab.private, EDGE_TUNNEL_ADDR),
        }.items():
            rate, lost = udp_figures(
                iperf(lab, server_ns, client_ns, host, args.seconds, *udp), args.seconds
            )
            r[f"iperf_udp_{key}_dgrams_per_s"] = rate
            r[f"iperf_udp_{key}_loss_pct"] = lost
        tun_info = json.loads(client.http_get("/ready")[1]).get("tun", {})

        # -- OpenVPN ------------------------------------------------------------------------
        if shutil.which("openvpn") is None:
            notes.append("openvpn is not installed: no OpenVPN figures")
        else:
            try:
                start_openvpn(lab, Path(tmp))
                rtts = ping_rtts(lab.client, OVPN_E, args.pings)
                r["ping_openvpn_p50_ms"] = statistics.median(rtts)
                r["ping_openvpn_p99_ms"] = percentile(rtts, 0.99)
                r["iperf_tcp_openvpn_MBps"] = tcp_mbps(
                    iperf(lab, lab.edge_ns, lab.client, OVPN_E, args.seconds)
                )
                rate, lost = udp_figures(
                    iperf(lab, lab.edge_ns, lab.client, OVPN_E, args.seconds, *udp), args.seconds
                )
                r["iperf_udp_openvpn_dgrams_per_s"] = rate
                r["iperf_udp_openvpn_loss_pct"] = lost
            except Exception as e:  # a peer that does not start is reported, not fatal
                notes.append(f"OpenVPN did not run: {e}")

    r["ping_added_p50_us"] = (r["ping_tun_p50_ms"] - r["ping_veth_p50_ms"]) * 1000
    r["ping_added_p99_us"] = (r["ping_tun_p99_ms"] - r["ping_veth_p99_ms"]) * 1000
    r["bulk_ratio_tun_vs_proxy"] = r["bulk_tun_MBps"] / r["bulk_proxy_MBps"]
    r["bulk_ratio_tun_large_vs_proxy"] = r["bulk_tun_large_MBps"] / r["bulk_proxy_MBps"]
    r["bulk_ratio_tun_vs_veth"] = r["bulk_tun_MBps"] / r["bulk_veth_MBps"]
    r["iperf_tcp_ratio_tun_vs_veth"] = r["iperf_tcp_tun_MBps"] / r["iperf_tcp_veth_MBps"]
    if "iperf_tcp_openvpn_MBps" in r:
        r["iperf_tcp_ratio_tun_vs_openvpn"] = r["iperf_tcp_tun_MBps"] / r["iperf_tcp_openvpn_MBps"]

    print("ping RTT (ms)")
    for key in ("tun", "veth", "openvpn"):
        if f"ping_{key}_p50_ms" in r:
            print(f"  {key:8} p50 {r[f'ping_{key}_p50_ms']:.3f}  p99 {r[f'ping_{key}_p99_ms']:.3f}")
    print(
        f"  TUN adds {r['ping_added_p50_us']:.0f} us at p50, {r['ping_added_p99_us']:.0f} us "
        "at p99 (bar: under 1,000 us at p50)"
    )
    print(f"TCP, one flow ({args.bytes / MB:.0f} MB, the bench's client)")
    for key in ("tun", "tun_large", "proxy", "veth"):
        print(f"  {key:9} {r[f'bulk_{key}_MBps']:8.1f} MB/s")
    print(
        f"  tun/proxy {r['bulk_ratio_tun_vs_proxy']:.2f}   tun_large/proxy "
        f"{r['bulk_ratio_tun_large_vs_proxy']:.2f}   tun/veth "
        f"{r['bulk_ratio_tun_vs_veth']:.3f}   (bar: tun at least 100 MB/s)"
    )
    print(f"iperf3 TCP ({args.seconds:.0f} s)")
    for key in ("tun", "tun_large", "veth", "openvpn"):
        if f"iperf_tcp_{key}_MBps" in r:
            print(f"  {key:9} {r[f'iperf_tcp_{key}_MBps']:8.1f} MB/s")
    if "iperf_tcp_ratio_tun_vs_openvpn" in r:
        print(f"  tun/openvpn {r['iperf_tcp_ratio_tun_vs_openvpn']:.2f}")
    print(f"iperf3 UDP ({args.udp_rate}bit/s offered, 1,200-byte datagrams)")
    for key in ("tun", "veth", "openvpn"):
        if f"iperf_udp_{key}_dgrams_per_s" in r:
            print(
                f"  {key:8} {r[f'iperf_udp_{key}_dgrams_per_s']:9.0f} datagrams/s   loss "
                f"{r[f'iperf_udp_{key}_loss_pct']:.2f} %"
            )
    if tun_info:
        print(f"client TUN: {tun_info}")
    for note in notes:
        print(f"note: {note}")
    print(json.dumps(r, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
