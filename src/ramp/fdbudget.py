"""The descriptor budget: limits that fit the descriptors the process may open.

Every flow, handshake, association and session holds descriptors. With limits larger than
RLIMIT_NOFILE allows, the process runs out before any limit is reached: accept(2) fails with
EMFILE and every client is turned away, not just the one past its share. So at start each role
raises its soft limit to the hard one (a service manager's 1,024 default is common), then
lowers the limits that do not fit, keeping a reserve for listeners, the store, logs, the
resolver's sockets and the metrics endpoint.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

from ramp.config import ConnectorConfig, EdgeConfig

log = logging.getLogger(__name__)

RESERVE = 256  # listeners, QUIC sockets, store, logs, resolver sockets, /metrics clients
MIN_LIMIT = 16  # never size a limit below this: a role that serves nobody is no use
NOFILE_CAP = 1 << 20  # when the hard limit is unlimited, do not ask for more than this

# Descriptors each unit holds. An edge flow through a tunnel holds its client socket; a direct
# flow also its origin socket and two splice pipes (two descriptors each). A SOCKS5 UDP
# association, which counts as a flow, holds its control connection and its UDP socket. A
# connector flow holds its origin socket; a UDP session its connected socket; an ICMP echo flow
# its ping socket.
FDS_TUNNEL_FLOW = 1
FDS_ASSOCIATION = 2
FDS_DIRECT_FLOW = 6
FDS_HANDSHAKE = 1
FDS_CONNECTOR_FLOW = 1
FDS_UDP_SESSION = 1
FDS_ICMP_FLOW = 1


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NOFILE_CAP if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return NOFILE_CAP if soft == resource.RLIM_INFINITY else soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:  # e.g. above fs.nr_open
        log.warning("could not raise the descriptor limit from %d to %d: %s", soft, target, e)
        return soft
    return target


@dataclass(frozen=True, slots=True)
class Need:
    """One limit and what each unit under it costs."""

    key: str  # the config field
    value: int
    fds_each: int


def fit(needs: list[Need], nofile: int, reserve: int = RESERVE) -> dict[str, int]:
    """The limits lowered, in proportion, so that their descriptors fit `nofile - reserve`;
    only the ones that change."""
    room = max(nofile - reserve, 0)
    needs = [n for n in needs if n.fds_each > 0]
    total = sum(n.value * n.fds_each for n in needs)
    if total <= room:
        return {}
    scale = room / total
    sized = {n.key: max(MIN_LIMIT, int(n.value * scale)) for n in needs}
    return {n.key: sized[n.key] for n in needs if sized[n.key] < n.value}


def edge_needs(config: EdgeConfig) -> list[Need]:
    onramps = config.effective_onramps()
    tcp_onramps = sum(1 for o in onramps if o.type != "dns")
    associations = any(o.type == "socks5" for o in onramps)
    per_flow = (
        FDS_DIRECT_FLOW
        if config.allow_direct_egress
        else FDS_ASSOCIATION
        if associations
        else FDS_TUNNEL_FLOW
    )
    return [
        Need("max_flows", config.max_flows, per_flow),
        Need("max_handshakes", config.max_handshakes, FDS_HANDSHAKE * max(tcp_onramps, 1)),
        # direct egress UDP sessions hold a socket each; tunnel ones hold none
        Need(
            "max_udp_sessions",
            config.max_udp_sessions,
            FDS_UDP_SESSION if config.allow_direct_egress else 0,
        ),
    ]


def connector_needs(config: ConnectorConfig) -> list[Need]:
    # the connector's flows are bounded by the stream slots it grants each connection
    return [
        Need(
            "max_streams_per_connection",
            config.max_streams_per_connection,
            FDS_CONNECTOR_FLOW * config.ha_connections,
        ),
        Need("max_udp_sessions", config.max_udp_sessions, FDS_UDP_SESSION),
        Need("icmp_flow_limit", config.icmp_flow_limit, FDS_ICMP_FLOW),
    ]


def _needs(config: EdgeConfig | ConnectorConfig) -> list[Need]:
    return edge_needs(config) if isinstance(config, EdgeConfig) else connector_needs(config)


# a share is a part of its total: when the total shrinks to fit, so does the share, or one
# client could again hold all of it
SHARES = {
    "max_flows": ("max_flows_per_source", "max_flows_per_identity"),
    "max_handshakes": ("max_handshakes_per_source",),
}


def apply_budget(config: EdgeConfig | ConnectorConfig) -> None:
    """Raise RLIMIT_NOFILE, then lower the config's limits that would not fit, each logged
    once with the way out (a warning when the user set the limit, else an info line), and
    their fair shares in proportion."""
    nofile = raise_nofile()
    lowered = fit(_needs(config), nofile)
    for total, value in list(lowered.items()):
        for key in SHARES.get(total, ()):
            share = getattr(config, key)
            if share:
                lowered[key] = max(1, share * value // getattr(config, total))
    for key, value in lowered.items():
        if value >= getattr(config, key):
            continue
        log.log(
            logging.WARNING if key in config.model_fields_set else logging.INFO,
            "descriptor limit %d (RLIMIT_NOFILE) holds no more: %s lowered from %d to %d "
            "(raise `ulimit -n` or LimitNOFILE= to keep it)",
            nofile,
            key,
            getattr(config, key),
            value,
        )
        setattr(config, key, value)


def limits_in_force(config: EdgeConfig | ConnectorConfig) -> dict[str, int]:
    """The sized limits and the descriptor limit, for the `ramp_limit` gauge."""
    limits = {n.key: int(getattr(config, n.key)) for n in _needs(config)}
    limits["nofile"] = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return limits
