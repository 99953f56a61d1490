"""Nested proxying: the QUIC connection to an edge runs inside connect-udp on another edge.

Each hop but the last is a `MasqueLink` of its own; the next hop's QUIC packets are the UDP
payloads of one connect-udp session on it (the MASQUE article's chain of proxies). The first
edge sees only an encrypted QUIC connection to the second edge, never the destination; the
second sees the first edge's address, never the client's.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from qh3.quic.configuration import QuicConfiguration

from ramp.flows.flow import Destination, Flow, FlowError, Route
from ramp.flows.opener import UdpSession
from ramp.offramps.masque import Dialer, EdgeTarget, MasqueLink, MasqueOffRamp, udp_dial
from ramp.quic import qh3compat
from ramp.quic.h3 import H3Peer

INNER_PACKET_SIZE = 1200  # QUIC's minimum (RFC 9000 section 14)


class SessionTransport(asyncio.DatagramTransport):
    """A connect-udp session as the datagram transport of a QUIC connection."""

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__()
        self.session: UdpSession | None = None
        self.address = address
        self._closing = False

    def sendto(self, data: Any, addr: Any = None) -> None:
        if self.session is not None and not self._closing:
            self.session.send(bytes(data))

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            if self.session is not None:
                self.session.close()

    def is_closing(self) -> bool:
        return self._closing

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in ("peername", "sockname"):
            return self.address
        return default


def through(link: MasqueLink, connect_timeout: float) -> Dialer:
    """A dialer whose packets go through connect-udp sessions on `link`'s edge."""
    offramp = MasqueOffRamp(link, connect_timeout, lambda flow: None)

    async def dial(host: str, port: int, configuration: QuicConfiguration, streams: int) -> H3Peer:
        transport = SessionTransport((host, port))
        # the smallest packets QUIC allows, so each fits one DATAGRAM frame of the hop below
        configuration = dataclasses.replace(configuration, max_datagram_size=INNER_PACKET_SIZE)
        connection = qh3compat.LimitedConnection(
            configuration=configuration, max_streams_bidi=streams
        )
        protocol = H3Peer(connection)
        flow = Flow(onramp="hop", source=("client", 0), destination=Destination(host, port))
        addr = (host, port)
        try:
            session = await offramp.open_datagram(
                flow,
                Route(offramp.name),
                lambda data: protocol.datagram_received(data, addr),
                lambda why: protocol.abandon(f"hop session ended: {why}"),
            )
        except FlowError as e:
            raise ConnectionError(f"hop refused connect-udp to {host}:{port}: {e.reason}") from e
        transport.session = session
        protocol.connection_made(transport)
        protocol.connect(addr)
        try:
            await protocol.wait_connected()
        except BaseException:
            transport.close()
            raise
        protocol.udp_transport = transport  # type: ignore[attr-defined]
        return protocol

    return dial


def nested_dialer(
    hops: list[EdgeTarget], *, idle_timeout: float, keepalive: float, connect_timeout: float
) -> tuple[Dialer, list[MasqueLink]]:
    """The dialer for the exit edge through `hops` (outermost first), and the hop links
    (to start and close with the client)."""
    links: list[MasqueLink] = []
    dialer: Dialer = udp_dial
    for hop in hops:
        link = MasqueLink(hop, idle_timeout=idle_timeout, keepalive=keepalive, dialer=dialer)
        links.append(link)
        dialer = through(link, connect_timeout)
    return dialer, links


__all__ = ["SessionTransport", "nested_dialer", "through"]
