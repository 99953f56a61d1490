"""Attacks on a real edge and connector, each while a legitimate client keeps fetching.

The attacker is one client at 203.0.113.2 in C; the legitimate client fetches through SOCKS5,
the HTTP proxy and UDP from 203.0.113.4 (`ramp.testing.attack`). For every attack: all the
legitimate requests succeed (each within a generous deadline), the attacker gets its protocol's
clear errors, the counters show what the edge did, and the edge's and the connector's
descriptors and RSS come back to where they started once the attack ends.

Every attack is bounded in count; none waits for a time to pass, only for conditions.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from ramp.testing.attack import LegitClient, ProcessUsage, Summary, Usage
from ramp.testing.clients import (
    REP_HOST_UNREACHABLE,
    REP_NOT_ALLOWED,
    socks5_greeting,
    socks5_request,
)
from ramp.testing.lab import (
    BLACKHOLE,
    CLIENT_ADDR,
    EDGE_METRICS_PORT,
    EDGE_PUBLIC_ADDR,
    HTTP_PORT,
    HTTP_PROXY_PORT,
    ORIGIN_PREFIX,
    SOCKS_PORT,
    UPSTREAM_DNS_ADDR,
    Lab,
    Payload,
    wait_until,
)
from ramp.testing.wait import DEADLINE

ATTACKER = CLIENT_ADDR
LEGIT_FLOWS = 3  # the legitimate client's threads: at most this many flows at once

# --- the lab and the watch over it ------------------------------------------------------------


def start(
    lab: Lab,
    *,
    edge_args: Sequence[str] = (),
    connector_args: Sequence[str] = ("--connect-timeout", "2"),
    wrapper: Sequence[str] = (),
    connections: int = 4,
) -> None:
    token = lab.create_tunnel("corp", [ORIGIN_PREFIX])
    lab.start_edge(*edge_args, wrapper=wrapper)
    lab.start_connector(token, *connector_args, "--ha-connections", str(connections))
    lab.wait_tunnel_connections("corp", connections)
    lab.add_client_address()


class Watch:
    """The legitimate client, and the edge's and connector's usage from before the attack."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.legit = LegitClient(lab).start()
        # warm first (threads, pooled connections, allocator arenas), then take the start
        self.legit.wait_requests(2)
        self.usage = [ProcessUsage(p) for p in (lab.edge, *lab.connectors) if p is not None]
        self.start: list[Usage] = [u.sample() for u in self.usage]

    def finish(self) -> Summary:
        """Stop the legitimate client: every request succeeded, usage is back to its start."""
        summary = self.legit.stop()
        assert summary.all_ok, f"legitimate requests failed under attack:\n{summary.describe()}"
        for usage, start in zip(self.usage, self.start, strict=True):
            usage.wait_back_to(start)
        return summary


@pytest.fixture
def attack_lab(tmp_path: Path, payload: Payload, lab_opener) -> Iterator[Lab]:  # type: ignore[no-untyped-def]
    with lab_opener(tmp_path, payload, standard=False) as lab:
        yield lab


def edge_value(lab: Lab, name: str, **labels: str) -> float:
    return lab.edge_metrics().value(name, **labels)


def failed_flows(lab: Lab, onramp: str) -> float:
    """Flows of `onramp` that ended any way but ok."""
    m = lab.edge_metrics()
    return m.value("ramp_flows_total", onramp=onramp) - m.value(
        "ramp_flows_total", onramp=onramp, result="ok"
    )


# --- the attacker -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Ask:
    """One attacking request: CONNECT to host:port by SOCKS5 or through the HTTP proxy."""

    via: str  # "socks5" or "http"
    host: str
    port: int


def _request_bytes(ask: Ask) -> bytes:
    if ask.via == "socks5":
        return socks5_greeting(None) + socks5_request(ask.host, ask.port)
    host = f"[{ask.host}]" if ":" in ask.host else ask.host
    return f"CONNECT {host}:{ask.port} HTTP/1.1\r\nHost: {host}:{ask.port}\r\n\r\n".encode()


async def _read_answer(loop: asyncio.AbstractEventLoop, sock: socket.socket, via: str) -> str:
    """ "rep 0x04", "http 403 ...reason...", or "closed"."""
    data = b""
    want = 12 if via == "socks5" else 0  # method reply + an IPv4 reply
    while True:
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            break
        data += chunk
        if via == "socks5" and len(data) >= want:
            return f"rep {data[3]:#04x}"
        if via == "http" and b"\r\n\r\n" in data:
            head, _, body = data.partition(b"\r\n\r\n")
            status = head.split(b" ", 2)[1].decode()
            # the reason the edge gives is in the body: read what the head announces
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            while len(body) < length and (chunk := await loop.sock_recv(sock, 4096)):
                body += chunk
            return f"http {status} {body.decode(errors='replace').strip()}"
    if via == "socks5" and len(data) >= 4:
        return f"rep {data[3]:#04x}"
    return "closed"


async def _ask(ask: Ask, *, leave: bool, timeout: float) -> str:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.bind((ATTACKER, 0))
        port = SOCKS_PORT if ask.via == "socks5" else HTTP_PROXY_PORT
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (EDGE_PUBLIC_ADDR, port))
            await loop.sock_sendall(sock, _request_bytes(ask))
            if leave:
                return "left"
            return await _read_answer(loop, sock, ask.via)
    except TimeoutError:
        return "no answer"
    except OSError as e:
        return f"error {e.strerror or e}"
    finally:
        sock.close()


def flood(
    lab: Lab, asks: Sequence[Ask], *, leave: bool = False, timeout: float = 2 * DEADLINE
) -> Counter[str]:
    """All `asks` at once from the attacker's address; what each got, counted. With `leave`
    each client closes right after sending its request."""

    async def run() -> list[str]:
        return await asyncio.gather(*(_ask(a, leave=leave, timeout=timeout) for a in asks))

    return Counter(lab.client.call(asyncio.run, run()))


def answers(got: Counter[str]) -> Counter[str]:
    """`got` by reply code alone ("http 502"), without the reason text of each."""
    found: Counter[str] = Counter()
    for answer, n in got.items():
        found[" ".join(answer.split()[:2])] += n
    return found


class Background:
    """`flood` in a thread, so the test can watch the edge while the answers are pending."""

    def __init__(self, lab: Lab, asks: Sequence[Ask], **kwargs: object) -> None:
        self.result: Counter[str] | None = None
        self._thread = threading.Thread(target=self._run, args=(lab, asks, kwargs), daemon=True)
        self._thread.start()

    def _run(self, lab: Lab, asks: Sequence[Ask], kwargs: dict[str, object]) -> None:
        self.result = flood(lab, asks, **kwargs)  # type: ignore[arg-type]

    def join(self, timeout: float = 4 * DEADLINE) -> Counter[str]:
        self._thread.join(timeout)
        assert self.result is not None, "the attacker's requests did not finish"
        return self.result


# --- (i) a flood of CONNECTs to a blackholed address -----------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_flood_to_a_blackholed_address_leaves_healthy_origins_reachable(attack_lab: Lab) -> None:
    lab = attack_lab
    # the connector dials longer than the edge waits: the edge's answer is what the attacker gets
    start(lab, edge_args=("--connect-timeout", "12"), connector_args=("--connect-timeout", "60"))
    watch = Watch(lab)
    before = failed_flows(lab, "socks5")
    attack = Background(lab, [Ask("socks5", BLACKHOLE, HTTP_PORT)] * 500)
    # the flood is held open at the edge and the connector while the legitimate client fetches
    wait_until(
        lambda: edge_value(lab, "ramp_flows_active") >= 500,
        DEADLINE,
        what=lambda: f"500 flood flows open at the edge ({edge_value(lab, 'ramp_flows_active')})",
    )
    watch.legit.wait_requests(3)
    assert edge_value(lab, "ramp_flows_active") >= 500, "the flood ended before the fetches did"
    got = attack.join()
    assert got == Counter({f"rep {REP_HOST_UNREACHABLE:#04x}": 500}), got
    assert failed_flows(lab, "socks5") - before >= 500
    watch.finish()


# --- (ii) CONNECTs whose clients go away at once ----------------------------------------------


@pytest.mark.timeout(180)
def test_clients_that_go_away_at_once_give_back_their_stream_slots(attack_lab: Lab) -> None:
    lab = attack_lab
    # 4 connections x 100 streams: the 400 slots of the report, and a connector that would
    # dial the blackhole for a minute if nobody told it the client had gone
    start(
        lab,
        connector_args=("--connect-timeout", "60", "--max-streams-per-connection", "100"),
    )
    connector = lab.connectors[0]
    watch = Watch(lab)
    before = failed_flows(lab, "socks5")
    got = flood(lab, [Ask("socks5", BLACKHOLE, HTTP_PORT)] * 500, leave=True)
    assert got == Counter({"left": 500}), got
    # every flow of the flood ended, at the edge and the connector, long before the dials
    # would have timed out: only the legitimate client's flows remain open
    wait_until(
        lambda: failed_flows(lab, "socks5") - before >= 500,
        2 * DEADLINE,
        what=lambda: f"the 500 abandoned flows to end ({failed_flows(lab, 'socks5') - before})",
    )
    wait_until(
        lambda: (
            connector.metrics().value("ramp_flows_active") <= LEGIT_FLOWS
            and edge_value(lab, "ramp_flows_active") <= LEGIT_FLOWS
        ),
        DEADLINE,
        what="the stream slots to be free again",
    )
    # the next real flows are served (a held slot would keep them waiting past the deadline)
    watch.legit.wait_requests(3)
    watch.finish()


# --- (iii) names whose resolver never answers -------------------------------------------------

SILENT_RESOLVER = "127.0.0.54"


@pytest.mark.timeout(180)
def test_names_whose_resolver_never_answers_do_not_hold_up_dials_to_addresses(
    attack_lab: Lab,
) -> None:
    lab = attack_lab
    # a resolver that takes every query and answers none
    silent = lab.edge_ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind((SILENT_RESOLVER, 53))
    lab.edge_ns.set_etc_file("resolv.conf", f"nameserver {SILENT_RESOLVER}\n")
    try:
        start(lab, edge_args=("--resolve-timeout", "10", "--resolve-max-concurrent", "16"))
        watch = Watch(lab)
        busy = edge_value(lab, "ramp_flows_rejected_total", reason="resolver_busy")
        asks = [Ask("socks5", f"n{i}.never.example", HTTP_PORT) for i in range(150)]
        asks += [Ask("http", f"h{i}.never.example", HTTP_PORT) for i in range(50)]
        attack = Background(lab, asks)
        # 16 lookups hang; every other one is refused at once as busy, and meanwhile the
        # legitimate client's dials to IP literals go through
        wait_until(
            lambda: (
                edge_value(lab, "ramp_flows_rejected_total", reason="resolver_busy") - busy
                >= len(asks) - 16
            ),
            DEADLINE,
            what="the lookups past the limit to be refused as busy",
        )
        watch.legit.wait_requests(3)
        got = answers(attack.join())
        assert got == Counter({f"rep {REP_HOST_UNREACHABLE:#04x}": 150, "http 502": 50}), got
        # the reason is the audit's: the attacker's lookups were refused, not lost
        refused = [
            r
            for r in lab.audit_records()
            if str(r.get("source", "")).startswith(ATTACKER + ":")
            and "resolver busy" in str(r.get("reason"))
        ]
        assert len(refused) >= len(asks) - 16, len(refused)
        watch.finish()
    finally:
        silent.close()


# --- (iv) direct egress to the edge's own services --------------------------------------------

MAPPED_LOOPBACK = "::ffff:127.0.0.1"


@pytest.mark.timeout(180)
def test_direct_egress_never_reaches_the_edges_own_services(attack_lab: Lab) -> None:
    lab = attack_lab
    lab.start_upstream_dns()  # a service of the edge's machine on 127.0.0.53:53 (TCP too)
    start(lab, edge_args=("--allow-direct-egress",))
    watch = Watch(lab)
    denied = edge_value(lab, "ramp_flows_rejected_total", reason="direct_egress_denied")
    targets = [
        (UPSTREAM_DNS_ADDR, 53),
        ("127.0.0.1", EDGE_METRICS_PORT),
        (EDGE_PUBLIC_ADDR, EDGE_METRICS_PORT),  # its own metrics, by its own address
        ("169.254.169.254", 80),  # the usual cloud metadata address
        (MAPPED_LOOPBACK, 53),
        (str(ipaddress.ip_address(f"::ffff:{EDGE_PUBLIC_ADDR}")), EDGE_METRICS_PORT),
        ("localhost", EDGE_METRICS_PORT),
    ]
    asks = [Ask(via, h, p) for via in ("socks5", "http") for h, p in targets] * 15
    got = answers(flood(lab, asks))
    half = len(asks) // 2
    assert got == Counter({f"rep {REP_NOT_ALLOWED:#04x}": half, "http 403": half}), got
    wait_until(
        lambda: (
            edge_value(lab, "ramp_flows_rejected_total", reason="direct_egress_denied") - denied
            >= len(asks)
        ),
        DEADLINE,
        what="every denied dial to be counted",
    )
    watch.legit.wait_requests(3)
    watch.finish()


# --- (v) slow handshakes against a low descriptor limit ---------------------------------------

FD_LIMIT = 1024
SLOW = 1200  # more half-open handshakes than the edge has descriptors


class SlowHandshakes:
    """`count` connections to the proxy listeners that send a first byte and then nothing;
    each one the edge closes is opened again, until `stop`."""

    def __init__(self, lab: Lab, count: int) -> None:
        self.lab = lab
        self.count = count
        self.open = 0
        self.closed_by_edge = 0
        self.connect_errors: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=lab.client.call, args=(asyncio.run, self._run()), daemon=True
        )
        self._thread.start()

    async def _one(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        port, first = (SOCKS_PORT, b"\x05") if index % 2 else (HTTP_PROXY_PORT, b"CONNECT ")
        while not self._stop.is_set():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.bind((ATTACKER, 0))
                async with asyncio.timeout(DEADLINE):
                    await loop.sock_connect(sock, (EDGE_PUBLIC_ADDR, port))
                await loop.sock_sendall(sock, first)
                self.open += 1
                try:
                    while not self._stop.is_set():
                        try:
                            async with asyncio.timeout(0.5):
                                if not await loop.sock_recv(sock, 4096):
                                    break
                        except TimeoutError:
                            continue
                    else:
                        return
                    self.closed_by_edge += 1
                finally:
                    self.open -= 1
            except (OSError, TimeoutError) as e:
                self.connect_errors[type(e).__name__] += 1
                await asyncio.sleep(0.1)  # pacing between a refused connect and the next
            finally:
                sock.close()

    async def _run(self) -> None:
        await asyncio.gather(*(self._one(i) for i in range(self.count)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2 * DEADLINE)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slow_handshakes_against_a_low_descriptor_limit_leave_the_proxies_serving(
    attack_lab: Lab,
) -> None:
    lab = attack_lab
    start(lab, wrapper=("prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}"))
    watch = Watch(lab)
    timeouts = edge_value(lab, "ramp_bad_input_total", reason="handshake_timeout")
    attack = SlowHandshakes(lab, SLOW)
    try:
        # the flood is at full strength (every connection opened or refused once)...
        wait_until(
            lambda: attack.open + sum(attack.connect_errors.values()) >= SLOW,
            2 * DEADLINE,
            what=lambda: f"{SLOW} slow handshakes under way (open {attack.open})",
        )
        # ...and the edge has started ending them: meanwhile the legitimate client is served
        wait_until(
            lambda: attack.closed_by_edge > 0,
            2 * DEADLINE,
            what="the edge to end slow handshakes",
        )
        watch.legit.wait_requests(3)
    finally:
        attack.stop()
    assert edge_value(lab, "ramp_bad_input_total", reason="handshake_timeout") > timeouts
    assert lab.edge is not None and lab.edge.alive()
    watch.finish()
