"""The test network of the integration tests and benchmarks, and the ramp processes inside it.

    client (C)                 edge (E)                          private (P)
    203.0.113.2/24 ──veth── 203.0.113.1/24
                               192.0.2.1/24 ──────veth────── 192.0.2.2/24
                                                              lo: origins 198.51.100.10, .11
                                                                  blackhole 198.51.100.99

(and the same in IPv6: 2001:db8:203::/64, 2001:db8:192::/64, origins in 2001:db8:198::/64).

- C reaches only E's proxy listeners. E has no route to the origins. P accepts no new inbound
  connections (nftables: established/related and loopback only), so the only way in is the
  connector in P dialling out to the edge at 192.0.2.1:7844 over QUIC.
- The origins (see `ramp.testing.origins`) listen in P: HTTP on :80 (files of a `Payload`),
  echo on :7, hello-echo on :9000, half-close on :9001. Nothing listens on :9 (refused), and
  P's nftables silently drop what P sends to the blackhole address (connects time out).
- The edge resolves `origin.ramp.test` (and friends) from its own /etc/hosts.
- UDP: an echo on :7/udp of each origin address. DNS: dnsmasq in P on 198.51.100.53:53 serves
  the private zone corp.example (`app.corp.example` -> 198.51.100.10, a TXT record too big for
  one 1232-byte UDP answer, `dual.corp.example` with an A record of the blackhole and an AAAA
  record of the IPv6 origin, ...) and refuses everything else; E has no route to it. On demand
  (`start_upstream_dns`), a second dnsmasq in E on 127.0.0.53:53 plays the edge's public
  upstream resolver (`www.example.net`).
- `Lab(..., router=True)` puts a router namespace R between P and the origins, which then live
  in their own namespace O (see "Router topology" below), so traceroute has a hop inside the
  private network. Off by default: the default topology is the one above.
- Options: `tunnel_mtu` for the E<->P veth (jumbo datagrams), `add_edge_address` for a second
  client-facing address of the edge (203.0.113.3, source-address tests), `add_client_address`
  for a second source address in C (203.0.113.4, a legitimate client beside an attacker),
  `route_to_edge` for a prefix routed from C to E that no interface holds (203.0.113.64/26
  or 2001:db8:203:64::/64, the any-port on-ramp's),
  `add_private_network` for another private network behind its own veth to E (198.18.N.0/24)
  with an origin at the same address 198.51.100.10 (tenants, virtual networks), `start_sshd`
  for OpenSSH on 198.51.100.10:22 (key login as root; `Lab.ssh` is the client in C).
- The edge can take a config file (`write_edge_config`, `start_edge("--config", path)`,
  `reload_edge` sends SIGHUP); the store has policy rules (`add_rule`, `policy_test`,
  `reset_policy`) and virtual networks (`vnet`, `add_route(..., vnet=)`); `audit_records`
  parses the edge's audit lines.
- `Lab(..., workers=N)` (default: $RAMP_LAB_WORKERS, else 1) starts the edge and every
  connector with `--workers N` (a connector's --ha-connections raised to N where lower), so
  the whole suite can run against worker processes.

Router topology (`router=True`):

    private (P)                      router (R)                        origins (O)
    198.51.100.1/30 ────veth──── 198.51.100.2/30
                                 198.51.100.5/30 ────veth──── 198.51.100.6/30
                                                               lo: origins 198.51.100.10, .11,
                                                                   .53 (DNS), .99

(IPv6: P 2001:db8:198:1::1/64, R 2001:db8:198:1::2 and 2001:db8:198:2::1, O 2001:db8:198:2::2,
origins 2001:db8:198::10 and ::99 on O's lo). P routes the origin prefixes via R, R forwards,
O's default route is R. The origins and the private DNS run in O; the connector stays in P and
its firewall too. ICMP errors of R come from 198.51.100.2 / 2001:db8:198:1::2 (ROUTER_ADDR).

The ramp CLI runs as `python -m ramp` with this interpreter: store commands on the host, the
edge in E, connectors in P. Their stdout/stderr go to files under the lab's work directory;
`Lab.log_tails` is what a failed test prints.

    with Lab(tmp_path, payload=payload) as lab:
        lab.start_standard()           # tunnel "corp" for the origins, edge, one connector
        lab.curl(*lab.proxy_args("socks5"), f"http://{ORIGIN}/")
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml
from prometheus_client.parser import text_string_to_metric_families

import ramp
from ramp.net.netns import Netns, NetnsGroup, stop_process, veth
from ramp.testing.clients import http_connect, http_forward_get, socks5_connect

# --- addresses and ports ---------------------------------------------------------------------

CLIENT_ADDR = "203.0.113.2"
EDGE_PUBLIC_ADDR = "203.0.113.1"  # the edge's proxy and metrics listeners
EDGE_TUNNEL_ADDR = "192.0.2.1"  # where connectors dial the edge
PRIVATE_ADDR = "192.0.2.2"  # the private network's way out
ORIGIN_PREFIX = "198.51.100.0/24"
ORIGIN = "198.51.100.10"
ORIGIN2 = "198.51.100.11"
BLACKHOLE = "198.51.100.99"
OUTSIDE = "192.0.2.200"  # in no route: nothing may ever dial it

CLIENT_ADDR6 = "2001:db8:203::2"
CLIENT_ADDR2 = "203.0.113.4"  # see `Lab.add_client_address`
CLIENT_NS2_ADDR = "203.0.113.5"  # see `Lab.add_client_namespace`
EDGE_PUBLIC_ADDR6 = "2001:db8:203::1"
EDGE_TUNNEL_ADDR6 = "2001:db8:192::1"
PRIVATE_ADDR6 = "2001:db8:192::2"
ORIGIN6_PREFIX = "2001:db8:198::/64"
ORIGIN6 = "2001:db8:198::10"
BLACKHOLE6 = "2001:db8:198::99"

# Router topology (`Lab(router=True)`): P <-> R <-> O, the origins on O's loopback.
PRIVATE_ROUTER_ADDR = "198.51.100.1"  # P's end of the P<->R link: the connector's source
ROUTER_ADDR = "198.51.100.2"  # R's end toward P: the address in R's ICMP errors
ROUTER_ORIGIN_ADDR = "198.51.100.5"
ORIGIN_HOST_ADDR = "198.51.100.6"
PRIVATE_ROUTER_ADDR6 = "2001:db8:198:1::1"
ROUTER_ADDR6 = "2001:db8:198:1::2"
ROUTER_ORIGIN_ADDR6 = "2001:db8:198:2::1"
ORIGIN_HOST_ADDR6 = "2001:db8:198:2::2"

EDGE_PUBLIC_ADDR2 = "203.0.113.3"  # see `Lab.add_edge_address`
# A prefix of public addresses no interface holds, routed from C to E (`route_to_edge`): the
# any-port on-ramp answers on all of it
ANYPORT_PREFIX = "203.0.113.64/26"
ANYPORT_PREFIX6 = "2001:db8:203:64::/64"
EDGE_PUBLIC_ADDR6_2 = "2001:db8:203::3"
# More private networks (`Lab.add_private_network`): E 198.18.N.1/24 <-> 198.18.N.2/24.
SECOND_PRIVATE_PREFIX = "198.18"

# DNS: the private zone (dnsmasq in P) and the edge's public upstream (dnsmasq in E).
PRIVATE_DNS_ADDR = "198.51.100.53"
PRIVATE_DNS = f"{PRIVATE_DNS_ADDR}:53"
DNS_ZONE = "corp.example"
APP_NAME = f"app.{DNS_ZONE}"  # -> ORIGIN
DB_NAME = f"db.{DNS_ZONE}"  # -> ORIGIN2
BIG_NAME = f"big.{DNS_ZONE}"  # TXT BIG_TXT: more than one 1232-byte UDP answer holds
BIG_TXT = tuple(f"{i:02d}" + chr(ord("a") + i) * 198 for i in range(8))
PRIVATE_DNS_RECORDS = {APP_NAME: ORIGIN, DB_NAME: ORIGIN2}
# A -> the blackhole (connects time out), AAAA -> the IPv6 origin: only happy eyeballs gets in
DUAL_NAME = f"dual.{DNS_ZONE}"
DUAL_RECORDS = (BLACKHOLE, ORIGIN6)
UPSTREAM_DNS_ADDR = "127.0.0.53"
UPSTREAM_DNS = f"{UPSTREAM_DNS_ADDR}:53"
PUBLIC_NAME = "www.example.net"  # known only to the upstream resolver
PUBLIC_NAME_ADDR = "192.0.2.80"

ORIGIN_NAME = "origin.ramp.test"
ORIGIN6_NAME = "origin6.ramp.test"
BLACKHOLE_NAME = "blackhole.ramp.test"

TUNNEL_PORT = 7844
SOCKS_PORT = 1080
HTTP_PROXY_PORT = 8080
EDGE_METRICS_PORT = 20241
CONNECTOR_METRICS_BASE_PORT = 20300
MASQUE_PORT = 443
CLIENT_SOCKS_PORT = 1080  # `ramp client run`'s listeners, on the client's loopback
CLIENT_HTTP_PORT = 8080
CLIENT_METRICS_PORT = 20243

HTTP_PORT = 80
ECHO_PORT = 7
HELLO_PORT = 9000
HALF_CLOSE_PORT = 9001
HTTP_ALT_PORT = 8000  # the same HTTP origin again
SSH_PORT = 22  # `Lab.start_sshd`
UDP_ECHO_PORT = 7  # UDP echo on each origin address
CLOSED_PORT = 9
DNS_PORT = 53

EDGE_TUNNEL = f"{EDGE_TUNNEL_ADDR}:{TUNNEL_PORT}"
SOCKS_PROXY = f"{EDGE_PUBLIC_ADDR}:{SOCKS_PORT}"
EDGE_MASQUE = f"{EDGE_PUBLIC_ADDR}:{MASQUE_PORT}"  # the edge's HTTP/3 proxy (UDP)
CLIENT_SOCKS = f"127.0.0.1:{CLIENT_SOCKS_PORT}"
CLIENT_HTTP = f"127.0.0.1:{CLIENT_HTTP_PORT}"
EDGE_DNS = f"{EDGE_PUBLIC_ADDR}:{DNS_PORT}"  # the usual --dns-listen in tests
HTTP_PROXY = f"{EDGE_PUBLIC_ADDR}:{HTTP_PROXY_PORT}"

RAMP = [sys.executable, "-m", "ramp"]

T = TypeVar("T")


WORKERS_ENV = "RAMP_LAB_WORKERS"  # run every lab's edge and connectors with --workers N


class LabError(RuntimeError):
    """Setting up or driving the lab failed; the message says what and shows the output."""


class ProcessExited(LabError):
    """A ramp process ended while the lab waited for it."""


# --- waiting ---------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    *,
    interval: float = 0.05,
    what: str | Callable[[], str] = "condition",
) -> T:
    """Poll `predicate` until it returns something truthy and return that.

    An exception from the predicate counts as "not yet" (the last one is chained to the
    TimeoutError), except `ProcessExited`, which ends the wait at once.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = predicate()
        except ProcessExited:
            raise
        except Exception as e:
            last_error = e
        else:
            if value:
                return value
            last_error = None
        if time.monotonic() >= deadline:
            text = what() if callable(what) else what
            detail = f"; last error: {last_error!r}" if last_error else ""
            raise TimeoutError(f"gave up after {timeout} s waiting for {text}{detail}") from (
                last_error
            )
        time.sleep(interval)


# --- payload ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileInfo:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Payload:
    """Files the HTTP origin serves; random content, sha256 taken while writing."""

    directory: Path
    big: FileInfo
    small: FileInfo


def _write_random(path: Path, size: int) -> FileInfo:
    digest = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            digest.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return FileInfo(path.name, size, digest.hexdigest())


def make_payload(directory: Path, big_size: int = 100 * 2**20) -> Payload:
    directory.mkdir(parents=True, exist_ok=True)
    big = _write_random(directory / "big.bin", big_size)
    small = _write_random(directory / "small.bin", 64 * 1024)
    return Payload(directory, big, small)


# --- metrics ---------------------------------------------------------------------------------


class Metrics:
    """A parsed /metrics scrape."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = [
            (s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels` (0 if none)."""
        return sum(
            v
            for n, sample_labels, v in self.samples
            if n == name and all(sample_labels.get(k) == x for k, x in labels.items())
        )

    def has(self, name: str) -> bool:
        return any(n == name for n, _, _ in self.samples)

    def labels(self, name: str) -> list[dict[str, str]]:
        return [sample_labels for n, sample_labels, _ in self.samples if n == name]


def _http_get(host: str, port: int, path: str, timeout: float) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# --- processes -------------------------------------------------------------------------------


class LabProcess:
    """One program the lab started in a namespace (edge, connector, origins)."""

    def __init__(
        self,
        role: str,
        ns: Netns,
        args: list[str],
        proc: subprocess.Popen[bytes],
        stdout_path: Path,
        stderr_path: Path,
        metrics_addr: tuple[str, int] | None,
    ) -> None:
        self.role = role
        self.ns = ns
        self.args = args
        self.proc = proc
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path
        self.metrics_addr = metrics_addr
        self.started = time.monotonic()

    def __repr__(self) -> str:
        return f"<{self.role} pid={self.pid} in {self.ns.name}>"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise ProcessExited(
                f"{self.role} exited with code {self.proc.returncode}\n{self.tail()}"
            )

    def signal(self, sig: int) -> None:
        """Send `sig` to the process and everything it started (its process group)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """`kill -9`: no chance to say goodbye to anyone."""
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        return stop_process(self.proc, timeout)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.role} still runs after {timeout} s\n{self.tail()}") from None

    def group_pids(self) -> set[int]:
        """The process and whatever it forked (they share its process group)."""
        pids = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == self.proc.pid:  # pgrp
                pids.add(int(entry.name))
        return pids

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def output(self) -> str:
        return self.stdout() + self.stderr()

    def tail(self, lines: int = 40) -> str:
        parts = []
        for label, path in (("stdout", self.stdout_path), ("stderr", self.stderr_path)):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                if text:
                    parts.append(f"--- {self.role} {label} ({path.name}, last {len(text)}) ---")
                    parts.extend(text)
        state = "running" if self.alive() else f"exited {self.proc.returncode}"
        return "\n".join([f"=== {self.role} pid {self.pid}: {state}", *parts])

    # status listener

    def http_get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        if self.metrics_addr is None:
            raise LabError(f"{self.role} has no metrics listener")
        host, port = self.metrics_addr
        return self.ns.call(_http_get, host, port, path, timeout)

    def ready(self) -> bool:
        """GET /ready answered 200 (raises ProcessExited if the process is gone)."""
        self.check_alive()
        status, _ = self.http_get("/ready")
        return status == 200

    def metrics(self) -> Metrics:
        status, body = self.http_get("/metrics")
        if status != 200:
            raise LabError(f"{self.role} /metrics answered {status}: {body[:200]!r}")
        return Metrics(body.decode())


# --- the lab ---------------------------------------------------------------------------------


_NFT_PRIVATE = f"""
table inet ramp_lab {{
    chain input {{
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        iif "lo" accept
        icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept
    }}
    chain output {{
        type filter hook output priority filter; policy accept;
        ip daddr {BLACKHOLE} drop
        ip6 daddr {BLACKHOLE6} drop
    }}
}}
"""

_HOSTS = f"""127.0.0.1 localhost
::1 localhost
{ORIGIN} {ORIGIN_NAME}
{ORIGIN6} {ORIGIN6_NAME}
{BLACKHOLE} {BLACKHOLE_NAME}
"""

# No nameserver: lookups of other names fail at once against 127.0.0.1 inside the namespace
# instead of leaving it.
_RESOLV = "options timeout:1 attempts:1\n"

_PROXY_ENV = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")


@dataclass(frozen=True)
class Digest:
    """What `Lab.curl_digest` saw: curl's exit code and stderr, and the body's size and hash."""

    returncode: int
    size: int
    sha256: str
    stderr: str


@dataclass(frozen=True)
class Dig:
    """One `dig` run: its exit code (9 = no answer from the server it asked) and output."""

    returncode: int
    output: str

    @property
    def status(self) -> str | None:
        """The answer's RCODE name (NOERROR, REFUSED, ...), None when there was no answer."""
        m = re.search(r"->>HEADER<<- opcode: \w+, status: (\w+)", self.output)
        return m.group(1) if m else None

    @property
    def flags(self) -> set[str]:
        m = re.search(r";; flags:([^;]*);", self.output)
        return set(m.group(1).split()) if m else set()

    def answers(self, rtype: str = "A") -> list[str]:
        """RDATA of the answer section's records of type `rtype`, as dig prints them."""
        found = []
        section = False
        for line in self.output.splitlines():
            if line.startswith(";; ANSWER SECTION:"):
                section = True
                continue
            if section:
                if not line.strip():
                    break
                cols = line.split(None, 4)
                if len(cols) == 5 and cols[3] == rtype:
                    found.append(cols[4])
        return found

    def server(self) -> str | None:
        """`;; SERVER:` line: the address the answer came from."""
        m = re.search(r";; SERVER: (\S+)", self.output)
        return m.group(1) if m else None


class Lab:
    """The three namespaces, the origins, and any edge and connectors started in them."""

    def __init__(
        self,
        workdir: Path,
        *,
        payload: Payload | None = None,
        mtu: int | None = None,
        tunnel_mtu: int | None = None,
        ipv6: bool = True,
        private_dns: bool = True,
        router: bool = False,
        workers: int | None = None,
    ) -> None:
        """`mtu` applies to both veth pairs, `tunnel_mtu` (if set) to the E<->P pair instead;
        `private_dns` starts the dnsmasq of the corp.example zone in P; `router` puts a router
        namespace between P and the origins (see the module's "Router topology")."""
        self.router = router
        self.workers = workers or int(os.environ.get(WORKERS_ENV, "1") or 1)
        self._router_ns: Netns | None = None
        self._origin_ns: Netns | None = None
        self.workdir = Path(workdir)
        self.payload = payload
        self.mtu = mtu
        self.tunnel_mtu = tunnel_mtu or mtu
        self.ipv6 = ipv6
        self.private_dns = private_dns
        self.data_dir = self.workdir / "edge-data"
        self.log_dir = self.workdir / "logs"
        self.env = self._make_env()
        self.processes: list[LabProcess] = []
        self.edge: LabProcess | None = None
        self.connectors: list[LabProcess] = []
        self.clients: list[LabProcess] = []  # `ramp client run` processes
        self.origins: LabProcess | None = None
        self.dns_server: LabProcess | None = None  # dnsmasq in P
        self.upstream_dns: LabProcess | None = None  # dnsmasq in E
        self._group: NetnsGroup | None = None
        self._role_counts: dict[str, int] = {}
        self._edge_args: list[str] = []
        self.tokens: dict[str, str] = {}  # tunnel name -> token, as created here
        self._extra_networks = 0

    # --- building ------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        self.build()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _make_env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k.lower() not in _PROXY_ENV and not k.startswith("RAMP_")
        }
        env["PYTHONUNBUFFERED"] = "1"
        env["RAMP_HOME"] = str(self.workdir / "home")
        # The children run in the lab's work directory: give them the source tree this
        # process imported ramp from (a relative PYTHONPATH would not resolve there).
        src = str(Path(ramp.__file__).resolve().parent.parent)
        rest = [str(Path(p).resolve()) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        rest = [p for p in rest if p != src]
        env["PYTHONPATH"] = os.pathsep.join([src, *rest])
        return env

    @property
    def client(self) -> Netns:
        return self._ns(0)

    @property
    def edge_ns(self) -> Netns:
        return self._ns(1)

    @property
    def private(self) -> Netns:
        return self._ns(2)

    @property
    def router_ns(self) -> Netns:
        """R, between P and the origins (`router=True` only)."""
        if self._router_ns is None:
            raise LabError("this lab has no router namespace (Lab(..., router=True))")
        return self._router_ns

    @property
    def origin_ns(self) -> Netns:
        """Where the origins live: O behind the router, else P itself."""
        return self._origin_ns if self._origin_ns is not None else self.private

    def _ns(self, i: int) -> Netns:
        if self._group is None or len(self._group.namespaces) < 3:
            raise LabError("the lab is not built (use `with Lab(...)` or call build())")
        return self._group.namespaces[i]

    def build(self) -> None:
        """Make the namespaces, wire them up, start the origins. Undone by `close`."""
        for d in (self.workdir, self.data_dir, self.log_dir, self.workdir / "home"):
            d.mkdir(parents=True, exist_ok=True)
        self._group = NetnsGroup()
        try:
            self._build_network()
            self.start_origins()
            if self.private_dns:
                self.start_private_dns()
        except BaseException:
            self.close()
            raise

    def _build_network(self) -> None:
        assert self._group is not None
        c = self._group.new("client")
        e = self._group.new("edge")
        p = self._group.new("private")
        v6 = self.ipv6
        veth(
            c,
            "to-edge",
            e,
            "to-client",
            a_addresses=[f"{CLIENT_ADDR}/24"] + ([f"{CLIENT_ADDR6}/64"] if v6 else []),
            b_addresses=[f"{EDGE_PUBLIC_ADDR}/24"] + ([f"{EDGE_PUBLIC_ADDR6}/64"] if v6 else []),
            mtu=self.mtu,
        )
        veth(
            e,
            "to-private",
            p,
            "to-edge",
            a_addresses=[f"{EDGE_TUNNEL_ADDR}/24"] + ([f"{EDGE_TUNNEL_ADDR6}/64"] if v6 else []),
            b_addresses=[f"{PRIVATE_ADDR}/24"] + ([f"{PRIVATE_ADDR6}/64"] if v6 else []),
            mtu=self.tunnel_mtu,
        )
        # The origins are local addresses of P (or of O behind R); E and C get no route to them.
        origins = self._build_router(p) if self.router else p
        for addr in (ORIGIN, ORIGIN2, BLACKHOLE, PRIVATE_DNS_ADDR):
            origins.add_address("lo", f"{addr}/32")
        if v6:
            for addr in (ORIGIN6, BLACKHOLE6):
                origins.add_address("lo", f"{addr}/128")
        for ns in (c, e, p):
            ns.sysctl("net.ipv4.ip_forward", 0)
            if v6:
                ns.sysctl("net.ipv6.conf.all.forwarding", 0)
        p.nft(_NFT_PRIVATE)
        for ns in (c, e, p):
            ns.set_etc_file("resolv.conf", _RESOLV)
        e.set_etc_file("hosts", _HOSTS)
        for ns in (c, p):
            ns.set_etc_file("hosts", "127.0.0.1 localhost\n::1 localhost\n")

    def _build_router(self, p: Netns) -> Netns:
        """R and O: P <-> R <-> O, P's routes to the origins via R; returns O."""
        assert self._group is not None
        r = self._router_ns = self._group.new("router")
        o = self._origin_ns = self._group.new("origins")
        v6 = self.ipv6
        veth(
            p,
            "to-router",
            r,
            "to-private",
            a_addresses=[f"{PRIVATE_ROUTER_ADDR}/30"]
            + ([f"{PRIVATE_ROUTER_ADDR6}/64"] if v6 else []),
            b_addresses=[f"{ROUTER_ADDR}/30"] + ([f"{ROUTER_ADDR6}/64"] if v6 else []),
            mtu=self.mtu,
        )
        veth(
            r,
            "to-origins",
            o,
            "to-router",
            a_addresses=[f"{ROUTER_ORIGIN_ADDR}/30"]
            + ([f"{ROUTER_ORIGIN_ADDR6}/64"] if v6 else []),
            b_addresses=[f"{ORIGIN_HOST_ADDR}/30"] + ([f"{ORIGIN_HOST_ADDR6}/64"] if v6 else []),
            mtu=self.mtu,
        )
        p.add_route(ORIGIN_PREFIX, via=ROUTER_ADDR)
        r.add_route(ORIGIN_PREFIX, via=ORIGIN_HOST_ADDR)
        o.add_route("default", via=ROUTER_ORIGIN_ADDR)
        r.sysctl("net.ipv4.ip_forward", 1)
        if v6:
            p.add_route(ORIGIN6_PREFIX, via=ROUTER_ADDR6)
            r.add_route(ORIGIN6_PREFIX, via=ORIGIN_HOST_ADDR6)
            o.add_route("default", via=ROUTER_ORIGIN_ADDR6)
            r.sysctl("net.ipv6.conf.all.forwarding", 1)
        for ns in (r, o):
            ns.set_etc_file("resolv.conf", _RESOLV)
            ns.set_etc_file("hosts", "127.0.0.1 localhost\n::1 localhost\n")
        return o

    def set_ping_group_range(self, ns: Netns, low: int, high: int) -> None:
        """net.ipv4.ping_group_range in `ns` (per namespace): who may open ping sockets;
        `1 0` (the kernel's default) lets nobody."""
        ns.sysctl("net.ipv4.ping_group_range", f"{low} {high}")

    def close(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL) and delete the namespaces."""
        for p in reversed(self.processes):
            with contextlib.suppress(Exception):
                p.stop(timeout=5.0)
        if self._group is not None:
            self._group.close()
            self._group = None

    # --- processes -----------------------------------------------------------------------

    def _role_name(self, role: str) -> str:
        n = self._role_counts.get(role, 0) + 1
        self._role_counts[role] = n
        return role if n == 1 else f"{role}-{n}"

    def start_process(
        self,
        role: str,
        ns: Netns,
        args: Sequence[str],
        *,
        metrics_addr: tuple[str, int] | None = None,
    ) -> LabProcess:
        """Start `args` in `ns` with output to log files; stopped when the lab closes."""
        name = self._role_name(role)
        out_path = self.log_dir / f"{name}.stdout.log"
        err_path = self.log_dir / f"{name}.stderr.log"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            proc = ns.popen(list(args), stdout=out, stderr=err, env=self.env, cwd=self.workdir)
        lp = LabProcess(name, ns, list(args), proc, out_path, err_path, metrics_addr)
        self.processes.append(lp)
        return lp

    def start_origins(self) -> LabProcess:
        root = self.payload.directory if self.payload else self._small_www()
        args = [sys.executable, "-m", "ramp.testing.origins", "--root", str(root)]
        hosts = [ORIGIN, ORIGIN2] + ([f"[{ORIGIN6}]"] if self.ipv6 else [])
        for host in hosts:
            args += ["--http", f"{host}:{HTTP_PORT}", "--echo", f"{host}:{ECHO_PORT}"]
            args += ["--hello-echo", f"{host}:{HELLO_PORT}"]
            args += ["--half-close", f"{host}:{HALF_CLOSE_PORT}"]
            args += ["--udp-echo", f"{host}:{UDP_ECHO_PORT}"]
        args += ["--http", f"{ORIGIN}:{HTTP_ALT_PORT}"]
        origins = self.start_process("origins", self.origin_ns, args)
        wait_until(
            lambda: origins.check_alive() or "ready" in origins.stdout(),
            30,
            what="the origin servers to listen",
        )
        self.origins = origins
        return origins

    def _dnsmasq(self, role: str, ns: Netns, addr: str, records: Sequence[str]) -> LabProcess:
        """dnsmasq answering only `records` on addr:53 (UDP and TCP), REFUSED for the rest."""
        args = [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--port=53",
            f"--listen-address={addr}",
            "--bind-interfaces",
            f"--pid-file={self.workdir / f'{role}.pid'}",
            "--log-facility=-",
            "--log-queries",
            *records,
        ]
        proc = self.start_process(role, ns, args)
        want = {("udp", f"{addr}:53"), ("tcp", f"{addr}:53")}
        wait_until(
            lambda: proc.check_alive() or want <= self.listening(ns),
            15,
            interval=0.05,
            what=lambda: f"{role} to listen on {addr}:53\n{proc.tail()}",
        )
        return proc

    def start_private_dns(self) -> LabProcess:
        """dnsmasq in P for the zone corp.example on 198.51.100.53:53 (started by `build`)."""
        records = [f"--address=/{name}/{ip}" for name, ip in PRIVATE_DNS_RECORDS.items()]
        records += [f"--address=/{DUAL_NAME}/{ip}" for ip in DUAL_RECORDS]
        # One argv word, no shell: quotes would end up inside the strings.
        records.append(f"--txt-record={BIG_NAME}," + ",".join(BIG_TXT))
        self.dns_server = self._dnsmasq(
            "dnsmasq-private", self.origin_ns, PRIVATE_DNS_ADDR, records
        )
        return self.dns_server

    def start_upstream_dns(self) -> LabProcess:
        """dnsmasq in E on 127.0.0.53:53, the edge's public upstream: knows www.example.net."""
        records = [f"--address=/{PUBLIC_NAME}/{PUBLIC_NAME_ADDR}"]
        self.upstream_dns = self._dnsmasq(
            "dnsmasq-upstream", self.edge_ns, UPSTREAM_DNS_ADDR, records
        )
        return self.upstream_dns

    def add_edge_address(self, address: str = EDGE_PUBLIC_ADDR2) -> None:
        """Another address on the edge's client-facing veth, in the prefix of the first."""
        self.edge_ns.add_address("to-client", f"{address}/{64 if ':' in address else 24}")

    def route_to_edge(self, prefix: str = ANYPORT_PREFIX) -> None:
        """Route `prefix` from C to E, as an upstream router sends a service's addresses to
        the edge; E holds none of them (the any-port on-ramp makes them its own)."""
        self.client.add_route(prefix, via=EDGE_PUBLIC_ADDR6 if ":" in prefix else EDGE_PUBLIC_ADDR)

    def add_client_address(self, address: str = CLIENT_ADDR2) -> None:
        """Another source address for C (a second client, told apart by its address)."""
        self.client.add_address("to-edge", f"{address}/{64 if ':' in address else 24}")

    def add_client_namespace(self, role: str, address: str = CLIENT_NS2_ADDR) -> Netns:
        """Another client namespace with its own veth to E: `address`/32 there, and in E a
        host route to it over the new veth (more specific than C's 203.0.113.0/24), so two
        `ramp client run --tun` can each own a TUN device and the same routes."""
        assert self._group is not None
        ns = self._group.new(role)
        dev = f"to-{role}"[:15]
        veth(self.edge_ns, dev, ns, "to-edge")
        ns.add_address("to-edge", f"{address}/32")
        ns.add_route(f"{EDGE_PUBLIC_ADDR}/32", dev="to-edge")
        ns.add_route("default", via=EDGE_PUBLIC_ADDR)
        self.edge_ns.add_route(f"{address}/32", dev=dev)
        for conf in ("all", dev):
            self.edge_ns.sysctl(f"net.ipv4.conf.{conf}.rp_filter", 0)
        ns.sysctl("net.ipv4.ip_forward", 0)
        ns.set_etc_file("resolv.conf", _RESOLV)
        ns.set_etc_file("hosts", "127.0.0.1 localhost\n::1 localhost\n")
        return ns

    def add_private_network(self, role: str, root: Path) -> Netns:
        """Another private network behind the edge, built like P: its own namespace with a
        veth to E (E 198.18.N.1/24, it 198.18.N.2/24, N = 1, 2, ...), the same origin
        addresses on its loopback, an HTTP origin on ORIGIN:80 serving `root`, and P's
        firewall (nothing inbound). A connector started in it (`start_connector(ns=...)`)
        dials the edge's tunnel address through E; E still has no route to its origins."""
        assert self._group is not None
        self._extra_networks += 1
        n = self._extra_networks
        edge_addr, addr = f"{SECOND_PRIVATE_PREFIX}.{n}.1", f"{SECOND_PRIVATE_PREFIX}.{n}.2"
        ns = self._group.new(role)
        veth(
            self.edge_ns,
            f"to-priv{n}",
            ns,
            "to-edge",
            a_addresses=[f"{edge_addr}/24"],
            b_addresses=[f"{addr}/24"],
            mtu=self.tunnel_mtu,
        )
        ns.add_route("default", via=edge_addr)
        for origin in (ORIGIN, ORIGIN2, BLACKHOLE):
            ns.add_address("lo", f"{origin}/32")
        ns.sysctl("net.ipv4.ip_forward", 0)
        ns.nft(_NFT_PRIVATE)
        ns.set_etc_file("resolv.conf", _RESOLV)
        ns.set_etc_file("hosts", "127.0.0.1 localhost\n::1 localhost\n")
        args = [sys.executable, "-m", "ramp.testing.origins", "--root", str(root)]
        args += ["--http", f"{ORIGIN}:{HTTP_PORT}", "--echo", f"{ORIGIN}:{ECHO_PORT}"]
        origins = self.start_process(f"origins-{role}", ns, args)
        wait_until(
            lambda: origins.check_alive() or "ready" in origins.stdout(),
            30,
            what=f"the origin servers of {role} to listen",
        )
        return ns

    def start_sshd(self, ns: Netns | None = None, address: str = ORIGIN) -> Path:
        """OpenSSH's sshd on address:22 in P (or `ns`) with a throwaway host key, letting in
        root with a throwaway client key only; returns that key's private file (`ssh`)."""
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not Path(sshd).exists():
            raise LabError("sshd is not installed (Debian: openssh-server)")
        d = self.workdir / "ssh"
        d.mkdir(exist_ok=True)
        for key in ("host_key", "client_key"):
            if not (d / key).exists():
                subprocess.run(
                    ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)],
                    check=True,
                    capture_output=True,
                    timeout=30,
                )
        (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
        (d / "sshd_config").write_text(
            f"""ListenAddress {address}:{SSH_PORT}
HostKey {d / "host_key"}
PidFile {d / "sshd.pid"}
AuthorizedKeysFile {d / "authorized_keys"}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
"""
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege separation dir
        ns = ns or self.origin_ns
        proc = self.start_process("sshd", ns, [sshd, "-D", "-e", "-f", str(d / "sshd_config")])
        wait_until(
            lambda: proc.check_alive() or ("tcp", f"{address}:{SSH_PORT}") in self.listening(ns),
            15,
            what=lambda: f"sshd to listen on {address}:{SSH_PORT}\n{proc.tail()}",
        )
        return d / "client_key"

    def ssh(
        self, key: Path, host: str, port: int, *command: str, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[bytes]:
        """`ssh -p PORT root@HOST COMMAND` in C with `key`, no host key checks, no config."""
        args = ["ssh", "-F", "/dev/null", "-i", str(key), "-p", str(port)]
        for option in (
            "IdentitiesOnly=yes",
            "BatchMode=yes",
            "StrictHostKeyChecking=no",
            "UserKnownHostsFile=/dev/null",
            "LogLevel=ERROR",
            f"ConnectTimeout={round(timeout)}",
        ):
            args += ["-o", option]
        return self.client.run(
            [*args, f"root@{host}", *command], check=False, timeout=timeout + 10, env=self.env
        )

    def _small_www(self) -> Path:
        www = self.workdir / "www"
        if not (www / "small.bin").exists():
            www.mkdir(parents=True, exist_ok=True)
            _write_random(www / "small.bin", 64 * 1024)
        return www

    # --- the ramp CLI (store commands run on the host) -----------------------------------

    def ramp(
        self, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """`ramp ARGS --data-dir <the edge's data dir>` on the host."""
        cmd = [*RAMP, *args, "--data-dir", str(self.data_dir)]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=self.env, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise LabError(
                f"`ramp {' '.join(args)}` exited {proc.returncode}\n"
                f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
            )
        return proc

    def create_tunnel(self, name: str, routes: Iterable[str] = ()) -> str:
        """Create tunnel `name`, route `routes` to it, return its token."""
        self.ramp("tunnel", "create", name)
        for cidr in routes:
            self.add_route(cidr, name)
        self.tokens[name] = self.token(name)
        return self.tokens[name]

    def token(self, name: str, edge: str = EDGE_TUNNEL) -> str:
        token = self.ramp("tunnel", "token", name, "--edge", edge).stdout.strip()
        if not token or len(token.split()) != 1:
            raise LabError(f"`ramp tunnel token {name}` printed {token!r}, not one token")
        return token

    def add_route(self, cidr: str, tunnel: str, *, vnet: str | None = None) -> None:
        self.ramp("tunnel", "route", "ip", "add", cidr, tunnel, *_vnet_flag(vnet))

    def delete_route(self, cidr: str, *, vnet: str | None = None) -> None:
        self.ramp("tunnel", "route", "ip", "delete", cidr, *_vnet_flag(vnet))

    # policy rules and virtual networks

    def policy(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`ramp policy ARGS` against the edge's store."""
        return self.ramp("policy", *args, check=check)

    def add_rule(self, rule_id: str, action: str, **match: str | int) -> None:
        """`ramp policy add RULE_ID --action ACTION --KEY VALUE...`; keys as the flags, with
        `source` for --from (`position=1` puts the rule first)."""
        args = ["add", rule_id, "--action", action]
        for key, value in match.items():
            flag = "--from" if key == "source" else "--" + key.replace("_", "-")
            args += [flag, str(value)]
        self.policy(*args)

    def delete_rule(self, rule_id: str) -> None:
        self.policy("delete", rule_id)

    def rule_ids(self) -> list[str]:
        """The rule ids in their order, from `ramp policy list`."""
        ids = []
        for line in self.policy("list").stdout.splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 2 and cols[0].isdigit():
                ids.append(cols[1])
        return ids

    def reset_policy(self) -> None:
        """Back to a new store's policy: the one rule `default`, allowing everything."""
        for rule_id in self.rule_ids():
            if rule_id != "default":
                self.delete_rule(rule_id)
        if "default" not in self.rule_ids():
            self.add_rule("default", "allow", position=1)

    def policy_test(self, to: str, identity: str | None = None, *extra: str) -> list[str]:
        """The lines `ramp policy test` prints; the first is `allow RULE` or `deny RULE`."""
        args = ["test", "--to", to, *extra]
        if identity is not None:
            args += ["--identity", identity]
        return self.policy(*args).stdout.splitlines()

    def vnet(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`ramp vnet ARGS` against the edge's store."""
        return self.ramp("vnet", *args, check=check)

    def delete_tunnel(self, name: str) -> None:
        self.ramp("tunnel", "delete", name)

    def add_dns_route(self, zone: str, tunnel: str) -> None:
        self.ramp("tunnel", "route", "dns", "add", zone, tunnel)

    def delete_dns_route(self, zone: str) -> None:
        self.ramp("tunnel", "route", "dns", "delete", zone)

    def dns_routes(self) -> str:
        """What `ramp tunnel route dns list` prints."""
        return self.ramp("tunnel", "route", "dns", "list").stdout

    # --- edge ----------------------------------------------------------------------------

    def edge_command(self, *extra: str) -> list[str]:
        return [
            *RAMP,
            "edge",
            "--data-dir",
            str(self.data_dir),
            "--tunnel-listen",
            EDGE_TUNNEL,
            "--socks5-listen",
            SOCKS_PROXY,
            "--http-listen",
            HTTP_PROXY,
            "--masque-listen",
            EDGE_MASQUE,
            "--metrics-listen",
            f"{EDGE_PUBLIC_ADDR}:{EDGE_METRICS_PORT}",
            *self._workers_flags(extra),
            *extra,
        ]

    def _workers_flags(self, extra: Sequence[str], connector: bool = False) -> list[str]:
        """`--workers N` unless the caller chose its own; a connector needs N connections."""
        if self.workers <= 1 or "--workers" in extra:
            return []
        flags = ["--workers", str(self.workers)]
        if connector:
            ha = _last_flag(list(extra), "--ha-connections", "4")
            if int(ha) < self.workers:
                flags += ["--ha-connections", str(self.workers)]
        return flags

    def start_edge(
        self,
        *extra: str,
        wait: bool = True,
        timeout: float = 30.0,
        wrapper: Sequence[str] = (),
    ) -> LabProcess:
        """Start `ramp edge` in E; with `wait`, return once all its listeners are bound.
        `wrapper` is a command that execs the edge, e.g. `prlimit --nofile=1024:1024`."""
        if self.edge is not None and self.edge.alive():
            raise LabError("an edge is already running; stop it first")
        args = [*wrapper, *self.edge_command(*extra)]
        self._edge_args = list(extra)
        edge = self.start_process(
            "edge", self.edge_ns, args, metrics_addr=(EDGE_PUBLIC_ADDR, EDGE_METRICS_PORT)
        )
        self.edge = edge
        if wait:
            self.wait_edge_listening(timeout)
        return edge

    def restart_edge(self, sig: int = signal.SIGTERM, *extra: str) -> LabProcess:
        """Stop the edge with `sig` (SIGKILL: no goodbye) and start it again, same data dir."""
        edge = self._need_edge()
        edge.signal(sig)
        edge.wait_exit(30)
        return self.start_edge(*(extra or self._edge_args))

    def _need_edge(self) -> LabProcess:
        if self.edge is None:
            raise LabError("no edge started")
        return self.edge

    def listening(self, ns: Netns) -> set[tuple[str, str]]:
        """(proto, "addr:port") of every listening socket in `ns`."""
        out = ns.run(["ss", "-Htuln"]).stdout.decode()
        found = set()
        for line in out.splitlines():
            cols = line.split()
            if len(cols) >= 5:
                found.add((cols[0], cols[4].replace("[", "").replace("]", "")))
        return found

    def wait_edge_listening(self, timeout: float = 30.0) -> None:
        edge = self._need_edge()
        tunnel = _last_flag(edge.args, "--tunnel-listen", EDGE_TUNNEL)
        want = {("udp", tunnel.replace("[", "").replace("]", ""))}
        for flag, default in (
            ("--socks5-listen", SOCKS_PROXY),
            ("--http-listen", HTTP_PROXY),
            ("--metrics-listen", f"{EDGE_PUBLIC_ADDR}:{EDGE_METRICS_PORT}"),
            ("--dns-listen", "off"),
            ("--masque-listen", EDGE_MASQUE),
        ):
            value = _last_flag(edge.args, flag, default)
            if value not in ("off", ""):
                bare = value.replace("[", "").replace("]", "")
                if flag != "--masque-listen":
                    want.add(("tcp", bare))
                if flag in ("--dns-listen", "--masque-listen"):
                    want.add(("udp", bare))

        def bound() -> bool:
            edge.check_alive()
            have = self.listening(self.edge_ns)
            # ss prints a dual-stack [::] socket as *:PORT
            have |= {(p, ":::" + a[2:]) for p, a in have if a.startswith("*:")}
            return want <= have

        wait_until(
            bound,
            timeout,
            interval=0.1,
            what=lambda: f"the edge to listen on {sorted(want)}\n{edge.tail()}",
        )

    def edge_metrics(self) -> Metrics:
        return self._need_edge().metrics()

    def write_edge_config(self, config: dict[str, object], name: str = "edge.yaml") -> Path:
        """Write `config` as YAML to the work directory (for `start_edge("--config", path)`);
        the same name again overwrites it in place, as an operator editing the file would."""
        path = self.workdir / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        tmp.replace(path)
        return path

    def write_file(self, name: str, text: str) -> Path:
        """A file in the work directory (hook modules, bad configs)."""
        path = self.workdir / name
        path.write_text(text)
        return path

    def wait_listening(
        self, ns: Netns, sockets: Iterable[tuple[str, str]], timeout: float = 30.0
    ) -> None:
        """Until every (proto, "addr:port") of `sockets` is a listening socket in `ns`."""
        want = set(sockets)
        wait_until(
            lambda: want <= self.listening(ns),
            timeout,
            interval=0.1,
            what=lambda: f"listeners {sorted(want)} in {ns.name}\n{self.log_tails(10)}",
        )

    def audit_records(self, path: Path | None = None) -> list[dict[str, object]]:
        """The audit records the edge wrote so far: its stderr's JSON lines, or `path`."""
        text = path.read_text(errors="replace") if path is not None else self._need_edge().stderr()
        records = []
        for line in text.splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    records.append(json.loads(line))
        return records

    def reload_edge(self) -> None:
        """SIGHUP to the edge: re-read its config file and hooks."""
        self._need_edge().signal(signal.SIGHUP)

    def wait_tunnel_connections(self, tunnel: str, count: int, timeout: float = 30.0) -> None:
        """Until the edge counts at least `count` registered connections of `tunnel`."""
        edge = self._need_edge()
        wait_until(
            lambda: edge.metrics().value("ramp_tunnel_connections", tunnel=tunnel) >= count,
            timeout,
            interval=0.1,
            what=lambda: f"{count} connections of tunnel {tunnel!r} at the edge\n{edge.tail()}",
        )

    # --- connectors ----------------------------------------------------------------------

    def connector_command(self, token: str, index: int, *extra: str) -> list[str]:
        return [
            *RAMP,
            "tunnel",
            "run",
            "--token",
            token,
            "--data-dir",
            str(self.workdir / f"connector-{index}-data"),
            "--metrics-listen",
            f"127.0.0.1:{CONNECTOR_METRICS_BASE_PORT + index}",
            *extra,
            *self._workers_flags(extra, connector=True),
        ]

    def start_connector(
        self,
        token: str,
        *extra: str,
        wait: bool = True,
        timeout: float = 30.0,
        ns: Netns | None = None,
    ) -> LabProcess:
        """Start `ramp tunnel run --token TOKEN` in P (or `ns`, e.g. a network of
        `add_private_network`); with `wait`, return once /ready is 200."""
        index = len(self.connectors) + 1
        args = self.connector_command(token, index, *extra)
        conn = self.start_process(
            "connector",
            ns or self.private,
            args,
            metrics_addr=("127.0.0.1", CONNECTOR_METRICS_BASE_PORT + index),
        )
        self.connectors.append(conn)
        if wait:
            self.wait_ready(conn, timeout)
        return conn

    def wait_ready(self, proc: LabProcess, timeout: float = 30.0) -> None:
        wait_until(
            proc.ready,
            timeout,
            interval=0.1,
            what=lambda: f"{proc.role} /ready to answer 200\n{proc.tail()}",
        )

    def start_standard(
        self,
        tunnel: str = "corp",
        *,
        routes: Sequence[str] = (ORIGIN_PREFIX,),
        edge_args: Sequence[str] = (),
        connector_args: Sequence[str] = ("--connect-timeout", "2"),
        ha_connections: int | None = None,
    ) -> str:
        """Tunnel `tunnel` routed for the origins, an edge, one ready connector; the token."""
        token = self.create_tunnel(tunnel, routes)
        self.start_edge(*edge_args)
        extra = list(connector_args)
        if ha_connections is not None:
            extra += ["--ha-connections", str(ha_connections)]
        self.start_connector(token, *extra)
        self.wait_tunnel_connections(tunnel, 1)
        return token

    # --- ramp client (MASQUE proxy mode) ----------------------------------------------------

    def client_token(self, name: str, edge: str = EDGE_MASQUE) -> str:
        """Create client identity `name` (unless it exists) and return its token."""
        listed = self.ramp("client", "list").stdout
        if not any(line.split()[:1] == [name] for line in listed.splitlines()):
            self.ramp("client", "create", name)
        return self.ramp("client", "token", name, "--edge", edge).stdout.strip()

    def start_client(
        self,
        token: str,
        *extra: str,
        wait: bool = True,
        timeout: float = 30.0,
        ns: Netns | None = None,
        metrics_port: int = CLIENT_METRICS_PORT,
    ) -> LabProcess:
        """Start `ramp client run` in C (token in a file, as users should pass it); with
        `wait`, return once its /ready is 200 (connected to the edge)."""
        index = len(self.clients) + 1
        token_file = self.workdir / f"client-{index}.token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        args = [
            *RAMP,
            "client",
            "run",
            "--token-file",
            str(token_file),
            "--data-dir",
            str(self.workdir / f"client-{index}-data"),
            "--socks5-listen",
            CLIENT_SOCKS,
            "--http-listen",
            CLIENT_HTTP,
            "--metrics-listen",
            f"127.0.0.1:{metrics_port}",
            *extra,
        ]
        proc = self.start_process(
            "client", ns or self.client, args, metrics_addr=("127.0.0.1", metrics_port)
        )
        self.clients.append(proc)
        if wait:
            self.wait_ready(proc, timeout)
        return proc

    # --- clients -------------------------------------------------------------------------

    @staticmethod
    def proxy_args(kind: str) -> list[str]:
        """curl flags for one way through the edge: socks5, socks5-hostname, connect, forward."""
        return {
            "socks5": ["--socks5", SOCKS_PROXY],
            "socks5-hostname": ["--socks5-hostname", SOCKS_PROXY],
            "connect": ["--proxytunnel", "--proxy", f"http://{HTTP_PROXY}"],
            "forward": ["--proxy", f"http://{HTTP_PROXY}"],
        }[kind]

    def curl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[bytes]:
        """curl in C (`-sS`); check the return code yourself."""
        return self.client.run(
            ["curl", "-sS", "--max-time", str(timeout), *args],
            check=False,
            timeout=timeout + 10,
            env=self.env,
        )

    def curl_digest(self, *args: str, timeout: float = 300.0) -> Digest:
        """curl in C, hashing the body as it streams in (nothing is written to disk)."""
        err_path = self.log_dir / f"curl-{time.monotonic_ns()}.stderr.log"
        digest = hashlib.sha256()
        size = 0
        with err_path.open("wb") as err:
            proc = self.client.popen(
                ["curl", "-sS", "--fail", "--max-time", str(timeout), *args],
                stdout=subprocess.PIPE,
                stderr=err,
                env=self.env,
            )
        try:
            assert proc.stdout is not None
            while chunk := proc.stdout.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
            returncode = proc.wait(timeout + 10)
        finally:
            stop_process(proc, 1.0)
            with contextlib.suppress(ValueError):
                self.client.procs.remove(proc)
        return Digest(returncode, size, digest.hexdigest(), err_path.read_text(errors="replace"))

    def client_socket(self, family: int = socket.AF_INET, timeout: float = 10.0) -> socket.socket:
        sock = self.client.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        return sock

    def connect_socks(self, timeout: float = 10.0) -> socket.socket:
        """A TCP connection from C to the edge's SOCKS5 listener."""
        sock = self.client_socket(timeout=timeout)
        sock.connect((EDGE_PUBLIC_ADDR, SOCKS_PORT))
        return sock

    def connect_http_proxy(self, timeout: float = 10.0) -> socket.socket:
        """A TCP connection from C to the edge's HTTP proxy listener."""
        sock = self.client_socket(timeout=timeout)
        sock.connect((EDGE_PUBLIC_ADDR, HTTP_PROXY_PORT))
        return sock

    def socks5(self, host: str, port: int, timeout: float = 10.0) -> tuple[int, socket.socket]:
        """SOCKS5 CONNECT from C via the edge: (REP byte, the socket; close it)."""
        sock = self.connect_socks(timeout)
        try:
            return socks5_connect(sock, host, port), sock
        except BaseException:
            sock.close()
            raise

    def http_connect(
        self, host: str, port: int, timeout: float = 10.0
    ) -> tuple[int, socket.socket]:
        """HTTP CONNECT from C via the edge: (status, the socket; close it)."""
        sock = self.connect_http_proxy(timeout)
        try:
            return http_connect(sock, host, port)[0], sock
        except BaseException:
            sock.close()
            raise

    def http_forward(self, host: str, port: int, path: str = "/", timeout: float = 10.0) -> int:
        """Absolute-form GET from C via the edge's HTTP proxy: the status."""
        with self.connect_http_proxy(timeout) as sock:
            return http_forward_get(sock, host, port, path)[0]

    def dig(self, *args: str, server: str = EDGE_PUBLIC_ADDR, timeout: float = 2.0) -> Dig:
        """`dig @SERVER ARGS` in C, one try of `timeout` seconds; see `Dig`."""
        proc = self.client.run(
            ["dig", f"@{server}", f"+time={max(1, round(timeout))}", "+tries=1", *args],
            check=False,
            timeout=timeout * 4 + 10,
            env=self.env,
        )
        return Dig(proc.returncode, proc.stdout.decode(errors="replace"))

    def udp_owners(self, dport: int) -> dict[int, int]:
        """Connected UDP sockets in P towards port `dport`: local port -> owning pid."""
        out = self.private.run(["ss", "-Hunp", "dport", "=", f":{dport}"]).stdout.decode()
        return _owners(out)

    def tcp_owners(self, dport: int) -> dict[int, int]:
        """Established TCP connections in P towards port `dport`: local port -> owning pid."""
        out = self.private.run(
            ["ss", "-Htnp", "state", "established", "dport", "=", f":{dport}"]
        ).stdout.decode()
        return _owners(out)

    # --- diagnostics ---------------------------------------------------------------------

    def log_tails(self, lines: int = 40) -> str:
        return "\n\n".join(p.tail(lines) for p in self.processes)


def _owners(ss_output: str) -> dict[int, int]:
    """Local port -> pid from the lines of `ss -H...p`.

    ss shows a State column only sometimes (not with a state filter, not for connected UDP),
    so the local address is the first column that looks like ADDR:PORT.
    """
    owners: dict[int, int] = {}
    for line in ss_output.splitlines():
        pid = re.search(r"pid=(\d+)", line)
        local = next((c for c in line.split() if re.fullmatch(r".+:\d+", c)), None)
        if pid and local:
            owners[int(local.rsplit(":", 1)[1])] = int(pid.group(1))
    return owners


def _vnet_flag(vnet: str | None) -> list[str]:
    return [] if vnet is None else ["--vnet", vnet]


def _last_flag(args: Sequence[str], flag: str, default: str) -> str:
    value = default
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value
