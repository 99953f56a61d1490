"""Sizing the limits to the descriptor limit, and riding out EMFILE on accept."""

from __future__ import annotations

import errno
import logging

import pytest

from ramp import fdbudget
from ramp.config import ConnectorConfig, EdgeConfig
from ramp.fdbudget import Need, apply_budget, fit, limits_in_force
from ramp.net.listen import ACCEPT_BACKOFF_MAX, AcceptErrors


def test_limits_that_fit_are_left_alone() -> None:
    assert fit([Need("a", 100, 1), Need("b", 10, 2)], nofile=1000, reserve=100) == {}


def test_limits_that_do_not_fit_shrink_in_proportion_and_never_below_the_floor() -> None:
    needs = [Need("a", 1000, 1), Need("b", 100, 10), Need("c", 20, 1), Need("free", 9, 0)]
    lowered = fit(needs, 1100, reserve=100)
    # scaled by 1000/2020; c falls to the floor; what costs nothing is not touched
    assert lowered == {"a": 495, "b": 49, "c": fdbudget.MIN_LIMIT}


def test_an_edge_under_a_1024_descriptor_limit_lowers_its_limits_and_shares(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(fdbudget, "raise_nofile", lambda: 1024)
    config = EdgeConfig(max_handshakes_per_source=128)
    with caplog.at_level(logging.INFO, logger="ramp.fdbudget"):
        apply_budget(config)
    tcp_onramps = 2  # socks5 and http by default
    used = config.max_flows * fdbudget.FDS_ASSOCIATION + config.max_handshakes * tcp_onramps
    assert used <= 1024 - fdbudget.RESERVE
    assert config.max_flows < 10000 and config.max_handshakes < 1024
    # the shares shrink with their totals: one client still cannot hold everything
    assert config.max_flows_per_source < config.max_flows
    assert config.max_handshakes_per_source < config.max_handshakes
    lines = [r for r in caplog.records if "lowered" in r.getMessage()]
    assert any("max_flows lowered from 10000" in r.getMessage() for r in lines)
    # set by the user: a warning; a default: an info line
    levels = {r.getMessage().split()[7]: r.levelno for r in lines}
    assert levels["max_handshakes_per_source"] == logging.WARNING
    assert levels["max_flows"] == logging.INFO


def test_direct_egress_flows_cost_more_descriptors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fdbudget, "raise_nofile", lambda: 30000)
    tunnel_only, direct = EdgeConfig(), EdgeConfig(allow_direct_egress=True)
    apply_budget(tunnel_only)
    apply_budget(direct)
    assert tunnel_only.max_flows == 10000  # 2 descriptors each (a UDP association) fit
    assert direct.max_flows < 30000 // fdbudget.FDS_DIRECT_FLOW


def test_a_connector_sizes_its_stream_slots_and_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fdbudget, "raise_nofile", lambda: 4096)
    config = ConnectorConfig()
    apply_budget(config)
    slots = config.max_streams_per_connection * config.ha_connections
    assert slots + config.max_udp_sessions + config.icmp_flow_limit <= 4096 - fdbudget.RESERVE
    assert limits_in_force(config)["max_udp_sessions"] == config.max_udp_sessions
    assert config.icmp_flow_limit < 4096  # each echo flow holds a ping socket


def test_raise_nofile_reaches_the_hard_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))
        got = fdbudget.raise_nofile()
        assert got == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert got == (hard if hard != resource.RLIM_INFINITY else fdbudget.NOFILE_CAP)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_out_of_descriptors_is_said_once_backs_off_and_counts_every_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    counted: list[str] = []
    errors = AcceptErrors("socks5 on-ramp", counted.append)
    emfile = OSError(errno.EMFILE, "Too many open files")
    with caplog.at_level(logging.DEBUG, logger="ramp.net.listen"):
        delays = [errors.failed(emfile) for _ in range(50)]
        errors.succeeded()
        errors.succeeded()
        again = errors.failed(emfile)
    assert counted == ["EMFILE"] * 51
    assert delays == sorted(delays) and delays[-1] == ACCEPT_BACKOFF_MAX and delays[0] > 0
    assert again == delays[0]  # a new episode starts from the short pause
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3  # paused, accepting again, paused (the second episode)
    assert "cannot accept" in warnings[0] and "after 50 failed accepts" in warnings[1]


def test_a_client_aborting_in_the_backlog_is_no_pause() -> None:
    errors = AcceptErrors("http on-ramp")
    assert errors.failed(OSError(errno.ECONNABORTED, "aborted")) == 0.0
    assert errors.failures == 0
