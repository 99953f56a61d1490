"""Whole IP packets between the edge and its tunnels' connectors (PACKET tunnel datagrams).

The edge's packet path (connect-ip, ICMP) calls `send` with a client's packet for a tunnel,
and gets the connector's packets for its clients (echo replies, ICMP errors the connector made
or routers reported) through `on_packet`. Only connections whose connector announced
`+ip-packets` at registration get packets: a connector that predates them would count every
one as a malformed datagram, so the edge logs and counts such registrations instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from ramp.observe.loglimit import LogLimiter
from ramp.wire.tunnel import (
    CAP_IP_PACKETS,
    ProtocolError,
    capabilities,
    encode_packet_datagram,
    parse_packet_datagram,
)

log = logging.getLogger("ramp.edge.packets")


class PacketLink(Protocol):
    """A registered connector connection as the packet path sees it (EdgeConnection)."""

    @property
    def closed(self) -> bool: ...

    @property
    def tunnel_id(self) -> str: ...

    @property
    def tunnel_name(self) -> str: ...

    @property
    def connector_id(self) -> str: ...

    @property
    def conn_index(self) -> int: ...

    @property
    def ip_packets(self) -> bool: ...

    def send_datagram(self, data: bytes) -> bool: ...


class PacketDirectory(Protocol):
    def candidates(self, tunnel_id: str) -> Sequence[PacketLink]: ...


def _flow_hash(packet: bytes) -> int:
    """The same connection for the same pair of addresses, so an echo flow's requests reach
    one connector and its replies come back the way they went."""
    if packet and packet[0] >> 4 == 6:
        return hash(packet[8:40])
    return hash(packet[12:20])


class EdgePackets:
    """`send(tunnel_id, packet, vnet) -> bool` and `on_packet(tunnel_id, packet)`."""

    def __init__(
        self,
        tunnels: PacketDirectory,
        *,
        metrics_packet: Callable[[str], None] = lambda direction: None,
        metrics_drop: Callable[[str], None] = lambda reason: None,
        metrics_legacy: Callable[[str], None] = lambda tunnel: None,
        on_bad_input: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.tunnels = tunnels
        self.on_packet: Callable[[str, bytes], None] | None = None
        self._metrics_packet = metrics_packet
        self.metrics_drop = metrics_drop
        self._metrics_legacy = metrics_legacy
        self._bad_input = on_bad_input
        self._log = LogLimiter()

    def send(self, tunnel: str, packet: bytes, vnet: str = "default") -> bool:
        """Send one IP packet to a connector of tunnel `tunnel` (its id). False (and counted)
        when no live connection of the tunnel takes IP packets or its queue is full."""
        conns = [c for c in self.tunnels.candidates(tunnel) if not c.closed]
        able = [c for c in conns if c.ip_packets]
        if not able:
            reason = "connector_predates_packets" if conns else "no_connection"
            self.metrics_drop(reason)
            if conns and self._log.allow((reason, tunnel)):
                log.warning(
                    "IP packet for tunnel %s dropped: its connectors predate IP packets "
                    "(ICMP through the tunnel); upgrade them",
                    conns[0].tunnel_name,
                )
            return False
        try:
            datagram = encode_packet_datagram(packet, vnet)
        except ProtocolError:
            self.metrics_drop("too_large")
            return False
        able.sort(key=lambda c: (c.connector_id, c.conn_index))
        conn = able[_flow_hash(packet) % len(able)]
        if not conn.send_datagram(datagram):
            return False  # the connection counted the drop by its reason
        self._metrics_packet("to_connector")
        return True

    def connection_registered(self, conn: PacketLink, client_info: str) -> bool:
        """Whether `conn`'s connector takes IP packets; says so when it does not."""
        if CAP_IP_PACKETS in capabilities(client_info):
            return True
        self._metrics_legacy(conn.tunnel_name)
        if self._log.allow(("legacy", conn.connector_id)):
            log.warning(
                "connector %s (tunnel %s) predates IP packets: ping and traceroute through "
                "this tunnel need a newer connector (%s)",
                conn.connector_id[:8],
                conn.tunnel_name,
                client_info or "no client info",
            )
        return False

    def connection_datagram(self, conn: PacketLink, data: bytes) -> None:
        """A PACKET datagram arrived on `conn`."""
        try:
            got = parse_packet_datagram(data)
        except ProtocolError as e:
            self._bad_input(f"malformed packet datagram: {e}")
            return
        handler = self.on_packet
        if handler is None:
            self.metrics_drop("no_packet_path")
            return
        self._metrics_packet("from_connector")
        try:
            handler(conn.tunnel_id, got.packet)
        except Exception:  # the packet path's bug must not take the tunnel connection down
            self.metrics_drop("handler_error")
            if self._log.allow("handler_error"):
                log.exception("the packet path failed on a packet from tunnel %s", conn.tunnel_name)
