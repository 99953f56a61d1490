"""Flows: the unit of policy, metrics and audit.

Every TCP connection an on-ramp accepts becomes one `Flow`. The on-ramp fills in where it came
from and where it wants to go, the router decides where it goes, and when it ends the flow's
result and byte counts are reported once (metrics and one audit line).
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field


class FlowResult(enum.Enum):
    """How a flow ended, or why it could not start.

    The names are shared by every ramp: on-ramps translate them to their own reply codes
    (SOCKS5 REP, HTTP status), the tunnel protocol carries them as numeric codes.
    """

    OK = "ok"
    NOT_PERMITTED = "not_permitted"  # policy said no (no route, direct egress off)
    NET_UNREACHABLE = "net_unreachable"  # no tunnel connection / no route to network
    HOST_UNREACHABLE = "host_unreachable"  # host did not answer, DNS failed
    REFUSED = "refused"  # origin answered with RST
    TIMEOUT = "timeout"  # origin never answered within the connect timeout
    ERROR = "error"  # anything else (protocol error, internal error)
    RESET = "reset"  # an established flow was reset by one side


class FlowError(Exception):
    """Opening a flow failed; `result` says how, `reason` says why in words for logs."""

    def __init__(self, result: FlowResult, reason: str = "") -> None:
        super().__init__(reason or result.value)
        self.result = result
        self.reason = reason or result.value


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a flow wants to go: an IP literal or a hostname, and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_flow_ids = itertools.count(1)


@dataclass(slots=True)
class Flow:
    """One proxied stream from accept to close."""

    onramp: str  # "socks5", "http", ...
    source: tuple[str, int]
    destination: Destination
    identity: str = "-"  # authenticated user name, or "-"
    id: int = field(default_factory=lambda: next(_flow_ids))
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    resolved: str | None = None  # IP the destination host resolved to
    route: str = "-"  # tunnel name, "direct", or "-" before routing
    result: FlowResult | None = None
    reason: str = ""
    bytes_up: int = 0  # client -> origin
    bytes_down: int = 0  # origin -> client
    protocol: str = "tcp"  # "tcp" or "udp"
    packets_up: int = 0  # datagrams client -> origin (udp)
    packets_down: int = 0  # datagrams origin -> client (udp)
    drops: int = 0  # datagrams dropped (udp): queue full, no session, too large
    ended: float | None = None

    @property
    def duration(self) -> float:
        return (self.ended or time.monotonic()) - self.started
