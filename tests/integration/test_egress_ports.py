"""Egress that does not run out of source ports: in a private namespace whose ephemeral port
range is narrowed to 1,000 ports, the connector holds 3,000 TCP flows and 3,000 UDP sessions
at once to three origin ports; with port sharing off the same load fails for some flows, each
with net_unreachable "source ports exhausted" (reference/ephemeral-ports-connectx.txt).

    client (C) --SOCKS5--> edge (E) --tunnel--> connector (P) --from 198.51.100.2x--> origins

The flows go in by SOCKS5 CONNECT (TCP) and SOCKS5 UDP ASSOCIATE (three destinations per
association). The TCP origin says which address and port it sees the flow come from, so the
test checks the sources too.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import itertools
import re
import resource
import socket
import struct
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ramp.net.netns import Netns
from ramp.testing.clients import http_connect, socks5_connect_async, udp_unwrap, udp_wrap
from ramp.testing.lab import (
    CLIENT_ADDR,
    DNS_ZONE,
    DUAL_NAME,
    EDGE_PUBLIC_ADDR,
    EDGE_PUBLIC_ADDR2,
    HTTP_PORT,
    ORIGIN,
    PRIVATE_DNS,
    SOCKS_PORT,
    SOCKS_PROXY,
    Lab,
    LabProcess,
    Metrics,
    wait_until,
)
from ramp.testing.origins import INDEX_BODY

PORT_RANGE = (40000, 40999)  # 1,000 ephemeral ports in P
ORIGIN_PORTS = (9100, 9101, 9102)
FLOWS = 3000
SESSIONS = 3000  # 1,000 associations x 3 destinations
CONCURRENCY = 48  # handshakes in flight from the client (below the edge's per-source share)
POOL_ON = ("198.51.100.21", "198.51.100.22")
POOL_OFF = ("198.51.100.23", "198.51.100.24")  # fresh addresses: nothing left from the first run
EXHAUSTED = "source ports exhausted"
REP_NETWORK_UNREACHABLE = 0x03
NOFILE = 16384
# seconds a session may take to answer after the last one began: UDP says nothing of a
# session that failed, so the client waits this long (and resends) before it counts it
UDP_SETTLE = 8.0
SCRAPE_PORTS = (39000, 39500)
# direct egress from the edge: fewer flows (each holds six descriptors there), fewer ports
DIRECT_RANGE = (41000, 41199)
DIRECT_FLOWS = 600
DIRECT_SESSIONS = 600
# not the address of the SOCKS5 listener: its UDP relay sockets bind ports of the range there,
# and shared UDP ports are spread over the range (see docs/egress.md)
DIRECT_POOL_ON = (EDGE_PUBLIC_ADDR2, "203.0.113.7")
DIRECT_POOL_OFF = ("203.0.113.5", "203.0.113.6")  # below PORT_RANGE: see connector_metrics


@dataclass
class Held:
    """What the client holds open and what it saw."""

    target: str  # the origins' address
    tcp: list[asyncio.StreamWriter] = field(default_factory=list)
    tcp_failed: Counter[str] = field(default_factory=Counter)
    sources: Counter[str] = field(default_factory=Counter)  # TCP source address at the origin
    udp: list[UdpAssociation] = field(default_factory=list)
    udp_failed: int = 0
    udp_started: float = 0.0  # when the last association began (loop time)


class UdpAssociation(asyncio.DatagramProtocol):
    """One SOCKS5 UDP ASSOCIATE from C: its control connection and UDP socket."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.transport: asyncio.DatagramTransport | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.relay: tuple[str, int] = ("", 0)
        self.echoed: dict[int, bytes] = {}
        self.arrived = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        host, port, payload = udp_unwrap(data)
        if host == self.target:
            self.echoed[port] = payload
            self.arrived.set()

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        reader, self.writer = await asyncio.open_connection(EDGE_PUBLIC_ADDR, SOCKS_PORT)
        self.writer.write(b"\x05\x01\x00")
        if await reader.readexactly(2) != b"\x05\x00":
            raise ConnectionError("SOCKS5 greeting refused")
        self.writer.write(b"\x05\x03\x00\x01" + bytes(6))
        head = await reader.readexactly(10)
        if head[1] != 0:
            raise ConnectionError(f"UDP ASSOCIATE refused: REP {head[1]:#x}")
        relay = (socket.inet_ntoa(head[4:8]), struct.unpack("!H", head[8:10])[0])
        self.relay = (EDGE_PUBLIC_ADDR if relay[0] == "0.0.0.0" else relay[0], relay[1])
        await loop.create_datagram_endpoint(lambda: self, local_addr=(CLIENT_ADDR, 0))

    async def exchange(self, tokens: dict[int, bytes], deadline: float) -> set[int]:
        """Send each port its token, again every half second, until each came back or the
        deadline passed; the ports that answered."""
        loop = asyncio.get_running_loop()
        self.echoed = {}
        assert self.transport is not None
        while loop.time() < deadline:
            missing = [p for p, t in tokens.items() if self.echoed.get(p) != t]
            if not missing:
                break
            for port in missing:
                self.transport.sendto(udp_wrap(self.target, port, tokens[port]), self.relay)
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), 0.5)
        return {p for p, t in tokens.items() if self.echoed.get(p) == t}

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.writer is not None:
            self.writer.close()


async def open_tcp(held: Held, index: int, sem: asyncio.Semaphore) -> None:
    port = ORIGIN_PORTS[index % len(ORIGIN_PORTS)]
    async with sem:
        reader, writer = await asyncio.open_connection(EDGE_PUBLIC_ADDR, SOCKS_PORT)
        rep = await socks5_connect_async(reader, writer, held.target, port)
        if rep != 0:
            held.tcp_failed[f"socks5 reply {rep:#04x}"] += 1
            writer.close()
            return
        seen = (await reader.readline()).decode().split()  # the origin: "HOST PORT"
        token = b"flow %d\n" % index
        writer.write(token)
        if await reader.readexactly(len(token)) != token:
            held.tcp_failed["wrong echo"] += 1
            writer.close()
            return
    held.sources[seen[0]] += 1
    writer._ramp_reader = reader  # type: ignore[attr-defined]
    writer._ramp_index = index  # type: ignore[attr-defined]
    held.tcp.append(writer)


async def check_tcp(writer: asyncio.StreamWriter) -> bool:
    """One more round trip on a held flow: it is still there, with its own data."""
    token = b"again %d\n" % writer._ramp_index  # type: ignore[attr-defined]
    writer.write(token)
    reader: asyncio.StreamReader = writer._ramp_reader  # type: ignore[attr-defined]
    return await reader.readexactly(len(token)) == token


async def open_udp(held: Held, index: int, sem: asyncio.Semaphore, settle: float) -> None:
    """One association and its three sessions: opened CONCURRENCY at a time, then waited
    for (without holding the others back) until `settle` seconds after the last one began."""
    loop = asyncio.get_running_loop()
    assoc = UdpAssociation(held.target)
    tokens = {p: b"session %d/%d" % (index, p) for p in ORIGIN_PORTS}
    async with sem:
        await assoc.open()
        held.udp.append(assoc)
        ok = await assoc.exchange(tokens, loop.time() + 0.3)
    if len(ok) < len(tokens):
        ok = await assoc.exchange(tokens, held.udp_started + settle)
    held.udp_failed += len(tokens) - len(ok)


def rst_close(writer: asyncio.StreamWriter) -> None:
    # a reset leaves no TIME_WAIT behind on the connector's side either (the tunnel passes
    # the reset on), so nothing of one run holds ports in the next
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def load(
    inspect: Callable[[], dict[str, Any]], target: str, flows: int, sessions: int
) -> dict[str, Any]:
    """Open `flows` TCP flows and `sessions` UDP sessions to the origin ports of `target`,
    hold them all, look at the egress side (`inspect`), check every one again, close them."""
    loop = asyncio.get_running_loop()
    held = Held(target)
    sem = asyncio.Semaphore(CONCURRENCY)
    async with asyncio.timeout(120):
        await asyncio.gather(*(open_tcp(held, i, sem) for i in range(flows)))

        async def udp(i: int) -> None:
            held.udp_started = loop.time()
            await open_udp(held, i, sem, UDP_SETTLE)

        await asyncio.gather(*(udp(i) for i in range(sessions // len(ORIGIN_PORTS))))
        seen = await asyncio.to_thread(inspect)
        # all still there, each with its own data: no flow lost, no session overshadowed
        tcp_again = sum(await asyncio.gather(*(check_tcp(w) for w in held.tcp)))
        deadline = loop.time() + 30
        udp_again = 0
        for i, assoc in enumerate(held.udp):
            if assoc.echoed:
                answered = set(assoc.echoed)
                tokens = {p: b"again %d/%d" % (i, p) for p in answered}
                udp_again += len(await assoc.exchange(tokens, deadline))
    for w in held.tcp:
        rst_close(w)
    for assoc in held.udp:
        assoc.close()
    return {
        "tcp_ok": len(held.tcp),
        "tcp_failed": dict(held.tcp_failed),
        "tcp_again": tcp_again,
        "sources": dict(held.sources),
        "udp_ok": sessions - held.udp_failed,
        "udp_failed": held.udp_failed,
        "udp_again": udp_again,
        **seen,
    }


def egress_sockets(ns: Netns, proto: str, target: str) -> tuple[int, int, set[str]]:
    """The sockets in `ns` connected to the origin ports of `target`: (count, distinct local
    ports, local addresses), from `ss`."""
    filt = ["("]
    for i, port in enumerate(ORIGIN_PORTS):
        filt += (["or"] if i else []) + ["dst", f"{target}:{port}"]
    filt.append(")")
    state = ["state", "established"] if proto == "t" else []
    out = ns.run(["ss", f"-H{proto}n", *state, *filt]).stdout.decode()
    local = [
        next(c for c in line.split() if re.fullmatch(r"[0-9.]+:\d+", c))
        for line in out.splitlines()
        if line.strip()
    ]
    return (
        len(local),
        len({x.rsplit(":", 1)[1] for x in local}),
        {x.rsplit(":", 1)[0] for x in local},
    )


_scrape_ports = itertools.count()


def scrape(proc: LabProcess, source: str) -> Metrics:
    """`proc`'s /metrics from its namespace, from `source` and a fixed port below the narrowed
    range: while the run without port sharing holds its ports, bind() has taken every port of
    the range from connect() in the whole namespace (the article's point), a scrape's too."""
    assert proc.metrics_addr is not None
    addr = proc.metrics_addr

    def get() -> str:
        port = SCRAPE_PORTS[0] + next(_scrape_ports) % (SCRAPE_PORTS[1] - SCRAPE_PORTS[0])
        c = http.client.HTTPConnection(*addr, timeout=10, source_address=(source, port))
        try:
            c.request("GET", "/metrics")
            return c.getresponse().read().decode()
        finally:
            c.close()

    return Metrics(proc.ns.call(get))


def header(head: bytes, name: str) -> str:
    found = re.search(rb"(?im)^" + name.encode() + rb": *(.*?)\r?$", head)
    return found.group(1).decode() if found else ""


def run_load(lab: Lab, connector_index: int) -> dict[str, Any]:
    conn = lab.connectors[connector_index]

    def inspect() -> dict[str, Any]:
        tcp = egress_sockets(lab.private, "t", ORIGIN)
        udp = egress_sockets(lab.private, "u", ORIGIN)
        metrics = scrape(conn, "127.0.0.1")
        # one more flow while all are held, by HTTP CONNECT: what an HTTP client sees
        with lab.connect_http_proxy() as sock:
            status, head = http_connect(sock, ORIGIN, ORIGIN_PORTS[0])
        return {
            "http_connect": status,
            "http_proxy_status": header(head, "proxy-status"),
            "connector_tcp": tcp[0],
            "connector_tcp_ports": tcp[1],
            "connector_tcp_sources": sorted(tcp[2]),
            "connector_udp": udp[0],
            "connector_udp_ports": udp[1],
            "connector_udp_active": metrics.value("ramp_udp_sessions_active"),
        }

    result = lab.client.call(lambda: asyncio.run(load(inspect, ORIGIN, FLOWS, SESSIONS)))
    metrics = scrape(conn, "127.0.0.1")
    result["exhausted_tcp"] = metrics.value("ramp_egress_ports_exhausted_total", protocol="tcp")
    result["exhausted_udp"] = metrics.value("ramp_egress_ports_exhausted_total", protocol="udp")
    return result


def run_direct_load(lab: Lab) -> dict[str, Any]:
    edge = lab.edge
    assert edge is not None

    def inspect() -> dict[str, Any]:
        tcp = egress_sockets(lab.edge_ns, "t", CLIENT_ADDR)
        udp = egress_sockets(lab.edge_ns, "u", CLIENT_ADDR)
        return {
            "edge_tcp": tcp[0],
            "edge_tcp_ports": tcp[1],
            "edge_tcp_sources": sorted(tcp[2]),
            "edge_udp": udp[0],
            "edge_udp_ports": udp[1],
        }

    result = lab.client.call(
        lambda: asyncio.run(load(inspect, CLIENT_ADDR, DIRECT_FLOWS, DIRECT_SESSIONS))
    )
    metrics = scrape(edge, EDGE_PUBLIC_ADDR)
    result["exhausted_tcp"] = metrics.value("ramp_egress_ports_exhausted_total", protocol="tcp")
    result["exhausted_udp"] = metrics.value("ramp_egress_ports_exhausted_total", protocol="udp")
    return result


def raise_nofile() -> None:
    """The client holds ~5,000 sockets, the origins ~3,000: more than a default soft limit of
    1,024. The children inherit it; the roles also size their limits to it (ramp.fdbudget)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < NOFILE:
        pytest.fail(f"RLIMIT_NOFILE is {soft}: the test needs {NOFILE} descriptors per process")


@pytest.mark.slow
def test_connector_holds_3000_flows_and_sessions_in_1000_ports(
    tmp_path: Path, payload: Any, lab_opener: Any
) -> None:
    raise_nofile()
    with lab_opener(tmp_path, payload, standard=False, lab_kwargs={"ipv6": False}) as lab:
        p = lab.private
        p.sysctl("net.ipv4.ip_local_port_range", f"{PORT_RANGE[0]} {PORT_RANGE[1]}")
        for addr in POOL_ON + POOL_OFF:
            p.add_address("lo", f"{addr}/32")
        args = [sys.executable, "-m", "ramp.testing.origins", "--root", str(tmp_path)]
        for port in ORIGIN_PORTS:
            args += ["--hello-echo", f"{ORIGIN}:{port}", "--udp-echo", f"{ORIGIN}:{port}"]
        origins = lab.start_process("origins-egress", p, args)
        wait_until(
            lambda: origins.check_alive() or "ready" in origins.stdout(),
            30,
            what="the egress origins to listen",
        )
        token = lab.create_tunnel("corp", ["198.51.100.0/24"])
        lab.start_edge(
            "--log-level",
            "warning",
            "--max-flows-per-source",
            "0",
            "--max-opening-flows-per-source",
            "0",
            "--max-udp-sessions-per-source",
            "0",
            "--max-udp-associations-per-source",
            "0",
            "--max-flows",
            "8000",
        )
        common = ["--log-level", "warning", "--max-udp-sessions-per-source", "0"]
        # limits that fit the descriptors (3,000 flows need far fewer than 4 x 10,000 streams)
        common += ["--grace-period", "1", "--max-streams-per-connection", "2000"]
        lab.start_connector(token, *common, "--egress-source", ",".join(POOL_ON))
        lab.wait_tunnel_connections("corp", 1)
        on = run_load(lab, 0)
        print(f"\nports shared (on):  {on}")
        lab.connectors[0].stop()
        lab.start_connector(
            token, *common, "--egress-source", ",".join(POOL_OFF), "--no-egress-share-ports"
        )
        wait_until(
            lambda: (
                lab.edge_metrics().value("ramp_tunnel_connections", tunnel="corp") >= 1
                and lab.connectors[1].ready()
            ),
            30,
            what="the second connector",
        )
        off = run_load(lab, 1)
        audit = lab.audit_records()

    print(f"ports alone (off):  {off}")

    # on: every flow and session held at once, each with its own data, from the pool
    assert on["tcp_ok"] == FLOWS and on["tcp_again"] == FLOWS, on
    assert on["udp_ok"] == SESSIONS and on["udp_again"] == SESSIONS, on
    assert on["connector_tcp"] == FLOWS and on["connector_udp"] == SESSIONS, on
    assert on["connector_udp_active"] == SESSIONS, on
    assert set(on["sources"]) == set(POOL_ON) and set(on["connector_tcp_sources"]) == set(POOL_ON)
    # 3,000 of each in a range of 1,000 ports: ports are shared across destinations
    assert on["connector_tcp_ports"] <= 1000 and on["connector_udp_ports"] <= 1000, on
    assert on["exhausted_tcp"] == on["exhausted_udp"] == 0, on
    assert on["http_connect"] == 200, on

    # off: each connection holds a port alone; two addresses hold 2 x 1,000 at most
    assert 0 < off["tcp_ok"] < FLOWS and 0 < off["udp_ok"] < SESSIONS, off
    assert off["tcp_failed"] == {
        f"socks5 reply {REP_NETWORK_UNREACHABLE:#04x}": FLOWS - off["tcp_ok"]
    }, off
    assert off["tcp_again"] == off["tcp_ok"], off
    assert off["http_connect"] == 502, off
    assert "error=destination_ip_unroutable" in off["http_proxy_status"], off
    assert off["exhausted_tcp"] >= FLOWS - off["tcp_ok"], off
    assert off["exhausted_udp"] >= SESSIONS - off["udp_ok"], off
    # the reason reaches the edge's record of each failed flow
    failed = [
        r
        for r in audit
        if r.get("result") == "net_unreachable" and EXHAUSTED in str(r.get("reason"))
    ]
    assert {r["protocol"] for r in failed} == {"tcp", "udp"}, failed[:3]
    # each SOCKS5 flow that failed, and the HTTP CONNECT one
    assert sum(1 for r in failed if r["protocol"] == "tcp") == FLOWS - off["tcp_ok"] + 1


@pytest.mark.slow
def test_direct_egress_shares_ports_too(tmp_path: Path, payload: Any, lab_opener: Any) -> None:
    """The edge's own egress, the same way: origins it reaches directly (in C, the only
    network it reaches), 600 flows and 600 sessions over three ports in 200 ports."""
    raise_nofile()
    with lab_opener(tmp_path, payload, standard=False, lab_kwargs={"ipv6": False}) as lab:
        e = lab.edge_ns
        e.sysctl("net.ipv4.ip_local_port_range", f"{DIRECT_RANGE[0]} {DIRECT_RANGE[1]}")
        for addr in (*DIRECT_POOL_ON, *DIRECT_POOL_OFF):
            lab.add_edge_address(addr)
        args = [sys.executable, "-m", "ramp.testing.origins", "--root", str(tmp_path)]
        for port in ORIGIN_PORTS:
            args += ["--hello-echo", f"{CLIENT_ADDR}:{port}", "--udp-echo", f"{CLIENT_ADDR}:{port}"]
        origins = lab.start_process("origins-direct", lab.client, args)
        wait_until(
            lambda: origins.check_alive() or "ready" in origins.stdout(),
            30,
            what="the direct origins to listen",
        )
        common = [
            "--log-level",
            "warning",
            "--allow-direct-egress",
            "--max-flows-per-source",
            "0",
            "--max-opening-flows-per-source",
            "0",
            "--max-udp-sessions-per-source",
            "0",
            "--max-udp-associations-per-source",
            "0",
        ]
        lab.start_edge(*common, "--egress-source", ",".join(DIRECT_POOL_ON))
        on = run_direct_load(lab)
        print(f"\ndirect, ports shared (on):  {on}")
        assert lab.edge is not None
        lab.edge.stop()
        lab.start_edge(
            *common, "--egress-source", ",".join(DIRECT_POOL_OFF), "--no-egress-share-ports"
        )
        off = run_direct_load(lab)
        print(f"direct, ports alone (off):  {off}")
        audit = lab.audit_records()

    assert on["tcp_ok"] == on["tcp_again"] == DIRECT_FLOWS, on
    assert on["udp_ok"] == on["udp_again"] == DIRECT_SESSIONS, on
    assert on["edge_tcp"] == DIRECT_FLOWS and on["edge_udp"] == DIRECT_SESSIONS, on
    assert set(on["sources"]) == set(DIRECT_POOL_ON), on
    assert on["edge_tcp_ports"] <= 200 and on["edge_udp_ports"] <= 200, on
    assert on["exhausted_tcp"] == on["exhausted_udp"] == 0, on

    assert 0 < off["tcp_ok"] < DIRECT_FLOWS and 0 < off["udp_ok"] < DIRECT_SESSIONS, off
    assert off["tcp_failed"] == {
        f"socks5 reply {REP_NETWORK_UNREACHABLE:#04x}": DIRECT_FLOWS - off["tcp_ok"]
    }, off
    assert off["exhausted_tcp"] >= DIRECT_FLOWS - off["tcp_ok"], off
    assert off["exhausted_udp"] >= DIRECT_SESSIONS - off["udp_ok"], off
    failed = [
        r
        for r in audit
        if r.get("result") == "net_unreachable" and EXHAUSTED in str(r.get("reason"))
    ]
    assert {r["protocol"] for r in failed} == {"tcp", "udp"}, failed[:3]


def test_a_name_whose_ipv4_address_never_answers_connects_over_ipv6(
    tmp_path: Path, payload: Any, lab_opener: Any
) -> None:
    """Happy eyeballs at the connector: dual.corp.example has an A record nobody answers
    (P drops what it sends there) and an AAAA record of the IPv6 origin. Tried one after the
    other, the first address would take the whole connect timeout; staggered (RFC 8305), the
    second starts 250 ms later and wins."""
    with lab_opener(tmp_path, payload, standard=False) as lab:
        token = lab.create_tunnel("corp", ["198.51.100.0/24", "2001:db8:198::/64"])
        lab.add_dns_route(DNS_ZONE, "corp")
        lab.start_edge()
        lab.start_connector(token, "--connect-timeout", "2", "--dns-resolver", PRIVATE_DNS)
        lab.wait_tunnel_connections("corp", 1)
        url = f"http://{DUAL_NAME}:{HTTP_PORT}/"
        # the edge learns the DNS route from its store poll
        got = wait_until(
            lambda: (
                (r := lab.curl("--socks5-hostname", SOCKS_PROXY, url, timeout=10)).returncode == 0
                and r
            ),
            30,
            interval=0.2,
            what=f"{url} through the tunnel",
        )
        assert got.stdout == INDEX_BODY
        ended = wait_until(
            lambda: [r for r in lab.audit_records() if DUAL_NAME in str(r.get("destination"))],
            30,
            what="the flow's audit record",
        )
        assert ended[-1]["result"] == "ok", ended[-3:]
