"""A resource's per-source and per-identity shares, taken and released together.

Each holder of a unit (a UDP association, a UDP session) takes one unit from its source's share
and, when it is authenticated, one from its identity's: an identity with many addresses is
bounded as well as one address with many identities. Built on `Shares`, which does the counting.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

from ramp.flows.shares import Shares

K = TypeVar("K", bound=Hashable)

SOURCE_SHARE = "source_share"
IDENTITY_SHARE = "identity_share"


class ClientShares(Generic[K]):
    """Per-source and per-identity counts (a limit of 0 means no share of that kind)."""

    def __init__(self, per_source: int, per_identity: int) -> None:
        self.sources: Shares[K] = Shares(per_source)
        self.identities: Shares[K] = Shares(per_identity)

    def try_take(self, source: K | None, identity: K | None) -> str | None:
        """Take a unit for both keys (None: no such key); None when taken, else why not
        (SOURCE_SHARE or IDENTITY_SHARE), with nothing taken."""
        if source is not None and not self.sources.try_take(source):
            return SOURCE_SHARE
        if identity is not None and not self.identities.try_take(identity):
            if source is not None:
                self.sources.release(source)
            return IDENTITY_SHARE
        return None

    def over(self, why: str, source: K | None, identity: K | None) -> str:
        """'WHO already has N', for the message of a refusal `try_take` gave as `why`."""
        if why == SOURCE_SHARE:
            return f"{source} already has {self.sources.limit}"
        return f"{identity} already has {self.identities.limit}"

    def release(self, source: K | None, identity: K | None) -> None:
        if source is not None:
            self.sources.release(source)
        if identity is not None:
            self.identities.release(identity)
