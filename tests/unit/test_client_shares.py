"""Per-source and per-identity shares taken together: a refusal by either takes nothing."""

from __future__ import annotations

from ramp.flows.client_shares import IDENTITY_SHARE, SOURCE_SHARE, ClientShares


def test_source_share_refuses_past_its_limit_and_others_still_get_in() -> None:
    s: ClientShares[str] = ClientShares(per_source=2, per_identity=0)
    assert s.try_take("a", None) is None
    assert s.try_take("a", None) is None
    assert s.try_take("a", None) == SOURCE_SHARE
    assert s.try_take("b", None) is None
    s.release("a", None)
    assert s.try_take("a", None) is None


def test_identity_refusal_gives_the_source_unit_back() -> None:
    s: ClientShares[str] = ClientShares(per_source=5, per_identity=1)
    assert s.try_take("a", "alice") is None
    assert s.try_take("b", "alice") == IDENTITY_SHARE
    assert s.sources.held("b") == 0
    assert s.try_take("b", "bob") is None
    s.release("a", "alice")
    assert s.identities.held("alice") == 0
    assert s.try_take("b", "alice") is None


def test_zero_limits_and_missing_keys_mean_no_share() -> None:
    s: ClientShares[str] = ClientShares(per_source=0, per_identity=0)
    assert all(s.try_take("a", "alice") is None for _ in range(1000))
    limited: ClientShares[str] = ClientShares(per_source=1, per_identity=1)
    assert all(limited.try_take(None, None) is None for _ in range(10))
