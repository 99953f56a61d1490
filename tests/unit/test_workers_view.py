"""The parts of `--workers` that need no processes: one /metrics from many, one /ready, the
description a moved flow travels with, and the refusals of what workers cannot share."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ramp.flows.flow import Decision, Destination, Flow, FlowResult, Identity, Route
from ramp.flows.moved import flow_from_dict, flow_to_dict
from ramp.onramps.tcp_listener import FlowPlan, plan_from_dict, plan_to_dict
from ramp.workers.metrics_sum import SummedCollector, sum_expositions
from ramp.workers.supervisor import merge_ready


def _worker_text(flows: int, active: int, limit: int, delays: list[float]) -> str:
    registry = CollectorRegistry()
    Counter("ramp_flows", "f", ["result"], registry=registry).labels("ok").inc(flows)
    Gauge("ramp_flows_active", "a", registry=registry).set(active)
    Gauge("ramp_limit", "l", ["name"], registry=registry).labels("max_flows").set(limit)
    Gauge("ramp_routes", "r", registry=registry).set(5)
    h = Histogram("ramp_flow_setup_seconds", "s", buckets=(0.01, 0.1), registry=registry)
    for d in delays:
        h.observe(d)
    return generate_latest(registry).decode()


def _values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_the_workers_samples_are_summed_and_shared_gauges_are_not() -> None:
    texts = [_worker_text(3, 1, 100, [0.005, 0.05]), _worker_text(4, 2, 100, [0.5])]
    registry = CollectorRegistry()
    summed = SummedCollector()
    registry.register(summed)
    summed.update(sum_expositions(texts))
    got = _values(generate_latest(registry).decode())
    assert got[("ramp_flows_total", (("result", "ok"),))] == 7
    assert got[("ramp_flows_active", ())] == 3
    # each worker enforces its share of a limit: the edge's limit is their sum
    assert got[("ramp_limit", (("name", "max_flows"),))] == 200
    assert got[("ramp_routes", ())] == 5  # the same in every worker
    assert got[("ramp_flow_setup_seconds_bucket", (("le", "0.01"),))] == 1
    assert got[("ramp_flow_setup_seconds_bucket", (("le", "+Inf"),))] == 3
    assert got[("ramp_flow_setup_seconds_count", ())] == 3
    created = [v for (name, _), v in got.items() if name == "ramp_flows_created"]
    assert len(created) == 1  # a time, not a sum of times


@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 500)), max_size=5))
def test_summing_adds_up_whatever_the_workers_report(workers: list[tuple[int, int]]) -> None:
    texts = [_worker_text(flows, active, 7, []) for flows, active in workers]
    got = _values(
        "".join(generate_latest(_registry_of(sum_expositions(texts))).decode() for _ in [0])
    )
    if workers:
        assert got[("ramp_flows_total", (("result", "ok"),))] == sum(f for f, _ in workers)
        assert got[("ramp_flows_active", ())] == sum(a for _, a in workers)
    else:
        assert got == {}


def _registry_of(families: list) -> CollectorRegistry:
    registry = CollectorRegistry()
    summed = SummedCollector()
    summed.update(families)
    registry.register(summed)
    return registry


def test_one_ready_answer_for_all_workers() -> None:
    ok, doc = merge_ready(
        [
            (0, 100, True, {"status": "ready", "connections": {"corp": 2}, "flows": 3}),
            (1, 101, False, {"status": "waiting for a connector", "connections": {}, "flows": 1}),
        ]
    )
    assert ok
    assert doc["connections"] == {"corp": 2} and doc["flows"] == 4
    assert doc["status"] == "ready"
    assert [w["pid"] for w in doc["workers"]] == [100, 101]
    assert merge_ready([])[0] is False


_names = st.text("abcdefghijklmnopqrstuvwxyz0123456789.-", min_size=1, max_size=30)


@given(
    host=_names,
    port=st.integers(1, 65535),
    user=st.none() | _names,
    groups=st.frozensets(_names, max_size=3),
    replica=st.none() | _names,
)
def test_a_moved_flow_arrives_as_it_left(
    host: str, port: int, user: str | None, groups: frozenset[str], replica: str | None
) -> None:
    flow = Flow(
        onramp="socks5",
        source=("203.0.113.2", 40000),
        destination=Destination(host, port),
        identity=None if user is None else Identity(user, groups),
        vnet="default",
    )
    flow.resolved = "198.51.100.10"
    flow.route = Route("tunnel", "default", "tid", "corp", "198.51.100.0/24", replica, "v2")
    flow.decision = Decision(True, "default", "allowed")
    flow.annotations["team"] = "blue"
    back = flow_from_dict({**flow_to_dict(flow), "from": 1})
    assert (back.onramp, back.source, back.destination) == (
        flow.onramp,
        flow.source,
        flow.destination,
    )
    assert back.identity == flow.identity
    assert back.route == flow.route and back.decision == flow.decision
    assert back.resolved == flow.resolved
    assert back.annotations["team"] == "blue"
    assert back.annotations["moved_from"] == f"worker 1 flow {flow.id}"
    assert back.id != flow.id  # the receiving worker's own numbering


def test_a_plan_moves_with_its_replies_and_a_wrapped_one_does_not() -> None:
    plan = FlowPlan(
        destination=Destination("198.51.100.10", 80),
        identity=None,
        ok_reply=b"\x05\x00\x00\x01" + bytes(6),
        error_reply=lambda r: r.value.encode(),
        busy_reply=b"busy",
        initial=b"early",
    )
    described = plan_to_dict(plan)
    assert described is not None
    back = plan_from_dict(described, plan.destination)
    assert back.ok_reply == plan.ok_reply and back.initial == b"early"
    assert back.busy_reply == b"busy"
    assert all(back.error_reply(r) == r.value.encode() for r in FlowResult)
    plan.client = lambda sock: sock  # type: ignore[assignment,return-value]
    assert plan_to_dict(plan) is None  # a wrapped client that cannot be rebuilt stays


def test_an_absolute_form_request_moves_and_is_rebuilt() -> None:
    import socket as socket_module

    import ramp.onramps.http_connect  # noqa: F401  (registers its rebuilder)

    raw = b"GET http://198.51.100.10/small.bin HTTP/1.1\r\nHost: 198.51.100.10\r\n\r\n"
    plan = FlowPlan(
        destination=Destination("198.51.100.10", 80),
        identity=None,
        ok_reply=b"",
        error_reply=lambda r: b"HTTP/1.1 502 Bad Gateway\r\n\r\n",
        busy_reply=b"",
        client=lambda sock: sock,  # type: ignore[arg-type,return-value]
        resume=("http-request", raw),
    )
    described = plan_to_dict(plan)
    assert described is not None
    back = plan_from_dict(described, plan.destination)
    assert back.client is not None
    a, b = socket_module.socketpair()
    try:
        endpoint = back.client(a)
        assert endpoint.kind == "http-request"  # type: ignore[attr-defined]
    finally:
        a.close()
        b.close()
    described["resume"] = ["http-request", b"GARBAGE\r\n\r\n".hex()]
    with pytest.raises(ValueError):
        plan_from_dict(described, plan.destination)


def _ramp(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ramp", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_workers_refuse_a_port_zero_listener_and_too_few_connections(tmp_path: Path) -> None:
    edge = _ramp(
        "edge",
        "--workers",
        "2",
        "--socks5-listen",
        "127.0.0.1:0",
        "--tunnel-listen",
        "127.0.0.1:17844",
        data_dir=tmp_path / "edge",
    )
    assert edge.returncode == 2
    assert "port 0" in edge.stderr
    assert _ramp("tunnel", "create", "corp", data_dir=tmp_path / "edge").returncode == 0
    token = _ramp(
        "tunnel", "token", "corp", "--edge", "127.0.0.1:17844", data_dir=tmp_path / "edge"
    ).stdout.strip()
    connector = _ramp(
        "tunnel",
        "run",
        "--workers",
        "3",
        "--ha-connections",
        "2",
        "--token",
        token,
        data_dir=tmp_path / "connector",
    )
    assert connector.returncode == 2
    assert "--workers 3 needs at least as many --ha-connections" in connector.stderr
