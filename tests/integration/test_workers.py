"""`--workers N` on the edge and the connector: workers share the listening sockets, a TCP
flow moves (as its client socket's descriptor) to the worker holding its tunnel, one /metrics
and /ready for all, and a worker killed with SIGKILL loses only its own flows and comes back."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_udp_socks5 import Association

from ramp.testing.lab import (
    APP_NAME,
    CLIENT_SOCKS,
    CLIENT_SOCKS_PORT,
    DNS_ZONE,
    EDGE_DNS,
    HTTP_PORT,
    HTTP_PROXY,
    ORIGIN,
    PRIVATE_DNS,
    SOCKS_PORT,
    SOCKS_PROXY,
    Digest,
    Lab,
    LabProcess,
    Payload,
    wait_until,
)
from ramp.testing.wait import DEADLINE

CONNECTOR_ARGS = ("--connect-timeout", "2")
RANGE = 3_000_000  # bytes each slow download fetches
MEDIUM = "workers-medium.bin"
RATE = "200K"  # per download: slow enough to be in flight while the test looks


def ready_doc(proc: LabProcess) -> dict[str, Any]:
    _, body = proc.http_get("/ready")
    doc = json.loads(body)
    assert isinstance(doc, dict)
    return doc


def worker_pids(proc: LabProcess) -> dict[int, int]:
    return {int(w["index"]): int(w["pid"]) for w in ready_doc(proc).get("workers", [])}


def connections_by_worker(proc: LabProcess, tunnel: str = "corp") -> list[int]:
    """The tunnel's connections each edge worker holds, in worker order."""
    workers = sorted(ready_doc(proc).get("workers", []), key=lambda w: int(w["index"]))
    return [int(w.get("connections", {}).get(tunnel, 0)) for w in workers]


def fetch_small(lab: Lab, via: str) -> Digest:
    if via == "socks5":
        proxy = ["--socks5", SOCKS_PROXY]
    elif via == "forward":  # an absolute-form request (GET http://...)
        proxy = ["--proxy", f"http://{HTTP_PROXY}"]
    else:
        proxy = ["--proxytunnel", "--proxy", via]
    return lab.curl_digest(*proxy, f"http://{ORIGIN}:{HTTP_PORT}/small.bin", timeout=30)


def holders(lab: Lab) -> dict[int, int]:
    """Client port -> pid of the process holding each established SOCKS5 connection."""
    out = lab.edge_ns.run(["ss", "-Htnp", "state", "established", f"sport = :{SOCKS_PORT}"])
    found = {}
    for line in out.stdout.decode().splitlines():
        cols = line.split()
        pid = re.search(r"pid=(\d+)", line)
        if len(cols) >= 4 and pid:
            found[int(cols[3].rsplit(":", 1)[1])] = int(pid.group(1))
    return found


def medium_sha(payload: Payload) -> str:
    """A file of RANGE bytes beside the payload's (the origin serves that directory)."""
    path = payload.directory / MEDIUM
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(os.urandom(RANGE))
        tmp.replace(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


class SlowDownloads:
    """Slow ranged downloads of the big file through SOCKS5, each in a thread."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.results: dict[int, Digest] = {}
        self.threads: list[threading.Thread] = []

    def start(self, n: int) -> None:
        for _ in range(n):
            i = len(self.threads)
            t = threading.Thread(target=self._one, args=(i,), daemon=True)
            self.threads.append(t)
            t.start()

    def _one(self, i: int) -> None:
        self.results[i] = self.lab.curl_digest(
            "--socks5",
            SOCKS_PROXY,
            "--limit-rate",
            RATE,
            "-w",
            "%{stderr}%{local_port}\n",
            f"http://{ORIGIN}:{HTTP_PORT}/{MEDIUM}",
            timeout=120,
        )

    def join(self) -> dict[int, Digest]:
        for t in self.threads:
            t.join(180)
        return self.results


@pytest.fixture
def workers_lab(tmp_path: Path, payload: Payload, lab_opener: Any) -> Iterator[Lab]:
    with lab_opener(tmp_path, payload, standard=False, lab_kwargs={"workers": 2}) as lab:
        yield lab


def test_two_workers_on_each_role_share_the_listeners_and_show_one_view(
    workers_lab: Lab, payload: Payload
) -> None:
    lab = workers_lab
    lab.start_standard(connector_args=CONNECTOR_ARGS, ha_connections=2)
    lab.wait_tunnel_connections("corp", 2)
    edge_workers = worker_pids(lab.edge)
    connector_workers = worker_pids(lab.connectors[0])
    assert sorted(edge_workers) == [0, 1] and sorted(connector_workers) == [0, 1]
    # both edge workers listen on the SOCKS5 port themselves (SO_REUSEPORT)
    out = lab.edge_ns.run(["ss", "-Htlnp", f"sport = :{SOCKS_PORT}"]).stdout.decode()
    listening = {int(p) for p in re.findall(r"pid=(\d+)", out)}
    assert listening == set(edge_workers.values()), out
    got = [fetch_small(lab, "socks5") for _ in range(30)]
    got += [fetch_small(lab, f"http://{HTTP_PROXY}") for _ in range(10)]
    assert all(d.returncode == 0 and d.sha256 == payload.small.sha256 for d in got), [
        d.stderr for d in got if d.returncode
    ]
    # one /metrics: the workers' samples summed
    m = lab.edge_metrics()
    assert m.value("ramp_flows_total", onramp="socks5", result="ok") == 30
    assert m.value("ramp_flows_total", onramp="http", result="ok") == 10
    assert m.value("ramp_workers") == 2
    assert lab.connectors[0].metrics().value("ramp_tunnel_connections") == 2
    # every flow in the audit once, ids unique across the workers
    records = [r for r in lab.audit_records() if r.get("kind") == "stream"]
    assert len(records) == 40
    assert len({r["flow"] for r in records}) == 40
    # an in-place restart is refused with the reason; the workers serve on
    refused = lab.ramp("edge", "restart", check=False)
    assert refused.returncode == 1
    assert "does not restart in place" in refused.stderr
    assert worker_pids(lab.edge) == edge_workers


def test_a_flow_moves_to_the_worker_holding_its_tunnel(workers_lab: Lab, payload: Payload) -> None:
    """One tunnel connection: one edge worker holds it. Flows the other worker accepts are
    handed over as descriptors; the client's socket then lives in the holder alone."""
    lab = workers_lab
    lab.start_standard(
        edge_args=("--dns-listen", EDGE_DNS),
        connector_args=(*CONNECTOR_ARGS, "--workers", "1", "--dns-resolver", PRIVATE_DNS),
        ha_connections=1,
    )
    lab.add_dns_route(DNS_ZONE, "corp")
    doc = ready_doc(lab.edge)
    holder = [w["pid"] for w in doc["workers"] if w["ready"]]
    assert len(holder) == 1, doc
    got = [fetch_small(lab, "socks5") for _ in range(40)]
    got += [fetch_small(lab, f"http://{HTTP_PROXY}") for _ in range(10)]
    got += [fetch_small(lab, "forward") for _ in range(10)]
    assert all(d.returncode == 0 and d.sha256 == payload.small.sha256 for d in got), [
        d.stderr for d in got if d.returncode
    ]
    # private DNS through the tunnel, over UDP and TCP, whichever worker the query reaches:
    # a worker without the tunnel asks the holder
    wait_until(lambda: lab.dig(APP_NAME).answers("A") == [ORIGIN], DEADLINE, what="the DNS route")
    digs = [lab.dig(APP_NAME, *(["+tcp"] if i % 2 else [])) for i in range(20)]
    assert all(d.status == "NOERROR" and d.answers("A") == [ORIGIN] for d in digs), [
        d.output for d in digs if d.answers("A") != [ORIGIN]
    ]
    m = lab.edge_metrics()
    assert m.value("ramp_worker_questions_total", what="dns") > 0
    moved = m.value("ramp_flows_moved_total", direction="out")
    assert moved > 0
    assert m.value("ramp_flows_moved_total", direction="in") == moved
    assert m.value("ramp_worker_flow_moves_total", outcome="ok") == moved
    records = [r for r in lab.audit_records() if r.get("kind") == "stream"]
    assert len(records) == 60  # a moved flow is reported once, by the worker it moved to
    assert sum(1 for r in records if "moved_from" in r.get("annotations", {})) == moved
    # while slow downloads run, every client connection is held by the holder only: the
    # bytes are not copied through the worker that accepted them
    want = medium_sha(payload)
    downloads = SlowDownloads(lab)
    downloads.start(6)
    wait_until(lambda: len(holders(lab)) >= 6, DEADLINE, what="6 downloads in flight")
    assert set(holders(lab).values()) == set(holder), holders(lab)
    results = downloads.join()
    assert len(results) == 6
    assert all(d.returncode == 0 and d.sha256 == want for d in results.values()), [
        d.stderr for d in results.values()
    ]


def test_every_edge_worker_holds_connections_of_the_tunnel_so_flows_that_cannot_move_work(
    workers_lab: Lab, payload: Payload
) -> None:
    """A SOCKS5 UDP association and a MASQUE client's streams and connect-udp requests are
    not sockets that can move to another worker: the worker they reach must hold the tunnel.
    The supervisor spreads the tunnel's connections over the workers (REDIAL) however the
    kernel's hash placed them, without the connector ever having fewer."""
    lab = workers_lab
    lab.start_standard(connector_args=(*CONNECTOR_ARGS, "--workers", "1"), ha_connections=4)
    lab.wait_tunnel_connections("corp", 4)
    wait_until(
        lambda: connections_by_worker(lab.edge) == [2, 2],
        DEADLINE,
        what="the tunnel's 4 connections spread 2 and 2 over the edge workers",
    )
    connector = lab.connectors[0]
    assert connector.metrics().value("ramp_tunnel_connections") == 4
    # 16 associations open at once: their control connections land on both workers
    assocs: list[Association] = []
    try:
        for _ in range(16):
            assocs.append(Association(lab))
        assert set(holders(lab).values()) == set(worker_pids(lab.edge).values()), holders(lab)
        lost = [i for i, a in enumerate(assocs) if not a.ping()]
        assert lost == [], f"associations {lost} got no echo"
    finally:
        for a in assocs:
            a.close()
    # a MASQUE client: one QUIC connection, on whichever worker its Initial reached
    client = lab.start_client(lab.client_token("laptop"))
    got = [
        lab.curl_digest(
            "--socks5", CLIENT_SOCKS, f"http://{ORIGIN}:{HTTP_PORT}/small.bin", timeout=30
        )
        for _ in range(10)
    ]
    assert all(d.returncode == 0 and d.sha256 == payload.small.sha256 for d in got), [
        d.stderr for d in got if d.returncode
    ]
    assoc = Association(lab, proxy=("127.0.0.1", CLIENT_SOCKS_PORT), bind="127.0.0.1")
    try:
        assert assoc.ping(), "no echo through the client's connect-udp"
    finally:
        assoc.close()
    assert client.metrics().value("ramp_client_edge_connects_total") == 1
    assert lab.edge_metrics().value("ramp_flows_moved_total", direction="out") == 0


def test_kill_9_of_an_edge_worker_loses_only_its_flows_and_it_comes_back(
    workers_lab: Lab, payload: Payload
) -> None:
    lab = workers_lab
    lab.start_standard(connector_args=(*CONNECTOR_ARGS, "--workers", "1"), ha_connections=4)
    lab.wait_tunnel_connections("corp", 4)
    pids = worker_pids(lab.edge)
    want = medium_sha(payload)
    downloads = SlowDownloads(lab)
    downloads.start(10)
    wait_until(lambda: len(holders(lab)) >= 10, DEADLINE, what="10 downloads in flight")
    held = holders(lab)
    # the victim: the worker holding the fewest of them (with four tunnel connections spread
    # by the kernel, usually both workers hold some; a flow moved to a worker is its flow)
    counts = {pid: list(held.values()).count(pid) for pid in pids.values()}
    victim = min((pid for pid in counts if counts[pid]), key=lambda pid: counts[pid])
    doomed = {port for port, pid in held.items() if pid == victim}
    os.kill(victim, signal.SIGKILL)
    results = downloads.join()
    by_port: dict[int, Digest] = {}
    for d in results.values():
        ports = re.findall(r"^(\d+)$", d.stderr, re.M)
        assert d.returncode != 0 or d.sha256 == want, d.stderr
        if ports:
            by_port[int(ports[-1])] = d
    assert set(by_port) == set(held)
    failed = {p for p, d in by_port.items() if d.returncode != 0}
    assert failed == doomed, (failed, doomed, held)
    # it comes back, and serves
    wait_until(
        lambda: len(worker_pids(lab.edge)) == 2 and victim not in worker_pids(lab.edge).values(),
        DEADLINE,
        what="the killed worker to be started again",
    )
    assert lab.edge_metrics().value("ramp_worker_restarts_total", how="signal") == 1
    lab.wait_tunnel_connections("corp", 4, timeout=DEADLINE)
    # the connections it lost were redialled to the worker that stayed; the supervisor moves
    # half of them back to the new one
    wait_until(
        lambda: connections_by_worker(lab.edge) == [2, 2],
        DEADLINE,
        what="the tunnel's connections spread over both workers again",
    )
    got = [fetch_small(lab, "socks5") for _ in range(20)]
    assert all(d.returncode == 0 and d.sha256 == payload.small.sha256 for d in got)


def test_kill_9_of_a_connector_worker_and_it_comes_back(workers_lab: Lab, payload: Payload) -> None:
    lab = workers_lab
    lab.start_standard(
        edge_args=("--workers", "1"), connector_args=CONNECTOR_ARGS, ha_connections=2
    )
    lab.wait_tunnel_connections("corp", 2)
    connector = lab.connectors[0]
    pids = worker_pids(connector)
    os.kill(pids[1], signal.SIGKILL)
    wait_until(
        lambda: len(worker_pids(connector)) == 2 and pids[1] not in worker_pids(connector).values(),
        DEADLINE,
        what="the killed connector worker to be started again",
    )
    assert worker_pids(connector)[0] == pids[0]  # the other one lived on
    assert connector.metrics().value("ramp_worker_restarts_total", how="signal") == 1
    wait_until(
        lambda: connector.metrics().value("ramp_tunnel_connections") == 2,
        DEADLINE,
        what="both connector workers registered",
    )
    got = [fetch_small(lab, "socks5") for _ in range(10)]
    assert all(d.returncode == 0 and d.sha256 == payload.small.sha256 for d in got)
