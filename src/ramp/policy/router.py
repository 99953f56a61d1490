"""Route lookup: which tunnel serves a destination address (longest prefix wins), within the
flow's virtual network."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from ramp.flows.flow import Flow, Route, parse_ip
from ramp.net.resolve import check_hostname

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
    proxy_protocol: str | None = None  # "v1" or "v2": origins get a PROXY header


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
    @property
    def proxy_protocol(self) -> str | None: ...


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
        if isinstance(address, str):
            parsed = parse_ip(address)
            if parsed is None:
                raise ValueError(f"{address!r} is not an IP address")
            ip: IPAddress = parsed
        else:
            ip = address
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


Resolve = Callable[[str, int], Awaitable[str]]
ZoneLookup = Callable[[str], tuple[str, str, str] | None]  # name -> (tunnel id, name, zone)
Replicas = Callable[[str], list[str]]  # tunnel id -> connector ids connected now
DirectProxy = Callable[[str], str | None]  # address -> PROXY version for direct egress to it


class Router:
    """Which off-ramps may carry a flow, best first.

    A hostname under a routed DNS zone goes to that zone's tunnel unresolved (its connector
    resolves it privately); other names are resolved here and routed by address in the flow's
    virtual network; direct egress comes last, when it is on. With `replicas`, each connected
    replica of the tunnel is offered too, for `route` hooks that pin flows to one.
    """

    def __init__(
        self,
        resolve: Resolve,
        *,
        allow_direct: bool = False,
        zone_lookup: ZoneLookup | None = None,
        replicas: Replicas | None = None,
        direct_proxy: DirectProxy | None = None,
    ) -> None:
        self.tables: Mapping[str, RouteTable] = {}
        self._resolve = resolve
        self.allow_direct = allow_direct
        self._zone_lookup = zone_lookup
        self._replicas = replicas
        self.direct_proxy = direct_proxy

    def _tunnel(
        self,
        vnet: str,
        tid: str,
        name: str,
        net: str,
        replicas: bool,
        proxy: str | None = None,
    ) -> list[Route]:
        found = [Route("tunnel", vnet, tid, name, net, proxy_protocol=proxy)]
        if replicas and self._replicas is not None:
            found += [
                Route("tunnel", vnet, tid, name, net, cid, proxy) for cid in self._replicas(tid)
            ]
        return found

    async def candidates(self, flow: Flow, vnet: str, *, replicas: bool = False) -> list[Route]:
        dest = flow.destination
        found: list[Route] = []
        # DNS zone routes belong to the default virtual network: a tenant's flows must not
        # reach another network's connector by name
        literal = parse_ip(dest.host)
        if literal is None:
            check_hostname(dest.host)  # before a zone sends it to a connector, or a lookup
        if vnet == DEFAULT_VNET and literal is None and self._zone_lookup is not None:
            zone = self._zone_lookup(dest.host)
            if zone is not None:
                tid, name, zname = zone
                return self._tunnel(vnet, tid, name, zname, replicas)
        if literal is not None:
            flow.resolved = dest.host  # what resolving a literal gives, without the call
        else:
            flow.resolved = await self._resolve(dest.host, dest.port)
        table = self.tables.get(vnet)
        hit = table.lookup(flow.resolved) if table is not None else None
        if hit is not None:
            found += self._tunnel(
                vnet,
                hit.tunnel_id,
                hit.tunnel_name,
                _cidr(hit.network),
                replicas,
                hit.proxy_protocol,
            )
        if self.allow_direct and hit is None:
            proxy = self.direct_proxy(flow.resolved) if self.direct_proxy is not None else None
            found.append(Route("direct", vnet, proxy_protocol=proxy))
        return found


@functools.lru_cache(maxsize=4096)
def _cidr(network: IPNetwork) -> str:
    return str(network)


class VnetRoutes:
    """One RouteTable per virtual network: the same prefix may be routed to different tunnels
    in different vnets, and a lookup only ever sees the routes of the flow's vnet."""

    def __init__(self, routes: Iterable[RouteLike] = ()) -> None:
        by_vnet: dict[str, list[RouteEntry]] = {DEFAULT_VNET: []}
        for r in routes:
            entry = (
                r
                if isinstance(r, RouteEntry)
                else RouteEntry(r.network, r.tunnel_id, r.tunnel_name, r.vnet, r.proxy_protocol)
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
