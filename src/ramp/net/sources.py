"""The pool of source addresses egress binds to (`egress_source`): each is good for a range
of ports per destination, so N addresses carry N times the connections to one origin.

Flows take the addresses in turn (round robin per family), and a flow whose address has no
port left towards its destination goes on to the next. An address that cannot be bound (not,
or no longer, an address of this host: EADDRNOTAVAIL) is left out for a while.
"""

from __future__ import annotations

import ipaddress
import itertools
import time
from collections.abc import Callable, Iterable, Iterator

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_POOL_ENTRY = 1 << 16  # addresses one entry may hold: every one must be configured here
MAX_TRIES = 16  # addresses one flow tries before it reports the ports exhausted
UNUSABLE_FOR = 30.0  # seconds an address that failed to bind is left out


def parse_source(text: str) -> IPNetwork:
    """An `egress_source` entry: an address or a CIDR of at most MAX_POOL_ENTRY addresses."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"bad egress source {text!r}: expected an IP address or CIDR") from None
    if net.num_addresses > MAX_POOL_ENTRY:
        raise ValueError(
            f"egress source {text!r} holds {net.num_addresses} addresses; at most "
            f"{MAX_POOL_ENTRY} per entry (each must be an address of this host)"
        )
    return net


def parse_pool(entries: Iterable[str]) -> list[IPNetwork]:
    """The entries of `egress_source`, each parsed; ValueError for a bad one, or for two that
    overlap (an address would get two turns, and one flow could try it twice)."""
    nets = [parse_source(e) for e in entries]
    for i, a in enumerate(nets):
        for b in nets[:i]:
            if a.version == b.version and a.overlaps(b):  # type: ignore[arg-type]
                raise ValueError(f"egress sources {b} and {a} overlap")
    return nets


def _addresses(net: IPNetwork) -> tuple[int, int]:
    """(first address as an int, count): an IPv4 prefix of /30 or wider without its network
    and broadcast addresses, as a host would never use them."""
    first, count = int(net.network_address), net.num_addresses
    if net.version == 4 and count >= 4:
        return first + 1, count - 2
    return first, count


class SourcePool:
    """Source addresses per family, handed out in turn; see the module's doc."""

    def __init__(self, entries: Iterable[str], clock: Callable[[], float] = time.monotonic) -> None:
        self._ranges: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        self._size = {4: 0, 6: 0}
        for net in parse_pool(entries):
            first, count = _addresses(net)
            self._ranges[net.version].append((first, count))
            self._size[net.version] += count
        # small pools (the common case) keep their addresses as text: no parsing per flow
        self._text: dict[int, list[str]] = {
            v: [self._make(v, i) for i in range(self._size[v])] if self._size[v] <= 4096 else []
            for v in (4, 6)
        }
        self._cursor = {4: 0, 6: 0}
        self._unusable: dict[str, float] = {}
        self._clock = clock

    def __len__(self) -> int:
        return self._size[4] + self._size[6]

    def size(self, version: int) -> int:
        return self._size[version]

    def address(self, version: int, index: int) -> str:
        """The `index`-th address of the family (modulo the pool's size)."""
        index %= self._size[version]
        text = self._text[version]
        return text[index] if text else self._make(version, index)

    def _make(self, version: int, index: int) -> str:
        for first, count in self._ranges[version]:
            if index < count:
                cls = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
                return str(cls(first + index))
            index -= count
        raise AssertionError("unreachable: index within the pool")

    def choose(self, version: int, tries: int = MAX_TRIES) -> Iterator[str]:
        """The addresses one flow tries, in order: the next in turn first, then the ones after
        it, at most `tries` (and each at most once), skipping those marked unusable. Empty when
        the pool has no address of the family."""
        size = self._size[version]
        if not size:
            return iter(())
        start = self._cursor[version]
        self._cursor[version] = (start + 1) % size
        now = self._clock()
        # unusable addresses are skipped, but never more of them than are marked
        scan = min(size, tries + len(self._unusable))
        picked = (self.address(version, start + i) for i in range(scan))
        usable = (a for a in picked if self._unusable.get(a, 0.0) <= now)
        return itertools.islice(usable, min(tries, size))

    def unusable(self, address: str) -> None:
        """`address` could not be bound: leave it out for UNUSABLE_FOR seconds."""
        now = self._clock()
        if len(self._unusable) >= 4096:
            self._unusable = {a: t for a, t in self._unusable.items() if t > now}
        self._unusable[address] = now + UNUSABLE_FOR
