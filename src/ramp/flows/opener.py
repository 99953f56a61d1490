"""The contract between on-ramps and the rest of the edge.

An on-ramp parses its protocol, builds a `Flow`, and asks a `FlowOpener` for a leg to the
destination. It then answers the client in its own protocol and hands the client socket to the
leg, which relays until both directions are closed.
"""

from __future__ import annotations

import socket
from typing import Protocol

from ramp.flows.flow import Flow


class TcpLeg(Protocol):
    """An opened outbound stream (direct TCP socket or tunnel stream)."""

    async def relay(self, client: socket.socket, initial: bytes = b"") -> None:
        """Copy bytes both ways until both directions are closed.

        `initial` holds bytes the on-ramp already read past its handshake; they go out first.
        Updates `flow.bytes_up` / `flow.bytes_down` as it goes; sets `flow.result` to RESET if
        either side reset. Closes `client` when done.
        """
        ...

    def abort(self) -> None:
        """Drop the leg without relaying (the on-ramp failed to answer its client)."""
        ...


class FlowOpener(Protocol):
    async def open_tcp(self, flow: Flow) -> TcpLeg:
        """Route `flow` and open its outbound leg; raises `FlowError` with the reason."""
        ...

    def flow_finished(self, flow: Flow) -> None:
        """Record a finished flow once: metrics and one audit line."""
        ...

    def bad_input(self, onramp: str, reason: str, peer: tuple[str, int] | None = None) -> None:
        """Count and log input that was rejected at the protocol level."""
        ...
