"""The edge's cap on concurrent UDP sessions (`max_udp_sessions`), for sessions through a
tunnel and for direct ones: past it opening fails with a clear error and a counter moves,
and a freed slot can be used again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ramp.config import EdgeConfig
from ramp.edge import Edge
from ramp.flows.flow import Destination, Flow, FlowError, FlowResult
from ramp.policy.rules import Rule
from ramp.store.db import Store
from ramp.testing.loopback import loopback_edge_config, run, tunnel, udp_echo_origin


def udp_flow(port: int) -> Flow:
    return Flow(
        onramp="test",
        source=("127.0.0.1", 1),
        destination=Destination("127.0.0.1", port),
        protocol="udp",
    )


def refused_at_limit(edge: Edge) -> float:
    value = edge.metrics.registry.get_sample_value(
        "ramp_udp_drops_total", {"reason": "too_many_sessions"}
    )
    return value or 0.0


def test_default_limit_matches_the_connector() -> None:
    assert EdgeConfig().max_udp_sessions == 4096
    with pytest.raises(ValueError):
        EdgeConfig(max_udp_sessions=0)


def test_tunnel_sessions_past_the_limit_are_refused(tmp_path: Path) -> None:
    async def main() -> None:
        transport, port = await udp_echo_origin()
        async with tunnel(tmp_path, max_udp_sessions=2) as t:
            got: asyncio.Queue[bytes] = asyncio.Queue()
            first = await t.edge.open_udp(udp_flow(port), got.put_nowait, lambda r: None)
            await t.edge.open_udp(udp_flow(port), got.put_nowait, lambda r: None)
            with pytest.raises(FlowError) as e:
                await t.edge.open_udp(udp_flow(port), got.put_nowait, lambda r: None)
            assert e.value.result is FlowResult.ERROR
            assert e.value.reason == "edge at its limit of 2 UDP sessions"
            assert refused_at_limit(t.edge) == 1
            # the sessions already open keep working
            first.send(b"still here")
            assert await asyncio.wait_for(got.get(), 10) == b"still here"
            # a closed session frees its slot
            first.close()
            third = await t.edge.open_udp(udp_flow(port), got.put_nowait, lambda r: None)
            third.send(b"third")
            assert await asyncio.wait_for(got.get(), 10) == b"third"
        transport.close()

    run(main())


def test_direct_sessions_past_the_limit_are_refused(tmp_path: Path) -> None:
    async def main() -> None:
        transport, port = await udp_echo_origin()
        with Store(tmp_path) as store:  # the origin is on loopback: a rule must name it
            store.add_rule(Rule("loopback-origins", "allow", to="127.0.0.0/8"), 1)
        edge = Edge(
            loopback_edge_config(
                tmp_path, socks5_listen="off", allow_direct_egress=True, max_udp_sessions=1
            )
        )
        await edge.start()
        try:
            # opened together: the slot a socket is still being made for counts
            results = await asyncio.gather(
                *(edge.open_udp(udp_flow(port), lambda d: None, lambda r: None) for _ in range(3)),
                return_exceptions=True,
            )
            opened = [r for r in results if not isinstance(r, BaseException)]
            refused = [r for r in results if isinstance(r, FlowError)]
            assert len(opened) == 1 and len(refused) == 2
            assert {e.reason for e in refused} == {"edge at its limit of 1 UDP sessions"}
            assert refused_at_limit(edge) == 2
            # each refusal is a finished UDP flow with result "error" (metrics and audit)
            assert (
                edge.metrics.registry.get_sample_value(
                    "ramp_udp_sessions_total", {"result": "error"}
                )
                == 2
            )
            audit = (tmp_path / "audit.log").read_text()
            assert audit.count("edge at its limit of 1 UDP sessions") == 2
        finally:
            await edge.close()
            transport.close()

    run(main())
