"""systemd notifications: the datagrams a service manager gets, from the codec to a real edge."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ramp.observe.sdnotify import Notifier, encode, socket_address, watchdog_interval
from ramp.testing.notify import Manager, parse, reap


@given(st.dictionaries(st.from_regex(r"[A-Z][A-Z_]{0,15}", fullmatch=True), st.text(), min_size=1))
def test_every_field_survives_as_one_line(fields: dict[str, str]) -> None:
    decoded = parse(encode(fields))
    assert decoded == {k: v.replace("\n", " ") for k, v in fields.items()}


@pytest.mark.parametrize("key", ["", "ready", "A=B", "A\nB"])
def test_keys_systemd_would_misread_are_refused(key: str) -> None:
    with pytest.raises(ValueError):
        encode({key: "1"})


def test_addresses_paths_and_the_abstract_namespace() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@ramp-test") == b"\0ramp-test"
    assert socket_address("vsock:2:1234") is None


def test_the_watchdog_is_only_this_process_s() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "2000000"}, 7) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "7"}, 7) == 1.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "8"}, 7) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 7) is None
    assert watchdog_interval({}, 7) is None


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready("x")
    assert notifier.sent == 0


def test_a_gone_service_manager_is_counted_not_fatal(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    notifier.ready()
    assert notifier.failed == 1 and notifier.sent == 0


def test_a_real_edge_notifies_ready_watchdog_reloading_and_stopping(tmp_path: Path) -> None:
    manager = Manager(tmp_path / "notify")
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(tmp_path / "notify"),
        "WATCHDOG_USEC": "400000",
        "PYTHONPATH": str(Path(__file__).parents[2] / "src"),
    }
    args = [sys.executable, "-m", "ramp", "edge", "--data-dir", str(tmp_path / "data")]
    args += ["--tunnel-listen", "127.0.0.1:0", "--socks5-listen", "127.0.0.1:0"]
    args += ["--http-listen", "off", "--masque-listen", "off", "--metrics-listen", "off"]
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE)
    try:
        ready = manager.wait_for("READY")
        assert ready["READY"] == "1"
        assert "waiting for a connector" in ready["STATUS"]
        manager.wait_for("WATCHDOG")
        manager.wait_for("WATCHDOG")  # pinged again, not once
        proc.send_signal(signal.SIGHUP)
        reloading = manager.wait_for("RELOADING")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert manager.wait_for("READY")["READY"] == "1"
        proc.send_signal(signal.SIGTERM)
        assert manager.wait_for("STOPPING")["STOPPING"] == "1"
        assert proc.wait(60) == 0
    finally:
        reap(proc, manager)
