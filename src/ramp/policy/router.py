"""Route lookup: which tunnel serves a destination address (longest prefix wins)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class RouteEntry:
    network: IPNetwork
    tunnel_id: str
    tunnel_name: str


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

    def lookup(
        self, address: str | ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> RouteEntry | None:
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
