"""UDP attacks on a real edge and connector, while a legitimate client on another address of
the client network keeps sending UDP echoes through SOCKS5 to the private origin.

(a) One source opens a few hundred SOCKS5 UDP associations and never sends a datagram: past
    its share UDP ASSOCIATE gets 0x01, the idle ones are closed (control connection too), and
    the edge's descriptors return to where they started.
(b) One source sprays datagrams at hundreds of destinations that never answer, to fill the
    connector's session table: past its share the sessions are refused, the legitimate
    client's sessions still open, and the unanswered ones expire after the short timeout.

Limits and timeouts are small here so the attack stays bounded in count and time; each check
waits on a condition under a generous deadline.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ramp.testing.attack import LegitClient, ProcessUsage
from ramp.testing.clients import ProxyError, socks5_udp_associate, udp_wrap
from ramp.testing.lab import (
    BLACKHOLE,
    CLIENT_ADDR,
    EDGE_PUBLIC_ADDR,
    ORIGIN_PREFIX,
    SOCKS_PORT,
    Lab,
    LabProcess,
    Payload,
    wait_until,
)
from ramp.testing.wait import DEADLINE

ATTACKER_ADDR = CLIENT_ADDR  # the legitimate client has its own (LegitClient's default)
TIMEOUT = 10.0  # for one request of the attacker's


# --- the attacker -----------------------------------------------------------------------------


def socks_control(lab: Lab) -> socket.socket:
    sock = lab.client.socket()
    sock.settimeout(TIMEOUT)
    try:
        sock.bind((ATTACKER_ADDR, 0))
        sock.connect((EDGE_PUBLIC_ADDR, SOCKS_PORT))
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def association(lab: Lab) -> Iterator[socket.socket]:
    """A UDP socket connected to the relay of a new association of the attacker's."""
    with socks_control(lab) as ctl, lab.client.socket(type=socket.SOCK_DGRAM) as udp:
        udp.bind((ATTACKER_ADDR, 0))
        udp.connect(socks5_udp_associate(ctl, *udp.getsockname()))
        yield udp


def metric(proc: LabProcess | None, name: str, **labels: str) -> float:
    assert proc is not None
    return proc.metrics().value(name, **labels)


# --- the lab ----------------------------------------------------------------------------------


@pytest.fixture
def lab(tmp_path: Path, payload: Payload, lab_opener: Callable[..., Any]) -> Iterator[Lab]:
    with lab_opener(tmp_path, payload, standard=False) as lab:
        lab.add_client_address()
        yield lab


def start(lab: Lab, edge_args: tuple[str, ...], connector_args: tuple[str, ...] = ()) -> None:
    token = lab.create_tunnel("corp", [ORIGIN_PREFIX])
    lab.start_edge(*edge_args)
    lab.start_connector(token, *connector_args)
    lab.wait_tunnel_connections("corp", 4)


# --- (a) idle associations --------------------------------------------------------------------

ASSOC_SHARE = 40
ATTACK_ASSOCIATIONS = 200


def test_idle_associations_from_one_source(lab: Lab) -> None:
    start(
        lab,
        (
            "--max-udp-associations-per-source",
            str(ASSOC_SHARE),
            "--udp-association-idle-timeout",
            "3",
        ),
    )
    edge = lab.edge
    assert edge is not None
    usage = ProcessUsage(edge)
    at_start = usage.sample()
    held: list[socket.socket] = []
    refused = 0
    try:
        with LegitClient(lab) as legit:
            legit.wait_requests(1)
            for _ in range(ATTACK_ASSOCIATIONS):
                ctl = socks_control(lab)
                try:
                    socks5_udp_associate(ctl)
                except ProxyError as e:
                    assert "0x1" in str(e), e  # general failure, then the edge closes
                    refused += 1
                    ctl.close()
                else:
                    held.append(ctl)
            # the attacker got its share and no more (idle ones it held may have expired
            # meanwhile, letting a few more in); the legitimate client is unaffected
            assert refused > 0
            assert metric(edge, "ramp_udp_associations_active") <= ASSOC_SHARE + 1
            assert metric(
                edge, "ramp_udp_associations_refused_total", reason="source_share"
            ) == float(refused)
            legit.wait_requests(3)
            # the attacker's idle associations are closed by the edge: EOF on each
            wait_until(
                lambda: metric(edge, "ramp_udp_associations_expired_total") >= len(held),
                DEADLINE,
                what="the idle associations to expire",
            )
            for ctl in held:
                assert ctl.recv(16) == b""
            legit.wait_requests(1)
        summary = legit.summary()
        assert summary.all_ok, summary.describe()
        # with the attacker's sockets still open here, the edge has let go of all of them
        wait_until(
            lambda: metric(edge, "ramp_udp_associations_active") == 0,
            DEADLINE,
            what="no association left at the edge",
        )
        usage.wait_back_to(at_start)
    finally:
        for ctl in held:
            ctl.close()


# --- (b) filling the session table ------------------------------------------------------------

CONNECTOR_SESSIONS = 96
SESSION_SHARE = 32
ATTACK_DESTINATIONS = 200  # per association
ATTACK_ASSOCS = 2
SPRAY_PAUSE = 0.5  # seconds between rounds: each destination is refreshed well within 2 s
SPRAY_ROUNDS = 400  # a bound on the attack, far more than the test needs


class Sprayer:
    """The attacker: datagrams to ATTACK_DESTINATIONS ports of an address that never answers,
    from each of its associations, round after round until stopped (refreshing its sessions,
    so they would hold the table for as long as it keeps at it)."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        self.sockets = sockets
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sprayer", daemon=True)

    def _run(self) -> None:
        while self.rounds < SPRAY_ROUNDS and not self._stop.is_set():
            for udp in self.sockets:
                for port in range(1000, 1000 + ATTACK_DESTINATIONS):
                    with contextlib.suppress(OSError):  # a full buffer: as UDP does
                        udp.send(udp_wrap(BLACKHOLE, port, b"x"))
            self.rounds += 1
            self._stop.wait(SPRAY_PAUSE)

    def __enter__(self) -> Sprayer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(DEADLINE)


def test_session_table_fill_from_one_source(lab: Lab) -> None:
    # The edge's own per-source share is off so that the connector's table (the one the
    # reported flood filled) and its share, keyed on what the edge reports, take the attack.
    start(
        lab,
        ("--max-udp-sessions-per-source", "0", "--udp-unreplied-timeout", "2"),
        (
            "--max-udp-sessions",
            str(CONNECTOR_SESSIONS),
            "--max-udp-sessions-per-source",
            str(SESSION_SHARE),
            "--udp-unreplied-timeout",
            "2",
        ),
    )
    edge, connector = lab.edge, lab.connectors[0]
    assert edge is not None
    usage = ProcessUsage(edge)
    at_start = usage.sample()

    def unreplied_expired() -> float:
        return metric(edge, "ramp_udp_sessions_expired_total", reason="unreplied") + metric(
            connector, "ramp_udp_sessions_expired_total", reason="unreplied"
        )

    with LegitClient(lab, kinds=("udp",)) as legit:
        legit.wait_requests(1)
        with contextlib.ExitStack() as stack:
            sockets = [stack.enter_context(association(lab)) for _ in range(ATTACK_ASSOCS)]
            with Sprayer(sockets) as sprayer:
                wait_until(
                    lambda: metric(
                        connector, "ramp_udp_sessions_refused_total", reason="source_share"
                    ),
                    DEADLINE,
                    what="the connector to refuse past the share",
                )
                # the legitimate client's sessions open while the attack goes on
                legit.wait_requests(5)
                assert metric(connector, "ramp_udp_sessions_active") <= SESSION_SHARE + 4
                assert sprayer.rounds < SPRAY_ROUNDS, "the attack ended before the checks"
            # the attacker stops: its unanswered sessions expire after the short timeout
            expired_before = unreplied_expired()
            wait_until(
                lambda: (
                    unreplied_expired() >= expired_before + SESSION_SHARE / 2
                    and metric(connector, "ramp_udp_sessions_active") <= 4
                ),
                DEADLINE,
                what="the unanswered sessions to expire",
            )
            legit.wait_requests(1)
    summary = legit.summary()
    assert summary.all_ok, summary.describe()
    usage.wait_back_to(at_start)
