"""Policy rules: allow or deny flows by who, where from, where to, which port and protocol.

Rules are ordered and the first match wins; nothing matching means deny. Rules are compiled into
indexes (by identity, by group, by destination prefix, by exact host name) so a decision looks at
the few rules that can match a flow, not at every rule, and decisions are memoised until the
rules change.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ramp.flows.flow import parse_ip

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ACTIONS = ("allow", "deny")
PROTOCOLS = ("tcp", "udp", "icmp", "any")
_RULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_HOST_PATTERN = re.compile(r"(\*\.)?([a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_-]{1,63}")
NO_RULE = "implicit-deny"  # what a decision names when no rule matched
CACHE_SIZE = 65536


class RuleError(ValueError):
    """A rule is malformed; the message names the field and says why."""


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    action: str  # "allow" | "deny"
    identity: str | None = None
    group: str | None = None
    onramp: str | None = None
    source: str | None = None  # CIDR
    to: str | None = None  # CIDR, or a host name pattern ("db.corp.example", "*.corp.example")
    ports: str | None = None  # "80,8000-8100"
    protocol: str = "any"

    def describe(self) -> str:
        parts = [self.action]
        for name in ("identity", "group", "onramp", "source", "to", "ports"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{'from' if name == 'source' else name} {value}")
        if self.protocol != "any":
            parts.append(f"protocol {self.protocol}")
        return " ".join(parts)


def parse_ports(text: str) -> tuple[tuple[int, int], ...]:
    ranges = []
    for part in text.split(","):
        part = part.strip()
        lo_s, sep, hi_s = part.partition("-")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if sep else lo
        except ValueError:
            raise RuleError(f"ports: {part!r} is not a port or a range like 8000-8100") from None
        if not (0 <= lo <= hi <= 65535):
            raise RuleError(f"ports: {part!r} is out of 0-65535 or reversed")
        ranges.append((lo, hi))
    if not ranges:
        raise RuleError("ports: empty")
    return tuple(ranges)


def _network(field: str, text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise RuleError(f"{field}: {text!r} is not a CIDR") from None


def validate(rule: Rule) -> Rule:
    """The rule with its fields normalised, or RuleError naming the bad field."""
    if not _RULE_ID.fullmatch(rule.id):
        raise RuleError(
            f"id: {rule.id!r} must be 1-64 letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit"
        )
    if rule.action not in ACTIONS:
        raise RuleError(f"action: {rule.action!r} is not one of {', '.join(ACTIONS)}")
    if rule.protocol not in PROTOCOLS:
        raise RuleError(f"protocol: {rule.protocol!r} is not one of {', '.join(PROTOCOLS)}")
    source = str(_network("from", rule.source)) if rule.source is not None else None
    to = rule.to
    if to is not None:
        to = to.strip().lower().rstrip(".")
        if any(c in to for c in "/:") or _looks_numeric(to):
            to = str(_network("to", to))
        elif len(to) > 253 or not _HOST_PATTERN.fullmatch(to):  # length first: bound the match
            raise RuleError(f"to: {rule.to!r} is neither a CIDR nor a host name pattern")
    ports = None
    if rule.ports is not None:
        ports = ",".join(
            f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in parse_ports(rule.ports)
        )
    for name in ("identity", "group", "onramp"):
        value = getattr(rule, name)
        if value is not None and not value.strip():
            raise RuleError(f"{name}: empty")
    return Rule(
        rule.id,
        rule.action,
        rule.identity,
        rule.group,
        rule.onramp,
        source,
        to,
        ports,
        rule.protocol,
    )


def _looks_numeric(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Facts:
    """What a decision looks at, taken from a flow."""

    identity: str | None
    groups: frozenset[str]
    onramp: str
    source: str  # IP
    host: str | None  # the destination as a name, when it was given as one
    address: str | None  # the destination IP, when known (a literal, or resolved at the edge)
    port: int
    protocol: str


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    rule: str  # a rule id, or NO_RULE
    why: str


class _Compiled:
    __slots__ = ("host_re", "index", "net", "ports", "rule", "source")

    def __init__(self, index: int, rule: Rule) -> None:
        self.index = index
        self.rule = rule
        self.source = ipaddress.ip_network(rule.source) if rule.source else None
        self.ports = parse_ports(rule.ports) if rule.ports else None
        self.net: IPNetwork | None = None
        self.host_re: re.Pattern[str] | None = None
        if rule.to is not None:
            if "/" in rule.to:
                self.net = ipaddress.ip_network(rule.to)
            elif rule.to.startswith("*."):
                self.host_re = re.compile(r"(?:[^.]+\.)+" + re.escape(rule.to[2:]))

    def matches(self, f: Facts, ip: IPAddress | None, src: IPAddress | None) -> bool:
        r = self.rule
        if r.identity is not None and f.identity != r.identity:
            return False
        if r.group is not None and r.group not in f.groups:
            return False
        if r.onramp is not None and f.onramp != r.onramp:
            return False
        if r.protocol != "any" and f.protocol != r.protocol:
            return False
        if self.source is not None and (src is None or src not in self.source):
            return False
        if self.ports is not None and not any(lo <= f.port <= hi for lo, hi in self.ports):
            return False
        if r.to is not None:
            if self.net is not None:
                return ip is not None and ip in self.net
            if f.host is None:
                return False
            if self.host_re is not None:
                return self.host_re.fullmatch(f.host) is not None
            return f.host == r.to
        return True


def _ip(text: str | None) -> IPAddress | None:
    return parse_ip(text) if text is not None else None


class Policy:
    """Compiled rules; `decide(facts)` names the first matching rule."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self.rules = list(rules)
        self._by_identity: dict[str, list[_Compiled]] = {}
        self._by_group: dict[str, list[_Compiled]] = {}
        self._by_host: dict[str, list[_Compiled]] = {}
        self._by_net: dict[tuple[int, int], dict[int, list[_Compiled]]] = {}
        self._any: list[_Compiled] = []
        for i, rule in enumerate(self.rules):
            c = _Compiled(i, rule)
            # each rule sits in exactly one bucket, the most selective one it has
            if rule.identity is not None:
                self._by_identity.setdefault(rule.identity, []).append(c)
            elif c.net is not None:
                key = (c.net.version, c.net.prefixlen)
                self._by_net.setdefault(key, {}).setdefault(int(c.net.network_address), []).append(
                    c
                )
            elif rule.to is not None and c.host_re is None:
                self._by_host.setdefault(rule.to, []).append(c)
            elif rule.group is not None:
                self._by_group.setdefault(rule.group, []).append(c)
            else:
                self._any.append(c)
        self._cache: dict[Facts, Verdict] = {}

    def __len__(self) -> int:
        return len(self.rules)

    def _candidates(self, f: Facts, ip: IPAddress | None) -> list[_Compiled]:
        found: list[_Compiled] = list(self._any)
        if f.identity is not None:
            found += self._by_identity.get(f.identity, ())
        for g in f.groups:
            found += self._by_group.get(g, ())
        if f.host is not None:
            found += self._by_host.get(f.host, ())
        if ip is not None:
            bits = 32 if ip.version == 4 else 128
            value = int(ip)
            for (version, plen), table in self._by_net.items():
                if version != ip.version:
                    continue
                mask = ((1 << plen) - 1) << (bits - plen) if plen else 0
                found += table.get(value & mask, ())
        found.sort(key=lambda c: c.index)
        return found

    def decide(self, f: Facts) -> Verdict:
        hit = self._cache.get(f)
        if hit is not None:
            return hit
        ip = _ip(f.address) if f.address is not None else _ip(f.host)
        src = _ip(f.source)
        verdict = Verdict(False, NO_RULE, "no rule matched: the policy denies by default")
        for c in self._candidates(f, ip):
            if c.matches(f, ip, src):
                r = c.rule
                verdict = Verdict(
                    r.action == "allow",
                    r.id,
                    f"rule {r.id} (position {c.index + 1}: {r.describe()}) matched",
                )
                break
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[f] = verdict
        return verdict
