"""Attacks on a real edge and connector, each while a legitimate client keeps fetching.

The attacker is one client at 203.0.113.2 in C; the legitimate client fetches through SOCKS5,
the HTTP proxy and UDP from 203.0.113.4 (`ramp.testing.attack`). For every attack: all the
legitimate requests succeed (each within a generous deadline), the attacker gets its protocol's
clear errors, the counters show what the edge did, and the edge's and the connector's
descriptors and RSS come back to where they started once the attack ends.

Every attack is bounded in count; none waits for a time to pass, only for conditions.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from ramp.testing.attack import (
    ATTACKER,
    DNS_TCP,
    KINDS,
    Ask,
    FloodInBackground,
    LegitClient,
    ProcessUsage,
    SlowHandshakes,
    Summary,
    Usage,
    answers,
    flood,
)
from ramp.testing.clients import REP_GENERAL_FAILURE, REP_HOST_UNREACHABLE, REP_NOT_ALLOWED
from ramp.testing.lab import (
    BLACKHOLE,
    DNS_PORT,
    DNS_ZONE,
    EDGE_DNS,
    EDGE_METRICS_PORT,
    EDGE_PUBLIC_ADDR,
    HTTP_PORT,
    ORIGIN_PREFIX,
    PRIVATE_DNS,
    UPSTREAM_DNS_ADDR,
    Lab,
    Payload,
    wait_until,
)
from ramp.testing.wait import DEADLINE

LEGIT_FLOWS = 3  # the legitimate client's threads: at most this many flows at once

# --- the lab and the watch over it ------------------------------------------------------------


def start(
    lab: Lab,
    *,
    edge_args: Sequence[str] = (),
    connector_args: Sequence[str] = ("--connect-timeout", "2"),
    wrapper: Sequence[str] = (),
    connections: int = 4,
    dns_zone: str | None = None,
) -> None:
    token = lab.create_tunnel("corp", [ORIGIN_PREFIX])
    if dns_zone is not None:
        lab.add_dns_route(dns_zone, "corp")
    # max_flows such that the descriptor budget leaves all 1,024 handshake slots in place on a
    # 20,000-descriptor host: the floods below stay under half of them, where one source's
    # handshake share binds, so that they measure what they are about (under a low descriptor
    # limit the budget still lowers it)
    lab.start_edge("--max-flows", "5000", *edge_args, wrapper=wrapper)
    lab.start_connector(token, *connector_args, "--ha-connections", str(connections))
    lab.wait_tunnel_connections("corp", connections)
    lab.add_client_address()


class Watch:
    """The legitimate client, and the edge's and connector's usage from before the attack."""

    def __init__(self, lab: Lab, kinds: Sequence[str] = KINDS) -> None:
        self.lab = lab
        self.legit = LegitClient(lab, kinds=kinds).start()
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


def attacker_records(lab: Lab) -> list[dict[str, object]]:
    """The edge's audit records of the attacker's flows."""
    return [r for r in lab.audit_records() if str(r.get("source", "")).startswith(ATTACKER + ":")]


def failed_flows(lab: Lab, onramp: str) -> float:
    """Flows of `onramp` that ended any way but ok."""
    m = lab.edge_metrics()
    return m.value("ramp_flows_total", onramp=onramp) - m.value(
        "ramp_flows_total", onramp=onramp, result="ok"
    )


# --- (i) a flood of CONNECTs to a blackholed address -----------------------------------------


# 500 stays under half of the 1,024 handshake slots, past which one source's handshake share
# binds: this attack is on opening flows, not on handshakes
FLOOD = 500
SHARE = 256  # flows one source may have opening


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "streams",
    [
        (),
        # the report's setting: 4 connections x 100 streams, fewer slots than the flood has
        # flows; the per-source share of opening flows keeps some for everyone else
        ("--max-streams-per-connection", "100"),
    ],
    ids=["default-streams", "400-slots"],
)
def test_a_flood_to_a_blackholed_address_leaves_healthy_origins_reachable(
    attack_lab: Lab, streams: tuple[str, ...]
) -> None:
    lab = attack_lab
    # the connector dials longer than the edge waits: the edge's answer is what the attacker
    # gets; the opening share is set so the numbers below do not follow the defaults
    start(
        lab,
        edge_args=("--connect-timeout", "12", "--max-opening-flows-per-source", str(SHARE)),
        connector_args=("--connect-timeout", "60", *streams),
    )
    watch = Watch(lab)
    before = failed_flows(lab, "socks5")
    shared = edge_value(lab, "ramp_flows_rejected_total", reason="source_opening_share")
    attack = FloodInBackground(lab, [Ask("socks5", BLACKHOLE, HTTP_PORT)] * FLOOD)
    # the attacker's share of flows is held open (dialling the blackhole) while the
    # legitimate client fetches; the rest of the flood was told 'busy' at once
    wait_until(
        lambda: (
            edge_value(lab, "ramp_flows_active") >= SHARE
            and edge_value(lab, "ramp_flows_rejected_total", reason="source_opening_share") - shared
            >= FLOOD - SHARE
        ),
        DEADLINE,
        what=lambda: f"the flood's share open at the edge ({edge_value(lab, 'ramp_flows_active')})",
    )
    watch.legit.wait_requests(3)
    # still held: the fetches did not have to wait for the flood's flows to time out
    assert edge_value(lab, "ramp_flows_active") >= SHARE, (
        "the legitimate fetches were served only once the flood's flows had ended:\n"
        + watch.legit.summary().describe()
    )
    got = attack.join()
    busy = f"rep {REP_GENERAL_FAILURE:#04x}"  # SOCKS5 has no 'busy': general failure
    assert got == Counter({f"rep {REP_HOST_UNREACHABLE:#04x}": SHARE, busy: FLOOD - SHARE}), got
    assert failed_flows(lab, "socks5") - before >= FLOOD
    watch.finish()


# --- (ii) CONNECTs whose clients go away at once ----------------------------------------------


def abandoned_why(record: dict[str, object]) -> str:
    reason = str(record.get("reason"))
    if reason == "client went away while opening":
        return "went away"
    return "share" if "flows opening" in reason else reason


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
    opened = connector.metrics().value("ramp_flows_total")
    got = flood(lab, [Ask("socks5", BLACKHOLE, HTTP_PORT)] * FLOOD, leave=True)
    assert got == Counter({"left": FLOOD}), got
    # every flow of the flood ended, at the edge and the connector, long before the dials
    # would have timed out: only the legitimate client's flows remain open
    wait_until(
        lambda: failed_flows(lab, "socks5") - before >= FLOOD,
        2 * DEADLINE,
        what=lambda: f"the {FLOOD} abandoned flows to end ({failed_flows(lab, 'socks5') - before})",
    )
    wait_until(
        lambda: (
            connector.metrics().value("ramp_flows_active") <= LEGIT_FLOWS
            and edge_value(lab, "ramp_flows_active") <= LEGIT_FLOWS
        ),
        DEADLINE,
        what="the stream slots to be free again",
    )
    # flows reached the connector (they held slots) and it dropped their dials; how many get
    # that far before the edge sees their client gone depends on the machine's load
    assert connector.metrics().value("ramp_flows_total") - opened > 0
    # each abandoned flow was let go while it opened, or refused at once past the source's
    # opening share (its client gone by the time the answer was written)
    reasons = Counter(abandoned_why(r) for r in attacker_records(lab))
    assert reasons.keys() <= {"went away", "share"} and sum(reasons.values()) == FLOOD, reasons
    assert reasons["went away"] > 0, reasons
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
        attack = FloodInBackground(lab, asks)
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
        refused = [r for r in attacker_records(lab) if "resolver busy" in str(r.get("reason"))]
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


def ended_handshakes(lab: Lab) -> float:
    """Proxy connections the edge ended in their handshake: timed out or past a share."""
    m = lab.edge_metrics()
    return sum(
        m.value("ramp_bad_input_total", reason=reason)
        for reason in (
            "handshake_timeout",
            "too_many_handshakes",
            "too_many_handshakes_from_source",
        )
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slow_handshakes_against_a_low_descriptor_limit_leave_the_proxies_serving(
    attack_lab: Lab,
) -> None:
    lab = attack_lab
    start(lab, wrapper=("prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}"))
    watch = Watch(lab)
    ended = ended_handshakes(lab)
    attack = SlowHandshakes(lab, SLOW)
    try:
        # every connection of the flood has been tried, and the edge has ended some (past
        # the source's share at once, the rest at their handshake timeout)...
        wait_until(
            lambda: attack.attempts >= SLOW and attack.closed_by_edge > 0,
            2 * DEADLINE,
            what=lambda: f"{SLOW} slow handshakes under way ({attack.outcomes}, {attack.open})",
        )
        # ...while the legitimate client is served
        watch.legit.wait_requests(3)
    finally:
        attack.stop()
    # the attacker's handshakes were ended: past its share at once, the rest at their timeout
    assert ended_handshakes(lab) > ended
    assert lab.edge is not None and lab.edge.alive()
    watch.finish()
    # running out of descriptors is said, not shouted: a line or two per listener, not a
    # warning for every failed accept
    emfile = [
        line
        for line in lab.edge.stderr().splitlines()
        if "accept" in line and "Too many open files" in line
    ]
    assert len(emfile) <= 4, f"{len(emfile)} accept warnings:\n" + "\n".join(emfile[:10])


# --- (vi) DNS over TCP held by one client -----------------------------------------------------

DNS_TCP_CAP = 512  # the DNS listener's TCP connections, all clients together


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_one_client_holding_dns_tcp_connections_leaves_room_for_others(attack_lab: Lab) -> None:
    lab = attack_lab
    start(
        lab,
        edge_args=("--dns-listen", EDGE_DNS),
        connector_args=("--connect-timeout", "2", "--dns-resolver", PRIVATE_DNS),
        dns_zone=DNS_ZONE,
    )
    watch = Watch(lab, kinds=(*KINDS, DNS_TCP))
    refused = edge_value(lab, "ramp_bad_input_total", reason="too_many_connections_from_source")
    # connections that send half a length prefix and wait; each one ended is opened again
    attack = SlowHandshakes(lab, DNS_TCP_CAP + 100, targets=[(DNS_PORT, b"\x00")])
    try:
        wait_until(
            lambda: attack.attempts >= DNS_TCP_CAP + 100 and attack.closed_by_edge > 0,
            2 * DEADLINE,
            what=lambda: f"the DNS connections to be held ({attack.outcomes}, {attack.open})",
        )
        watch.legit.wait_requests(3)
    finally:
        attack.stop()
    # past half the listener, the flooding address got no more: its share was at work
    assert (
        edge_value(lab, "ramp_bad_input_total", reason="too_many_connections_from_source") > refused
    )
    watch.finish()
