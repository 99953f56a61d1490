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
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ramp.testing.clients import ProxyError, socks5_udp_associate, udp_unwrap, udp_wrap
from ramp.testing.lab import (
    BLACKHOLE,
    CLIENT_ADDR,
    EDGE_PUBLIC_ADDR,
    ORIGIN,
    ORIGIN_PREFIX,
    SOCKS_PORT,
    UDP_ECHO_PORT,
    Lab,
    LabProcess,
    Payload,
    wait_until,
)
from ramp.testing.wait import DEADLINE

LEGIT_ADDR = "203.0.113.3"  # a second address of the client network: the legitimate client
ATTACKER_ADDR = CLIENT_ADDR
ECHO = (ORIGIN, UDP_ECHO_PORT)
PER_REQUEST = 10.0  # seconds a legitimate echo may take: generous, not a timing assertion
FD_SLACK = 8  # descriptors the edge may hold beyond its start (log files, a lazy socket)


# --- clients ----------------------------------------------------------------------------------


def socks_control(lab: Lab, source: str) -> socket.socket:
    sock = lab.client.socket()
    sock.settimeout(PER_REQUEST)
    try:
        sock.bind((source, 0))
        sock.connect((EDGE_PUBLIC_ADDR, SOCKS_PORT))
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def association(lab: Lab, source: str) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(control connection, UDP socket connected to the relay) from `source`."""
    with socks_control(lab, source) as ctl, lab.client.socket(type=socket.SOCK_DGRAM) as udp:
        udp.bind((source, 0))
        udp.settimeout(PER_REQUEST)
        udp.connect(socks5_udp_associate(ctl, *udp.getsockname()))
        yield ctl, udp


def echo_once(udp: socket.socket) -> bool:
    data = os.urandom(32)
    udp.send(udp_wrap(*ECHO, data))
    while True:
        try:
            host, port, got = udp_unwrap(udp.recv(70000))
        except (TimeoutError, ConnectionRefusedError):
            return False
        if (host, port) == ECHO and got == data:
            return True


@dataclass
class LegitClient:
    """A background client: a new association from LEGIT_ADDR each round, a few echoes on it."""

    lab: Lab
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with association(self.lab, LEGIT_ADDR) as (_, udp):
                    for _ in range(3):
                        if echo_once(udp):
                            self.ok += 1
                        else:
                            self.failures.append("echo lost")
            except (OSError, ProxyError) as e:
                self.failures.append(repr(e))
            self._stop.wait(0.05)

    def __enter__(self) -> LegitClient:
        self._thread = threading.Thread(target=self._run, name="legit-udp", daemon=True)
        self._thread.start()
        wait_until(lambda: self.ok or self.failures, DEADLINE, what="a first legitimate echo")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(DEADLINE)

    def wait_more(self, n: int = 3) -> None:
        """Until `n` more echoes succeeded (the client works *now*, not only before)."""
        want = self.ok + n
        wait_until(lambda: self.ok >= want or self.failures, DEADLINE, what="legit echoes")


def fd_count(proc: LabProcess) -> int:
    return len(os.listdir(f"/proc/{proc.pid}/fd"))


def metric(proc: LabProcess | None, name: str, **labels: str) -> float:
    assert proc is not None
    return proc.metrics().value(name, **labels)


# --- the lab ----------------------------------------------------------------------------------


@pytest.fixture
def lab(tmp_path: Path, payload: Payload, lab_opener: Callable[..., Any]) -> Iterator[Lab]:
    with lab_opener(tmp_path, payload, standard=False) as lab:
        lab.client.add_address("to-edge", f"{LEGIT_ADDR}/24")
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
    fds_at_start = fd_count(edge)
    held: list[socket.socket] = []
    refused = 0
    try:
        with LegitClient(lab) as legit:
            for _ in range(ATTACK_ASSOCIATIONS):
                ctl = socks_control(lab, ATTACKER_ADDR)
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
            legit.wait_more()
            # the attacker's idle associations are closed by the edge: EOF on each
            wait_until(
                lambda: metric(edge, "ramp_udp_associations_expired_total") >= ASSOC_SHARE - 1,
                DEADLINE,
                what="the idle associations to expire",
            )
            for ctl in held[:5]:
                assert ctl.recv(16) == b""
            legit.wait_more()
        assert legit.failures == [], legit.failures
        assert legit.ok > 0
        # with the attacker's sockets still open here, the edge has let go of all of them
        wait_until(
            lambda: (
                metric(edge, "ramp_udp_associations_active") == 0
                and fd_count(edge) <= fds_at_start + FD_SLACK
            ),
            DEADLINE,
            what=lambda: f"edge fds back near {fds_at_start} (now {fd_count(edge)})",
        )
    finally:
        for ctl in held:
            ctl.close()


# --- (b) filling the session table ------------------------------------------------------------

CONNECTOR_SESSIONS = 96
SESSION_SHARE = 32
ATTACK_DESTINATIONS = 200  # per association
ATTACK_ASSOCS = 2


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
    fds_at_start = fd_count(edge)

    def refused() -> float:
        return metric(connector, "ramp_udp_sessions_refused_total", reason="source_share")

    with contextlib.ExitStack() as stack, LegitClient(lab) as legit:
        sprayers = [
            stack.enter_context(association(lab, ATTACKER_ADDR))[1] for _ in range(ATTACK_ASSOCS)
        ]
        # a few rounds at every destination: refused ones are retried after a holdoff
        for _ in range(3):
            for udp in sprayers:
                for port in range(1000, 1000 + ATTACK_DESTINATIONS):
                    udp.send(udp_wrap(BLACKHOLE, port, b"x"))
            wait_until(refused, DEADLINE, what="the connector to refuse past the share")
            legit.wait_more()
        assert metric(connector, "ramp_udp_sessions_active") <= SESSION_SHARE + 4
        # the attacker stops: its unanswered sessions expire after the short timeout
        wait_until(
            lambda: (
                metric(edge, "ramp_udp_sessions_expired_total", reason="unreplied")
                + metric(connector, "ramp_udp_sessions_expired_total", reason="unreplied")
                >= SESSION_SHARE
            ),
            DEADLINE,
            what="the unanswered sessions to expire",
        )
        wait_until(
            lambda: metric(connector, "ramp_udp_sessions_active") <= 4,
            DEADLINE,
            what="the connector's table to empty",
        )
        legit.wait_more()
    assert legit.failures == [], legit.failures
    assert legit.ok > 0
    wait_until(
        lambda: fd_count(edge) <= fds_at_start + FD_SLACK,
        DEADLINE,
        what=lambda: f"edge fds back near {fds_at_start} (now {fd_count(edge)})",
    )
