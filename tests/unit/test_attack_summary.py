"""The legitimate client's summary: what an attack test reports about the requests it made."""

from __future__ import annotations

import math

from ramp.testing.attack import Outcome, Summary, percentile


def test_nearest_rank_percentiles() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile(list(reversed(values)), 50) == 50.0  # order does not matter
    assert percentile([0.3], 99) == 0.3
    assert math.isnan(percentile([], 50))


def test_summary_counts_each_kind_and_keeps_the_reasons_of_failures() -> None:
    outcomes = [
        Outcome("socks5", True, 0.01),
        Outcome("socks5", True, 0.03),
        Outcome("socks5", False, 5.0, "ProxyError: SOCKS5 CONNECT answered REP 0x4"),
        Outcome("http", True, 0.02),
    ]
    summary = Summary.of(outcomes)
    socks = summary.kinds["socks5"]
    assert (socks.ok, socks.failed) == (2, 1)
    assert socks.failures == ("ProxyError: SOCKS5 CONNECT answered REP 0x4",)
    # latencies are of the successful requests only
    assert (socks.p50, socks.p99) == (0.01, 0.03)
    assert summary.kinds["udp"].ok == 0
    assert not summary.all_ok
    text = summary.describe()
    assert "socks5: 2 ok, 1 failed" in text and "REP 0x4" in text


def test_all_ok_needs_every_kind_to_have_succeeded_at_least_once() -> None:
    ok = [Outcome(k, True, 0.01) for k in ("socks5", "http", "udp")]
    assert Summary.of(ok).all_ok
    assert not Summary.of(ok[:2]).all_ok  # no UDP request at all is not "all ok"
    assert Summary.of(ok[:2], kinds=("socks5", "http")).all_ok
