"""The contract between on-ramps and the rest of the edge.

An on-ramp parses its protocol, builds a `Flow`, and asks a `FlowOpener` for a leg to the
destination. It then answers the client in its own protocol and hands the client socket to the
leg, which relays until both directions are closed.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Protocol

from ramp.flows.endpoint import StreamEndpoint
from ramp.flows.flow import Flow


class TcpLeg(Protocol):
    """An opened outbound stream (direct TCP socket or tunnel stream)."""

    async def relay(self, client: socket.socket | StreamEndpoint, initial: bytes = b"") -> None:
        """Copy bytes both ways until both directions are closed.

        `client` is the flow's client end: a kernel socket (spliced where the other end is one
        too) or any byte-stream endpoint (an in-process stream, a QUIC stream).

        `initial` holds bytes the on-ramp already read past its handshake; they go out first.
        Updates `flow.bytes_up` / `flow.bytes_down` as it goes; sets `flow.result` to RESET if
        either side reset. Closes `client` when done.
        """
        ...

    def abort(self) -> None:
        """Drop the leg without relaying (the on-ramp failed to answer its client)."""
        ...


class UdpSession(Protocol):
    """An open UDP session towards one destination (through a tunnel or direct)."""

    def send(self, payload: bytes) -> None:
        """Queue one datagram for the origin. Never blocks; drops are counted, not raised."""
        ...

    def close(self) -> None:
        """End the session (idempotent); the opener then reports the flow as finished."""
        ...


class FlowOpener(Protocol):
    async def open_tcp(self, flow: Flow) -> TcpLeg:
        """Route `flow` and open its outbound leg; raises `FlowError` with the reason."""
        ...

    async def open_moved(self, flow: Flow) -> TcpLeg:
        """Open the leg of a flow another worker routed (ramp.flows.moved)."""
        ...

    async def open_udp(
        self,
        flow: Flow,
        receive: Callable[[bytes], None],
        closed: Callable[[str], None],
    ) -> UdpSession:
        """Open a UDP session for `flow` (flow.protocol == "udp").

        `receive(payload)` is called for each datagram from the origin; `closed(reason)` once
        when the session ends for any reason other than the caller's close() (idle timeout,
        the connector closed it, tunnel gone). The opener calls `flow_finished(flow)` itself
        when the session ends, with packet and byte counts filled in. Raises `FlowError`.
        """
        ...

    async def dns_query(self, query: bytes) -> bytes | None:
        """Answer a DNS query (wire format) whose name falls under a zone routed to a tunnel,
        through that tunnel's connector; None when no DNS route matches (the caller then uses
        its upstream or answers REFUSED). Raises `FlowError` when the tunnel cannot answer."""
        ...

    def flow_finished(self, flow: Flow) -> None:
        """Record a finished flow once: metrics and one audit line."""
        ...

    def bad_input(self, onramp: str, reason: str, peer: tuple[str, int] | None = None) -> None:
        """Count and log input that was rejected at the protocol level."""
        ...
