"""Connectors and edges die and come back; users notice as little as possible.

Each test gets a fresh lab: they kill things.
"""

from __future__ import annotations

import json
import os
import signal
import socket

import pytest

from ramp.testing.clients import REP_SUCCEEDED
from ramp.testing.lab import (
    BLACKHOLE,
    HELLO_PORT,
    ORIGIN,
    ORIGIN_PREFIX,
    Lab,
    LabProcess,
    Payload,
    wait_until,
)
from ramp.testing.wait import DEADLINE

CONNECTOR_ARGS = ("--connect-timeout", "2")


def _small_download_ok(lab: Lab, payload: Payload, timeout: float = 2.0) -> bool:
    got = lab.curl_digest(
        *lab.proxy_args("socks5"), f"http://{ORIGIN}/{payload.small.name}", timeout=timeout
    )
    return got.returncode == 0 and got.sha256 == payload.small.sha256


class EchoSession:
    """A SOCKS5 flow to the hello-echo origin; knows its source port at the origin."""

    def __init__(self, lab: Lab) -> None:
        code, self.sock = lab.socks5(ORIGIN, HELLO_PORT)
        assert code == REP_SUCCEEDED
        greeting = b""
        while not greeting.endswith(b"\n"):
            chunk = self.sock.recv(100)
            assert chunk, "origin greeting cut short"
            greeting += chunk
        self.origin_side_port = int(greeting.split()[1])

    def echoes(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        data = os.urandom(64)
        try:
            self.sock.sendall(data)
            got = b""
            while len(got) < len(data):
                chunk = self.sock.recv(len(data) - len(got))
                if not chunk:
                    return False
                got += chunk
        except OSError:
            return False
        return got == data

    def closed(self) -> bool:
        """True once the edge has ended this flow (EOF or reset); sends nothing."""
        self.sock.settimeout(0.05)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


def _carriers(lab: Lab, sessions: list[EchoSession]) -> dict[int, LabProcess]:
    """Which connector dialled each session's origin leg (by the owner of its socket in P)."""
    owners = lab.tcp_owners(HELLO_PORT)
    pid_to_connector = {pid: c for c in lab.connectors for pid in c.group_pids()}
    found: dict[int, LabProcess] = {}
    for i, session in enumerate(sessions):
        pid = owners.get(session.origin_side_port)
        if pid in pid_to_connector:
            found[i] = pid_to_connector[pid]
    return found


@pytest.mark.timeout(90)
def test_kill_9_connector_then_restart_serves_new_flows(lab: Lab, payload: Payload) -> None:
    lab.connectors[0].kill()
    lab.start_connector(lab.tokens["corp"], *CONNECTOR_ARGS, wait=False)
    wait_until(
        lambda: _small_download_ok(lab, payload), DEADLINE, what="a flow through the new connector"
    )
    # And from then on every new flow works, none is sent to the dead connector's connections.
    for _ in range(10):
        assert _small_download_ok(lab, payload, timeout=5)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_replicas_share_flows_and_killing_one_breaks_only_its_flows(
    lab: Lab, payload: Payload
) -> None:
    first = lab.connectors[0]
    second = lab.start_connector(lab.tokens["corp"], *CONNECTOR_ARGS)
    lab.wait_tunnel_connections("corp", 8)  # 4 connections from each replica

    sessions = [EchoSession(lab) for _ in range(16)]
    try:
        carriers = wait_until(
            lambda: (c := _carriers(lab, sessions)) and len(c) == len(sessions) and c,
            DEADLINE,
            what="every session's origin leg to show up in P",
        )
        on_first = [s for i, s in enumerate(sessions) if carriers[i] is first]
        on_second = [s for i, s in enumerate(sessions) if carriers[i] is second]
        assert on_first and on_second, "the edge did not spread flows over both replicas"

        first.kill()
        assert all(s.echoes() for s in on_second)
        wait_until(
            lambda: all(s.closed() for s in on_first),
            DEADLINE,
            what="the flows of the killed replica to be closed",
        )
        assert all(s.echoes() for s in on_second), "a flow of the surviving replica broke"

        fresh = [EchoSession(lab) for _ in range(8)]
        sessions += fresh
        assert all(s.echoes() for s in fresh)
        assert _small_download_ok(lab, payload, timeout=5)
    finally:
        for s in sessions:
            s.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_edge_restart_connectors_reconnect_by_themselves(
    lab: Lab, payload: Payload, sig: signal.Signals
) -> None:
    connector = lab.connectors[0]
    assert _small_download_ok(lab, payload)
    lab.restart_edge(sig)
    wait_until(
        lambda: _small_download_ok(lab, payload),
        45,
        interval=0.5,
        what="flows through the reconnected connector",
    )
    assert connector.alive(), "the connector should reconnect, not exit"
    lab.wait_tunnel_connections("corp", 4, timeout=45)
    assert lab.edge is not None and lab.edge.ready()
    for _ in range(5):
        assert _small_download_ok(lab, payload, timeout=5)


@pytest.mark.timeout(60)
def test_connector_sigterm_lets_open_flows_finish(lab: Lab) -> None:
    """SIGTERM: no new flows, open ones finish (within --grace-period), then exit 0."""
    connector = lab.connectors[0]
    session = EchoSession(lab)
    try:
        connector.signal(signal.SIGTERM)
        # draining (it says so on /ready) and still there, because a flow is open
        wait_until(
            lambda: connector.check_alive() or b"draining" in connector.http_get("/ready")[1],
            DEADLINE,
            what="the connector to start draining",
        )
        assert connector.alive(), "the connector left at once despite an open flow"
        assert session.echoes(), "the open flow broke during the grace period"
        session.sock.shutdown(socket.SHUT_WR)
        assert connector.wait_exit(15) == 0
    finally:
        session.close()


@pytest.mark.timeout(90)
def test_ready_follows_registration_and_a_connector_may_start_before_the_edge(
    bare_lab: Lab, payload: Payload
) -> None:
    lab = bare_lab
    token = lab.create_tunnel("corp", [ORIGIN_PREFIX])
    connector = lab.start_connector(token, *CONNECTOR_ARGS, wait=False)
    # No edge yet: the connector keeps trying and says it is not ready.
    wait_until(
        lambda: connector.check_alive() or connector.http_get("/ready")[0] == 503,
        DEADLINE,
        what="the connector's /ready to answer 503",
    )
    edge = lab.start_edge()
    lab.wait_ready(edge)  # 200 once the connector has registered
    lab.wait_ready(connector)
    status, body = edge.http_get("/ready")
    assert status == 200
    assert json.loads(body)["ready"] is True
    assert _small_download_ok(lab, payload, timeout=5)


def test_clients_that_leave_while_their_flows_open_free_the_stream_slots(bare_lab: Lab) -> None:
    # a connector that lets the edge open 2 streams per connection; both go to dials of a
    # blackholed address (no answer to SYN), whose clients then hang up
    lab = bare_lab
    token = lab.create_tunnel("corp", [ORIGIN_PREFIX])
    lab.start_edge()
    lab.start_connector(
        token,
        "--connect-timeout",
        "60",
        "--ha-connections",
        "1",
        "--max-streams-per-connection",
        "2",
    )
    lab.wait_tunnel_connections("corp", 1)
    request = b"\x05\x01\x00\x01" + socket.inet_aton(BLACKHOLE) + (80).to_bytes(2, "big")
    leavers = []
    for _ in range(2):
        sock = lab.connect_socks()
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        sock.sendall(request)
        leavers.append(sock)
    # both flows hold their stream slots (the connector is dialling for them)
    wait_until(
        lambda: lab.edge_metrics().value("ramp_flows_active") >= 2,
        DEADLINE,
        what="the edge to hold both waiting flows",
    )
    for sock in leavers:
        sock.close()
    wait_until(
        lambda: lab.edge_metrics().value("ramp_flows_total", onramp="socks5", result="error") >= 2,
        DEADLINE,
        what="the edge to end both flows whose clients left",
    )
    # the slots are free again: without that, this flow would wait for one past the edge's
    # 15 s connect timeout (the connector dials for 60 s) and get REP 0x04, not success
    session = EchoSession(lab)
    assert session.echoes()
    session.sock.close()
