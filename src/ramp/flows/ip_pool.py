"""The connect-ip address pool: which address each client request gets (RFC 9484 ADDRESS_ASSIGN).

One prefix per IP version. Its first address is the edge's own: the gateway a client's TUN
device routes through, and the source of the ICMP errors the edge itself sends (time exceeded
for a TTL-1 packet). Each connect-ip request takes one address of each version and gives it
back when it ends. A client may ask for one (ADDRESS_REQUEST); it gets it when it is free and
inside the pool, else any free one.

Addresses handed out are the lowest free ones after a cursor that walks the pool, so an address
just given back is not reused at once (a late packet of the old client cannot reach the new).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_IP_POOL = ("100.96.0.0/12", "fd72:616d:7000::/64")
# of a huge IPv6 pool, only this many addresses are ever in play: the cursor walks them
MAX_WALK = 1 << 20


class PoolExhausted(RuntimeError):
    """No free address of that IP version."""


class AddressPool:
    def __init__(self, prefixes: Iterable[str | IPNetwork] = DEFAULT_IP_POOL) -> None:
        self.networks: dict[int, IPNetwork] = {}
        for p in prefixes:
            net = ipaddress.ip_network(p)
            if net.version in self.networks:
                raise ValueError(f"more than one IPv{net.version} pool prefix")
            if net.num_addresses < 4:
                raise ValueError(f"pool prefix {net} is too small")
            self.networks[net.version] = net
        self.used: dict[int, set[int]] = {v: set() for v in self.networks}
        self._cursor: dict[int, int] = dict.fromkeys(self.networks, 0)

    def gateway(self, version: int) -> IPAddress | None:
        """The edge's own address in the IPv`version` pool (the prefix's first host)."""
        net = self.networks.get(version)
        return None if net is None else net.network_address + 1

    def _span(self, version: int) -> int:
        net = self.networks[version]
        # host offsets 2 .. size-2: not the network address, the gateway or (IPv4) broadcast
        return min(net.num_addresses - 3, MAX_WALK)

    def capacity(self, version: int) -> int:
        return self._span(version) if version in self.networks else 0

    def take(self, version: int, wanted: IPAddress | None = None) -> IPAddress:
        """A free address of IPv`version` (`wanted` when it is free and in the pool), marked
        used. PoolExhausted when there is none, KeyError when the pool has no such version."""
        net = self.networks[version]
        used = self.used[version]
        span = self._span(version)
        if wanted is not None and wanted.version == version and wanted in net:
            offset = int(wanted) - int(net.network_address) - 2
            if 0 <= offset < span and offset not in used:
                used.add(offset)
                return wanted
        if len(used) >= span:
            raise PoolExhausted(f"all {span} addresses of {net} are in use")
        offset = self._cursor[version]
        while offset in used:
            offset = (offset + 1) % span
        used.add(offset)
        self._cursor[version] = (offset + 1) % span
        return ipaddress.ip_address(int(net.network_address) + 2 + offset)

    def give_back(self, address: IPAddress) -> None:
        net = self.networks.get(address.version)
        if net is None or address not in net:
            return
        self.used[address.version].discard(int(address) - int(net.network_address) - 2)

    def in_use(self, version: int) -> int:
        return len(self.used.get(version, ()))


__all__ = ["DEFAULT_IP_POOL", "AddressPool", "PoolExhausted"]
