"""Configuration of each role: defaults, overridden by a YAML file, overridden by flags.

The models are the single source of truth: `ramp config default` prints them as commented YAML,
the CLI builds one flag per key, and the roles receive a validated instance.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ramp.config_lines import (
    ConfigIssues,
    ParsedYaml,
    format_issues,
    issues_from_validation,
    normalize_keys,
    read_yaml_file,
)
from ramp.flows.ip_pool import DEFAULT_IP_POOL
from ramp.net.sources import parse_pool
from ramp.onramps.registry import OnRampOptions, check_conflicts, parse_entry
from ramp.quic.admission import DEFAULT_LIMITS
from ramp.wire.masque import IpTemplate, UdpTemplate

LogLevel = Literal["debug", "info", "warning", "error"]


def default_data_dir() -> Path:
    """`$RAMP_HOME`, else `~/.local/share/ramp`."""
    env = os.environ.get("RAMP_HOME")
    if env:
        return Path(env)
    return Path.home() / ".local" / "share" / "ramp"


def parse_hostport(value: str, *, default_port: int | None = None) -> tuple[str, int]:
    """Split `HOST:PORT`, `[V6]:PORT` or (with a default port) `HOST`."""
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep:
            raise ValueError(f"bad address {value!r}: missing ']'")
        port_s = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, _, port_s = value.partition(":")
    elif value.count(":") > 1:
        raise ValueError(f"bad address {value!r}: write IPv6 addresses as [ADDR]:PORT")
    else:
        host, port_s = value, ""
    if not port_s:
        if default_port is None:
            raise ValueError(f"bad address {value!r}: expected HOST:PORT")
        return host, default_port
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"bad port in {value!r}")
    if not host:
        raise ValueError(f"bad address {value!r}: empty host")
    return host, int(port_s)


def _check_template(value: str) -> str:
    UdpTemplate(value)  # ValueError says what is wrong
    return value


def _check_ip_template(value: str) -> str:
    if value.strip() in ("", "off"):
        return "off"
    IpTemplate(value)
    return value


def _check_pool(value: list[str]) -> list[str]:
    out = []
    versions = set()
    for text in value:
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as e:
            raise ValueError(f"bad pool prefix {text!r}: {e}") from None
        if net.num_addresses < 4:
            raise ValueError(f"pool prefix {text!r} is too small (at least a /30 or /126)")
        if net.version in versions:
            raise ValueError(f"more than one IPv{net.version} pool prefix: {text!r}")
        versions.add(net.version)
        out.append(str(net))
    return out


def _check_listen(value: str) -> str:
    if value in ("", "off"):
        return "off"
    parse_hostport(value)
    return value


def _check_resolver(value: str) -> str:
    """Empty, or `IP[:PORT]` (port 53 by default): a resolver is asked by address, since
    resolving the resolver's own name would need a resolver."""
    value = value.strip()
    if not value:
        return ""
    host, _ = parse_hostport(value, default_port=53)
    try:
        ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        raise ValueError(f"bad resolver {value!r}: expected an IP address, not a name") from None
    return value


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Directory holding the store (SQLite), the edge CA and keys.",
    )
    log_level: LogLevel = Field("info", description="Log verbosity: debug, info, warning, error.")
    # both roles write the same flow record (observe.audit), so they share its settings
    audit_log: str = Field(
        "-",
        description="File for the audit log (one JSON line per finished flow, the same record "
        "on the edge and the connector); '-' = stderr.",
    )
    audit_log_max_bytes: int = Field(
        100 * 1024 * 1024,
        ge=0,
        description=(
            "Size in bytes past which the audit log file is rotated: FILE becomes FILE.1, "
            "FILE.1 FILE.2, ...; 0 = never (leave it to logrotate, which SIGHUP follows)."
        ),
    )
    audit_log_backups: int = Field(
        5, ge=0, description="Rotated audit log files kept (FILE.1 ... FILE.N); 0 = none."
    )
    # both roles buffer flow bytes the same way (tunnel/bridge.py), so they share the budget
    flow_memory_budget: int = Field(
        0,
        ge=0,
        description="Bytes all flows' windows may take together (what slow readers can make "
        "the process hold); as it runs low, new flows get smaller windows, down to 64 KiB, "
        "instead of failing. 0 = sized to the machine: 1/16 of the memory (or the cgroup's "
        "limit), between 16 MiB and 1 GiB.",
    )

    # both roles resolve destination names the same way (net.resolve), bounded alike
    resolve_timeout: float = Field(
        5.0,
        gt=0,
        description="Seconds to wait for the A and AAAA answers of a destination name "
        "(resolved with /etc/hosts and DNS, never getaddrinfo); the connector asks its "
        "--dns-resolver.",
    )
    resolve_max_concurrent: int = Field(
        64,
        ge=1,
        description="Name lookups kept in flight; past it a flow to a name fails at once (host "
        "unreachable, 'resolver busy') and ramp_flows_rejected{reason=resolver_busy} counts it.",
    )


def _onramp_entry(entry: Any) -> OnRampOptions:
    parsed = parse_entry(entry)
    _check_listen(parsed.listen)
    return parsed


class HookEntry(BaseModel):
    """A hook with options for its `setup(options)`."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, description="A Python file defining hook functions.")
    module: str | None = Field(None, description="An importable module defining them.")
    options: dict[str, Any] = Field(default_factory=dict, description="Passed to setup().")

    @field_validator("module")
    @classmethod
    def _one_source(cls, v: str | None, info: Any) -> str | None:
        if (v is None) == (info.data.get("path") is None):
            raise ValueError("give exactly one of path and module")
        return v

    @property
    def source(self) -> str:
        return self.path or self.module or ""


class _ProxyOnRamps(_Base):
    """What every role running the proxy on-ramps (SOCKS5, HTTP) has: edge and client."""

    handshake_timeout: float = Field(
        10.0, gt=0, description="Seconds a proxy client has to finish its request."
    )
    max_flows: int = Field(
        10000,
        gt=0,
        description="Concurrent flows; past it new requests get an error. Lowered at start "
        "when the descriptor limit (RLIMIT_NOFILE, raised to its hard limit) cannot hold them.",
    )
    max_handshakes: int = Field(
        1024,
        gt=0,
        description="Proxy connections per on-ramp still in their handshake (SOCKS5 greeting, "
        "HTTP request head); past it new connections are closed at once.",
    )
    max_handshakes_per_source: int = Field(
        128,
        ge=0,
        description="Of those, how many one client address may hold; 0 = no share.",
    )
    users: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Proxy credentials, user name to password. When set, or when the store has an "
            "active client identity (`ramp client create`), SOCKS5 requires RFC 1929 "
            "username/password and HTTP requires Proxy-Authorization (Basic, or Bearer for "
            "client identities)."
        ),
    )
    max_udp_associations_per_source: int = Field(
        256,
        ge=0,
        description="SOCKS5 UDP associations one client address may hold; past it UDP "
        "ASSOCIATE gets reply 0x01 (general failure) and "
        "ramp_udp_associations_refused{reason=source_share} counts it; 0 = no share.",
    )
    max_udp_associations_per_identity: int = Field(
        1024,
        ge=0,
        description="SOCKS5 UDP associations one authenticated user may hold, over all its "
        "addresses (reason=identity_share); 0 = no share.",
    )
    max_udp_destinations_per_association: int = Field(
        256,
        ge=1,
        description="Destinations (UDP sessions) one SOCKS5 UDP association may use at once; "
        "a datagram to one more is dropped (ramp_bad_input{reason=too_many_sessions}).",
    )
    udp_association_idle_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds a SOCKS5 UDP association may carry no datagram (either way) "
        "before it is closed with its control connection (ramp_udp_associations_expired).",
    )


def _check_sources(value: Any) -> list[str]:
    """`egress_source`: a list, or one comma-separated string; every entry an address or a
    CIDR small enough to enumerate (ramp.net.sources)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"bad egress source {item!r}: expected an IP address or CIDR")
        out += [part.strip() for part in item.split(",") if part.strip()]
    parse_pool(out)
    return out


class _Egress(_Base):
    """How a role's own connections leave: the connector's to origins, the edge's direct
    egress (reference/ephemeral-ports-connectx.txt)."""

    egress_source: Annotated[list[str], BeforeValidator(_check_sources)] = Field(
        default_factory=list,
        description="Source addresses (IPs, or CIDRs of at most 65,536) of this host for "
        "connections to origins (connector) or direct egress (edge); each flow takes the next "
        "in turn, and another when one has no port left. Empty: the routing table chooses.",
    )
    egress_share_ports: bool = Field(
        True,
        description="Share source ports across destinations (TCP: IP_BIND_ADDRESS_NO_PORT, "
        "UDP: connectx), so the port range limits connections per destination, not in all; "
        "off: a port per connection. None left: net_unreachable 'source ports exhausted'.",
    )


class EdgeConfig(_ProxyOnRamps, _Egress):
    """The edge: on-ramps, routing to tunnels, direct egress."""

    tunnel_listen: str = Field(
        "0.0.0.0:7844", description="UDP HOST:PORT where connectors dial in over QUIC."
    )
    socks5_listen: str = Field(
        "127.0.0.1:1080", description="SOCKS5 proxy listener HOST:PORT, or 'off'."
    )
    http_listen: str = Field(
        "127.0.0.1:8080", description="HTTP CONNECT proxy listener HOST:PORT, or 'off'."
    )
    masque_listen: str = Field(
        "0.0.0.0:443",
        description="HTTP/3 proxy (MASQUE: CONNECT, connect-udp, connect-ip) UDP HOST:PORT, "
        "or 'off'. Every request must carry a client identity's credentials.",
    )
    masque_udp_template: str = Field(
        "/.well-known/masque/udp/{target_host}/{target_port}/",
        description="connect-udp URI template path of the MASQUE listener.",
    )
    masque_ip_template: str = Field(
        "/.well-known/masque/ip/{target}/{ipproto}/",
        description="connect-ip (RFC 9484) URI template path of the MASQUE listener, with "
        "{target} and {ipproto}; 'off' = no connect-ip.",
    )
    masque_ip_pool: list[str] = Field(
        default_factory=lambda: list(DEFAULT_IP_POOL),
        description="Prefixes connect-ip clients get their addresses from (ADDRESS_ASSIGN): one "
        "address of each IP version per request, returned when the request ends. The first "
        "address of each prefix is the edge's own (ICMP errors such as time exceeded come "
        "from it).",
    )
    masque_ip_mtu: int = Field(
        1400,
        ge=1280,
        le=65535,
        description="Largest IP packet a connect-ip client may send through the edge; a bigger "
        "one gets ICMP fragmentation needed / packet too big naming this MTU.",
    )
    masque_ip_max_flows: int = Field(
        65536,
        ge=1,
        description="Packet flows (per protocol, addresses and ports) the edge tracks for all "
        "connect-ip clients together; past it a packet starting a new flow is dropped "
        "(ramp_packets_dropped{reason=flow_limit}).",
    )
    masque_idle_timeout: float = Field(
        30.0, gt=0, description="Seconds without packets before a MASQUE client connection is dead."
    )
    masque_max_streams_per_connection: int = Field(
        10000,
        ge=1,
        le=1 << 30,
        description="Requests (CONNECT streams) a MASQUE client may have open at once on one "
        "connection (the QUIC MAX_STREAMS the edge advertises), raised as streams close.",
    )
    metrics_listen: str = Field(
        "127.0.0.1:20241", description="HTTP listener for /metrics and /ready, or 'off'."
    )
    allow_direct_egress: bool = Field(
        False,
        description="Let destinations outside every route go out directly from the edge.",
    )
    direct_egress_proxy_protocol: dict[str, Literal["v1", "v2"]] = Field(
        default_factory=dict,
        description="Direct egress destinations (CIDR, longest prefix wins) whose origins get "
        "a PROXY protocol header (v1 or v2) with the client's address before the first "
        "payload byte, as `ramp tunnel route ip add --proxy-protocol` does for a tunnel's.",
        json_schema_extra={"cli": False},
    )
    connect_timeout: float = Field(
        15.0,
        gt=0,
        description="Seconds to wait for a flow's outbound leg (tunnel answer or direct dial).",
    )
    # fair shares: one client cannot take what the limits above guard from everyone else
    max_flows_per_source: int = Field(
        2500,
        ge=0,
        description="Concurrent flows one client address may hold; past it its new requests "
        "get 'busy' (SOCKS5 0x01, HTTP 503 connection_limit_reached); 0 = no share.",
    )
    max_flows_per_identity: int = Field(
        5000, ge=0, description="Concurrent flows one authenticated user may hold; 0 = no share."
    )
    max_opening_flows_per_source: int = Field(
        256,
        ge=0,
        description="Flows one client address may have opening at once (resolving, waiting "
        "for a stream slot or for the origin to answer); 0 = no share.",
    )
    max_opening_flows_per_identity: int = Field(
        512, ge=0, description="Flows one authenticated user may have opening; 0 = no share."
    )
    store_poll_interval: float = Field(
        1.0, gt=0, description="Seconds between checks of the store for CLI changes."
    )
    drain_timeout: float = Field(
        30.0,
        ge=0,
        description="Seconds open flows may run once the edge stops accepting (SIGTERM, "
        "or a restart's successor serves) before the rest are cut.",
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Worker processes sharing the listeners (SO_REUSEPORT, QUIC steered by "
        "connection id) under one supervisor that serves /metrics and /ready for all.",
    )
    quic_idle_timeout: float = Field(
        5.0, gt=0, description="Seconds without packets before a tunnel connection is dead."
    )
    # the tunnel listener's handshake table (ramp.quic.admission)
    quic_max_handshakes: int = Field(
        DEFAULT_LIMITS.max_handshakes,
        ge=1,
        description="QUIC handshakes the tunnel listener runs at once; past it new "
        "connections are dropped (ramp_tunnel_bad_packets{reason=handshake_limit}).",
    )
    quic_retry_threshold: int = Field(
        DEFAULT_LIMITS.retry_threshold,
        ge=0,
        description="Handshakes in progress past which a new connector must prove its "
        "address with a QUIC Retry first; 0 = always.",
    )
    quic_max_handshakes_per_source: int = Field(
        DEFAULT_LIMITS.per_source,
        ge=0,
        description="QUIC handshakes one source IP may have in progress; past it its new "
        "connections are dropped (reason=source_limit); 0 = no limit.",
    )
    quic_handshake_timeout: float = Field(
        DEFAULT_LIMITS.timeout,
        gt=0,
        description="Seconds a QUIC handshake may take on the tunnel listener before the "
        "half-open connection is dropped without a reply.",
    )
    quic_retry_token_lifetime: float = Field(
        DEFAULT_LIMITS.token_lifetime,
        gt=0,
        description="Seconds a QUIC Retry token stays valid.",
    )
    quic_refusals_per_source: int = Field(
        DEFAULT_LIMITS.refusals_per_source,
        ge=0,
        description="Refused registrations (a wrong secret, say) from one source IP within "
        "10 s after which the tunnel listener ignores it for quic_refusal_penalty seconds "
        "(ramp_tunnel_bad_packets{reason=penalized}); 0 = never.",
    )
    quic_refusal_penalty: float = Field(
        DEFAULT_LIMITS.refusal_penalty,
        gt=0,
        description="Seconds a source shut out for refused registrations waits.",
    )

    dns_listen: str = Field("off", description="DNS listener HOST:PORT (UDP and TCP), or 'off'.")
    dns_upstream: str = Field(
        "",
        description=(
            "Resolver IP:PORT (port 53 if omitted) for names outside every routed DNS zone; "
            "empty = answer REFUSED."
        ),
    )
    dns_timeout: float = Field(
        5.0, gt=0, description="Seconds to wait for an answer from a tunnel or the upstream."
    )
    udp_idle_timeout: float = Field(
        210.0, gt=0, description="Seconds a UDP session may stay idle before it is closed."
    )
    max_udp_sessions: int = Field(
        4096, gt=0, description="Concurrent UDP sessions; past it new ones are refused."
    )
    # Fair shares of UDP and the expiry of what nobody uses (issue 12)
    max_udp_sessions_per_source: int = Field(
        512,
        ge=0,
        description="UDP sessions one client address may hold; past it a datagram to a new "
        "destination is dropped (ramp_udp_sessions_refused{reason=source_share}); 0 = no share.",
    )
    max_udp_sessions_per_identity: int = Field(
        1024,
        ge=0,
        description="UDP sessions one authenticated user may hold, over all its addresses "
        "(ramp_udp_sessions_refused{reason=identity_share}); 0 = no share.",
    )
    udp_unreplied_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a UDP session the origin never answered may stay idle (like "
        "conntrack's unreplied entries); answered ones keep udp_idle_timeout.",
    )

    onramps: list[Annotated[OnRampOptions, BeforeValidator(_onramp_entry)]] = Field(
        default_factory=list,
        description=(
            "On-ramps, each a mapping with `type` (socks5, http, dns, forward, ...), `listen` "
            "and the type's own keys. When set, the socks5/http/dns listener keys at their "
            "defaults are not used; one set explicitly (a flag) adds its listener."
        ),
        json_schema_extra={"cli": False},
    )
    groups: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Identity groups for policy rules: group name to its user names.",
        json_schema_extra={"cli": False},
    )
    hooks: list[str | HookEntry] = Field(
        default_factory=list,
        description=(
            "Python hooks, in order: a file path or module name, or a mapping with `path` "
            "(or `module`) and `options`. The built-in policy runs first. See docs/hooks.md."
        ),
    )
    hook_timeout: float = Field(
        0.05,
        gt=0,
        description="Seconds an async hook may take before it fails closed (hook_error); "
        "sync hooks slower than this are logged and counted.",
    )
    max_streams_per_connection: int = Field(
        10000,
        ge=1,
        le=1 << 30,
        description="Streams a connector may open at once on one tunnel connection (the "
        "QUIC MAX_STREAMS the edge advertises).",
    )
    max_waiting_flows: int = Field(
        10000,
        ge=0,
        description="Flows per tunnel that may wait for a stream slot while every tunnel "
        "connection is at the connector's stream limit; past it new flows fail at once.",
    )

    _v_listen = field_validator(
        "tunnel_listen",
        "socks5_listen",
        "http_listen",
        "metrics_listen",
        "dns_listen",
        "masque_listen",
    )(classmethod(lambda cls, v: _check_listen(v)))
    _v_template = field_validator("masque_udp_template")(
        classmethod(lambda cls, v: _check_template(v))
    )
    _v_ip_template = field_validator("masque_ip_template")(
        classmethod(lambda cls, v: _check_ip_template(v))
    )
    _v_ip_pool = field_validator("masque_ip_pool")(classmethod(lambda cls, v: _check_pool(v)))
    _v_resolver = field_validator("dns_upstream")(classmethod(lambda cls, v: _check_resolver(v)))

    @field_validator("direct_egress_proxy_protocol")
    @classmethod
    def _check_proxy_cidrs(cls, v: dict[str, str]) -> dict[str, str]:
        for cidr in v:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"bad CIDR {cidr!r}") from None
        return v

    @model_validator(mode="after")
    def _no_conflicts(self) -> EdgeConfig:
        # e.g. two any-port on-ramps claiming one address and port, or a listener inside one
        check_conflicts(self.effective_onramps())
        return self

    def effective_onramps(self) -> list[OnRampOptions]:
        """`onramps`, plus the shorthand listener keys: all of them that are not `off` when
        `onramps` is empty, else only those set explicitly."""
        found = list(self.onramps)
        for kind, key in (
            ("socks5", "socks5_listen"),
            ("http", "http_listen"),
            ("dns", "dns_listen"),
            ("masque", "masque_listen"),
        ):
            value = getattr(self, key)
            if value == "off" or (self.onramps and key not in self.model_fields_set):
                continue
            entry = {"type": kind, "listen": value}
            if kind == "masque":
                entry["udp_template"] = self.masque_udp_template
                entry["ip_template"] = self.masque_ip_template
                entry["ip_pool"] = list(self.masque_ip_pool)
                entry["ip_mtu"] = self.masque_ip_mtu
            found.append(parse_entry(entry))
        return found


class ClientConfig(_ProxyOnRamps):
    """The client (`ramp client run`): local SOCKS5 and HTTP proxies whose flows go to an
    edge's MASQUE endpoint, one HTTP/3 CONNECT stream or connect-udp request each."""

    token: str = Field("", description="Client token from `ramp client token NAME`.")
    token_file: Path | None = Field(
        None,
        description="File holding the client token, readable by its owner only; unlike "
        "`token` on the command line it does not show in `ps`.",
    )
    edge: list[str] = Field(
        default_factory=list,
        description="Edge MASQUE HOST:PORT addresses; when set they replace those in the token.",
    )
    hop: list[str] = Field(
        default_factory=list,
        description="Nested proxying: client tokens of edges to pass through, outermost "
        "first. The QUIC connection to each next edge runs inside connect-udp on the one "
        "before, so the first edge never sees the destination and the last never sees the "
        "client's address. Without it the token's edge is the only hop.",
    )
    socks5_listen: str = Field(
        "127.0.0.1:1080", description="Local SOCKS5 proxy listener HOST:PORT, or 'off'."
    )
    http_listen: str = Field(
        "127.0.0.1:8080", description="Local HTTP proxy listener HOST:PORT, or 'off'."
    )
    metrics_listen: str = Field(
        "127.0.0.1:20243",
        description="HTTP listener for /metrics and /ready (the edge connection's state, "
        "RTT and flows), or 'off'.",
    )
    connect_timeout: float = Field(
        15.0,
        gt=0,
        description="Seconds a flow waits for the edge's answer (and for the edge connection).",
    )
    idle_timeout: float = Field(
        30.0, gt=0, description="Seconds without packets before the edge connection is dead."
    )
    keepalive_interval: float = Field(
        10.0, gt=0, description="Seconds of silence after which the client pings the edge."
    )
    # every local connection comes from this machine: shares per address would only cap it
    max_handshakes_per_source: int = Field(
        0, ge=0, description="Handshakes one local address may hold; 0 = no share."
    )
    max_udp_associations_per_source: int = Field(
        0, ge=0, description="SOCKS5 UDP associations one local address may hold; 0 = no share."
    )
    tun: bool = Field(
        False,
        description="Also create a TUN device whose packets ride connect-ip (RFC 9484): it gets "
        "the address the edge assigns and a route for each prefix this identity may reach, "
        "so ping, traceroute, ssh or any program reaches private addresses without proxy "
        "settings. Needs root or CAP_NET_ADMIN and /dev/net/tun.",
    )
    tun_name: str = Field(
        "ramp0",
        description="Name of the TUN device; a leftover device of this name is replaced at start.",
    )
    tun_mtu: int = Field(
        1400,
        ge=1280,
        le=65535,
        description="MTU of the TUN device. The default fits one QUIC DATAGRAM on a 1,500-byte "
        "path and is the edge's default `masque_ip_mtu`; a larger packet rides a capsule on "
        "the request stream (slower, never dropped), and one over the edge's `masque_ip_mtu` "
        "gets ICMP fragmentation needed.",
    )
    tun_address: list[str] = Field(
        default_factory=list,
        description="Addresses (or prefixes) to ask the edge for with ADDRESS_REQUEST, e.g. "
        "100.96.0.7/32; the edge may assign others. Without it the edge picks from its pool.",
    )
    masque_ip_template: str = Field(
        "/.well-known/masque/ip/{target}/{ipproto}/",
        description="The edge's connect-ip URI template (its path; RFC 9484 section 3), as the "
        "edge's `masque_ip_template` says; the client asks for target and ipproto `*`.",
    )

    _v_listen = field_validator("socks5_listen", "http_listen", "metrics_listen")(
        classmethod(lambda cls, v: _check_listen(v))
    )

    @field_validator("tun_name")
    @classmethod
    def _v_tun_name(cls, v: str) -> str:
        # IFNAMSIZ is 16 with the terminating NUL; "/" and whitespace are not allowed in names
        if not v or len(v) > 15 or any(c in v for c in "/: \t\n") or v in (".", ".."):
            raise ValueError(
                f"{v!r} is not a network device name (1-15 characters, no / : or space)"
            )
        return v

    @field_validator("tun_address")
    @classmethod
    def _v_tun_address(cls, v: list[str]) -> list[str]:
        for item in v:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or prefix") from None
        return v

    @field_validator("masque_ip_template")
    @classmethod
    def _v_ip_template(cls, v: str) -> str:
        IpTemplate(v)
        return v

    def effective_onramps(self) -> list[OnRampOptions]:
        return [
            parse_entry({"type": kind, "listen": value})
            for kind, value in (("socks5", self.socks5_listen), ("http", self.http_listen))
            if value != "off"
        ]


class ConnectorConfig(_Egress):
    """The connector (`ramp tunnel run`)."""

    token: str = Field("", description="Tunnel token from `ramp tunnel token NAME`.")
    token_file: Path | None = Field(
        None,
        description=(
            "File holding the tunnel token (surrounding whitespace ignored), readable by its "
            "owner only; unlike `token` on the command line it does not show in `ps`."
        ),
    )
    edge: list[str] = Field(
        default_factory=list,
        description="Edge HOST:PORT addresses; when set they replace those in the token.",
    )
    ha_connections: int = Field(
        4, ge=1, le=16, description="QUIC connections to open to each edge address."
    )
    workers: int = Field(
        1,
        ge=1,
        le=16,
        description="Worker processes, each holding its share of the --ha-connections, "
        "under one supervisor that serves /metrics and /ready for all.",
    )
    metrics_listen: str = Field(
        "127.0.0.1:20242", description="HTTP listener for /metrics and /ready, or 'off'."
    )
    grace_period: float = Field(
        30.0, ge=0, description="Seconds open flows may run after SIGTERM before exit."
    )
    connect_timeout: float = Field(
        10.0, gt=0, description="Seconds to wait for an origin to accept a TCP connection."
    )
    quic_idle_timeout: float = Field(
        5.0, gt=0, description="Seconds without packets before a tunnel connection is dead."
    )
    keepalive_interval: float = Field(
        1.0, gt=0, description="Seconds between QUIC PINGs on an idle tunnel connection."
    )
    max_udp_sessions: int = Field(
        4096, gt=0, description="Concurrent UDP sessions; past it new ones are refused."
    )
    udp_idle_timeout: float = Field(
        210.0, gt=0, description="Seconds a UDP session may stay idle before it is closed."
    )
    # Fair shares of UDP sessions, keyed by the client address and identity the edge reports
    # with each session (issue 12)
    max_udp_sessions_per_source: int = Field(
        512,
        ge=0,
        description="UDP sessions one client address (as the edge reports it, per edge) may "
        "hold; past it the session is refused (ramp_udp_sessions_refused{reason=source_share}); "
        "0 = no share.",
    )
    max_udp_sessions_per_identity: int = Field(
        1024,
        ge=0,
        description="UDP sessions one authenticated user (as the edge reports it, per edge) "
        "may hold (reason=identity_share); 0 = no share.",
    )
    udp_unreplied_timeout: float = Field(
        30.0,
        gt=0,
        description="Seconds a UDP session the origin never answered may stay idle (like "
        "conntrack's unreplied entries); answered ones keep udp_idle_timeout.",
    )
    icmp_idle_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds an ICMP echo flow (one client source, destination and echo id) "
        "may stay idle before its ping socket is closed.",
    )
    icmp_flow_limit: int = Field(
        4096,
        gt=0,
        description="Concurrent ICMP echo flows; past it new ones are dropped "
        "(ramp_icmp_drops{reason=too_many_flows}).",
    )
    dns_resolver: str = Field(
        "",
        description=(
            "Resolver IP:PORT (port 53 if omitted) for names the edge sends through the "
            "tunnel; empty = the first nameserver in /etc/resolv.conf."
        ),
    )

    max_streams_per_connection: int = Field(
        10000,
        ge=1,
        le=1 << 30,
        description="Flows the edge may open at once on one tunnel connection (the QUIC "
        "MAX_STREAMS the connector advertises); further flows wait at the edge.",
    )

    _v_listen = field_validator("metrics_listen")(classmethod(lambda cls, v: _check_listen(v)))
    _v_resolver = field_validator("dns_resolver")(classmethod(lambda cls, v: _check_resolver(v)))


T = TypeVar("T", bound=_Base)


class ConfigError(Exception):
    """A config file or flag is wrong; the message says which and why."""


def load_config(model: type[T], config_file: Path | None, overrides: dict[str, Any]) -> T:
    """Defaults < YAML file < flags. `overrides` holds only flags the user actually gave.

    Every problem is one line of the ConfigError, `FILE:LINE: KEY: message` for the file's.
    """
    data: dict[Any, Any] = {}
    parsed: ParsedYaml | None = None
    if config_file is not None:
        try:
            parsed = read_yaml_file(config_file)
        except ConfigIssues as e:
            raise ConfigError(str(e)) from e
        data.update(normalize_keys(model, parsed.data))
    given = {k: v for k, v in overrides.items() if v is not None}
    data.update(given)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        issues = issues_from_validation(e, model, parsed, from_flags=given)
        raise ConfigError(format_issues(issues)) from e
