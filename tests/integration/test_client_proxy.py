"""`ramp client run` (MASQUE proxy mode) in the client namespace: curl, many flows, UDP and DNS
through its local SOCKS5, nested hops, and revocation.

Every TCP flow from C's loopback proxy becomes an HTTP/3 CONNECT stream to the edge's MASQUE
endpoint (203.0.113.1:443/udp), every UDP flow a connect-udp request, all on one QUIC
connection; the edge sends them down the tunnel as it does its own SOCKS5 on-ramp's flows.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import dns.message
import dns.rdatatype
import pytest
from test_udp_socks5 import Association, echo_all

from ramp.testing.clients import REP_NOT_ALLOWED, REP_SUCCEEDED, socks5_connect_async
from ramp.testing.lab import (
    APP_NAME,
    CLIENT_ADDR,
    CLIENT_HTTP,
    CLIENT_SOCKS,
    CLIENT_SOCKS_PORT,
    DNS_ZONE,
    ECHO_PORT,
    EDGE_TUNNEL_ADDR,
    MASQUE_PORT,
    ORIGIN,
    ORIGIN_NAME,
    ORIGIN_PREFIX,
    PRIVATE_DNS,
    PRIVATE_DNS_ADDR,
    Lab,
    LabProcess,
    Payload,
    wait_until,
)
from ramp.testing.origins import INDEX_BODY
from ramp.testing.wait import DEADLINE

CLIENT_NAME = "laptop"
LOCAL = ("127.0.0.1", CLIENT_SOCKS_PORT)


def audit(lab: Lab) -> list[dict[str, Any]]:
    return lab.audit_records(lab.workdir / "audit.jsonl")


def start_client_lab(lab: Lab, *edge_args: str) -> tuple[str, LabProcess]:
    """Tunnel "corp" for the origins and corp.example, an edge, a connector resolving with the
    private dnsmasq, a client identity and `ramp client run` connected to the edge."""
    token = lab.create_tunnel("corp", [ORIGIN_PREFIX])
    lab.add_dns_route(DNS_ZONE, "corp")
    lab.start_edge("--audit-log", str(lab.workdir / "audit.jsonl"), *edge_args)
    lab.start_connector(token, "--connect-timeout", "2", "--dns-resolver", PRIVATE_DNS)
    lab.wait_tunnel_connections("corp", 1)
    client_token = lab.client_token(CLIENT_NAME)
    client = lab.start_client(client_token)
    # the edge learns the DNS route from its store poll
    wait_until(
        lambda: (
            lab.curl("--socks5-hostname", CLIENT_SOCKS, f"http://{APP_NAME}/", timeout=5).stdout
            == INDEX_BODY
        ),
        30,
        interval=0.2,
        what=f"{APP_NAME} to be reachable through the client",
    )
    return client_token, client


@pytest.fixture(scope="module")
def client_lab(
    tmp_path_factory: pytest.TempPathFactory, payload: Payload, lab_opener: Callable[..., Any]
) -> Iterator[Lab]:
    with lab_opener(tmp_path_factory.mktemp("client"), payload, standard=False) as lab:
        start_client_lab(lab)
        yield lab


# --- TCP -----------------------------------------------------------------------------------


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("args", "host"),
    [
        (("--socks5-hostname", CLIENT_SOCKS), ORIGIN_NAME),  # the edge resolves the name
        (("-x", f"http://{CLIENT_HTTP}"), ORIGIN),  # absolute-form GET
        (("-p", "-x", f"http://{CLIENT_HTTP}"), ORIGIN_NAME),  # HTTP CONNECT
    ],
)
def test_curl_downloads_100mb_through_the_client_with_identical_sha256(
    client_lab: Lab, payload: Payload, args: tuple[str, ...], host: str
) -> None:
    before = len(audit(client_lab))
    got = client_lab.curl_digest(*args, f"http://{host}/{payload.big.name}", timeout=200)
    assert got.returncode == 0, got.stderr
    assert got.size == payload.big.size
    assert got.sha256 == payload.big.sha256
    # the edge saw it as a MASQUE flow of the client identity, down the tunnel
    records = wait_until(
        lambda: [
            r
            for r in audit(client_lab)[before:]
            if r.get("onramp") == "masque" and r.get("bytes_down", 0) >= payload.big.size
        ],
        DEADLINE,
        what="the edge's audit record of the download",
    )
    assert records[0]["identity"] == CLIENT_NAME
    assert records[0]["tunnel"] == "corp"


def test_a_private_dns_name_resolves_at_the_edge_and_is_fetched(client_lab: Lab) -> None:
    got = client_lab.curl("--socks5-hostname", CLIENT_SOCKS, f"http://{APP_NAME}/", timeout=20)
    assert got.returncode == 0, got.stderr
    assert got.stdout == INDEX_BODY


def test_a_refused_origin_gets_the_socks5_answer_for_refused(client_lab: Lab) -> None:
    got = client_lab.curl("--socks5", CLIENT_SOCKS, f"http://{ORIGIN}:9/", timeout=20)
    assert got.returncode == 97  # curl: the proxy answered with an error
    assert b"(5)" in got.stderr  # REP 0x05 connection refused, as the edge's SOCKS5 says


@pytest.mark.timeout(240)
def test_1000_concurrent_flows_through_one_client_connection_complete_correctly(
    client_lab: Lab,
) -> None:
    lab = client_lab
    count = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * count:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8 * count), hard))
    client = lab.clients[0]
    connects = client.metrics().value("ramp_client_edge_connects_total")
    socks = lab.client.sockets(count)

    async def open_flow(sock: socket.socket) -> tuple[Any, Any, int]:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, LOCAL)
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        return reader, writer, await socks5_connect_async(reader, writer, ORIGIN, ECHO_PORT)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        data = os.urandom(8 * 1024)
        writer.write(data)
        await writer.drain()
        got = await reader.readexactly(len(data))
        writer.write_eof()
        rest = await reader.read()
        writer.close()
        return got == data and rest == b""

    async def run() -> tuple[list[int], float, list[bool]]:
        flows = []
        # opened a hundred at a time (the edge's share of flows still opening per client is
        # 256), and all held open together before any data moves
        for i in range(0, count, 100):
            batch = socks[i : i + 100]
            flows += await asyncio.wait_for(asyncio.gather(*(open_flow(s) for s in batch)), 60)
        loop = asyncio.get_running_loop()
        active = await loop.run_in_executor(
            None, lambda: client.metrics().value("ramp_flows_active")
        )
        results = await asyncio.wait_for(asyncio.gather(*(echo(r, w) for r, w, _ in flows)), 120)
        return [rep for _, _, rep in flows], active, results

    try:
        reps, active, results = asyncio.run(run())
    finally:
        for s in socks:
            s.close()
    assert reps == [REP_SUCCEEDED] * count
    assert active >= count
    assert results == [True] * count
    # all of them on the one QUIC connection the client had before
    assert client.metrics().value("ramp_client_edge_connects_total") == connects


# --- UDP: connect-udp ------------------------------------------------------------------------


def test_dns_queries_through_the_client_socks5_udp(client_lab: Lab) -> None:
    assoc = Association(client_lab, proxy=LOCAL, bind="127.0.0.1", timeout=5)
    try:
        for name in (APP_NAME, f"db.{DNS_ZONE}"):
            query = dns.message.make_query(name, dns.rdatatype.A)
            assoc.send(query.to_wire(), (PRIVATE_DNS_ADDR, 53))
            host, port, data = assoc.recv()
            assert (host, port) == (PRIVATE_DNS_ADDR, 53)
            answer = dns.message.from_wire(data)
            assert answer.id == query.id
            assert answer.answer, f"no answer for {name}"
    finally:
        assoc.close()


@pytest.mark.timeout(240)
def test_ten_thousand_datagrams_through_the_client_come_back_intact(client_lab: Lab) -> None:
    assoc = Association(client_lab, proxy=LOCAL, bind="127.0.0.1", timeout=5)
    try:
        sizes = [1 + (i * 37) % 1400 for i in range(10_000)]
        got, nbytes = echo_all(assoc, (os.urandom(n) for n in sizes), window=64, timeout=10)
    finally:
        assoc.close()
    assert got == 10_000
    assert nbytes == sum(sizes)


# --- nested hops -----------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_nested_hops_the_first_edge_never_sees_the_destination(
    tmp_path: Any, payload: Payload, lab_opener: Callable[..., Any]
) -> None:
    """client --hop (edge at 203.0.113.1) -> connect-udp to the edge's tunnel-side address
    through the tunnel -> the same edge's MASQUE endpoint again, as a second, inner QUIC
    connection whose peer is the connector's address: the outer request names only the inner
    edge's address, the inner one the destination, and never the client's address."""
    with lab_opener(tmp_path, payload, standard=False) as lab:
        token = lab.create_tunnel("corp", [ORIGIN_PREFIX, f"{EDGE_TUNNEL_ADDR}/32"])
        lab.start_edge(
            "--audit-log",
            str(lab.workdir / "audit.jsonl"),
            "--masque-listen",
            f"0.0.0.0:{MASQUE_PORT}",
        )
        lab.start_connector(token, "--connect-timeout", "2")
        lab.wait_tunnel_connections("corp", 1)
        outer = lab.client_token(CLIENT_NAME)
        inner = lab.client_token("inner", edge=f"{EDGE_TUNNEL_ADDR}:{MASQUE_PORT}")
        lab.start_client(inner, "--hop", outer)
        got = lab.curl_digest(
            "--socks5", CLIENT_SOCKS, f"http://{ORIGIN}/{payload.small.name}", timeout=60
        )
        assert got.returncode == 0, got.stderr
        assert got.sha256 == payload.small.sha256
        lab.clients[0].stop()

        def hop_done() -> bool:
            return any(r["protocol"] == "udp" for r in audit(lab) if r.get("onramp") == "masque")

        wait_until(hop_done, DEADLINE, what="the outer hop's session record")
        records = [r for r in audit(lab) if r.get("onramp") == "masque"]
        outer_rec = [r for r in records if r["protocol"] == "udp"]
        inner_rec = [r for r in records if r["protocol"] == "tcp"]
        assert [r["destination"] for r in outer_rec] == [f"{EDGE_TUNNEL_ADDR}:{MASQUE_PORT}"]
        assert outer_rec[0]["identity"] == CLIENT_NAME
        assert [r["destination"] for r in inner_rec] == [f"{ORIGIN}:80"]
        assert inner_rec[0]["identity"] == "inner"
        # the inner connection came from the private side, not from the client's address
        assert not inner_rec[0]["source"].startswith(f"{CLIENT_ADDR}:")


# --- revocation ------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_revoked_client_is_refused_and_its_open_flows_end_within_2_s(
    tmp_path: Any, payload: Payload, lab_opener: Callable[..., Any]
) -> None:
    with lab_opener(tmp_path, payload, standard=False) as lab:
        start_client_lab(lab)
        sock = lab.client_socket(timeout=10)
        sock.connect(LOCAL)
        ended = threading.Event()

        async def hold() -> int:
            reader, writer = await asyncio.open_connection(sock=sock)
            rep = await socks5_connect_async(reader, writer, ORIGIN, ECHO_PORT)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            opened.set()
            await reader.read()  # until the flow is cut
            ended.set()
            return rep

        opened = threading.Event()
        result: list[int] = []
        t = threading.Thread(target=lambda: result.append(asyncio.run(hold())), daemon=True)
        t.start()
        assert opened.wait(DEADLINE), "the held flow did not open"
        lab.ramp("client", "revoke", CLIENT_NAME)
        # the edge polls its store every second; the flow must end within 2 s of that
        assert ended.wait(2 + 2), "the revoked client's flow is still open"
        t.join(DEADLINE)
        assert result == [REP_SUCCEEDED]
        # its next request is refused: 407 from the edge, "not allowed" from the local SOCKS5
        got = lab.curl("--socks5", CLIENT_SOCKS, f"http://{ORIGIN}/", timeout=20)
        assert got.returncode == 97
        assert f"({REP_NOT_ALLOWED})".encode() in got.stderr
