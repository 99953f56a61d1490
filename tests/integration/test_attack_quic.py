"""Attacks on the tunnel listener: one client must not take the edge away from its connectors.

A flood of QUIC Initial packets with fresh connection ids (each one a new handshake on a
listener without limits) runs while a new connector registers and a user downloads through
SOCKS5; then a flood of registrations with a wrong secret. Each run is bounded in packets,
registrations and time.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time

import pytest

from ramp.config import EdgeConfig
from ramp.testing.attack import LegitClient, ProcessUsage
from ramp.testing.lab import (
    EDGE_TUNNEL,
    ORIGIN,
    PRIVATE_ADDR,
    Lab,
    LabProcess,
    Payload,
    wait_until,
)
from ramp.testing.wait import DEADLINE
from ramp.tunnel.edge_side import REFUSAL_LOG_BURST, REFUSAL_LOG_PERIOD

ATTACKER = "192.0.2.66"  # a second address in the private network, on the edge's side
FLOOD = [sys.executable, "-m", "ramp.testing.quic_flood"]
FLOOD_RATE = 5000  # Initials per second, each with fresh connection ids
FLOOD_SECONDS = 10
WRONG_SECRET_REGISTRATIONS = 40
REFUSALS_BEFORE_PENALTY = EdgeConfig.model_fields["quic_refusals_per_source"].default
# the flood's share of unproved handshakes plus the new connector's four
MAX_HELD = EdgeConfig.model_fields["quic_max_handshakes_per_source"].default + 4


def _handshake_events(proc: LabProcess, event: str) -> float:
    return proc.metrics().value("ramp_tunnel_handshake_events_total", event=event)


def _download_ok(lab: Lab, payload: Payload) -> bool:
    got = lab.curl_digest(
        *lab.proxy_args("socks5"), f"http://{ORIGIN}/{payload.small.name}", timeout=30
    )
    return got.returncode == 0 and got.sha256 == payload.small.sha256


def _finish(proc: LabProcess) -> dict[str, object]:
    proc.wait_exit(DEADLINE)
    lines = proc.stdout().strip().splitlines()
    assert lines, f"{proc.role} printed no summary\n{proc.tail()}"
    result: dict[str, object] = json.loads(lines[-1])
    return result


@pytest.mark.parametrize(
    "source",
    [ATTACKER, PRIVATE_ADDR],
    ids=["own-address", "connector-address"],
)
def test_an_initial_flood_leaves_room_for_connectors_and_users(lab: Lab, source: str) -> None:
    """From its own address or forging the connector's, the flood gets Retries and its
    share of the handshake table; the connector proves its address and gets in."""
    edge = lab.edge
    assert edge is not None
    if source == ATTACKER:
        lab.private.add_address("to-edge", f"{ATTACKER}/24")
    lab.add_client_address()
    usage = ProcessUsage(edge)
    start = usage.sample()
    connections_before = edge.metrics().value("ramp_tunnel_connections", tunnel="corp")

    flood = lab.start_process(
        "flood",
        lab.private,
        [
            *FLOOD,
            "initials",
            "--target",
            EDGE_TUNNEL,
            "--bind",
            source,
            "--rate",
            str(FLOOD_RATE),
            "--seconds",
            str(FLOOD_SECONDS),
        ],
    )
    try:
        with LegitClient(lab) as legit:
            wait_until(
                lambda: _handshake_events(edge, "retry_sent") > 100,
                DEADLINE,
                what=lambda: f"the flood to meet Retries\n{flood.tail()}\n{edge.tail()}",
            )
            # a new connector registers all its connections while the flood goes on
            second = lab.start_connector(lab.tokens["corp"], "--connect-timeout", "2")
            lab.wait_tunnel_connections("corp", int(connections_before) + 4)
            assert flood.alive(), "the flood ended before the connector registered: no proof"
            # users fetch all along, and the flood never holds more than its share
            while flood.alive():
                legit.wait_requests(1)
                assert edge.metrics().value("ramp_tunnel_handshakes_active") <= MAX_HELD
            summary = legit.stop()
        assert summary.all_ok, summary.describe()
    finally:
        if flood.alive():
            flood.signal(signal.SIGTERM)
    result = _finish(flood)
    answers = result["answers"]
    assert isinstance(answers, dict)
    assert answers.get("retry", 0) > 0, result
    assert second.alive() and edge.alive()

    # the flood's half-open connections time out, and nothing it did is still held
    wait_until(
        lambda: _handshake_events(edge, "handshake_timeout") >= 16,
        DEADLINE,
        what="the flood's share of the handshake table to time out",
    )
    wait_until(
        lambda: edge.metrics().value("ramp_tunnel_handshakes_active") == 0,
        DEADLINE,
        what="the handshake table to empty",
    )
    usage.wait_back_to(start)


def test_a_wrong_secret_flood_is_counted_logged_in_part_and_shut_out(
    lab: Lab, payload: Payload
) -> None:
    """Each refusal is counted, a few are logged; past quic_refusals_per_source the source
    gets no answer at all for a while, and the connector's live connections carry on."""
    edge = lab.edge
    assert edge is not None

    def refused() -> float:
        return edge.metrics().value("ramp_tunnel_registration_failures_total", reason="bad_proof")

    refused_before = refused()
    started = time.monotonic()
    flood = lab.start_process(
        "register-flood",
        lab.private,
        [
            *FLOOD,
            "register",
            "--token",
            lab.tokens["corp"],
            "--wrong-secret",
            "--count",
            str(WRONG_SECRET_REGISTRATIONS),
            "--concurrency",
            "8",
            "--timeout",
            "3",
        ],
    )
    result = _finish(flood)
    elapsed = time.monotonic() - started
    refusals, timeouts = result.get("refused_bad_proof", 0), result.get("TimeoutError", 0)
    assert isinstance(refusals, int) and isinstance(timeouts, int)
    # the edge answered until the penalty, then nothing (the attempts time out)
    assert REFUSALS_BEFORE_PENALTY <= refusals < WRONG_SECRET_REGISTRATIONS, result
    assert refusals + timeouts == WRONG_SECRET_REGISTRATIONS, result
    wait_until(
        lambda: refused() >= refused_before + refusals,
        DEADLINE,
        what="the edge to count every refusal",
    )
    assert refused() == refused_before + refusals
    penalties = _handshake_events(edge, "source_penalized")
    assert penalties >= 1
    assert edge.metrics().value("ramp_tunnel_bad_packets_total", reason="penalized") > 0

    stderr = edge.stderr()
    lines = [ln for ln in stderr.splitlines() if "refused tunnel registration" in ln]
    # a few lines per source and period, however many refusals
    windows = math.ceil(elapsed / REFUSAL_LOG_PERIOD) + 1
    assert 1 <= len(lines) <= REFUSAL_LOG_BURST * windows, lines
    assert len(lines) < refusals
    assert stderr.count("no new tunnel connections from") == penalties
    # the connector shares the address, but its live connections were never disturbed
    assert edge.metrics().value("ramp_tunnel_connections", tunnel="corp") == 4
    assert _download_ok(lab, payload)
