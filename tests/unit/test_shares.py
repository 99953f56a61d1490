from hypothesis import given
from hypothesis import strategies as st

from ramp.flows.shares import POOL_FULL, POOL_SHARE, Pool, Shares


def test_a_key_past_its_share_is_refused_and_others_are_not() -> None:
    shares: Shares[str] = Shares(2)
    assert shares.try_take("a") and shares.try_take("a")
    assert not shares.try_take("a")
    assert shares.try_take("b")
    assert shares.refused == 1
    shares.release("a")
    assert shares.try_take("a")


def test_released_keys_are_forgotten() -> None:
    shares: Shares[str] = Shares(3)
    shares.try_take("a")
    shares.release("a")
    shares.release("a")  # one too many: ignored
    assert len(shares) == 0 and shares.held("a") == 0


def test_a_share_not_enforced_still_counts() -> None:
    shares: Shares[str] = Shares(1)
    assert shares.try_take("a", enforce=False) and shares.try_take("a", enforce=False)
    assert shares.held("a") == 2 and not shares.try_take("a")
    shares.release("a")
    assert not shares.try_take("a")  # still at its share
    shares.release("a")
    assert shares.try_take("a")


def test_limit_zero_means_no_share() -> None:
    shares: Shares[str] = Shares(0)
    assert all(shares.try_take("a") for _ in range(1000))


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3)), max_size=200), st.integers(1, 4))
def test_counts_never_pass_the_limit_nor_go_negative(
    ops: list[tuple[bool, int]], limit: int
) -> None:
    shares: Shares[int] = Shares(limit)
    model: dict[int, int] = {}
    for take, key in ops:
        if take:
            ok = shares.try_take(key)
            assert ok == (model.get(key, 0) < limit)
            if ok:
                model[key] = model.get(key, 0) + 1
        elif model.get(key, 0):
            shares.release(key)
            model[key] -= 1
        assert shares.held(key) == model.get(key, 0) <= limit


def test_a_pool_lets_one_key_burst_into_the_idle_half_only() -> None:
    pool: Pool[str] = Pool(limit=4, per_key=1)
    assert pool.try_take("a") is None and pool.try_take("a") is None  # under half: a burst
    assert pool.try_take("a") == POOL_SHARE  # half taken: a's share binds
    assert pool.try_take("b") is None and pool.try_take("c") is None
    assert pool.try_take("d") == POOL_FULL and pool.used == 4
    pool.release("a")
    assert pool.try_take("d") is None
