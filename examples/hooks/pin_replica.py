"""Send flows for some hosts to a chosen connector replica of their tunnel.

A tunnel usually has several connectors (replicas) connected, and the edge spreads flows over
them. This `route` hook overrides that for destinations matching a rule:

- `replica: stable` keeps each client on the same replica: the replica is chosen by a hash of
  the client's source IP (or its identity, with `by: identity`) among the replicas connected
  now. The choice is consistent (rendezvous hashing): when a replica comes or goes, only the
  clients that were on it move. Use it for origins that keep per-client state in front of
  each site (sticky sessions, a cache, an IP-based rate limit on the private side).
- `replica: CONNECTOR_ID` (or a list of them, in order of preference) pins the flows to that
  connector, e.g. the replica in the data centre next to a database, or one you are
  debugging. An id may be shortened to the 8-character prefix the connector logs at start
  ("connector 1a2b3c4d for tunnel ..."). Connector ids are made afresh each time a connector
  starts, so update the rule (and reload with SIGHUP) after restarting one.

When no listed replica is connected, `fallback` says what happens: `any` (the default: the
edge picks any connected replica, as without this hook), `stable` (as `replica: stable`), or
`deny` (refuse the flow, for traffic that must not take another path).

Configure it in the edge's YAML:

    hooks:
      - path: examples/hooks/pin_replica.py
        options:
          rules:                                # the first rule whose host matches is used
            - host: "*.db.corp.example"         # shell-style pattern, case-insensitive
              replica: 1a2b3c4d                 # a connector id or its 8-char prefix
              fallback: deny
            - host: "10.20.*"                   # IP literals match as written
              replica: [1a2b3c4d, 5e6f7a8b]     # first connected one wins
            - host: "*"
              replica: stable
              by: source                        # or identity (source IP when anonymous)

Patterns match the destination as the client asked for it: a hostname, or an IP literal.
The chosen replica is written to the flow's annotations (`replica`, and `replica_fallback`
when the pinned one was not connected), so the audit line shows it.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass
from typing import Any

from ramp.flows.flow import Flow, Route
from ramp.policy.hooks import Deny

STABLE = "stable"
_FALLBACKS = ("any", "stable", "deny")
_PREFIX = 8  # what connectors log of their id


@dataclass(frozen=True, slots=True)
class Rule:
    host: str  # lower-cased pattern
    replicas: tuple[str, ...]  # connector ids or prefixes; empty: stable
    fallback: str
    by: str  # "source" or "identity"

    def matches(self, host: str) -> bool:
        return fnmatch.fnmatchcase(host, self.host)


_rules: list[Rule] = []


def _rule(i: int, entry: Any) -> Rule:
    where = f"rules[{i}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a mapping with host and replica")
    unknown = set(entry) - {"host", "replica", "fallback", "by"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    host = entry.get("host")
    if not isinstance(host, str) or not host:
        raise ValueError(f"{where}: host must be a pattern such as '*.db.corp.example'")
    replica = entry.get("replica")
    wanted = [replica] if isinstance(replica, str) else replica
    if not isinstance(wanted, list) or not wanted or not all(isinstance(r, str) for r in wanted):
        raise ValueError(f"{where}: replica must be 'stable', a connector id, or a list of ids")
    if STABLE in wanted and len(wanted) > 1:
        raise ValueError(f"{where}: 'stable' cannot be mixed with connector ids")
    for r in wanted:
        if r != STABLE and len(r) < _PREFIX:
            raise ValueError(f"{where}: connector id {r!r} is shorter than {_PREFIX} characters")
    fallback = entry.get("fallback", "any")
    if fallback not in _FALLBACKS:
        raise ValueError(f"{where}: fallback must be one of {', '.join(_FALLBACKS)}")
    by = entry.get("by", "source")
    if by not in ("source", "identity"):
        raise ValueError(f"{where}: by must be source or identity")
    replicas = () if wanted == [STABLE] else tuple(r.lower() for r in wanted)
    return Rule(host.lower().rstrip("."), replicas, fallback, by)


def setup(options: dict[str, Any]) -> None:
    global _rules
    unknown = set(options) - {"rules"}
    if unknown:
        raise ValueError(f"unknown options: {', '.join(sorted(unknown))}")
    rules = options.get("rules")
    if not isinstance(rules, list) or not rules:
        raise ValueError("rules must be a non-empty list of {host, replica} mappings")
    _rules = [_rule(i, entry) for i, entry in enumerate(rules)]


def _stable(flow: Flow, rule: Rule, replicas: dict[str, Route]) -> Route:
    key = flow.user if rule.by == "identity" and flow.user is not None else flow.source[0]

    # Rendezvous hashing: every (client, replica) pair gets a score and the best replica
    # wins, so removing one replica only moves the clients it was winning. blake2b, not
    # hash(): the choice must be the same in every edge process and after restarts.
    def score(replica: str) -> bytes:
        return hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest()

    return replicas[max(replicas, key=score)]


def _pinned(rule: Rule, replicas: dict[str, Route]) -> Route | None:
    for wanted in rule.replicas:
        for replica, route in replicas.items():
            if replica.lower().startswith(wanted):
                return route
    return None


def route(flow: Flow, candidates: list[Route]) -> Route | Deny | None:
    host = flow.destination.host.lower().rstrip(".")
    rule = next((r for r in _rules if r.matches(host)), None)
    if rule is None:
        return None
    # Candidates are the tunnel (any replica) first, then one Route per connected replica.
    replicas = {c.replica: c for c in candidates if c.replica is not None}
    if rule.replicas:
        chosen = _pinned(rule, replicas)
        if chosen is not None:
            flow.annotations["replica"] = str(chosen.replica)
            return chosen
        missing = ",".join(rule.replicas)
        flow.annotations["replica_fallback"] = f"{missing} not connected"
        if rule.fallback == "deny":
            return Deny(f"replica {missing} for {host} is not connected")
        if rule.fallback == "any" or not replicas:
            return None
    elif not replicas:
        return None
    chosen = _stable(flow, rule, replicas)
    flow.annotations["replica"] = str(chosen.replica)
    return chosen
