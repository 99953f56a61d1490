"""What hooks answer, and what they are shown: verdicts, proxy requests, replies.

They live below the on-ramps so that an on-ramp can hand a request to the hooks and send their
reply without importing the policy layer; users import them from `ramp.policy.hooks`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Allow:
    """Let the flow go on (other hooks may still deny it)."""

    reason: str = ""
    rule: str | None = None


@dataclass(frozen=True, slots=True)
class Deny:
    """Refuse the flow: the client gets its protocol's "not permitted" answer."""

    reason: str
    rule: str | None = None


@dataclass(frozen=True, slots=True)
class ProxyRequest:
    """An HTTP proxy request as the on-ramp received it (CONNECT or absolute-form)."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


@dataclass(frozen=True, slots=True)
class Reply:
    """A response a `connect_request` hook sends instead of opening the flow."""

    status: int
    body: str = ""
    headers: tuple[tuple[str, str], ...] = ()
