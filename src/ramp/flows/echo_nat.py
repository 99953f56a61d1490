"""The connector's table of ICMP echo flows (sans-I/O): one flow per (edge, vnet, client
source, destination, client echo id), each with the echo id its requests carry toward the
origin, found again by (origin, that id) when a reply or an error comes back.

Two clients pinging the same origin with the same echo id are two flows with two ids on the
wire, so each gets only its own replies (the NAT of RFC 5508 section 3.2 for ICMP queries).
With ping sockets the kernel picks the id (one socket per flow); with a raw socket the table
picks one unused for that origin.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, field
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
EchoKey = tuple[str, str, IPAddress, IPAddress, int]  # edge id, vnet, source, dest, echo id


class TableFull(Exception):
    """No room for another echo flow (the table's limit, or every id to one origin in use)."""


@dataclass(slots=True, eq=False)
class EchoFlow:
    key: EchoKey
    local_ident: int
    started: float
    last_active: float
    link: Any = None  # the tunnel connection its last request came on: replies go back there
    sock: Any = None  # its ping socket, in ping socket mode
    last_ttl: int = -1  # the TTL set on its socket, so it is set again only when it changes
    packets_up: int = 0
    packets_down: int = 0
    errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def edge_id(self) -> str:
        return self.key[0]

    @property
    def vnet(self) -> str:
        return self.key[1]

    @property
    def source(self) -> IPAddress:
        return self.key[2]

    @property
    def destination(self) -> IPAddress:
        return self.key[3]

    @property
    def client_ident(self) -> int:
        return self.key[4]


class EchoTable:
    def __init__(self, limit: int, idle_timeout: float, rng: random.Random | None = None):
        self.limit = limit
        self.idle_timeout = idle_timeout
        self._flows: dict[EchoKey, EchoFlow] = {}
        self._by_reply: dict[tuple[IPAddress, int], EchoFlow] = {}
        self._rng = rng or random.Random()

    def __len__(self) -> int:
        return len(self._flows)

    def flows(self) -> list[EchoFlow]:
        return list(self._flows.values())

    def get(self, key: EchoKey) -> EchoFlow | None:
        return self._flows.get(key)

    def by_reply(self, origin: IPAddress, local_ident: int) -> EchoFlow | None:
        """The flow a reply (or an error quoting a request) from/to `origin` with that id
        belongs to."""
        return self._by_reply.get((origin, local_ident))

    def free_ident(self, origin: IPAddress) -> int:
        """An echo id no flow to `origin` uses (raw socket mode)."""
        start = self._rng.randrange(0x10000)
        for i in range(0x10000):
            ident = (start + i) & 0xFFFF
            if (origin, ident) not in self._by_reply:
                return ident
        raise TableFull(f"every echo id to {origin} is in use")

    def add(self, key: EchoKey, local_ident: int, now: float) -> EchoFlow:
        if len(self._flows) >= self.limit:
            raise TableFull(f"{self.limit} ICMP echo flows open")
        reply_key = (key[3], local_ident)
        if reply_key in self._by_reply:
            raise TableFull(f"echo id {local_ident} to {key[3]} is in use")
        flow = EchoFlow(key, local_ident, now, now)
        self._flows[key] = flow
        self._by_reply[reply_key] = flow
        return flow

    def remove(self, flow: EchoFlow) -> None:
        if self._flows.get(flow.key) is flow:
            del self._flows[flow.key]
            self._by_reply.pop((flow.destination, flow.local_ident), None)

    def expire(self, now: float) -> list[EchoFlow]:
        """Remove and return the flows idle for longer than the idle timeout."""
        idle = [f for f in self._flows.values() if now - f.last_active >= self.idle_timeout]
        for f in idle:
            self.remove(f)
        return idle
