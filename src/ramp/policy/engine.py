"""The built-in policy as a hook: the store's rules decide, first match wins."""

from __future__ import annotations

from ramp.flows.flow import Decision, Flow, parse_ip
from ramp.policy.hooks import Allow, Deny, LoadedHook
from ramp.policy.rules import Facts, Policy, Verdict


def facts_of(flow: Flow) -> Facts:
    host = flow.destination.host
    literal = parse_ip(host) is not None
    ident = flow.identity
    return Facts(
        identity=ident.name if ident is not None else None,
        groups=ident.groups if ident is not None else frozenset(),
        onramp=flow.onramp,
        source=flow.source[0],
        host=None if literal else host.lower().rstrip("."),
        address=host if literal else flow.resolved,
        port=flow.destination.port,
        protocol=flow.protocol,
    )


class PolicyHook:
    """Holds the current compiled policy; the edge swaps it when the store changes."""

    name = "policy"

    def __init__(self, policy: Policy | None = None) -> None:
        self.policy = policy or Policy()
        self.generation = 0

    def replace(self, policy: Policy) -> None:
        self.policy = policy
        self.generation += 1

    def verdict(self, flow: Flow) -> Verdict:
        return self.policy.decide(facts_of(flow))

    def flow_start(self, flow: Flow) -> Allow | Deny:
        v = self.verdict(flow)
        return Allow(v.why, v.rule) if v.allowed else Deny(v.why, v.rule)

    def decide(self, flow: Flow) -> Decision:
        v = self.verdict(flow)
        return Decision(v.allowed, v.rule, v.why)

    def as_hook(self) -> LoadedHook:
        return LoadedHook(
            self.name,
            {"flow_start": self.flow_start},
            {"flow_start": False},
            builtin=self.decide,
        )
