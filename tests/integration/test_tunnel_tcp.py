"""TCP through the tunnel, as a user sees it: curl and proxy clients in C, origins in P.

These tests share one lab per module (edge, tunnel "corp" for 198.51.100.0/24, one connector
with `--connect-timeout 2`) and leave it as they found it.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket

import pytest

from ramp.testing.clients import (
    REP_HOST_UNREACHABLE,
    REP_NOT_ALLOWED,
    REP_REFUSED,
    REP_SUCCEEDED,
    http_connect,
    recv_until_eof,
    socks5_connect,
    socks5_connect_async,
)
from ramp.testing.lab import (
    BLACKHOLE,
    CLOSED_PORT,
    ECHO_PORT,
    EDGE_PUBLIC_ADDR,
    HALF_CLOSE_PORT,
    HELLO_PORT,
    HTTP_PORT,
    ORIGIN,
    ORIGIN_NAME,
    OUTSIDE,
    SOCKS_PORT,
    Lab,
    Payload,
    wait_until,
)
from ramp.testing.origins import half_close_reply
from ramp.testing.wait import DEADLINE

# --- bulk download -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("via", "host"),
    [
        ("socks5", ORIGIN),  # curl sends the address
        ("socks5-hostname", ORIGIN_NAME),  # curl sends the name, the edge resolves it
        ("connect", ORIGIN_NAME),  # curl -p -x http://edge: CONNECT
        ("forward", ORIGIN),  # curl -x http://edge: absolute-form GET
    ],
)
def test_curl_downloads_100mb_with_identical_sha256(
    shared_lab: Lab, payload: Payload, via: str, host: str
) -> None:
    got = shared_lab.curl_digest(
        *shared_lab.proxy_args(via), f"http://{host}/{payload.big.name}", timeout=150
    )
    assert got.returncode == 0, got.stderr
    assert got.size == payload.big.size
    assert got.sha256 == payload.big.sha256


@pytest.mark.parametrize("via", ["socks5", "socks5-hostname", "connect", "forward"])
def test_curl_fetches_a_small_file(shared_lab: Lab, payload: Payload, via: str) -> None:
    host = ORIGIN_NAME if via in ("socks5-hostname", "connect") else ORIGIN
    got = shared_lab.curl_digest(
        *shared_lab.proxy_args(via), f"http://{host}/{payload.small.name}", timeout=20
    )
    assert got.returncode == 0, got.stderr
    assert got.sha256 == payload.small.sha256


# --- errors before any payload -------------------------------------------------------------


def _ask(lab: Lab, via: str, host: str, port: int) -> int:
    """The proxy's answer for host:port (SOCKS5 REP or HTTP status)."""
    if via == "socks5":
        code, sock = lab.socks5(host, port, timeout=20)
        sock.close()
    elif via == "connect":
        code, sock = lab.http_connect(host, port, timeout=20)
        sock.close()
    else:
        code = lab.http_forward(host, port, timeout=20)
    return code


@pytest.mark.parametrize(
    ("via", "expected"), [("socks5", REP_NOT_ALLOWED), ("connect", 403), ("forward", 403)]
)
def test_destination_outside_every_route_is_refused(
    shared_lab: Lab, via: str, expected: int
) -> None:
    # not permitted, not a timeout: the edge decides without dialing (bench/ measures how fast)
    assert _ask(shared_lab, via, OUTSIDE, HTTP_PORT) == expected


@pytest.mark.parametrize(
    ("via", "expected"), [("socks5", REP_REFUSED), ("connect", 502), ("forward", 502)]
)
def test_closed_origin_port_is_refused(shared_lab: Lab, via: str, expected: int) -> None:
    # the origin's RST comes back as "refused", not as a timeout
    assert _ask(shared_lab, via, ORIGIN, CLOSED_PORT) == expected


@pytest.mark.parametrize(
    ("via", "expected"), [("socks5", REP_HOST_UNREACHABLE), ("connect", 504), ("forward", 504)]
)
def test_blackholed_origin_times_out_after_the_connect_timeout(
    shared_lab: Lab, via: str, expected: int
) -> None:
    assert _ask(shared_lab, via, BLACKHOLE, HTTP_PORT) == expected


def test_failed_flows_are_counted_by_result(shared_lab: Lab) -> None:
    before = shared_lab.edge_metrics()
    _ask(shared_lab, "socks5", ORIGIN, CLOSED_PORT)
    _ask(shared_lab, "socks5", OUTSIDE, HTTP_PORT)

    def counted() -> bool:
        after = shared_lab.edge_metrics()
        return all(
            after.value("ramp_flows_total", onramp="socks5", result=result)
            > before.value("ramp_flows_total", onramp="socks5", result=result)
            for result in ("refused", "not_permitted")
        )

    wait_until(
        counted, DEADLINE, what="ramp_flows_total to count the refused and not_permitted flows"
    )


# --- half-close ----------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["socks5", "connect"])
def test_client_that_half_closes_gets_the_whole_response(shared_lab: Lab, via: str) -> None:
    request = os.urandom(200_000)
    if via == "socks5":
        code, sock = shared_lab.socks5(ORIGIN, HALF_CLOSE_PORT)
        assert code == REP_SUCCEEDED
    else:
        code, sock = shared_lab.http_connect(ORIGIN, HALF_CLOSE_PORT)
        assert code == 200
    with sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)  # "that is all", but keep reading
        reply = recv_until_eof(sock)
    assert reply == half_close_reply(request)


def test_origin_half_close_reaches_the_client(shared_lab: Lab) -> None:
    """The echo origin passes our end of input on; we must see its end of output, then EOF."""
    code, sock = shared_lab.socks5(ORIGIN, ECHO_PORT)
    assert code == REP_SUCCEEDED
    with sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b"last words"


# --- many flows at once --------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_200_concurrent_flows_through_one_tunnel_all_complete_correctly(shared_lab: Lab) -> None:
    lab = shared_lab
    count = 200
    socks = lab.client.sockets(count)
    before = lab.edge_metrics()
    before_active = before.value("ramp_flows_active")
    before_ok = before.value("ramp_flows_total", onramp="socks5", result="ok")

    async def open_flow(
        sock: socket.socket,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (EDGE_PUBLIC_ADDR, SOCKS_PORT))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        rep = await socks5_connect_async(reader, writer, ORIGIN, ECHO_PORT)
        return reader, writer, rep

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        data = os.urandom(16 * 1024)
        writer.write(data)
        await writer.drain()
        got = await reader.readexactly(len(data))
        writer.write_eof()
        rest = await reader.read()
        writer.close()
        return got == data and rest == b""

    async def run() -> tuple[list[int], float, list[bool]]:
        flows = await asyncio.wait_for(asyncio.gather(*(open_flow(s) for s in socks)), 60)
        # All 200 are open at this point: the edge must count them as active together.
        loop = asyncio.get_running_loop()
        active = await loop.run_in_executor(
            None, lambda: lab.edge_metrics().value("ramp_flows_active")
        )
        results = await asyncio.wait_for(asyncio.gather(*(echo(r, w) for r, w, _ in flows)), 60)
        return [rep for _, _, rep in flows], active, results

    try:
        reps, active, results = asyncio.run(run())
    finally:
        for s in socks:
            s.close()
    assert reps == [REP_SUCCEEDED] * count
    assert active - before_active >= count
    assert results == [True] * count

    def settled() -> bool:
        after = lab.edge_metrics()
        return (
            after.value("ramp_flows_total", onramp="socks5", result="ok") - before_ok >= count
            and after.value("ramp_flows_active") <= before_active
        )

    wait_until(
        settled, DEADLINE, what="the edge to count 200 finished ok flows and none left active"
    )


def test_flow_bytes_are_counted_both_ways(shared_lab: Lab) -> None:
    before = shared_lab.edge_metrics()
    code, sock = shared_lab.socks5(ORIGIN, HALF_CLOSE_PORT)
    assert code == REP_SUCCEEDED
    with sock:
        sock.sendall(b"x" * 50_000)
        sock.shutdown(socket.SHUT_WR)
        reply = recv_until_eof(sock)

    def counted() -> bool:
        after = shared_lab.edge_metrics()
        up = after.value("ramp_flow_bytes_total", direction="up") - before.value(
            "ramp_flow_bytes_total", direction="up"
        )
        down = after.value("ramp_flow_bytes_total", direction="down") - before.value(
            "ramp_flow_bytes_total", direction="down"
        )
        return up >= 50_000 and down >= len(reply)

    wait_until(counted, DEADLINE, what="ramp_flow_bytes_total to count the flow's bytes")


def test_socks5_ipv4_domain_and_http_connect_reach_the_same_origin(shared_lab: Lab) -> None:
    """One origin, three ways to name it; every way gets the origin's own answer."""
    request = b"GET / HTTP/1.1\r\nHost: origin\r\nConnection: close\r\n\r\n"
    answers = []
    for host in (ORIGIN, ORIGIN_NAME):
        with shared_lab.connect_socks() as sock:
            assert socks5_connect(sock, host, HTTP_PORT) == REP_SUCCEEDED
            sock.sendall(request)
            answers.append(recv_until_eof(sock))
    with shared_lab.connect_http_proxy() as sock:
        status, _ = http_connect(sock, ORIGIN_NAME, HTTP_PORT)
        assert status == 200
        sock.sendall(request)
        answers.append(recv_until_eof(sock))
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert answer.endswith(b"ramp lab origin\n")


@pytest.mark.timeout(60)
def test_origin_that_speaks_first_is_heard_on_every_flow(shared_lab: Lab) -> None:
    """Like SSH or SMTP: the origin writes before the client has sent anything."""

    def one() -> bytes:
        code, sock = shared_lab.socks5(ORIGIN, HELLO_PORT)
        with sock:
            assert code == REP_SUCCEEDED
            greeting = b""
            while not greeting.endswith(b"\n"):
                chunk = sock.recv(100)
                assert chunk, f"closed after {greeting!r}"
                greeting += chunk
            return greeting

    greetings = [one() for _ in range(100)]
    assert all(g.startswith(ORIGIN.encode() + b" ") for g in greetings)


def test_every_finished_flow_gets_one_audit_line(shared_lab: Lab) -> None:
    assert shared_lab.edge is not None
    body = os.urandom(12_345)
    code, sock = shared_lab.socks5(ORIGIN, HALF_CLOSE_PORT)
    assert code == REP_SUCCEEDED
    with sock:
        source_port = sock.getsockname()[1]
        sock.sendall(body)
        sock.shutdown(socket.SHUT_WR)
        reply = recv_until_eof(sock)

    def audit_lines() -> list[dict[str, object]]:
        found = []
        for line in shared_lab.edge.stderr().splitlines():  # type: ignore[union-attr]
            if line.startswith("{") and f":{source_port}" in line:
                record = json.loads(line)
                if str(record.get("source", "")).endswith(f":{source_port}"):
                    found.append(record)
        return found

    (record,) = wait_until(audit_lines, DEADLINE, what="the flow's audit line")
    assert record["destination"] == f"{ORIGIN}:{HALF_CLOSE_PORT}"
    assert record["tunnel"] == "corp"
    assert record["result"] == "ok"
    assert record["bytes_up"] == len(body)
    assert record["bytes_down"] == len(reply)
    assert {"time", "identity", "duration"} <= set(record)


def test_a_refused_flow_gets_an_audit_line_too(shared_lab: Lab) -> None:
    assert shared_lab.edge is not None
    code, sock = shared_lab.socks5(ORIGIN, CLOSED_PORT)
    with sock:
        source_port = sock.getsockname()[1]
    assert code == REP_REFUSED

    def audit_line() -> dict[str, object] | None:
        for line in shared_lab.edge.stderr().splitlines():  # type: ignore[union-attr]
            if line.startswith("{") and f':{source_port}"' in line:
                return json.loads(line)
        return None

    record = wait_until(audit_line, DEADLINE, what="the refused flow's audit line")
    assert record["destination"] == f"{ORIGIN}:{CLOSED_PORT}"
    assert record["result"] == "refused"
