"""Prometheus metrics of each role, each on its own registry (several roles may share a
process, as in `ramp up`)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ramp.flows.budget import MemoryBudget, make_budget
from ramp.observe.loglimit import LogLimiter

log = logging.getLogger("ramp.flows")


class FlowMetrics:
    """Flow counters both roles have."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.flows_active = Gauge("ramp_flows_active", "Flows open now.", registry=registry)
        self.restart_requests = Counter(
            "ramp_restart_requests",
            "Requests on the restart socket by outcome (ok, failed: the successor did not "
            "take over; busy, bad_request, bad_peer: refused).",
            ["outcome"],
            registry=self.registry,
        )
        self.flows = Counter(
            "ramp_flows",
            "Finished flows by on-ramp and result.",
            ["onramp", "result"],
            registry=registry,
        )
        self.flow_bytes = Counter(
            "ramp_flow_bytes",
            "Payload bytes relayed; up = client to origin, down = origin to client.",
            ["direction"],
            registry=registry,
        )
        self.flow_setup = Histogram(
            "ramp_flow_setup_seconds",
            "Time from request to an open outbound leg.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.flows_rejected = Counter(
            "ramp_flows_rejected",
            "Flows refused before they opened, by reason (flow_table_full, not_permitted, ...).",
            ["reason"],
            registry=registry,
        )
        self.bad_input = Counter(
            "ramp_bad_input",
            "Input rejected at the protocol level.",
            ["onramp", "reason"],
            registry=registry,
        )
        self.accept_errors = Counter(
            "ramp_accept_errors",
            "Failed accept(2) calls by listener and errno (EMFILE: out of descriptors).",
            ["onramp", "error"],
            registry=registry,
        )
        self.limits = Gauge(
            "ramp_limit",
            "Limits in force, after sizing them to the descriptor limit (RLIMIT_NOFILE).",
            ["limit"],
            registry=registry,
        )
        self.udp_sessions_active = Gauge(
            "ramp_udp_sessions_active", "UDP sessions open now.", registry=registry
        )
        self.udp_sessions = Counter(
            "ramp_udp_sessions", "Finished UDP sessions by result.", ["result"], registry=registry
        )
        self.udp_datagrams = Counter(
            "ramp_udp_datagrams",
            "UDP datagrams relayed; up = client to origin, down = origin to client.",
            ["direction"],
            registry=registry,
        )
        self.udp_bytes = Counter(
            "ramp_udp_bytes", "UDP payload bytes relayed.", ["direction"], registry=registry
        )
        self.udp_drops = Counter(
            "ramp_udp_drops",
            "UDP datagrams dropped, by reason (too_many_sessions: a session refused at the limit).",
            ["reason"],
            registry=registry,
        )
        self.udp_sessions_refused = Counter(
            "ramp_udp_sessions_refused",
            "UDP sessions refused because their client's share was used up, by reason "
            "(source_share, identity_share).",
            ["reason"],
            registry=registry,
        )
        self.udp_sessions_expired = Counter(
            "ramp_udp_sessions_expired",
            "UDP sessions closed for idling, by reason (idle: past udp_idle_timeout; unreplied: "
            "never answered, past udp_unreplied_timeout).",
            ["reason"],
            registry=registry,
        )
        # per-datagram hot path: bind the labelled children once
        self._dgram_children = {
            d: (self.udp_datagrams.labels(d), self.udp_bytes.labels(d)) for d in ("up", "down")
        }
        # the edge's direct egress and the connector's origins (ramp.offramps.egress)
        self.egress_ports_exhausted = Counter(
            "ramp_egress_ports_exhausted",
            "Flows and UDP sessions that failed with 'source ports exhausted': no source "
            "address had a port left towards the destination, by protocol (tcp, udp).",
            ["protocol"],
            registry=registry,
        )
        self.tunnel_bad_packets = Counter(
            "ramp_tunnel_bad_packets",
            "UDP packets dropped on the tunnel port before reaching a QUIC connection.",
            ["reason"],
            registry=registry,
        )

        self.flow_memory_budget = Gauge(
            "ramp_flow_memory_budget_bytes",
            "Bytes all flows' windows may take together (flow_memory_budget).",
            registry=registry,
        )
        self.flow_memory_reserved = Gauge(
            "ramp_flow_memory_reserved_bytes",
            "Bytes of the flow memory budget the open flows' windows hold now.",
            registry=registry,
        )
        self.flow_windows_reduced = Counter(
            "ramp_flow_windows_reduced",
            "Flows given a smaller window than the default because the budget ran low.",
            registry=registry,
        )

    def flow_budget(self, setting: int) -> MemoryBudget:
        """The flow memory budget for the `flow_memory_budget` setting, exported here."""
        # whoever opens the flows sets the rate: one line a minute says the budget is tight
        limiter = LogLimiter(burst=1, period=60.0)

        def reduced() -> None:
            self.flow_windows_reduced.inc()
            if limiter.allow("reduced"):
                log.warning(
                    "flow memory budget low (%d of %d bytes reserved by %d flows): new flows "
                    "get smaller windows",
                    budget.reserved,
                    budget.total,
                    budget.flows,
                )

        budget = make_budget(setting, on_reduced=reduced)
        self.flow_memory_budget.set(budget.total)
        self.flow_memory_reserved.set_function(lambda: budget.reserved)
        return budget

    def count_datagram(self, direction: str, size: int) -> None:
        datagrams, nbytes = self._dgram_children[direction]
        datagrams.inc()
        nbytes.inc(size)

    def udp_session_refused(self, reason: str) -> None:
        self.udp_sessions_refused.labels(reason).inc()

    def udp_session_expired(self, reason: str) -> None:
        self.udp_sessions_expired.labels(reason).inc()


class ProxyMetrics(FlowMetrics):
    """What roles running the SOCKS5 on-ramp count besides flows (edge and client)."""

    def add_association_metrics(self) -> None:
        self.udp_associations_active = Gauge(
            "ramp_udp_associations_active",
            "SOCKS5 UDP associations open now.",
            registry=self.registry,
        )
        self.udp_associations_refused = Counter(
            "ramp_udp_associations_refused",
            "SOCKS5 UDP ASSOCIATE requests refused because their client's share was used up, "
            "by reason (source_share, identity_share).",
            ["reason"],
            registry=self.registry,
        )
        self.udp_associations_expired = Counter(
            "ramp_udp_associations_expired",
            "SOCKS5 UDP associations closed after udp_association_idle_timeout without a datagram.",
            registry=self.registry,
        )


class EdgeMetrics(ProxyMetrics):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry or CollectorRegistry())
        self.proxy_headers = Counter(
            "ramp_proxy_headers",
            "PROXY protocol headers accepted on TCP on-ramps, by on-ramp, version (v1, v2) and "
            "kind (client: the flow's source is the client it names; local: a LOCAL or "
            "UNKNOWN header, the peer's own address kept). Refused ones: ramp_bad_input.",
            ["onramp", "version", "kind"],
            registry=self.registry,
        )
        self.onramp_steering = Gauge(
            "ramp_onramp_steering",
            "On-ramp listeners that take traffic for addresses and ports they do not bind "
            "(anyport), by on-ramp, listen address and mechanism (sk_lookup, tproxy).",
            ["onramp", "listen", "mechanism"],
            registry=self.registry,
        )
        self.tunnel_connections = Gauge(
            "ramp_tunnel_connections",
            "Registered connector connections by tunnel.",
            ["tunnel"],
            registry=self.registry,
        )
        self.registrations = Counter(
            "ramp_tunnel_registrations",
            "Accepted connector registrations.",
            registry=self.registry,
        )
        self.registration_failures = Counter(
            "ramp_tunnel_registration_failures",
            "Refused connector registrations by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.tunnel_handshaking = Gauge(
            "ramp_tunnel_handshakes_active",
            "QUIC handshakes in progress on the tunnel listener.",
            registry=self.registry,
        )
        self.tunnel_handshakes = Counter(
            "ramp_tunnel_handshake_events",
            "Tunnel listener handshake admission: retry_sent, handshake_timeout (half-open "
            "connection dropped), token_invalid_<why>, source_penalized (shut out after "
            "refused registrations).",
            ["event"],
            registry=self.registry,
        )
        self.dns_queries = Counter(
            "ramp_dns_queries",
            "DNS queries answered by the edge's DNS listener, by outcome "
            "(tunnel, upstream, refused, servfail, formerr, truncated, ...).",
            ["outcome"],
            registry=self.registry,
        )
        self.routes = Gauge(
            "ramp_routes", "IP routes loaded from the store.", registry=self.registry
        )
        self.policy_rules = Gauge(
            "ramp_policy_rules", "Policy rules loaded from the store.", registry=self.registry
        )
        self.policy_decisions = Counter(
            "ramp_policy_decisions",
            "Flow decisions by action (allow, deny).",
            ["action"],
            registry=self.registry,
        )
        self.udp_sessions_moved = Counter(
            "ramp_udp_sessions_moved",
            "UDP sessions moved off a draining tunnel connection (a connector restart) to "
            "another connection of the tunnel before it closed.",
            registry=self.registry,
        )
        self.flows_moved = Counter(
            "ramp_flows_moved",
            "TCP flows handed to (out) or taken from (in) another worker holding their "
            "tunnel's connections, as the client socket's descriptor.",
            ["direction"],
            registry=self.registry,
        )
        self.flows_revoked = Counter(
            "ramp_flows_revoked",
            "Open flows ended because a policy change denies them now.",
            registry=self.registry,
        )
        self.client_flows_revoked = Counter(
            "ramp_client_flows_revoked",
            "Open flows ended because their client identity was revoked.",
            registry=self.registry,
        )
        # Labelled by client name: only identities in the store's clients table, a set the
        # operator controls, so the label set stays bounded.
        self.client_flows = Counter(
            "ramp_client_flows",
            "Finished flows of client identities, by client and result.",
            ["client", "result"],
            registry=self.registry,
        )
        self.hook_errors = Counter(
            "ramp_hook_errors",
            "Hook calls that raised or timed out (the flow is denied: hook_error).",
            ["hook", "point", "kind"],
            registry=self.registry,
        )
        self.hook_slow = Counter(
            "ramp_hook_slow",
            "Synchronous hook calls that took longer than the hook timeout (they block the "
            "event loop).",
            ["hook", "point"],
            registry=self.registry,
        )
        self.add_association_metrics()
        self.tunnel_packets = Counter(
            "ramp_tunnel_packets",
            "IP packets (PACKET datagrams) by direction (to_connector, from_connector).",
            ["direction"],
            registry=self.registry,
        )
        self.tunnel_packet_drops = Counter(
            "ramp_tunnel_packet_drops",
            "IP packets for a tunnel not sent, or from one not handled, by reason "
            "(no_connection, connector_predates_packets, too_large, no_packet_path, ...).",
            ["reason"],
            registry=self.registry,
        )
        self.connectors_without_packets = Counter(
            "ramp_tunnel_registrations_without_packets",
            "Connector registrations whose connector predates IP packets (no ICMP), by tunnel.",
            ["tunnel"],
            registry=self.registry,
        )
        self.config_reloads = Counter(
            "ramp_config_reloads",
            "SIGHUP reloads by result (ok, failed).",
            ["result"],
            registry=self.registry,
        )


class ConnectorMetrics(FlowMetrics):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry or CollectorRegistry())
        self.tunnel_connections = Gauge(
            "ramp_tunnel_connections", "Registered connections to edges.", registry=self.registry
        )
        self.registration_failures = Counter(
            "ramp_tunnel_registration_failures",
            "Registrations refused by an edge, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.dial_failures = Counter(
            "ramp_tunnel_dial_failures",
            "Failed attempts to reach an edge.",
            ["reason"],
            registry=self.registry,
        )
        self.icmp_mode = Gauge(
            "ramp_icmp_mode",
            "1 for the kind of socket ICMP echo uses per family: ping_socket, raw_socket "
            "(ping sockets not permitted by net.ipv4.ping_group_range), none (neither works).",
            ["family", "mode"],
            registry=self.registry,
        )
        self.icmp_packets = Counter(
            "ramp_icmp_packets",
            "ICMP packets by what happened: to_origin (echo requests sent), from_origin (echo "
            "replies), error_from_router (errors passed back), time_exceeded_here (TTL 1).",
            ["what"],
            registry=self.registry,
        )
        self.icmp_drops = Counter(
            "ramp_icmp_drops",
            "ICMP packets dropped by reason (not_echo_request, bad_checksum, truncated, "
            "fragment, no_icmp_socket, too_many_flows, send_failed, ...).",
            ["reason"],
            registry=self.registry,
        )
        self.icmp_flows_active = Gauge(
            "ramp_icmp_flows_active", "Open ICMP echo flows.", registry=self.registry
        )
        self.icmp_flows = Counter(
            "ramp_icmp_flows",
            "Finished ICMP echo flows by result.",
            ["result"],
            registry=self.registry,
        )


class ClientMetrics(ProxyMetrics):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry or CollectorRegistry())
        self.edge_connected = Gauge(
            "ramp_client_edge_connected",
            "1 while the QUIC connection to the edge is up.",
            registry=self.registry,
        )
        self.edge_connects = Counter(
            "ramp_client_edge_connects",
            "Times the connection to the edge came up (more than once: it was redialled).",
            registry=self.registry,
        )
        self.edge_rtt = Gauge(
            "ramp_client_edge_rtt_seconds",
            "Smoothed round-trip time of the edge connection.",
            registry=self.registry,
        )
        self.add_association_metrics()
        # --tun: the TUN device and its connect-ip session
        self.tun_packets = Counter(
            "ramp_client_tun_packets",
            "IP packets through the TUN device: up (device to edge), down (edge to device).",
            ["direction"],
            registry=self.registry,
        )
        self.tun_bytes = Counter(
            "ramp_client_tun_bytes",
            "Bytes of IP packets through the TUN device, by direction.",
            ["direction"],
            registry=self.registry,
        )
        self.tun_drops = Counter(
            "ramp_client_tun_drops",
            "IP packets the client dropped, by reason (no_session: the edge connection is "
            "down; link_local: IPv6 the kernel sends on any link, never forwarded; "
            "packets the QUIC connection cannot take count in ramp_udp_drops_total; "
            "tun_refused: the kernel refused a packet from the edge; malformed_ip_capsule, "
            "unknown_capsule, unexpected_capsule: bad input from the edge).",
            ["reason"],
            registry=self.registry,
        )
        self.tun_addresses = Gauge(
            "ramp_client_tun_addresses",
            "Addresses the edge assigned to the TUN device.",
            registry=self.registry,
        )
        self.tun_routes = Gauge(
            "ramp_client_tun_routes",
            "Routes through the TUN device (prefixes the edge advertised).",
            registry=self.registry,
        )
        self.connect_ip_opens = Counter(
            "ramp_client_connect_ip_opens",
            "Times the connect-ip session opened (more than once: reopened after a redial).",
            registry=self.registry,
        )
