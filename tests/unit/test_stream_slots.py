"""Tunnel stream slots: the per-connection stream limit is a setting, flows that find every
connection at its limit wait in a first-come queue woken by MAX_STREAMS, and a flow whose
client goes away frees its slot at once."""

from __future__ import annotations

from pathlib import Path

from ramp.config import ConnectorConfig, EdgeConfig
from ramp.quic import qh3compat
from ramp.testing.loopback import run, tunnel
from ramp.tunnel.edge_side import EdgeConnection


def edge_conns(t: object) -> list[EdgeConnection]:
    tunnels = t.edge.tunnels  # type: ignore[attr-defined]
    return [c for entry in tunnels.tunnels.values() for c in entry.conns]


def test_stream_limits_default_to_at_least_ten_thousand() -> None:
    assert ConnectorConfig().max_streams_per_connection >= 10_000
    assert EdgeConfig().max_streams_per_connection >= 10_000


def test_each_side_advertises_its_setting(tmp_path: Path) -> None:
    async def main() -> None:
        async with tunnel(
            tmp_path,
            ha=1,
            connector_kw={"max_streams_per_connection": 3},
            max_streams_per_connection=7,
        ) as t:
            (econn,) = edge_conns(t)
            (cconn,) = t.connector.client.live
            # what the edge may open is what the connector advertised, and the other way round
            assert qh3compat.bidi_stream_limit(econn.quic) == 3
            assert qh3compat.bidi_stream_limit(cconn.quic) == 7

    run(main())


def test_the_default_lifts_qh3s_hundred(tmp_path: Path) -> None:
    async def main() -> None:
        async with tunnel(tmp_path, ha=1) as t:
            (econn,) = edge_conns(t)
            assert qh3compat.bidi_stream_limit(econn.quic) == 10_000

    run(main())
