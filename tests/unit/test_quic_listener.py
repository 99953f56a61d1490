"""The tunnel listener under a flood of Initial packets: Retry, per-source shares and the
half-open timeout keep the handshake table open to real connectors."""

from __future__ import annotations

import asyncio
from pathlib import Path

from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection

from ramp.edge import Edge
from ramp.testing.loopback import Tunnel, make_token, run, tunnel
from ramp.testing.quic_flood import flood_initials, flood_registrations
from ramp.testing.wait import until
from ramp.tunnel.token import Token
from ramp.wire.tunnel import ALPN


def _sample(edge: Edge, name: str, **labels: str) -> float:
    return edge.metrics.registry.get_sample_value(name, labels) or 0.0


def _events(edge: Edge, event: str) -> float:
    return _sample(edge, "ramp_tunnel_handshake_events_total", event=event)


def _drops(edge: Edge, reason: str) -> float:
    return _sample(edge, "ramp_tunnel_bad_packets_total", reason=reason)


def _token(t: Tunnel) -> Token:
    assert t.edge.tunnels is not None
    return Token.decode(make_token(t.data_dir, "corp", t.edge.tunnels.port))


def test_connectors_register_through_a_retry(tmp_path: Path) -> None:
    async def main() -> None:
        async with tunnel(tmp_path, quic_retry_threshold=0) as t:
            # every connection proved its address first: qh3's client accepted our Retry
            # and the transport parameters that name it
            assert _events(t.edge, "retry_sent") >= 2
            assert t.edge.ready()[1]["connections"] == {"corp": 2}

    run(main())


def test_a_flood_from_one_source_holds_only_its_share_and_expires(tmp_path: Path) -> None:
    async def main() -> None:
        async with tunnel(
            tmp_path, ha=1, quic_max_handshakes_per_source=4, quic_handshake_timeout=0.5
        ) as t:
            server = t.edge.tunnels.server  # type: ignore[union-attr]
            assert server is not None
            target = ("127.0.0.1", t.edge.tunnels.port)  # type: ignore[union-attr]
            flood = asyncio.ensure_future(asyncio.to_thread(flood_initials, target, 500, 3.0))
            peak = 0
            while not flood.done():
                peak = max(peak, server.handshaking)
                await asyncio.sleep(0.005)
            result = flood.result()
            assert result["sent"] >= 100
            # the flood gets Retries instead of slots once its share is used
            assert peak <= 4
            assert result["answers"].get("retry", 0) > 0
            assert _events(t.edge, "retry_sent") > 0
            # its half-open connections are gone after the timeout, counted, unanswered
            await until(lambda: server.handshaking == 0, what="the half-open connections to go")
            assert _events(t.edge, "handshake_timeout") >= 1
            # the table is free for a connector from the same address
            assert await flood_registrations(_token(t), 1) == {"registered": 1}

    run(main())


def test_a_source_that_answers_retries_is_capped_at_its_share(tmp_path: Path) -> None:
    """Clients that prove their address but never finish the handshake: real qh3 clients
    whose packets after the Retry go unanswered."""

    async def main() -> None:
        async with tunnel(
            tmp_path, ha=1, quic_retry_threshold=0, quic_max_handshakes_per_source=4
        ) as t:
            assert t.edge.tunnels is not None and t.edge.tunnels.server is not None
            server = t.edge.tunnels.server
            target = ("127.0.0.1", t.edge.tunnels.port)
            loop = asyncio.get_running_loop()
            clients: dict[bytes, QuicConnection] = {}
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _RetryAnswerer(clients), remote_addr=target
            )
            try:
                for _ in range(12):
                    quic = QuicConnection(
                        configuration=QuicConfiguration(is_client=True, alpn_protocols=[ALPN])
                    )
                    quic.connect(target, now=loop.time())
                    clients[quic.host_cid] = quic
                    for data, _addr in quic.datagrams_to_send(now=loop.time()):
                        transport.sendto(data)
                await until(
                    lambda: _drops(t.edge, "source_limit") >= 12 - 4,
                    what="the share to refuse the clients past it",
                )
                assert server.handshaking <= 4
            finally:
                transport.close()
            assert await flood_registrations(_token(t), 1) == {"registered": 1}

    run(main())


class _RetryAnswerer(asyncio.DatagramProtocol):
    """Hands each Retry to its client and sends the client's new Initial; ignores the rest."""

    def __init__(self, clients: dict[bytes, QuicConnection]) -> None:
        self.clients = clients
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not data or data[0] & 0xF0 != 0xF0:  # long header, packet type Retry
            return
        dcid = data[6 : 6 + data[5]]
        quic = self.clients.pop(dcid, None)
        if quic is None or self.transport is None:
            return
        now = asyncio.get_running_loop().time()
        quic.receive_datagram(data, addr, now=now)
        for out, _addr in quic.datagrams_to_send(now=now):
            self.transport.sendto(out)
