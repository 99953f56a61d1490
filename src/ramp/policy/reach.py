"""What an identity may reach, as address prefixes: the routes a connect-ip client is told of.

A connect-ip client's TUN device routes exactly the prefixes the edge advertises (RFC 9484
ROUTE_ADVERTISEMENT). They are the routes of the identity's virtual network (the tunnels' CIDR
routes) intersected with the addresses the policy lets this identity reach, so a client whose
rules allow one /32 routes that /32 only, and a packet to anything else never leaves its device.

The policy is ordered and the first match wins. Ports and protocols split the packets a rule
can match into classes (the port ranges any rule names cut 0-65535 into pieces; TCP, UDP and
ICMP), and within one class every rule either matches a packet to an address or does not. For
each class the walk keeps the addresses some earlier rule `settled`, and adds to `allowed` the
unsettled part of each allow rule's `to` prefix (all addresses without one); an address is
advertised when some class allows it, so a client routes what at least one of its packets may
reach and the per-flow decision still checks each flow. Rules naming a host pattern never match
a packet (it carries no name) and are skipped; rules with a `from` CIDR apply when the client's
address is in it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from ramp.policy.router import RouteTable
from ramp.policy.rules import Policy, Rule, parse_ports

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Ranges = list[tuple[int, int]]  # sorted, disjoint, inclusive [start, end] of integer addresses

PROTOCOL_NUMBERS = {"tcp": (6,), "udp": (17,), "icmp": (1, 58)}
_BITS = {4: 32, 6: 128}


def _norm(ranges: Iterable[tuple[int, int]]) -> Ranges:
    out: Ranges = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _subtract(a: Ranges, b: Ranges) -> Ranges:
    out: Ranges = []
    j = 0
    for lo, hi in a:
        cur = lo
        while j < len(b) and b[j][1] < cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] <= hi:
            if b[k][0] > cur:
                out.append((cur, b[k][0] - 1))
            cur = max(cur, b[k][1] + 1)
            k += 1
        if cur <= hi:
            out.append((cur, hi))
    return out


def _intersect(a: Ranges, b: Ranges) -> Ranges:
    out: Ranges = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _of(net: IPNetwork) -> tuple[int, int]:
    return int(net.network_address), int(net.broadcast_address)


def _applies(
    rule: Rule,
    identity: str | None,
    groups: frozenset[str],
    onramp: str,
    source: IPAddress | None,
) -> bool:
    if rule.identity is not None and rule.identity != identity:
        return False
    if rule.group is not None and rule.group not in groups:
        return False
    if rule.onramp is not None and rule.onramp != onramp:
        return False
    return rule.source is None or (
        source is not None and source in ipaddress.ip_network(rule.source)
    )


def _classes(rules: Sequence[Rule], ipproto: int | None) -> list[tuple[str, int]]:
    """(protocol, a port) standing for every class of packets the rules tell apart."""
    cuts = {0}
    for rule in rules:
        if rule.ports is not None:
            for lo, hi in parse_ports(rule.ports):
                cuts.add(lo)
                if hi < 65535:
                    cuts.add(hi + 1)
    protocols = [
        name for name, numbers in PROTOCOL_NUMBERS.items() if ipproto is None or ipproto in numbers
    ]
    return [(proto, port) for proto in protocols for port in sorted(cuts)]


def allowed_ranges(
    policy: Policy,
    version: int,
    *,
    identity: str | None,
    groups: frozenset[str] = frozenset(),
    onramp: str = "masque",
    source: IPAddress | None = None,
    ipproto: int | None = None,
) -> Ranges:
    """The IPv`version` addresses some packet of this identity may reach by the policy."""
    everything = [(0, (1 << _BITS[version]) - 1)]
    rules: list[tuple[Rule, Ranges, tuple[tuple[int, int], ...] | None]] = []
    for rule in policy.rules:
        if not _applies(rule, identity, groups, onramp, source):
            continue
        if rule.to is None:
            region = everything
        elif "/" in rule.to:
            net = ipaddress.ip_network(rule.to)
            if net.version != version:
                continue
            region = [_of(net)]
        else:
            continue  # a host pattern: packets have no names
        rules.append((rule, region, parse_ports(rule.ports) if rule.ports else None))
    allowed: Ranges = []
    for proto, port in _classes([r for r, _, _ in rules], ipproto):
        settled: Ranges = []
        for rule, region, ports in rules:
            if rule.protocol not in ("any", proto):
                continue
            if ports is not None and not any(lo <= port <= hi for lo, hi in ports):
                continue
            if rule.action == "allow":
                allowed = _norm(allowed + _subtract(region, settled))
            settled = _norm(settled + region)
            if settled == everything:
                break
    return allowed


def reachable_prefixes(
    policy: Policy,
    routes: RouteTable | None,
    *,
    identity: str | None,
    groups: frozenset[str] = frozenset(),
    onramp: str = "masque",
    source: IPAddress | None = None,
    scope: IPNetwork | None = None,
    ipproto: int | None = None,
) -> list[IPNetwork]:
    """The prefixes to advertise: routed (in `routes`, the identity's virtual network) and
    allowed by `policy`, within `scope` (the request's target) when given. Ordered, IPv4
    first, merged."""
    out: list[IPNetwork] = []
    for version in (4, 6):
        if scope is not None and scope.version != version:
            continue
        routed = _norm(
            _of(r.network)
            for r in (routes.routes if routes else ())
            if r.network.version == version
        )
        if not routed:
            continue
        allowed = allowed_ranges(
            policy,
            version,
            identity=identity,
            groups=groups,
            onramp=onramp,
            source=source,
            ipproto=ipproto,
        )
        reach = _intersect(routed, allowed)
        if scope is not None:
            reach = _intersect(reach, [_of(scope)])
        out += _to_networks(version, reach)
    return out


def _to_networks(version: int, ranges: Sequence[tuple[int, int]]) -> list[IPNetwork]:
    make = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    nets: list[IPNetwork] = []
    for lo, hi in ranges:
        nets += ipaddress.summarize_address_range(make(lo), make(hi))  # type: ignore[arg-type]
    return nets


__all__ = ["allowed_ranges", "reachable_prefixes"]
