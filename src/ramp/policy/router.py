"""Route lookup: which tunnel serves a destination address (longest prefix wins), within the
flow's virtual network."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

# The store's name for it; kept here too so lookup does not import the store.
DEFAULT_VNET = "default"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class RouteEntry:
    network: IPNetwork
    tunnel_id: str
    tunnel_name: str
    vnet: str = DEFAULT_VNET


class RouteLike(Protocol):
    """What VnetRoutes needs of a route: a RouteEntry, or the store's Route."""

    @property
    def network(self) -> IPNetwork: ...
    @property
    def tunnel_id(self) -> str: ...
    @property
    def tunnel_name(self) -> str: ...
    @property
    def vnet(self) -> str: ...


class RouteTable:
    """Longest-prefix match with one dict per prefix length: a lookup costs one hash probe
    per distinct prefix length in use, not one comparison per route."""

    def __init__(self, routes: Iterable[RouteEntry] = ()) -> None:
        self._by_len: dict[int, list[tuple[int, dict[int, RouteEntry]]]] = {4: [], 6: []}
        tables: dict[tuple[int, int], dict[int, RouteEntry]] = {}
        self.routes = sorted(routes, key=lambda r: (r.network.version, -r.network.prefixlen))
        for r in self.routes:
            key = (r.network.version, r.network.prefixlen)
            tables.setdefault(key, {})[int(r.network.network_address)] = r
        for (version, plen), table in sorted(tables.items(), key=lambda kv: -kv[0][1]):
            self._by_len[version].append((plen, table))

    def lookup(self, address: str | IPAddress) -> RouteEntry | None:
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        bits = 32 if ip.version == 4 else 128
        value = int(ip)
        for plen, table in self._by_len[ip.version]:
            mask = ((1 << plen) - 1) << (bits - plen) if plen else 0
            hit = table.get(value & mask)
            if hit is not None:
                return hit
        return None

    def __len__(self) -> int:
        return len(self.routes)


class VnetRoutes:
    """One RouteTable per virtual network: the same prefix may be routed to different tunnels
    in different vnets, and a lookup only ever sees the routes of the flow's vnet."""

    def __init__(self, routes: Iterable[RouteLike] = ()) -> None:
        by_vnet: dict[str, list[RouteEntry]] = {DEFAULT_VNET: []}
        for r in routes:
            entry = (
                r
                if isinstance(r, RouteEntry)
                else RouteEntry(r.network, r.tunnel_id, r.tunnel_name, r.vnet)
            )
            by_vnet.setdefault(entry.vnet, []).append(entry)
        self._tables = {vnet: RouteTable(entries) for vnet, entries in by_vnet.items()}

    @property
    def tables(self) -> Mapping[str, RouteTable]:
        """vnet name -> its table; `default` is always there, possibly empty."""
        return self._tables

    def lookup(self, vnet: str, address: str | IPAddress) -> RouteEntry | None:
        """The longest matching route in `vnet`; None if none matches or `vnet` has no routes
        (a vnet without routes is not in the store's listing, so unknown means empty)."""
        table = self._tables.get(vnet)
        return None if table is None else table.lookup(address)

    def __len__(self) -> int:
        return sum(len(t) for t in self._tables.values())
