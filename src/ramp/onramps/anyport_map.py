"""The options of the any-port on-ramp and how it maps (address, port) to a destination.

Three ways to say where a connection to ADDRESS:PORT of the prefix goes (`to`):

- `to: HOST:PORT` - one fixed destination for all of them;
- `to: {host: HOST}` - the same PORT on HOST (a private host that serves many ports);
- `to: [RULE, ...]` - a rule table: the first rule whose `addresses` (a CIDR inside the prefix)
  and `ports` (a range inside the on-ramp's) hold ADDRESS:PORT decides, with its own `to`
  (either of the two above). A connection no rule matches is closed and counted
  (`ramp_bad_input_total{onramp="anyport",reason="no_rule"}`).

Port ranges are written `FIRST-LAST` or a single `PORT`. Everything here is pure: the on-ramp
(`anyport.py`) and the config check use it alike.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ramp.flows.flow import Destination
from ramp.onramps.forward import _split
from ramp.onramps.registry import OnRampOptions

PortRange = tuple[int, int]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_ports(value: str | int) -> PortRange:
    """`FIRST-LAST` or `PORT` as (first, last), each 1-65535, first <= last."""
    text = str(value).strip()
    first_s, sep, last_s = text.partition("-")
    if not first_s.strip().isdigit() or (sep and not last_s.strip().isdigit()):
        raise ValueError(f"expected a port or a range FIRST-LAST, got {value!r}")
    first = int(first_s)
    last = int(last_s) if sep else first
    if not (1 <= first <= 65535 and 1 <= last <= 65535):
        raise ValueError(f"ports are 1-65535, got {value!r}")
    if first > last:
        raise ValueError(f"port range {value!r} ends before it starts")
    return first, last


def parse_prefix(value: str) -> Network:
    try:
        return ipaddress.ip_network(value.strip(), strict=True)
    except ValueError as e:
        raise ValueError(f"bad prefix {value!r}: {e}") from None


def _contains(outer: PortRange, inner: PortRange) -> bool:
    return outer[0] <= inner[0] and inner[1] <= outer[1]


def _overlap(a: PortRange, b: PortRange) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


class SamePort(BaseModel):
    """Each connection goes to the port the client dialled, on one private host."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(
        description="The private host (an address or a name) that gets each connection on "
        "the port the client dialled: 203.0.113.7:8443 -> HOST:8443."
    )

    @field_validator("host")
    @classmethod
    def _check_host(cls, v: str) -> str:
        v = v.strip()
        if not v or any(c in v for c in " /") or (":" in v and not v.count(":") > 1):
            raise ValueError(f"expected a host name or address without a port, got {v!r}")
        return v


Target = str | SamePort


def _check_target(v: Target) -> Target:
    if isinstance(v, str):
        _split(v)
    return v


class MapRule(BaseModel):
    """One row of a rule table: which addresses and ports it matches, and where they go."""

    model_config = ConfigDict(extra="forbid")

    addresses: str | None = Field(
        None,
        description="CIDR inside the on-ramp's prefix this rule matches (a single address "
        "as /32); default: the whole prefix.",
    )
    ports: str | int | None = Field(
        None,
        description="Port or range FIRST-LAST inside the on-ramp's `ports` this rule "
        "matches; default: all of them.",
    )
    to: Target = Field(
        description="Where matching connections go: HOST:PORT (fixed) or {host: HOST} (the "
        "dialled port on HOST)."
    )

    _v_to = field_validator("to")(classmethod(lambda cls, v: _check_target(v)))

    @field_validator("addresses")
    @classmethod
    def _check_addresses(cls, v: str | None) -> str | None:
        if v is not None:
            parse_prefix(v)
        return v

    @field_validator("ports")
    @classmethod
    def _check_ports(cls, v: str | int | None) -> str | int | None:
        if v is not None:
            parse_ports(v)
        return v


class AnyportOptions(OnRampOptions):
    """Every port of every address of a prefix, on one socket (like Spectrum): TCP
    connections or UDP sessions mapped to destinations by (address, port)."""

    listen: str = Field(
        "127.0.0.1:0",
        description="HOST:PORT the one socket binds to (port 0: any; [::1]:0 for an IPv6 "
        "prefix), of the prefix's address family. Clients never dial it: sk_lookup or the "
        "TPROXY rule hands it the traffic for the prefix.",
    )
    prefix: str = Field(
        description="The IPv4 or IPv6 prefix (CIDR) whose addresses this on-ramp answers "
        "on, e.g. 203.0.113.0/24 or 2001:db8:1::/64; routers must send it to the edge. The "
        "edge makes the addresses its own while it runs (sk_lookup: the AnyIP route `local "
        "PREFIX dev lo`; TPROXY: a fwmark rule), no interface needs them."
    )
    ports: str | int = Field(
        "1-65535", description="Port or range FIRST-LAST answered on every address."
    )
    protocol: Literal["tcp", "udp"] = Field(
        "tcp",
        description="tcp: connections, each one flow; udp: datagrams, one flow per "
        "client address and port and dialled address and port.",
    )
    to: Target | list[MapRule] = Field(
        description="Where flows go: HOST:PORT (one fixed destination), {host: HOST} (the "
        "dialled port on HOST), or a rule table: a list of {addresses, ports, to}, the first "
        "match wins (no match: closed and counted as no_rule). See docs/anyport.md."
    )
    mechanism: Literal["auto", "sk_lookup", "tproxy"] = Field(
        "auto",
        description="How the traffic reaches the socket: sk_lookup (a BPF program in the "
        "network namespace), tproxy (an nftables tproxy rule and a fwmark routing rule), or "
        "auto: sk_lookup, and tproxy when the BPF program does not load. The edge logs which.",
    )

    _v_to = field_validator("to")(
        classmethod(lambda cls, v: [*v] if isinstance(v, list) else _check_target(v))
    )

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, v: str) -> str:
        return str(parse_prefix(v))

    @field_validator("ports")
    @classmethod
    def _check_ports(cls, v: str | int) -> str | int:
        parse_ports(v)
        return v

    @model_validator(mode="after")
    def _check_rules(self) -> AnyportOptions:
        PortMap.from_options(self)  # raises ValueError with the rule that is wrong
        if self.protocol == "udp" and self.proxy_protocol is not None:
            raise ValueError("proxy_protocol is for TCP: a udp anyport on-ramp takes none")
        if self.network.version == 6 and "listen" not in self.model_fields_set:
            # the one socket is of the prefix's family
            self.listen = "[::1]:0"
        return self

    @property
    def network(self) -> Network:
        return parse_prefix(self.prefix)

    @property
    def port_range(self) -> PortRange:
        return parse_ports(self.ports)

    def conflicts_with(self, other: OnRampOptions) -> str | None:
        """Why `other` cannot run beside this on-ramp, or None: two any-port on-ramps of one
        protocol must not claim the same address and port, and no other on-ramp may listen
        on one this on-ramp claims (its traffic would be taken away from it)."""
        if not isinstance(other, AnyportOptions):
            try:
                host, port = _split(other.listen)
            except ValueError:
                return None
            if PortMap.from_options(self).claims(host.strip("[]"), port):
                return (
                    f"the {other.type} on-ramp listens on {other.listen}, inside the anyport "
                    f"{self.protocol} on-ramp's {self.prefix} ports {self.ports}: that "
                    "traffic would go to the anyport on-ramp"
                )
            return None
        if other.protocol != self.protocol:
            return None
        if self.network.version != other.network.version or not self.network.overlaps(
            other.network  # type: ignore[arg-type]
        ):
            return None
        if not _overlap(self.port_range, other.port_range):
            return None
        return (
            f"anyport {self.protocol} on-ramps {self.prefix} ports {self.ports} and "
            f"{other.prefix} ports {other.ports} overlap: each address and port may belong to "
            "one only"
        )


@dataclass(frozen=True, slots=True)
class _Row:
    network: Network
    ports: PortRange
    host: str
    port: int | None  # None: the dialled port


@dataclass(frozen=True, slots=True)
class PortMap:
    """The compiled `to` of one on-ramp: `lookup(address, port)` -> Destination or None."""

    network: Network
    ports: PortRange
    rows: tuple[_Row, ...]

    @classmethod
    def from_options(cls, options: AnyportOptions) -> PortMap:
        network, ports = options.network, options.port_range
        to = options.to
        if not isinstance(to, list):
            return cls(network, ports, (_row(network, ports, to),))
        if not to:
            raise ValueError("the rule table `to` is empty: give at least one rule")
        rows: list[_Row] = []
        for i, rule in enumerate(to, 1):
            net = parse_prefix(rule.addresses) if rule.addresses is not None else network
            rng = parse_ports(rule.ports) if rule.ports is not None else ports
            if net.version != network.version or not net.subnet_of(network):  # type: ignore[arg-type]
                raise ValueError(f"rule {i}: addresses {net} are not inside the prefix {network}")
            if not _contains(ports, rng):
                raise ValueError(
                    f"rule {i}: ports {rng[0]}-{rng[1]} are not inside the on-ramp's ports "
                    f"{ports[0]}-{ports[1]}"
                )
            for j, earlier in enumerate(rows, 1):
                if net.subnet_of(earlier.network) and _contains(earlier.ports, rng):  # type: ignore[arg-type]
                    raise ValueError(
                        f"rule {i} never matches: rule {j} comes first and covers all of its "
                        "addresses and ports"
                    )
            rows.append(_row(net, rng, rule.to))
        return cls(network, ports, tuple(rows))

    def claims(self, address: str, port: int) -> bool:
        """Whether ADDRESS:PORT is one this on-ramp answers on at all."""
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        return ip in self.network and self.ports[0] <= port <= self.ports[1]

    def lookup(self, address: str, port: int) -> Destination | None:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return None
        if ip not in self.network or not self.ports[0] <= port <= self.ports[1]:
            return None
        for row in self.rows:
            if ip in row.network and row.ports[0] <= port <= row.ports[1]:
                return Destination(row.host, port if row.port is None else row.port)
        return None


def _row(network: Network, ports: PortRange, to: Target) -> _Row:
    if isinstance(to, SamePort):
        return _Row(network, ports, to.host, None)
    host, port = _split(to)
    return _Row(network, ports, host, port)
