"""Flows: the unit of policy, metrics and audit.

Every connection, UDP session or (later) packet flow an on-ramp accepts becomes one `Flow`. The
on-ramp fills in where it came from and where it wants to go; the flow table walks it through
its lifecycle (accepted -> authenticated -> decided -> routed -> opened -> established ->
ended); when it ends, its result and counts are reported once (metrics, one audit line, the
`flow_end` hooks).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=65536)
def parse_ip(text: str) -> IPAddress | None:
    """The address an IP literal names (IPv4-mapped IPv6 as IPv4), or None for a name.

    Every flow's destination is looked at by the router, the policy and the route table;
    parsing it once per distinct string keeps ipaddress off the per-flow path."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0] if "%" in text else text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class FlowResult(enum.Enum):
    """How a flow ended, or why it could not start.

    The names are shared by every ramp: on-ramps translate them to their own reply codes
    (SOCKS5 REP, HTTP status), the tunnel protocol carries them as numeric codes.
    """

    OK = "ok"
    NOT_PERMITTED = "not_permitted"  # policy said no (a rule, a hook, no route, no egress)
    NET_UNREACHABLE = "net_unreachable"  # no tunnel connection / no route to network
    HOST_UNREACHABLE = "host_unreachable"  # host did not answer, DNS failed
    REFUSED = "refused"  # origin answered with RST
    TIMEOUT = "timeout"  # origin never answered within the connect timeout
    ERROR = "error"  # anything else (protocol error, internal error)
    RESET = "reset"  # an established flow was reset by one side
    BAD_DESTINATION = "bad_destination"  # not a host name one could resolve (e.g. "a..b")
    BUSY = "busy"  # a limit of this edge, or the client's fair share of it, is used up


class FlowError(Exception):
    """Opening a flow failed; `result` says how, `reason` says why in words for logs."""

    def __init__(
        self,
        result: FlowResult,
        reason: str = "",
        *,
        rule: str | None = None,
        reply: object | None = None,
    ) -> None:
        super().__init__(reason or result.value)
        self.result = result
        self.reason = reason or result.value
        self.rule = rule  # the policy rule (or hook) that refused the flow, if one did
        self.reply = reply  # a hook's own answer for the client (policy.hooks.Reply)


class FlowKind(enum.Enum):
    STREAM = "stream"  # a reliable byte stream (TCP, a QUIC stream, an HTTP CONNECT tunnel)
    DATAGRAM = "datagram"  # messages in a session (UDP, HTTP datagrams)
    PACKET = "packet"  # whole IP packets


class FlowState(enum.IntEnum):
    """Where a flow is in its life; a flow only moves forward."""

    ACCEPTED = 1
    AUTHENTICATED = 2
    DECIDED = 3
    ROUTED = 4
    OPENED = 5
    ESTABLISHED = 6
    ENDED = 7


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a flow wants to go: an IP literal or a hostname, and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is behind a flow: an authenticated user and the groups it belongs to."""

    name: str
    groups: frozenset[str] = frozenset()

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class Route:
    """Where the router sent a flow: an off-ramp, and for a tunnel which one."""

    offramp: str  # "tunnel", "direct", ...
    vnet: str = "default"
    tunnel_id: str | None = None
    tunnel_name: str | None = None
    network: str | None = None  # the route's CIDR or DNS zone that matched, if any
    replica: str | None = None  # a connector id, when the flow must use that replica
    proxy_protocol: str | None = None  # "v1" or "v2": the origin gets a PROXY header first

    def __str__(self) -> str:
        return self.tunnel_name or self.offramp


@dataclass(frozen=True, slots=True)
class Decision:
    """What policy and the hooks said about a flow, and which rule said it."""

    allowed: bool
    rule: str | None  # policy rule id, "hook:NAME", or None when no rule matched
    reason: str = ""


@dataclass(frozen=True, slots=True)
class FlowKey:
    """What identifies a flow on the wire: protocol, addresses and ports."""

    protocol: str
    source: tuple[str, int]
    destination: Destination


_flow_ids = itertools.count(1)


def number_flows(first: int, step: int) -> None:
    """Number this process's flows first, first + step, ...: worker i of N starts at i + 1
    with step N, so flow ids in the audit log stay unique across workers."""
    global _flow_ids
    _flow_ids = itertools.count(first, step)


@dataclass(slots=True, eq=False)
class Flow:
    """One proxied stream, datagram session or packet flow, from accept to end."""

    onramp: str  # "socks5", "http", "forward", ...
    source: tuple[str, int]
    destination: Destination
    identity: Identity | None = None  # None: not authenticated (no credentials configured)
    protocol: str = "tcp"  # "tcp", "udp" or "icmp"
    kind: FlowKind = FlowKind.STREAM
    vnet: str | None = None  # the virtual network the on-ramp is bound to, if it is
    id: int = field(default_factory=lambda: next(_flow_ids))
    state: FlowState = FlowState.ACCEPTED
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    resolved: str | None = None  # IP the destination host resolved to
    decision: Decision | None = None
    route: Route | None = None
    result: FlowResult | None = None
    reason: str = ""
    annotations: dict[str, str] = field(default_factory=dict)  # set by hooks, in the audit
    request: object | None = None  # the proxy request (policy.hooks.ProxyRequest), if any
    bytes_up: int = 0  # client -> origin
    bytes_down: int = 0  # origin -> client
    packets_up: int = 0  # datagrams client -> origin
    packets_down: int = 0  # datagrams origin -> client
    drops: int = 0  # datagrams dropped: queue full, no session, too large
    ended: float | None = None
    # How the flow table ends this flow early (policy changed): set once it is established.
    stop: Callable[[FlowResult, str], None] | None = None

    def __post_init__(self) -> None:
        if self.protocol == "udp" and self.kind is FlowKind.STREAM:
            self.kind = FlowKind.DATAGRAM

    @property
    def key(self) -> FlowKey:
        return FlowKey(self.protocol, self.source, self.destination)

    @property
    def user(self) -> str | None:
        return self.identity.name if self.identity is not None else None

    @property
    def duration(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def advance(self, state: FlowState) -> None:
        if state > self.state:
            self.state = state

    def fail(self, result: FlowResult, reason: str) -> None:
        """Record how the flow ends, unless an earlier cause was recorded already."""
        if self.result is None:
            self.result, self.reason = result, reason
