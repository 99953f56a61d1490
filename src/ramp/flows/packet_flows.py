"""The edge's packet flows: what connect-ip clients' IP packets are, grouped into flows.

A packet flow is keyed by protocol, addresses and ports (for ICMP echo, the echo identifier in
place of both ports), as conntrack does. The first packet of a flow pays for the route and
policy decision; later packets find the flow here and reuse it. Each flow holds the `Flow`
the edge's flow table reports (start and end, packets and bytes each way, in the audit line and
metrics like every other flow) and the protocol's handle (a UDP session, an upgraded TCP
connection, the tunnel an ICMP echo goes to).

Idle expiry is per protocol: ICMP after `icmp_idle` (10 s), UDP after `udp_idle` (the tunnel's
UDP session timeout), TCP after `tcp_idle`, or `tcp_linger` after a FIN seen both ways or an
RST. The table is bounded: past `limit` flows a packet that would start a new one is refused.
Sans-I/O: the caller passes the time, and ends the flows `expire` returns.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ramp.flows.flow import Flow

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
ICMP_IDLE = 10.0
TCP_IDLE = 7200.0  # like conntrack's established timeout, shortened from its 5 days
TCP_LINGER = 10.0  # after FIN both ways or RST: late retransmissions still find the flow
# TCP flag bits (RFC 9293)
FIN = 0x01
SYN = 0x02
RST = 0x04
ACK = 0x10


@dataclass(frozen=True, slots=True)
class PacketKey:
    """A packet flow as the client sees it: `sport`/`dport` are the echo identifier (both) for
    ICMP. `client` is the client's (assigned) address, `peer` the far end."""

    proto: int
    client: IPAddress
    sport: int
    peer: IPAddress
    dport: int

    def __str__(self) -> str:
        return f"{_proto_name(self.proto)} {self.client}:{self.sport} -> {self.peer}:{self.dport}"


def _proto_name(proto: int) -> str:
    return {PROTO_ICMP: "icmp", PROTO_ICMPV6: "icmp", PROTO_TCP: "tcp", PROTO_UDP: "udp"}.get(
        proto, str(proto)
    )


def protocol_name(proto: int) -> str:
    """The policy's name of an IP protocol: tcp, udp, icmp."""
    return _proto_name(proto)


@dataclass(slots=True, eq=False)
class PacketFlow:
    key: PacketKey
    flow: Flow
    last_seen: float
    handle: Any = None  # the protocol's own state: a UdpSession, an upgrade slot, a Route
    fin_up: bool = False
    fin_down: bool = False
    closing_since: float | None = None  # RST, or FIN both ways
    ended: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def saw_tcp_flags(self, flags: int, up: bool, now: float) -> None:
        """A TCP segment's flags went by (`up`: from the client)."""
        if flags & RST:
            self.closing_since = now
            return
        if flags & FIN:
            if up:
                self.fin_up = True
            else:
                self.fin_down = True
            if self.fin_up and self.fin_down and self.closing_since is None:
                self.closing_since = now


class FlowLimit(RuntimeError):
    """The packet flow table is full."""


class PacketFlows:
    def __init__(
        self,
        limit: int,
        *,
        icmp_idle: float = ICMP_IDLE,
        udp_idle: float = 210.0,
        tcp_idle: float = TCP_IDLE,
        tcp_linger: float = TCP_LINGER,
    ) -> None:
        self.limit = limit
        self.idle = {
            PROTO_ICMP: icmp_idle,
            PROTO_ICMPV6: icmp_idle,
            PROTO_UDP: udp_idle,
            PROTO_TCP: tcp_idle,
        }
        self.tcp_linger = tcp_linger
        self._flows: dict[PacketKey, PacketFlow] = {}

    def __len__(self) -> int:
        return len(self._flows)

    def __iter__(self) -> Iterator[PacketFlow]:
        return iter(list(self._flows.values()))

    def get(self, key: PacketKey) -> PacketFlow | None:
        return self._flows.get(key)

    def touch(self, key: PacketKey, now: float) -> PacketFlow | None:
        """The live flow of `key`, its idle clock restarted; None when there is none."""
        pf = self._flows.get(key)
        if pf is not None:
            pf.last_seen = now
        return pf

    def add(self, key: PacketKey, flow: Flow, now: float, handle: Any = None) -> PacketFlow:
        """A new flow for `key`; FlowLimit when the table is full."""
        if key in self._flows:
            raise KeyError(f"flow {key} exists")
        if len(self._flows) >= self.limit:
            raise FlowLimit(f"at the limit of {self.limit} packet flows")
        pf = PacketFlow(key, flow, now, handle)
        self._flows[key] = pf
        return pf

    def remove(self, key: PacketKey) -> PacketFlow | None:
        pf = self._flows.pop(key, None)
        if pf is not None:
            pf.ended = True
        return pf

    def deadline(self, pf: PacketFlow) -> float:
        if pf.closing_since is not None:
            return pf.closing_since + self.tcp_linger
        return pf.last_seen + self.idle.get(pf.key.proto, ICMP_IDLE)

    def expire(self, now: float) -> list[PacketFlow]:
        """Remove and return the flows idle (or closed) past their protocol's timeout."""
        gone = [pf for pf in self._flows.values() if self.deadline(pf) <= now]
        for pf in gone:
            self.remove(pf.key)
        return gone

    def of_client(self, client: IPAddress) -> list[PacketFlow]:
        return [pf for pf in self._flows.values() if pf.key.client == client]


__all__ = [
    "FlowLimit",
    "PacketFlow",
    "PacketFlows",
    "PacketKey",
    "protocol_name",
]
