"""Fair shares of UDP sessions on the edge and the connector, and the short expiry of
sessions the origin never answered: one client past its share is refused with a counter, the
others keep opening sessions, and a freed unit can be used again."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ramp.config import ConnectorConfig, EdgeConfig
from ramp.flows.flow import Destination, Flow, FlowError, Identity
from ramp.observe.metrics import FlowMetrics
from ramp.testing.loopback import run, tunnel, udp_echo_origin
from ramp.testing.wait import until
from ramp.tunnel.sessions_connector import share_keys


def udp_flow(port: int, source: str = "127.0.0.1", user: str | None = None) -> Flow:
    return Flow(
        onramp="test",
        source=(source, 1),
        destination=Destination("127.0.0.1", port),
        protocol="udp",
        identity=Identity(user) if user is not None else None,
    )


def sample(metrics: FlowMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def ignore(_: object) -> None:
    pass


@contextmanager
def silent_origin() -> Iterator[int]:
    """A UDP port that takes datagrams and never answers (no ICMP either)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_defaults_are_shares_well_below_the_totals() -> None:
    for config in (EdgeConfig(), ConnectorConfig()):
        assert 0 < config.max_udp_sessions_per_source < config.max_udp_sessions
        assert 0 < config.max_udp_sessions_per_identity < config.max_udp_sessions
        assert config.udp_unreplied_timeout == 30.0
        assert config.udp_idle_timeout == 210.0
    edge = EdgeConfig()
    assert 0 < edge.max_udp_associations_per_source < edge.max_flows
    assert edge.udp_association_idle_timeout == 60.0


def test_edge_source_share_refuses_one_source_only(tmp_path: Path) -> None:
    async def main() -> None:
        transport, port = await udp_echo_origin()
        async with tunnel(tmp_path, max_udp_sessions_per_source=2) as t:
            got: asyncio.Queue[bytes] = asyncio.Queue()
            first = await t.edge.open_udp(udp_flow(port), got.put_nowait, ignore)
            await t.edge.open_udp(udp_flow(port), got.put_nowait, ignore)
            with pytest.raises(FlowError) as e:
                await t.edge.open_udp(udp_flow(port), got.put_nowait, ignore)
            assert "source share of 2 UDP sessions" in e.value.reason
            m = t.edge.metrics
            assert sample(m, "ramp_udp_sessions_refused_total", reason="source_share") == 1
            # another source is not affected, and its sessions work
            other = await t.edge.open_udp(udp_flow(port, "127.0.0.2"), got.put_nowait, ignore)
            other.send(b"other source")
            assert await asyncio.wait_for(got.get(), 10) == b"other source"
            # a closed session gives its unit back
            first.close()
            again = await t.edge.open_udp(udp_flow(port), got.put_nowait, ignore)
            again.send(b"again")
            assert await asyncio.wait_for(got.get(), 10) == b"again"
        transport.close()

    run(main())


def test_edge_identity_share_spans_addresses(tmp_path: Path) -> None:
    async def main() -> None:
        transport, port = await udp_echo_origin()
        async with tunnel(tmp_path, max_udp_sessions_per_identity=2) as t:
            for src in ("127.0.0.1", "127.0.0.2"):
                await t.edge.open_udp(udp_flow(port, src, "alice"), ignore, ignore)
            with pytest.raises(FlowError) as e:
                await t.edge.open_udp(udp_flow(port, "127.0.0.3", "alice"), ignore, ignore)
            assert "identity share" in e.value.reason
            await t.edge.open_udp(udp_flow(port, "127.0.0.3", "bob"), ignore, ignore)
            m = t.edge.metrics
            assert sample(m, "ramp_udp_sessions_refused_total", reason="identity_share") == 1
        transport.close()

    run(main())


def test_connector_keys_its_shares_on_the_source_the_edge_reports(tmp_path: Path) -> None:
    async def main() -> None:
        transport, port = await udp_echo_origin()
        # the edge has no share of its own here: the connector's is what refuses
        async with tunnel(
            tmp_path,
            connector_kw={"max_udp_sessions_per_source": 2},
            max_udp_sessions_per_source=0,
        ) as t:
            for _ in range(2):
                await t.edge.open_udp(udp_flow(port), ignore, ignore)
            with pytest.raises(FlowError) as e:
                await t.edge.open_udp(udp_flow(port), ignore, ignore)
            assert "source share of 2 sessions" in e.value.reason
            cm = t.connector.metrics
            assert sample(cm, "ramp_udp_sessions_refused_total", reason="source_share") == 1
            got: asyncio.Queue[bytes] = asyncio.Queue()
            other = await t.edge.open_udp(udp_flow(port, "127.0.0.9"), got.put_nowait, ignore)
            other.send(b"other")
            assert await asyncio.wait_for(got.get(), 10) == b"other"
        transport.close()

    run(main())


@pytest.mark.parametrize("side", ["edge", "connector"])
def test_unreplied_sessions_expire_and_answered_ones_stay(tmp_path: Path, side: str) -> None:
    async def main() -> None:
        transport, port = await udp_echo_origin()
        short = {"udp_unreplied_timeout": 0.5, "udp_idle_timeout": 600.0}
        long_ = {"udp_unreplied_timeout": 600.0, "udp_idle_timeout": 600.0}
        edge_kw, connector_kw = (short, long_) if side == "edge" else (long_, short)
        with silent_origin() as silent_port:
            async with tunnel(tmp_path, connector_kw=connector_kw, **edge_kw) as t:
                got: asyncio.Queue[bytes] = asyncio.Queue()
                closed: list[str] = []
                answered = await t.edge.open_udp(udp_flow(port), got.put_nowait, closed.append)
                answered.send(b"hello")
                assert await asyncio.wait_for(got.get(), 10) == b"hello"
                unanswered = await t.edge.open_udp(udp_flow(silent_port), ignore, closed.append)
                unanswered.send(b"anyone?")
                m = t.edge.metrics if side == "edge" else t.connector.metrics
                await until(
                    lambda: sample(m, "ramp_udp_sessions_expired_total", reason="unreplied"),
                    what="the unanswered session to expire",
                )
                await until(lambda: closed, what="the on-ramp to hear of it")
                assert len(closed) == 1
                # the answered one is still open end to end
                answered.send(b"still here")
                assert await asyncio.wait_for(got.get(), 10) == b"still here"
                assert sample(m, "ramp_udp_sessions_expired_total", reason="idle") == 0
        transport.close()

    run(main())


def test_connector_share_keys_come_from_the_register_metadata() -> None:
    meta = {"src": "2001:db8::7:40000", "identity": "alice", "onramp": "socks5-udp"}
    assert share_keys("edge-1", meta) == (("edge-1", "2001:db8::7"), ("edge-1", "alice"))
    assert share_keys("edge-2", {"src": "203.0.113.2:5353"}) == (
        ("edge-2", "203.0.113.2"),
        None,
    )
    # an edge that says nothing of the source gets no per-source share here
    assert share_keys("edge-1", {}) == (None, None)
