"""The small interfaces a tunnel connection and the UDP sessions riding it talk through.

A connection hands tunnel datagrams to a session table, and a session table sends datagrams
on a connection; typing each side against these protocols instead of the other's class keeps
connector_side/sessions_connector and edge_side/sessions_edge free of import cycles.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

# A connection we heard nothing from for this long is passed over when a flow picks one, and
# the UDP sessions on it move: connectors ping every second, so silence this long means it is
# probably gone.
STALE_AFTER = 2.5


class DatagramLink(Protocol):
    """A registered tunnel connection as the UDP session tables see it."""

    @property
    def closed(self) -> bool: ...

    def send_datagram(self, data: bytes) -> bool: ...


class ConnectorLink(DatagramLink, Protocol):
    """A connector's connection: sessions are keyed by the edge that registered them."""

    @property
    def edge_id(self) -> str: ...


class EdgeLink(DatagramLink, Protocol):
    """An edge's connection: it knows which sessions ride it and when it last heard the peer."""

    @property
    def last_rx(self) -> float: ...

    @property
    def sessions(self) -> dict[int, Any]: ...


class ConnectorDatagramSink(Protocol):
    """Where a connector's connection delivers tunnel datagrams (ConnectorSessions)."""

    def datagram(self, conn: ConnectorLink, data: bytes) -> None: ...

    def metrics_drop(self, reason: str) -> None: ...


class ConnectorPacketSink(Protocol):
    """Where a connector's connection delivers PACKET datagrams (the ICMP off-ramp)."""

    def datagram(self, conn: ConnectorLink, data: bytes) -> None: ...


class EdgeDatagramSink(Protocol):
    """Where an edge's connection delivers tunnel datagrams and its end (EdgeSessions)."""

    def connection_datagram(self, conn: EdgeLink, data: bytes) -> None: ...

    def connection_lost(self, conn: EdgeLink) -> None: ...

    def connection_draining(self, conn: EdgeLink) -> None: ...

    def metrics_drop(self, reason: str) -> None: ...


class LinkDirectory(Protocol):
    """The edge's registry of live connections per tunnel (TunnelEdge)."""

    def candidates(self, tunnel_id: str) -> Sequence[EdgeLink]: ...
