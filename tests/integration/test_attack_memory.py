"""Slow readers against the flow memory budget, with a real edge and connector.

A slow reader asks an origin for a big file through SOCKS5 and never reads: every byte the
windows allow then sits in the edge and the connector. With a small `--flow-memory-budget`,
the windows the flows hold stay within it, a legitimate client still downloads intact, and
once the readers go the budget and the descriptors come back.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path

import pytest

from ramp.flows.budget import WINDOW_FLOOR
from ramp.testing.attack import LegitClient, ProcessUsage
from ramp.testing.clients import REP_SUCCEEDED, socks5_connect
from ramp.testing.lab import (
    EDGE_PUBLIC_ADDR,
    HTTP_PORT,
    ORIGIN,
    SOCKS_PORT,
    Lab,
    Payload,
    wait_until,
)
from ramp.testing.wait import DEADLINE

BUDGET = 32 * 1024 * 1024
SLOW_READERS = 100
RESERVED = "ramp_flow_memory_reserved_bytes"


def _slow_reader(lab: Lab, path: str) -> socket.socket:
    """A SOCKS5 flow that asked for `path` and will never read the answer."""
    sock = lab.client_socket()
    # a tiny receive buffer: the bytes pile up in the edge, not in this test's kernel
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        sock.connect((EDGE_PUBLIC_ADDR, SOCKS_PORT))
        assert socks5_connect(sock, ORIGIN, HTTP_PORT) == REP_SUCCEEDED
        sock.sendall(f"GET /{path} HTTP/1.1\r\nHost: {ORIGIN}\r\n\r\n".encode())
    except BaseException:
        sock.close()
        raise
    return sock


@pytest.fixture
def budget_lab(
    tmp_path: Path,
    payload: Payload,
    lab_opener: Callable[..., AbstractContextManager[Lab]],
) -> Iterator[Lab]:
    budget = ("--flow-memory-budget", str(BUDGET))
    with lab_opener(
        tmp_path,
        payload,
        standard=True,
        edge_args=budget,
        connector_args=("--connect-timeout", "2", *budget),
    ) as lab:
        yield lab


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_slow_readers_stay_within_the_budget_and_a_legitimate_download_is_intact(
    budget_lab: Lab, payload: Payload
) -> None:
    lab = budget_lab
    assert lab.edge is not None
    roles = {"edge": lab.edge, "connector": lab.connectors[0]}
    for proc in roles.values():
        assert proc.metrics().value("ramp_flow_memory_budget_bytes") == BUDGET
    # SOCKS5, HTTP and UDP from their own address, all through the attack
    lab.add_client_address()
    legit = LegitClient(lab).start()
    legit.wait_requests(2)
    usage = {name: ProcessUsage(p) for name, p in roles.items()}
    before = {name: u.sample() for name, u in usage.items()}

    with ExitStack() as readers:
        for _ in range(SLOW_READERS):
            readers.enter_context(_slow_reader(lab, payload.big.name))

        # every stalled flow holds at least the floor on both sides once its origin answered
        def all_stalled() -> bool:
            return all(
                p.metrics().value(RESERVED) >= SLOW_READERS * WINDOW_FLOOR for p in roles.values()
            )

        wait_until(all_stalled, 4 * DEADLINE, what="every slow reader to hold a window")
        for name, proc in roles.items():
            m = proc.metrics()
            assert m.value(RESERVED) <= BUDGET, name
            assert m.value("ramp_flow_windows_reduced_total") > 0, name

        # 100 MiB through windows at the floor: every grant waits on this client's drain
        got = lab.curl_digest(
            *lab.proxy_args("socks5"), f"http://{ORIGIN}/{payload.big.name}", timeout=200
        )
        assert got.returncode == 0, got.stderr
        assert got.sha256 == payload.big.sha256

        legit.wait_requests(3)
        for name, proc in roles.items():
            assert proc.metrics().value(RESERVED) <= BUDGET, name
            # loosely: the windows, not the origin's 100 MiB per reader, are what is held
            assert usage[name].sample().rss_kib - before[name].rss_kib < 3 * BUDGET // 1024, name

    summary = legit.stop()  # its own flows hold windows too
    assert summary.all_ok, summary.describe()
    for name, proc in roles.items():
        wait_until(
            lambda p=proc: p.metrics().value(RESERVED) == 0,
            4 * DEADLINE,
            what=f"the {name}'s flow windows to be released",
        )
    for name, u in usage.items():
        # descriptors back to their start; memory only loosely (Python keeps freed arenas)
        u.wait_back_to(before[name], rss_slack_kib=3 * BUDGET // 1024, timeout=4 * DEADLINE)
