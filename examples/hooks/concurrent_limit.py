"""Limit how many flows each identity may have open at once.

A flow is one TCP connection, HTTP request or UDP session (SOCKS5 UDP has one per
destination). It is counted when it starts (`flow_start`) and released when it ends
(`flow_end`, matched on the flow id). Authenticated flows are counted per identity;
anonymous ones (no proxy credentials configured) per source IP address, so one noisy client
cannot use up the edge. A flow over the limit is denied with a reason that names the limit,
e.g.

    denied by hook:concurrent_limit: alice has 10 flows open, the limit is 10

Configure it in the edge's YAML:

    hooks:
      - path: examples/hooks/concurrent_limit.py
        options:
          max_flows: 10          # per identity (or per source IP when anonymous); required
          overrides:             # optional: a different limit for some identities or IPs
            backup-robot: 100
            192.0.2.7: 2

Put it after hooks that may deny (the built-in policy always runs first): a flow another hook
denies later is still counted until it ends, which it does at once.

State lives in this module, in memory, for one edge process: a config reload (SIGHUP) loads
the file afresh and starts counting from zero, so until the flows open at the reload end, an
identity can have up to twice its limit open.
"""

from __future__ import annotations

from typing import Any

from ramp.flows.flow import Flow
from ramp.policy.hooks import Deny

_limit = 0
_overrides: dict[str, int] = {}
_open: dict[str, int] = {}  # who -> flows open now
_owner: dict[int, str] = {}  # flow id -> who it was counted against


def _positive(value: Any, what: str) -> int:
    # bool is an int in Python, and `max_flows: yes` in YAML is a typo, not a limit of 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a whole number >= 1, not {value!r}")
    return value


def setup(options: dict[str, Any]) -> None:
    global _limit, _overrides
    unknown = set(options) - {"max_flows", "overrides"}
    if unknown:
        raise ValueError(f"unknown options: {', '.join(sorted(unknown))}")
    if "max_flows" not in options:
        raise ValueError("max_flows is required")
    _limit = _positive(options["max_flows"], "max_flows")
    overrides = options.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ValueError("overrides must be a mapping of identity or IP to a limit")
    _overrides = {str(k): _positive(v, f"overrides[{k}]") for k, v in overrides.items()}
    _open.clear()
    _owner.clear()


def _who(flow: Flow) -> str:
    return flow.user if flow.user is not None else flow.source[0]


# Sync on purpose: check-and-count must not be split by an await, or two flows of the same
# identity starting together could both see room for one more.
def flow_start(flow: Flow) -> Deny | None:
    who = _who(flow)
    limit = _overrides.get(who, _limit)
    now = _open.get(who, 0)
    if now >= limit:
        return Deny(f"{who} has {now} flows open, the limit is {limit}")
    _open[who] = now + 1
    _owner[flow.id] = who
    return None


def flow_end(record: dict[str, Any]) -> None:
    # Flows this hook never counted (denied before it ran, the edge's own DNS flows, flows
    # opened before a reload) end here too: only ids it counted release anything.
    who = _owner.pop(record["flow"], None)
    if who is None:
        return
    left = _open.get(who, 0) - 1
    if left > 0:
        _open[who] = left
    else:
        _open.pop(who, None)
