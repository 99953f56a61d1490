"""UDP sessions end to end: a SOCKS5 UDP ASSOCIATE client in C, the edge, the tunnel, the
connector, and the UDP echo server on 198.51.100.10:7 in the private namespace.

The SOCKS5 UDP client (`ramp.testing.clients`) is written from RFC 1928 section 7,
independently of ramp's codecs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ramp.testing.clients import socks5_udp_associate, udp_unwrap, udp_wrap
from ramp.testing.lab import (
    CLIENT_ADDR,
    ORIGIN,
    ORIGIN_PREFIX,
    UDP_ECHO_PORT,
    Lab,
    LabProcess,
    Payload,
    wait_until,
)
from ramp.testing.wait import DEADLINE

ECHO = (ORIGIN, UDP_ECHO_PORT)
MAX_UDP_PAYLOAD = 65507  # IPv4
SOCKS_UDP_HEADER = 10  # RSV RSV FRAG ATYP=1 ADDR(4) PORT(2)
SO_RCVBUFFORCE = 33


# --- a SOCKS5 UDP client ----------------------------------------------------------------------


class Association:
    """One UDP ASSOCIATE: the TCP control connection and the client's UDP socket, which is
    connected to the relay so that only the relay's datagrams reach it."""

    def __init__(
        self,
        lab: Lab,
        *,
        timeout: float = 5.0,
        proxy: tuple[str, int] | None = None,
        bind: str = CLIENT_ADDR,
    ) -> None:
        if proxy is None:
            self.ctrl = lab.connect_socks(timeout)
        else:  # another SOCKS5 proxy in C (`ramp client run`'s)
            self.ctrl = lab.client_socket(timeout=timeout)
            self.ctrl.connect(proxy)
        self.udp = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            with contextlib.suppress(OSError):
                self.udp.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 * 2**20)
            self.udp.bind((bind, 0))
            self.udp.settimeout(timeout)
            self.relay = socks5_udp_associate(self.ctrl, *self.udp.getsockname())
            self.udp.connect(self.relay)
        except BaseException:
            self.close()
            raise

    def send(self, data: bytes, dest: tuple[str, int] = ECHO, frag: int = 0) -> None:
        self.udp.send(udp_wrap(dest[0], dest[1], data, frag=frag))

    def recv(self, timeout: float | None = None) -> tuple[str, int, bytes]:
        if timeout is not None:
            self.udp.settimeout(timeout)
        return udp_unwrap(self.udp.recv(70000))

    def ping(self, size: int = 64, timeout: float = 5.0) -> bool:
        """One datagram to the echo; True when it came back intact within `timeout`."""
        data = os.urandom(size)
        self.send(data)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                host, port, got = self.recv(left)
            except (TimeoutError, ConnectionRefusedError):
                return False
            if (host, port) == ECHO and got == data:
                return True
        return False

    def close(self) -> None:
        self.udp.close()
        self.ctrl.close()


@contextlib.contextmanager
def associate(lab: Lab, timeout: float = 5.0) -> Iterator[Association]:
    assoc = Association(lab, timeout=timeout)
    try:
        yield assoc
    finally:
        assoc.close()


def echo_all(
    assoc: Association, payloads: Iterable[bytes], *, window: int = 64, timeout: float = 5.0
) -> tuple[int, int]:
    """Send `payloads` to the echo with at most `window` unanswered; every one must come back
    intact (any order). Returns (datagrams, bytes); raises AssertionError on loss or damage."""
    outstanding: Counter[bytes] = Counter()
    in_flight = sent = received = nbytes = 0
    it = iter(payloads)
    more = True
    assoc.udp.settimeout(timeout)
    while True:
        while more and in_flight < window:
            data = next(it, None)
            if data is None:
                more = False
                break
            assoc.send(data)
            outstanding[data] += 1
            in_flight += 1
            sent += 1
        if not in_flight:
            return received, nbytes
        try:
            host, port, data = assoc.recv()
        except TimeoutError:
            sizes = sorted(len(d) for d in outstanding.elements())
            raise AssertionError(
                f"{in_flight} datagrams of {sent} sent got no echo within {timeout} s "
                f"({received} came back); sizes of the missing: {sizes[:20]}..."
            ) from None
        assert (host, port) == ECHO, f"reply from {host}:{port}"
        assert outstanding[data] > 0, f"a {len(data)}-byte echo matches nothing sent"
        outstanding[data] -= 1
        in_flight -= 1
        received += 1
        nbytes += len(data)


# --- labs --------------------------------------------------------------------------------------

CONNECTOR_ARGS = ("--connect-timeout", "2")


def start_udp_lab(
    lab: Lab,
    *,
    edge_args: tuple[str, ...] = (),
    connector_args: tuple[str, ...] = (),
    connectors: int = 1,
) -> None:
    token = lab.create_tunnel("corp", [ORIGIN_PREFIX])
    lab.start_edge("--audit-log", str(audit_path(lab)), *edge_args)
    for _ in range(connectors):
        lab.start_connector(token, *CONNECTOR_ARGS, *connector_args)
    lab.wait_tunnel_connections("corp", 4 * connectors)


def audit_path(lab: Lab) -> Path:
    return lab.workdir / "audit.jsonl"


def udp_audit(lab: Lab) -> list[dict[str, Any]]:
    path = audit_path(lab)
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r.get("protocol") == "udp"]


@pytest.fixture(scope="module")
def udp_lab(
    tmp_path_factory: pytest.TempPathFactory, payload: Payload, lab_opener: Callable[..., Any]
) -> Iterator[Lab]:
    """Edge + one connector, defaults otherwise; tests leave it as they found it."""
    with lab_opener(tmp_path_factory.mktemp("udp"), payload, standard=False) as lab:
        start_udp_lab(lab)
        yield lab


@pytest.fixture
def fresh_lab(tmp_path: Path, payload: Payload, lab_opener: Callable[..., Any]) -> Iterator[Lab]:
    with lab_opener(tmp_path, payload, standard=False) as lab:
        yield lab


@pytest.fixture
def jumbo_lab(tmp_path: Path, payload: Payload, lab_opener: Callable[..., Any]) -> Iterator[Lab]:
    """The E<->P veth with MTU 9000."""
    with lab_opener(tmp_path, payload, standard=False, lab_kwargs={"tunnel_mtu": 9000}) as lab:
        start_udp_lab(lab)
        yield lab


def active(proc: LabProcess | None) -> float:
    assert proc is not None
    return proc.metrics().value("ramp_udp_sessions_active")


def wait_active(
    lab: Lab, want: Callable[[float], bool], what: str, timeout: float = DEADLINE
) -> None:
    sides = [lab.edge, *lab.connectors]
    wait_until(
        lambda: all(want(active(p)) for p in sides if p is not None and p.alive()),
        timeout,
        interval=0.1,
        what=lambda: f"{what} (active: {[(p.role, active(p)) for p in sides if p and p.alive()]})",
    )


# --- echo through the tunnel ----------------------------------------------------------------


@pytest.mark.timeout(180)
def test_ten_thousand_datagrams_of_1_to_1472_bytes_come_back_intact(udp_lab: Lab) -> None:
    with associate(udp_lab) as assoc:
        assert assoc.ping(), "the first datagram got no echo"
        payloads = (os.urandom(1 + i % 1472) for i in range(10_000))
        count, nbytes = echo_all(assoc, payloads, window=64)
    assert count == 10_000
    assert nbytes == sum(1 + i % 1472 for i in range(10_000))


@pytest.mark.timeout(120)
def test_jumbo_datagrams_of_1500_to_9000_bytes_arrive_intact(jumbo_lab: Lab) -> None:
    sizes = [*range(1500, 9001, 75), 9000]
    with associate(jumbo_lab) as assoc:
        assert assoc.ping()
        count, _ = echo_all(assoc, (os.urandom(n) for n in sizes * 3), window=8)
    assert count == len(sizes) * 3


@pytest.mark.timeout(120)
def test_the_largest_ipv4_datagrams_arrive_intact(jumbo_lab: Lab) -> None:
    """65,507 bytes on the wire from the relay: a 65,497-byte payload plus the SOCKS5 header."""
    biggest = MAX_UDP_PAYLOAD - SOCKS_UDP_HEADER
    sizes = [16_000, 32_768, 60_000, biggest, biggest]
    with associate(jumbo_lab) as assoc:
        assert assoc.ping()
        count, _ = echo_all(assoc, (os.urandom(n) for n in sizes), window=1)
    assert count == len(sizes)


@pytest.mark.timeout(60)
def test_udp_metrics_and_one_audit_line_per_session(udp_lab: Lab) -> None:
    lab = udp_lab
    assert lab.edge is not None
    sides = [lab.edge, lab.connectors[0]]
    before = [p.metrics() for p in sides]
    audited = len(udp_audit(lab))
    with associate(lab) as assoc:
        echo_all(assoc, [os.urandom(100) for _ in range(10)], window=1)
        relay = assoc.relay
        after = [p.metrics() for p in sides]
        for side, b, a in zip(sides, before, after, strict=True):
            assert a.value("ramp_udp_sessions_active") >= 1, side.role
            for direction in ("up", "down"):
                d = a.value("ramp_udp_datagrams_total", direction=direction) - b.value(
                    "ramp_udp_datagrams_total", direction=direction
                )
                n = a.value("ramp_udp_bytes_total", direction=direction) - b.value(
                    "ramp_udp_bytes_total", direction=direction
                )
                assert (d, n) == (10, 1000), f"{side.role} {direction}: {d} datagrams, {n} bytes"
    # Closing the control connection ends the association and its session, on both sides.
    wait_until(
        lambda: ("udp", f"{relay[0]}:{relay[1]}") not in lab.listening(lab.edge_ns),
        DEADLINE,
        what="the relay port to close with the control connection",
    )
    wait_active(lab, lambda n: n == 0, "the session to end on both sides")
    for side, b in zip(sides, before, strict=True):
        done = side.metrics().value("ramp_udp_sessions_total") - b.value("ramp_udp_sessions_total")
        assert done == 1, f"{side.role} counted {done} finished sessions"
    records = wait_until(
        lambda: (r := udp_audit(lab)[audited:]) and r,
        DEADLINE,
        what="an audit line for the UDP session",
    )
    assert len(records) == 1, records
    rec = records[0]
    assert rec["destination"] == f"{ORIGIN}:{UDP_ECHO_PORT}", rec
    assert rec["source"].startswith(CLIENT_ADDR), rec
    assert (rec["packets_up"], rec["bytes_up"]) == (10, 1000), rec
    assert (rec["packets_down"], rec["bytes_down"]) == (10, 1000), rec
    assert rec["tunnel"] == "corp", rec


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_idle_sessions_close_on_both_sides_and_the_next_datagram_opens_a_new_one(
    fresh_lab: Lab,
) -> None:
    lab = fresh_lab
    # idle long enough that pings 0.3 s apart keep a session open on two loaded cores
    idle = ("--udp-idle-timeout", "3")
    start_udp_lab(lab, edge_args=idle, connector_args=idle)
    sides = [lab.edge, lab.connectors[0]]
    with associate(lab) as assoc:
        # Busy: pings every 0.3 s keep the session open.
        for _ in range(5):
            assert assoc.ping()
            time.sleep(0.3)
        assert all(active(p) == 1 for p in sides)
        assert lab.udp_owners(UDP_ECHO_PORT), "no connector socket towards the echo"
        before = [p.metrics().value("ramp_udp_sessions_total") for p in sides if p]
        # Idle: gone on both sides, the connector's socket to the origin too.
        wait_active(lab, lambda n: n == 0, "idle sessions to close", timeout=DEADLINE)
        wait_until(
            lambda: not lab.udp_owners(UDP_ECHO_PORT),
            DEADLINE,
            what="the connector's origin socket to close",
        )
        after = [p.metrics().value("ramp_udp_sessions_total") for p in sides if p]
        assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1]
        # The association outlives its idle session: the next datagram opens a new one.
        assert assoc.ping(), "no echo after the idle session closed"
        assert all(active(p) == 1 for p in sides)
        assert lab.udp_owners(UDP_ECHO_PORT)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_session_moves_to_another_replica_when_its_connector_dies(fresh_lab: Lab) -> None:
    lab = fresh_lab
    # Default settings: the killed process sends no goodbye, so the edge notices its silence
    # (connectors ping every second) and moves the session to the surviving replica.
    start_udp_lab(lab, connectors=2)
    by_pid = {pid: c for c in lab.connectors for pid in c.group_pids()}
    with associate(lab) as assoc:
        assert assoc.ping()
        owners = set(lab.udp_owners(UDP_ECHO_PORT).values())
        assert len(owners) == 1, f"sockets towards the echo: {owners}"
        carrier = by_pid[owners.pop()]
        survivor = next(c for c in lab.connectors if c is not carrier)

        carrier.kill()
        # datagrams sent while the session moves are lost: ping until one is answered
        wait_until(lambda: assoc.ping(timeout=0.2), DEADLINE, what="the echo to resume")
        assert {by_pid.get(p) for p in lab.udp_owners(UDP_ECHO_PORT).values()} == {survivor}
        for _ in range(20):
            assert assoc.ping(timeout=2)


# --- bad input ---------------------------------------------------------------------------------

TRUNCATED = [
    b"\x00",
    b"\x00\x00",
    b"\x00\x00\x00",  # no ATYP
    b"\x00\x00\x00\x01\xc6\x33\x64",  # IPv4 address cut
    b"\x00\x00\x00\x01" + socket.inet_aton(ORIGIN) + b"\x00",  # port cut
    b"\x00\x00\x00\x03\x10app.corp",  # name shorter than its length byte
    b"\x00\x00\x00\x04" + bytes(8),  # IPv6 address cut
    b"\x00\x00\x00\x09" + bytes(6),  # no such ATYP
]


TOO_MANY = re.compile(r"too.many.sessions|limit of \d+ sessions", re.I)


def bad_udp_input(lab: Lab) -> float:
    return lab.edge_metrics().value("ramp_bad_input_total", onramp="socks5-udp")


def fragment_drops(lab: Lab) -> float:
    m = lab.edge_metrics()
    return sum(
        v
        for n, labels, v in m.samples
        if n == "ramp_udp_drops_total" and re.search("frag", labels.get("reason", ""))
    )


@pytest.mark.timeout(60)
def test_truncated_socks5_udp_headers_are_counted_and_the_association_keeps_working(
    udp_lab: Lab,
) -> None:
    lab = udp_lab
    with associate(lab) as assoc:
        assert assoc.ping()
        before = bad_udp_input(lab)
        for junk in TRUNCATED:
            assoc.udp.send(junk)
        wait_until(
            lambda: bad_udp_input(lab) - before >= len(TRUNCATED),
            DEADLINE,
            what=lambda: f"{len(TRUNCATED)} bad inputs counted, got {bad_udp_input(lab) - before}",
        )
        assert bad_udp_input(lab) - before == len(TRUNCATED)
        assert assoc.ping(), "the association broke after bad input"
    assert lab.edge is not None and lab.edge.alive()


@pytest.mark.timeout(60)
def test_fragments_are_dropped_and_counted(udp_lab: Lab) -> None:
    lab = udp_lab
    with associate(lab) as assoc:
        assert assoc.ping()
        bad, drops = bad_udp_input(lab), fragment_drops(lab)
        assoc.send(b"fragment one", frag=1)
        assoc.send(b"fragment last", frag=0x81)
        with pytest.raises(TimeoutError):
            assoc.recv(timeout=1.0)
        counted = (bad_udp_input(lab) - bad) + (fragment_drops(lab) - drops)
        assert counted == 2, "fragments are not counted (ramp_bad_input_total / ramp_udp_drops)"
        assert assoc.ping()


@pytest.mark.timeout(60)
def test_the_relay_accepts_datagrams_only_from_the_associated_client(udp_lab: Lab) -> None:
    lab = udp_lab
    with associate(lab) as assoc:
        assert assoc.ping()
        stranger = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with stranger:
            stranger.bind((CLIENT_ADDR, 0))
            stranger.settimeout(1.0)
            stranger.sendto(udp_wrap(*ECHO, b"not mine"), assoc.relay)
            with pytest.raises(TimeoutError):
                stranger.recv(70000)
        with pytest.raises(TimeoutError):
            assoc.recv(timeout=0.5)  # nor is it echoed to the rightful client
        assert assoc.ping()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sessions_beyond_the_connector_limit_are_refused_and_counted(fresh_lab: Lab) -> None:
    lab = fresh_lab
    limit = 4
    start_udp_lab(lab, connector_args=("--max-udp-sessions", str(limit)))
    connector = lab.connectors[0]
    # Sessions are per destination: a flood of 64 destinations (nothing listens on most).
    ports = [UDP_ECHO_PORT + 10_000 + i for i in range(64)]
    with associate(lab) as flood:
        for port in ports:
            flood.send(b"hello?", (ORIGIN, port))
        refused = wait_until(
            lambda: (
                (
                    r := [
                        x
                        for x in udp_audit(lab)
                        if re.search(
                            r"too.many.sessions|limit of \d+ sessions", x["reason"] or "", re.I
                        )
                    ]
                )
                and len(r) >= len(ports) - limit
                and r
            ),
            DEADLINE,
            what=lambda: f"{len(ports) - limit} sessions refused for the limit",
        )
        assert all(r["result"] != "ok" for r in refused)
        assert active(connector) == limit
        assert connector.alive() and lab.edge is not None and lab.edge.alive()
        # At the limit: the echo's session is refused too.
        with associate(lab) as late:
            assert not late.ping(timeout=2)
    # The flood's sessions end with its association; then new sessions work again.
    wait_active(lab, lambda n: n == 0, "the flood's sessions to end")
    with associate(lab) as assoc:
        assert assoc.ping()
        echo_all(assoc, [os.urandom(200) for _ in range(100)])
