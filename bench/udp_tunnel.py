"""UDP through the tunnel vs. a plain veth, measured in one run on the namespace lab.

    python -m bench.udp_tunnel [--seconds S] [--window W] [--rate R] [--rate-seconds S]
                               [--pings N] [--size BYTES]

Path under test: a SOCKS5 UDP client in the client namespace -> the edge's UDP relay -> QUIC
tunnel -> connector -> UDP echo server in the private namespace, and back. Baseline: the same
client code against the same echo server program over the plain edge<->private veth.

For each path it prints:
- throughput: datagrams per second each way with `--size`-byte payloads, offered as fast as
  the echo comes back (`--window` unanswered at most), and the loss;
- fixed rate: `--rate` datagrams per second for `--rate-seconds`, and the loss at that rate;
- round-trip time of `--pings` datagrams sent one at a time: p50 and p99, and for the tunnel
  the p50 it adds to the baseline.

Needs root (network namespaces). Traffic stays inside the lab's namespaces. Each phase is
bounded in time and count; the whole run takes well under a minute with the defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import select
import socket
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ramp.testing.lab import (
    CLIENT_ADDR,
    EDGE_PUBLIC_ADDR,
    EDGE_TUNNEL_ADDR,
    ORIGIN,
    SOCKS_PORT,
    UDP_ECHO_PORT,
    Lab,
    LabProcess,
    wait_until,
)

BASELINE_PORT = 5007
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
SOCKET_BUFFER = 8 * 2**20
SEQ = struct.Struct("!Q")
DRAIN_SECONDS = 1.0  # how long late echoes are still counted after a phase


@dataclass
class UdpPath:
    """A connected UDP socket to an echo: `header` goes before every payload, `strip` bytes
    come off every reply (the SOCKS5 UDP header on the tunnel path, nothing on the veth)."""

    name: str
    sock: socket.socket
    header: bytes = b""
    strip: int = 0
    control: socket.socket | None = None  # the SOCKS5 control connection, kept open

    def close(self) -> None:
        self.sock.close()
        if self.control is not None:
            self.control.close()


def _big_buffers(sock: socket.socket) -> None:
    for forced, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, SOCKET_BUFFER)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise RuntimeError("SOCKS5 server closed the control connection")
        buf += chunk
    return buf


def socks5_udp_path(
    lab: Lab,
    *,
    proxy: tuple[str, int] = (EDGE_PUBLIC_ADDR, SOCKS_PORT),
    bind: str = CLIENT_ADDR,
    auth: tuple[str, str] | None = None,
    name: str = "tunnel",
) -> UdpPath:
    """UDP ASSOCIATE from C (RFC 1928 section 7) for datagrams to the echo in P, through the
    SOCKS5 proxy at `proxy` (with RFC 1929 `auth` when given)."""
    control = lab.client.socket()
    control.settimeout(10)
    control.connect(proxy)
    sock = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _big_buffers(sock)
    sock.bind((bind, 0))
    port = sock.getsockname()[1]
    if auth is None:
        control.sendall(b"\x05\x01\x00")
        if _recv_exact(control, 2) != b"\x05\x00":
            raise RuntimeError("SOCKS5 greeting refused")
    else:
        user, password = (x.encode() for x in auth)
        control.sendall(b"\x05\x01\x02")
        if _recv_exact(control, 2) != b"\x05\x02":
            raise RuntimeError("SOCKS5 proxy does not take a password")
        control.sendall(bytes([1, len(user)]) + user + bytes([len(password)]) + password)
        if _recv_exact(control, 2) != b"\x01\x00":
            raise RuntimeError("SOCKS5 login refused")
    control.sendall(b"\x05\x03\x00\x01" + socket.inet_aton(bind) + struct.pack("!H", port))
    reply = _recv_exact(control, 10)
    if reply[1] != 0 or reply[3] != 1:
        raise RuntimeError(f"UDP ASSOCIATE refused: {reply!r}")
    relay_host = socket.inet_ntoa(reply[4:8])
    if relay_host == "0.0.0.0":
        relay_host = proxy[0]
    (relay_port,) = struct.unpack("!H", reply[8:10])
    sock.connect((relay_host, relay_port))
    header = b"\x00\x00\x00\x01" + socket.inet_aton(ORIGIN) + struct.pack("!H", UDP_ECHO_PORT)
    return UdpPath(name, sock, header, len(header), control)


def veth_path(lab: Lab) -> UdpPath:
    """From P straight to the baseline echo in E over the veth."""
    sock = lab.private.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _big_buffers(sock)
    sock.connect((EDGE_TUNNEL_ADDR, BASELINE_PORT))
    return UdpPath("veth", sock)


def _payload(path: UdpPath, seq: int, filler: bytes) -> bytes:
    return path.header + SEQ.pack(seq) + filler


def _seq(path: UdpPath, data: bytes) -> int:
    return SEQ.unpack_from(data, path.strip)[0]


def _drain(path: UdpPath, seen: set[int], seconds: float) -> None:
    """Collect late echoes for `seconds`."""
    sock = path.sock
    deadline = time.perf_counter() + seconds
    sock.setblocking(False)
    while (left := deadline - time.perf_counter()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        with contextlib.suppress(BlockingIOError):
            while True:
                seen.add(_seq(path, sock.recv(65535)))


def saturate(path: UdpPath, size: int, seconds: float, window: int) -> dict[str, float]:
    """As fast as the echo comes back, at most `window` unanswered."""
    sock = path.sock
    sock.setblocking(True)
    sock.settimeout(0.2)
    filler = bytes(size - SEQ.size)
    seen: set[int] = set()
    sent = given_up = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        sending = time.perf_counter() < deadline
        while sending and sent - len(seen) - given_up < window:
            sock.send(_payload(path, sent, filler))
            sent += 1
        if not sending:
            break
        try:
            seen.add(_seq(path, sock.recv(65535)))
        except TimeoutError:
            given_up = sent - len(seen)  # those are lost; open the window again
    elapsed = time.perf_counter() - start
    _drain(path, seen, DRAIN_SECONDS)
    return {
        "datagrams_per_s": len(seen) / elapsed,
        "sent": sent,
        "received": len(seen),
        "loss_pct": 100.0 * (sent - len(seen)) / sent if sent else 0.0,
    }


def fixed_rate(path: UdpPath, size: int, rate: float, seconds: float) -> dict[str, float]:
    """`rate` datagrams per second, sent in 1 ms batches, for `seconds`; echoes counted."""
    sock = path.sock
    sock.setblocking(False)
    filler = bytes(size - SEQ.size)
    total = int(rate * seconds)
    seen: set[int] = set()
    sent = send_errors = 0
    batch = max(1.0, rate / 1000)
    start = time.perf_counter()
    while sent < total:
        now = time.perf_counter()
        due = min(total, int((now - start) * rate) + 1)
        while sent < due:
            try:
                sock.send(_payload(path, sent, filler))
            except BlockingIOError:
                send_errors += 1  # our own send buffer is full: it counts as lost
            sent += 1
        # Sleep (in select) until the next 1 ms batch is due, reading echoes meanwhile.
        wait = max(0.0, start + (sent + batch) / rate - time.perf_counter())
        if select.select([sock], [], [], wait)[0]:
            with contextlib.suppress(BlockingIOError):
                while True:
                    seen.add(_seq(path, sock.recv(65535)))
    send_time = time.perf_counter() - start
    _drain(path, seen, DRAIN_SECONDS)
    return {
        "offered_per_s": sent / send_time,
        "sent": sent,
        "received": len(seen),
        "client_send_errors": send_errors,
        "loss_pct": 100.0 * (sent - len(seen)) / sent if sent else 0.0,
    }


def pings(path: UdpPath, size: int, count: int) -> dict[str, float]:
    """`count` round trips, one at a time; RTT percentiles in milliseconds."""
    sock = path.sock
    sock.setblocking(True)
    sock.settimeout(1.0)
    filler = bytes(size - SEQ.size)
    rtts: list[float] = []
    lost = 0
    for seq in range(count):
        t0 = time.perf_counter()
        sock.send(_payload(path, seq, filler))
        try:
            while _seq(path, sock.recv(65535)) != seq:
                pass
        except TimeoutError:
            lost += 1
            continue
        rtts.append((time.perf_counter() - t0) * 1000)
    if not rtts:
        raise RuntimeError(f"{path.name}: no ping came back")
    cuts = statistics.quantiles(rtts, n=100)
    return {"p50_ms": statistics.median(rtts), "p99_ms": cuts[98], "lost": lost}


def drops(proc: LabProcess | None) -> dict[str, float]:
    """ramp_udp_drops_total by reason."""
    if proc is None:
        return {}
    m = proc.metrics()
    out: dict[str, float] = {}
    for name, labels, value in m.samples:
        if name == "ramp_udp_drops_total":
            out[labels.get("reason", "")] = out.get(labels.get("reason", ""), 0.0) + value
    return out


def kernel_udp(lab: Lab) -> dict[str, float]:
    """Kernel UDP error counters (/proc/net/snmp) of each namespace: where datagrams die that
    no ramp counter sees (socket buffers full)."""
    out: dict[str, float] = {}
    for role, ns in (("client", lab.client), ("edge", lab.edge_ns), ("private", lab.private)):
        lines = [
            line.split()
            for line in ns.run(["cat", "/proc/net/snmp"]).stdout.decode().splitlines()
            if line.startswith("Udp:")
        ]
        for key, value in zip(lines[0][1:], lines[1][1:], strict=True):
            if key in ("InErrors", "RcvbufErrors", "SndbufErrors"):
                out[f"{role}_{key}"] = float(value)
    return out


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def start_baseline_echo(lab: Lab) -> LabProcess:
    args = [sys.executable, "-m", "ramp.testing.origins"]
    args += ["--udp-echo", f"{EDGE_TUNNEL_ADDR}:{BASELINE_PORT}"]
    echo = lab.start_process("baseline-echo", lab.edge_ns, args)
    wait_until(lambda: echo.check_alive() or "ready" in echo.stdout(), 30, what="the baseline echo")
    return echo


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1200, help="payload bytes per datagram")
    ap.add_argument("--seconds", type=float, default=3.0, help="duration of the throughput test")
    ap.add_argument("--window", type=int, default=128, help="unanswered datagrams at most")
    ap.add_argument("--rate", type=float, default=20_000, help="datagrams/s of the fixed rate")
    ap.add_argument("--rate-seconds", type=float, default=3.0, help="duration of the fixed rate")
    ap.add_argument("--pings", type=int, default=1000, help="round trips for the RTT test")
    args = ap.parse_args()
    if not SEQ.size <= args.size <= 1472:
        ap.error("--size must be 8..1472 (one Ethernet frame)")

    results: dict[str, float] = {}
    tunnel_drops: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="ramp-bench-") as tmp, Lab(Path(tmp)) as lab:
        start_baseline_echo(lab)
        lab.start_standard(
            connector_args=("--log-level", "warning"),
            edge_args=("--log-level", "warning", "--audit-log", "/dev/null"),
        )
        paths = [socks5_udp_path(lab), veth_path(lab)]
        try:
            for path in paths:
                pings(path, args.size, 1000)  # warm up: session, QUIC windows, code paths
            for path in paths:
                phase = saturate(path, args.size, args.seconds, args.window)
                for k, v in phase.items():
                    results[f"max_{path.name}_{k}"] = v
            for path in paths:
                before = [drops(lab.edge), drops(lab.connectors[0]), kernel_udp(lab)]
                phase = fixed_rate(path, args.size, args.rate, args.rate_seconds)
                for k, v in phase.items():
                    results[f"rate_{path.name}_{k}"] = v
                after = [drops(lab.edge), drops(lab.connectors[0]), kernel_udp(lab)]
                tunnel_drops[f"{path.name}: kernel"] = _delta(after[2], before[2])
                if path.name == "tunnel":
                    tunnel_drops["tunnel: edge"] = _delta(after[0], before[0])
                    tunnel_drops["tunnel: connector"] = _delta(after[1], before[1])
            for path in paths:
                phase = pings(path, args.size, args.pings)
                for k, v in phase.items():
                    results[f"rtt_{path.name}_{k}"] = v
        finally:
            for path in paths:
                path.close()
    r = results
    r["max_ratio"] = r["max_tunnel_datagrams_per_s"] / r["max_veth_datagrams_per_s"]
    r["rtt_added_p50_ms"] = r["rtt_tunnel_p50_ms"] - r["rtt_veth_p50_ms"]
    r["rtt_added_p99_ms"] = r["rtt_tunnel_p99_ms"] - r["rtt_veth_p99_ms"]

    print(f"throughput ({args.size}-byte datagrams, window {args.window}, {args.seconds:g} s)")
    for name in ("tunnel", "veth"):
        print(
            f"  {name:8} {r[f'max_{name}_datagrams_per_s']:9.0f} /s each way  "
            f"loss {r[f'max_{name}_loss_pct']:.2f} %"
        )
    print(f"  ratio    {r['max_ratio']:9.3f}")
    print(f"fixed rate ({args.rate:.0f} /s offered for {args.rate_seconds:g} s)")
    for name in ("tunnel", "veth"):
        print(
            f"  {name:8} {r[f'rate_{name}_offered_per_s']:9.0f} /s offered  "
            f"{r[f'rate_{name}_received']:.0f}/{r[f'rate_{name}_sent']:.0f} back  "
            f"loss {r[f'rate_{name}_loss_pct']:.2f} %"
        )
    for where, counts in sorted(tunnel_drops.items()):
        if counts:
            print(f"  drops, {where}: {json.dumps(counts, sort_keys=True)}")
    print(f"round trip ({args.pings} pings, one at a time)")
    for name in ("tunnel", "veth"):
        print(
            f"  {name:8} p50 {r[f'rtt_{name}_p50_ms']:7.3f} ms  "
            f"p99 {r[f'rtt_{name}_p99_ms']:7.3f} ms  ({r[f'rtt_{name}_lost']:.0f} lost)"
        )
    print(f"  added    p50 {r['rtt_added_p50_ms']:7.3f} ms  p99 {r['rtt_added_p99_ms']:7.3f} ms")
    print(json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
