"""`ramp edge restart` and `ramp tunnel restart`: a successor takes over the sockets and the
tunnel connections while the old process drains; under load nothing fails, where a naive
stop-and-start loses flows. And a restart that cannot happen leaves the old process serving."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ramp.testing.lab import (
    APP_NAME,
    DNS_ZONE,
    ECHO_PORT,
    EDGE_DNS,
    HTTP_PORT,
    ORIGIN,
    ORIGIN_PREFIX,
    PRIVATE_DNS,
    RAMP,
    SOCKS_PROXY,
    UDP_ECHO_PORT,
    Lab,
    Payload,
    wait_until,
)
from ramp.testing.wait import DEADLINE

CONNECTOR_ARGS = ("--connect-timeout", "2", "--dns-resolver", PRIVATE_DNS)
HA = 2  # configured connections per connector
DOWNLOADS = 20  # long downloads during the restarts
DOWNLOAD_RATE = 100_000  # bytes/s each: slow enough that the machine carries the whole load


def restart(lab: Lab, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return _restart(lab, "edge", lab.edge_ns, lab.data_dir, timeout)


def restart_connector(lab: Lab, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return _restart(lab, "tunnel", lab.private, lab.workdir / "connector-1-data", timeout)


def _restart(
    lab: Lab, role: str, ns: Any, data_dir: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    proc = ns.run(
        [*RAMP, role, "restart", "--data-dir", str(data_dir), "--timeout", str(timeout)],
        check=False,
        timeout=timeout + 10,
        env=lab.env,
    )
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    )


def successor_pid(result: subprocess.CompletedProcess[str]) -> int:
    found = re.search(r"pid (\d+) serves", result.stdout)
    assert found, f"no successor pid in {result.stdout!r} {result.stderr!r}"
    return int(found.group(1))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return False


def small_ok(lab: Lab, payload: Payload) -> bool:
    got = lab.curl_digest(
        *lab.proxy_args("socks5"), f"http://{ORIGIN}/{payload.small.name}", timeout=10
    )
    return got.returncode == 0 and got.sha256 == payload.small.sha256


def net_drops(lab: Lab) -> dict[str, dict[str, int]]:
    """What each namespace's kernel dropped or discarded (full socket buffers, forwarding
    discards): where a datagram lost on the way went, when one is."""
    found = {}
    for name in ("client", "edge_ns", "router_ns", "private", "origin_ns"):
        try:
            ns = getattr(lab, name)
        except Exception:
            continue
        text = ns.run(["cat", "/proc/net/snmp", "/proc/net/netstat"]).stdout.decode()
        lines = text.splitlines()
        bad = {}
        for head, values in zip(lines[::2], lines[1::2], strict=False):
            proto, *keys = head.split()
            for key, value in zip(keys, values.split()[1:], strict=False):
                if value != "0" and any(w in key for w in ("Discard", "Errors", "Drop")):
                    bad[proto + key] = int(value)
        found[name] = bad
    return found


def start(lab: Lab, *edge_args: str) -> None:
    token = lab.create_tunnel("corp", [ORIGIN_PREFIX])
    lab.add_dns_route(DNS_ZONE, "corp")
    lab.start_edge("--dns-listen", EDGE_DNS, *edge_args)
    lab.start_connector(token, *CONNECTOR_ARGS, "--ha-connections", str(HA))
    lab.wait_tunnel_connections("corp", HA)


class ConnectionSampler:
    """The edge's registered tunnel connections, read from /metrics every 100 ms."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.samples: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        assert self.lab.edge is not None
        while not self._stop.wait(0.1):
            try:
                _status, body = self.lab.edge.http_get("/metrics", timeout=2.0)
                text = body.decode()
                found = re.search(r'^ramp_tunnel_connections\{tunnel="corp"\} (\S+)$', text, re.M)
                self.samples.append(float(found.group(1)) if found else 0.0)
            except Exception as e:  # a refused or cut /metrics request is a finding too
                self.errors.append(repr(e))

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


class Load:
    """The restart load generator in C: runs until `stop()` (at most `limit` seconds)."""

    def __init__(self, lab: Lab, download: tuple[Path, str] | None = None) -> None:
        self.limit = 60.0
        downloads = []
        if download is not None:
            path, sha256 = download
            downloads = [
                "--downloads",
                str(DOWNLOADS),
                "--http",
                f"{ORIGIN}:{HTTP_PORT}",
                "--download-path",
                f"/{path.name}",
                "--download-sha256",
                sha256,
                "--download-rate",
                str(DOWNLOAD_RATE),
            ]
        self.proc = lab.client.popen(
            [
                sys.executable,
                "-m",
                "ramp.testing.restart_load",
                "--socks",
                SOCKS_PROXY,
                "--echo",
                f"{ORIGIN}:{ECHO_PORT}",
                "--udp-echo",
                f"{ORIGIN}:{UDP_ECHO_PORT}",
                "--dns",
                EDGE_DNS,
                "--dns-name",
                APP_NAME,
                "--duration",
                str(self.limit),
                *downloads,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=lab.env,
        )
        self.started = time.monotonic()

    def stop(self, at_least: float) -> dict[str, Any]:
        """Stop once it has run `at_least` seconds; its result."""
        time.sleep(max(0.0, at_least - (time.monotonic() - self.started)))
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=self.limit + 60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.returncode == 0, err.decode()
        result: dict[str, Any] = json.loads(out)
        return result


def download_file(payload: Payload, seconds: float) -> tuple[Path, str]:
    """A file the origin serves that takes a download at DOWNLOAD_RATE about `seconds`."""
    size = int(seconds * DOWNLOAD_RATE)
    path = payload.directory / f"restart-{size}.bin"
    if not path.exists():
        path.write_bytes(os.urandom(size))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def restarts_under_load(
    lab: Lab,
    payload: Payload,
    do_restart: Callable[[Lab], subprocess.CompletedProcess[str]],
    first_pid: int,
) -> tuple[dict[str, Any], ConnectionSampler, set[int], int]:
    """Three restarts one after the other under the restart load, /metrics sampled all the
    while: the load's result, the sampler, every pid that served, the newest one."""
    pids = {first_pid}
    restarts = []
    with ConnectionSampler(lab) as sampler:
        load = Load(lab, download_file(payload, 14.0))
        time.sleep(1.0)  # the load is under way before the first restart
        for _ in range(3):
            result = do_restart(lab)
            assert result.returncode == 0, result.stdout + result.stderr + lab.log_tails()
            pids.add(successor_pid(result))
            restarts.append(round(time.monotonic() - load.started, 1))
        got = load.stop(at_least=max(10.0, restarts[-1] + 1.0))
    print(
        f"\n{' '.join(result.args[-6:-4])} x3 (done at {restarts} s) under "
        f"{got['seconds']} s of load: TCP flows {got['flows']}, UDP "
        f"{got['udp_received']}/{got['udp_sent']} echoed, DNS {got['dns']}, downloads "
        f"{got['downloads']}, tunnel connections min {min(sampler.samples, default=-1)}, "
        f"kernel drops {net_drops(lab)}"
    )
    return got, sampler, pids, successor_pid(result)


@pytest.mark.slow
def test_restarts_under_load_drop_nothing_where_a_naive_restart_does(
    bare_lab: Lab, payload: Payload
) -> None:
    lab = bare_lab
    start(lab, "--drain-timeout", "30")
    assert lab.edge is not None
    got, sampler, pids, newest = restarts_under_load(lab, payload, restart, lab.edge.pid)
    assert got["flows_failed"] == 0, got
    assert got["udp_lost"] == 0 and got["udp_sent"] > 10_000, got
    assert got["dns_failed"] == 0 and got["dns"].get("ok", 0) > 50, got
    assert got["downloads"] == {"ok": DOWNLOADS}, got
    assert not sampler.errors, sampler.errors[:5]
    assert len(sampler.samples) > 50 and min(sampler.samples) >= HA, sampler.samples
    assert len(pids) == 4  # three successors, each a new process
    # the predecessors drain and go; the last successor serves on
    wait_until(lambda: not any(alive(p) for p in pids - {newest}), DEADLINE, what="old edges")
    assert alive(newest)

    # the same load through a naive restart, as a proxy without handover does it: stop (a
    # second SIGTERM: at once), start again
    load = Load(lab, download_file(payload, 6.0))
    time.sleep(2.0)
    os.kill(newest, signal.SIGTERM)
    time.sleep(0.2)
    os.kill(newest, signal.SIGTERM)
    wait_until(lambda: not alive(newest), 60, what="the edge to exit")
    lab.start_edge("--dns-listen", EDGE_DNS, "--drain-timeout", "30")
    naive = load.stop(at_least=10.0)
    print(
        f"naive stop/start under load: {naive['flows_failed']} TCP flows failed "
        f"({naive['flows']}), UDP lost {naive['udp_lost']}/{naive['udp_sent']}, "
        f"DNS failed {naive['dns_failed']}, downloads failed {naive['downloads_failed']}/20"
    )
    lost = naive["flows_failed"] + naive["udp_lost"] + naive["dns_failed"]
    assert lost + naive["downloads_failed"] > 0, naive


def test_restart_with_a_broken_config_keeps_the_old_edge_serving(
    bare_lab: Lab, payload: Payload
) -> None:
    lab = bare_lab
    config = lab.write_edge_config({"max_flows": 1000})
    start(lab, "--config", str(config))
    assert lab.edge is not None
    config.write_text("max_flows: [not a number\n")
    result = restart(lab)
    assert result.returncode != 0
    assert "restart failed" in result.stderr, result.stderr
    assert "edge.yaml:2: invalid YAML" in result.stderr, result.stderr
    assert lab.edge.alive()
    assert small_ok(lab, payload)
    assert lab.edge.metrics().value("ramp_restart_requests_total", outcome="failed") == 1
    # fixed, the next restart works and the tunnel follows
    config.write_text("max_flows: 1000\n")
    result = restart(lab)
    assert result.returncode == 0, result.stderr + lab.log_tails()
    lab.edge.wait_exit(60)
    assert small_ok(lab, payload)
    lab.wait_tunnel_connections("corp", HA)


def _raw_request(path: Path, data: bytes, *, uid: int | None = None) -> str:
    """Send `data` to the restart socket, as `uid` if given; the answer."""
    if uid is None:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(path))
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            return s.makefile().read()
    # another user: SO_PEERCRED says uid; the file's mode would stop it at connect(), so
    # keep root's filesystem uid (setfsuid) to get that far and be refused by the check
    code = (
        "import ctypes,os,socket,sys\n"
        f"os.setresuid({uid},{uid},0)\n"
        "ctypes.CDLL(None).setfsuid(0)\n"
        "s=socket.socket(socket.AF_UNIX);s.settimeout(10)\n"
        f"s.connect({str(path)!r})\n"
        f"s.sendall({data!r});s.shutdown(socket.SHUT_WR)\n"
        "sys.stdout.write(s.makefile().read())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30, check=True)
    return out.stdout.decode()


def test_bad_input_on_the_restart_socket_is_refused(bare_lab: Lab, payload: Payload) -> None:
    lab = bare_lab
    start(lab)
    assert lab.edge is not None
    path = lab.data_dir / "restart.sock"
    assert (path.stat().st_mode & 0o777) == 0o600
    answers = [
        _raw_request(path, b"\x00\xffgarbage\n"),
        _raw_request(path, b'{"op": "reboot"}\n'),
        _raw_request(path, b"x" * 70000),
        _raw_request(path, b'{"op": "restart"}\n', uid=65534),
    ]
    for answer in answers:
        assert json.loads(answer.splitlines()[-1])["ok"] is False, answer
    assert "uid 65534" in answers[-1]
    metrics = lab.edge.metrics()
    assert metrics.value("ramp_restart_requests_total", outcome="bad_request") == 3
    assert metrics.value("ramp_restart_requests_total", outcome="bad_peer") == 1
    assert lab.edge.alive() and small_ok(lab, payload)

    # a second restart while one runs is refused; the first completes
    first = lab.edge_ns.popen(
        [*RAMP, "edge", "restart", "--data-dir", str(lab.data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=lab.env,
    )
    assert first.stdout is not None
    assert b"starting the successor" in first.stdout.readline()
    second = restart(lab)
    _out, err = first.communicate(timeout=90)
    assert first.returncode == 0, err.decode() + lab.log_tails()
    assert second.returncode != 0 and "already in progress" in second.stderr, second
    lab.edge.wait_exit(60)
    assert small_ok(lab, payload)


def test_sigquit_restarts_and_sigterm_drains(bare_lab: Lab, payload: Payload) -> None:
    lab = bare_lab
    start(lab, "--drain-timeout", "20")
    assert lab.edge is not None
    old = lab.edge.pid
    # an open flow when the signal comes: it finishes on the old process
    code, flow = lab.socks5(ORIGIN, ECHO_PORT)
    assert code == 0
    os.kill(old, signal.SIGQUIT)
    wait_until(
        lambda: "SIGQUIT restart: successor pid" in lab.edge.stderr(),  # type: ignore[union-attr]
        DEADLINE,
        what="the SIGQUIT successor",
    )
    assert lab.edge.alive()  # draining: the open flow holds it
    flow.sendall(b"still here")
    assert flow.recv(100) == b"still here"
    flow.close()
    lab.edge.wait_exit(30)
    assert lab.edge.returncode == 0
    assert small_ok(lab, payload)
    found = re.search(r"SIGQUIT restart: successor pid (\d+)", lab.edge.stderr())
    assert found
    new = int(found.group(1))
    # SIGTERM: stop accepting, let the open flow finish, exit
    code, flow = lab.socks5(ORIGIN, ECHO_PORT)
    assert code == 0
    os.kill(new, signal.SIGTERM)
    wait_until(lambda: not _accepts(lab), DEADLINE, what="the edge to stop accepting after SIGTERM")
    assert alive(new)
    flow.sendall(b"draining")
    assert flow.recv(100) == b"draining"
    flow.close()
    wait_until(lambda: not alive(new), DEADLINE, what="the drained edge to exit")


def _accepts(lab: Lab) -> bool:
    try:
        lab.connect_socks(timeout=2).close()
    except OSError:
        return False
    return True


@pytest.mark.slow
def test_connector_restarts_under_load_keep_the_tunnel_up(bare_lab: Lab, payload: Payload) -> None:
    lab = bare_lab
    start(lab)
    assert lab.connectors
    got, sampler, pids, newest = restarts_under_load(
        lab, payload, restart_connector, lab.connectors[0].pid
    )
    assert got["flows_failed"] == 0, got
    assert got["dns_failed"] == 0, got
    assert got["downloads"] == {"ok": DOWNLOADS}, got
    assert not sampler.errors, sampler.errors[:5]
    assert len(sampler.samples) > 50 and min(sampler.samples) >= HA, sampler.samples
    assert len(pids) == 4
    wait_until(lambda: not any(alive(p) for p in pids - {newest}), 60, what="old connectors")
    # the edge moves each UDP session to the successor's connections before the old
    # connector goes (make before break): nothing is lost
    assert got["udp_lost"] == 0 and got["udp_sent"] > 10_000, got
