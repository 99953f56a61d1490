"""A worker's share of the role's limits.

Limits are settings for the whole edge or connector: `--max-flows 10000 --workers 2` admits
10,000 flows, not 20,000. Each worker enforces its share of every limit that counts across
the process (the limit divided by the number of workers, rounded up, so no limit drops to 0,
which means "off" for the fair shares). The kernel spreads connections over the workers by
a hash of their addresses and ports, so a client with many connections gets its share on
each worker; one with a few may be refused a little before its whole share.

Limits of one connection or one association (streams per connection, destinations per
association) and timeouts are the same in every worker.
"""

from __future__ import annotations

import math
from typing import TypeVar

from ramp.config import ConnectorConfig, EdgeConfig
from ramp.flows.budget import machine_budget

# what each worker holds a share of: its own flows, handshakes, associations, sessions
SHARED_LIMITS: dict[type, tuple[str, ...]] = {
    EdgeConfig: (
        "max_flows",
        "max_handshakes",
        "max_handshakes_per_source",
        "max_udp_associations_per_source",
        "max_udp_associations_per_identity",
        "max_flows_per_source",
        "max_flows_per_identity",
        "max_opening_flows_per_source",
        "max_opening_flows_per_identity",
        "quic_max_handshakes",
        "quic_max_handshakes_per_source",
        "quic_refusals_per_source",
        "max_udp_sessions",
        "max_udp_sessions_per_source",
        "max_udp_sessions_per_identity",
        "masque_ip_max_flows",
        "max_waiting_flows",
        "flow_memory_budget",
        "resolve_max_concurrent",
    ),
    ConnectorConfig: (
        "max_udp_sessions",
        "max_udp_sessions_per_source",
        "max_udp_sessions_per_identity",
        "icmp_flow_limit",
        "flow_memory_budget",
        "resolve_max_concurrent",
    ),
}

C = TypeVar("C", EdgeConfig, ConnectorConfig)


def share(value: int, workers: int) -> int:
    """One worker's part of `value`: rounded up; 0 (off) stays 0."""
    return math.ceil(value / workers) if value > 0 else 0


def worker_share(config: C, workers: int) -> C:
    """`config` with the limits one of `workers` workers enforces."""
    if workers <= 1:
        return config
    update = {key: share(getattr(config, key), workers) for key in SHARED_LIMITS[type(config)]}
    if config.flow_memory_budget == 0:  # sized to the machine: the machine is shared too
        update["flow_memory_budget"] = share(machine_budget(), workers)
    copy = config.model_copy(update=update)
    # what the user set stays what the user set (apply_budget words its lines by it)
    object.__setattr__(copy, "__pydantic_fields_set__", set(config.model_fields_set))
    return copy
