"""Which tunnel connections to move between edge workers (sans-I/O).

A connector's connections land on the edge's workers by the kernel's hash of their addresses,
so one worker can hold all of a tunnel's connections and another none. TCP flows that reach
the other worker still get through (their socket moves, ramp.flows.moved), but flows that are
not sockets cannot move: a SOCKS5 UDP association, a MASQUE stream or connect-udp request on a
client's QUIC connection. So the supervisor keeps every tunnel's connections spread over the
listening workers, as evenly as their number allows: when one worker holds at least two more
of a tunnel's connections than another, it asks the first to move one (REDIAL, docs/
protocol.md) to the second. One move per tunnel is under way at a time: it is done when the
source worker reports one connection fewer, or given up after `SETTLE` seconds. A worker
that cannot move one (its connectors predate REDIAL) says so; the tunnel is then left alone
until its connections change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

SETTLE = 10.0  # a move not seen to happen within this is given up (and may be asked again)


@dataclass(frozen=True, slots=True)
class Move:
    tunnel: str
    source: int  # worker index
    target: int


def plan(holdings: Mapping[int, Mapping[str, int]], listening: Sequence[int]) -> list[Move]:
    """One move for every tunnel whose connections on the listening workers differ by two or
    more: from the worker holding most (the lowest index of equals) to the one holding
    fewest. `holdings`: worker index -> tunnel id -> connections that take flows."""
    workers = sorted(set(listening))
    if len(workers) < 2:
        return []
    tunnels = sorted({t for w in workers for t in holdings.get(w, {})})
    moves: list[Move] = []
    for tunnel in tunnels:
        counts = [(holdings.get(w, {}).get(tunnel, 0), w) for w in workers]
        most = max(counts, key=lambda c: (c[0], -c[1]))
        fewest = min(counts)
        if most[0] - fewest[0] >= 2:
            moves.append(Move(tunnel, most[1], fewest[1]))
    return moves


@dataclass(slots=True)
class Balancer:
    """The moves under way, so each tunnel has at most one."""

    pending: dict[str, tuple[int, int, float]] = field(default_factory=dict)
    stuck: dict[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)

    def due(
        self, holdings: Mapping[int, Mapping[str, int]], listening: Sequence[int], now: float
    ) -> list[Move]:
        """The moves to ask for now."""
        for tunnel, (source, had, since) in list(self.pending.items()):
            if holdings.get(source, {}).get(tunnel, 0) < had or now - since > SETTLE:
                del self.pending[tunnel]
        for tunnel, seen in list(self.stuck.items()):
            if _spread(holdings, tunnel) != seen:
                del self.stuck[tunnel]
        moves = [
            m
            for m in plan(holdings, listening)
            if m.tunnel not in self.pending and m.tunnel not in self.stuck
        ]
        for m in moves:
            self.pending[m.tunnel] = (m.source, holdings[m.source][m.tunnel], now)
        return moves

    def cannot(self, tunnel: str, holdings: Mapping[int, Mapping[str, int]]) -> None:
        """The source worker has no connection of the tunnel that can move: ask again only
        once the tunnel's connections are spread differently."""
        self.pending.pop(tunnel, None)
        self.stuck[tunnel] = _spread(holdings, tunnel)


def _spread(holdings: Mapping[int, Mapping[str, int]], tunnel: str) -> tuple[tuple[int, int], ...]:
    return tuple(sorted((w, h.get(tunnel, 0)) for w, h in holdings.items()))
