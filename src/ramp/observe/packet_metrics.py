"""Metrics of the edge's packet path (connect-ip): packets, drops by reason, flows, addresses."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class PacketMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.packets = Counter(
            "ramp_connect_ip_packets",
            "IP packets of connect-ip clients by direction (up: from clients, down: to them).",
            ["direction"],
            registry=self.registry,
        )
        self.dropped = Counter(
            "ramp_connect_ip_packets_dropped",
            "connect-ip packets the edge did not forward, by reason: malformed ones by the "
            "parser's label (truncated, bad_checksum, fragment, ...), spoofed_source, "
            "not_advertised and too_big (answered with ICMP), ttl_exceeded (answered with time "
            "exceeded), icmp_type (not an echo request), flow_limit, no_flow, denied, ...",
            ["reason"],
            registry=self.registry,
        )
        self.icmp_errors = Counter(
            "ramp_connect_ip_icmp_errors",
            "ICMP errors the edge sent to connect-ip clients, by kind (admin_prohibited, "
            "frag_needed, packet_too_big, time_exceeded, port_unreachable, host_unreachable).",
            ["kind"],
            registry=self.registry,
        )
        self.flows = Gauge(
            "ramp_connect_ip_flows_active",
            "Packet flows tracked now, by protocol.",
            ["protocol"],
            registry=self.registry,
        )
        self.addresses = Gauge(
            "ramp_connect_ip_addresses_assigned",
            "Addresses of the connect-ip pool assigned now, by IP version.",
            ["version"],
            registry=self.registry,
        )
        self.sessions = Gauge(
            "ramp_connect_ip_sessions_active",
            "connect-ip requests (client TUN sessions) open now.",
            registry=self.registry,
        )
        self.route_updates = Counter(
            "ramp_connect_ip_route_advertisements",
            "ROUTE_ADVERTISEMENT capsules sent (the first of each session, and each change).",
            registry=self.registry,
        )


__all__ = ["PacketMetrics"]
