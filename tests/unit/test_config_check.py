"""`ramp config check FILE`, and the same messages from `ramp edge|tunnel run --config FILE`."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from ramp.cli import main


def ramp(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RAMP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAMP_TUNNEL_TOKEN", raising=False)
    return tmp_path / "ramp.yaml"


@pytest.mark.parametrize(
    "text, role",
    [
        ("socks5_listen: 127.0.0.1:1999\nusers: {alice: pw}\n", "edge"),
        ("log_level: debug\nmetrics_listen: 'off'\n", "edge"),  # keys both roles have
        ("", "edge"),
        ("edge: [192.0.2.1:7844]\nha-connections: 2\n", "connector"),
    ],
)
def test_valid_file(cfg: Path, text: str, role: str) -> None:
    cfg.write_text(text)
    r = ramp("config", "check", str(cfg))
    assert r.exit_code == 0, r.output
    assert r.stdout == f"{cfg}: valid {role} configuration\n"
    assert r.stderr == ""


def test_every_problem_one_line_with_its_line(cfg: Path) -> None:
    cfg.write_text(
        "max_flows: lots\n"
        "handshake_timeout: -1\n"
        "# a comment\n"
        "socks5_lisen: 127.0.0.1:1\n"
        "users:\n"
        "  alice: {nested: map}\n"
    )
    r = ramp("config", "check", str(cfg))
    assert r.exit_code == 2
    assert r.stdout == ""
    assert r.stderr.splitlines() == [
        f"{cfg}:1: max_flows: Input should be a valid integer, unable to parse string as an "
        "integer",
        f"{cfg}:2: handshake_timeout: Input should be greater than 0",
        f"{cfg}:4: socks5_lisen: unknown key; did you mean 'socks5_listen'?",
        f"{cfg}:6: users.alice: Input should be a valid string",
    ]


def test_bad_yaml(cfg: Path) -> None:
    cfg.write_text("max_flows: 1\nusers:\n  alice: pw\n bob: pw\n")
    r = ramp("config", "check", str(cfg))
    assert r.exit_code == 2
    assert r.stderr.startswith(f"{cfg}:4: invalid YAML: ")


def test_role_flag_beats_detection(cfg: Path) -> None:
    cfg.write_text("log_level: info\nmax_flows: 10\n")
    r = ramp("config", "check", str(cfg), "--role", "connector")
    assert r.exit_code == 2
    assert r.stderr == f"{cfg}:2: max_flows: unknown key\n"


def test_keys_of_both_roles_need_role(cfg: Path) -> None:
    cfg.write_text("token: abc\nmax_flows: 10\n")
    r = ramp("config", "check", str(cfg))
    assert r.exit_code == 2
    assert r.stderr == (
        f"{cfg}: has edge keys (max_flows) and connector keys (token); "
        "pass --role edge or --role connector\n"
    )
    r = ramp("config", "check", str(cfg), "--role", "edge")
    assert r.exit_code == 2
    assert r.stderr == f"{cfg}:1: token: unknown key\n"


def test_connector_token_must_decode(cfg: Path) -> None:
    cfg.write_text("grace_period: 3\ntoken: not*a*token\n")
    r = ramp("config", "check", str(cfg))
    assert r.exit_code == 2
    assert r.stderr.startswith(f"{cfg}:2: token: invalid token: ")


def test_missing_file(cfg: Path) -> None:
    r = ramp("config", "check", str(cfg))
    assert r.exit_code == 2
    assert r.stderr == f"cannot read config file {cfg}: No such file or directory\n"


@pytest.fixture
def no_roles(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Stands in for the roles, so that a config that passes would show up as a call."""
    calls: list[object] = []
    for mod, fn in (("edge", "run_edge"), ("connector", "run_connector")):
        m = types.ModuleType(f"ramp.{mod}")
        setattr(m, fn, lambda cfg: calls.append(cfg) or 0)
        monkeypatch.setitem(sys.modules, f"ramp.{mod}", m)
    return calls


@pytest.mark.parametrize(
    "command, text",
    [
        (["edge"], "tunnel_listen: 0.0.0.0:7844\nmax_flows: 0\nbogus: 1\n"),
        (["edge"], "max_flows: 1\nusers: [alice,\n"),
        (["tunnel", "run"], "token: x\nha_connections: 0\ngrace-period: soon\n"),
    ],
)
def test_role_commands_reject_with_the_checks_lines(
    cfg: Path, no_roles: list[object], command: list[str], text: str
) -> None:
    cfg.write_text(text)
    check = ramp("config", "check", str(cfg))
    r = ramp(*command, "--config", str(cfg))
    assert r.exit_code == check.exit_code == 2
    assert no_roles == []
    lines = check.stderr.splitlines()
    assert lines and all(ln.startswith(f"{cfg}:") for ln in lines)
    assert r.stderr.splitlines() == [f"ramp: error: {ln}" for ln in lines]
    assert "Traceback" not in r.output


def test_edge_config_error_message(cfg: Path, no_roles: list[object]) -> None:
    cfg.write_text("tunnel_listen: 0.0.0.0:7844\nmax_flows: 0\nbogus: 1\n")
    r = ramp("edge", "--config", str(cfg))
    assert r.exit_code == 2
    assert r.stderr.splitlines() == [
        f"ramp: error: {cfg}:2: max_flows: Input should be greater than 0",
        f"ramp: error: {cfg}:3: bogus: unknown key",
    ]


def test_flag_errors_are_not_blamed_on_the_file(cfg: Path, no_roles: list[object]) -> None:
    cfg.write_text("max_flows: 5\n")
    r = ramp("edge", "--config", str(cfg), "--max-flows", "0")
    assert r.exit_code == 2
    assert r.stderr == (
        "ramp: error: max_flows: Input should be greater than 0 (from the command line)\n"
    )
