from __future__ import annotations

import logging
import socket
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from ramp.cli import main
from ramp.config import ConnectorConfig, EdgeConfig
from ramp.store.db import Store
from ramp.tunnel.token import Token


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "home"
    monkeypatch.setenv("RAMP_HOME", str(d))
    monkeypatch.delenv("RAMP_TUNNEL_TOKEN", raising=False)
    return d


def ramp(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_tunnel_lifecycle(home: Path) -> None:
    r = ramp("tunnel", "create", "office")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("Created tunnel office with id ")
    tunnel_id = r.stdout.split()[5]
    assert ramp("tunnel", "create", "lab").exit_code == 0

    r = ramp("tunnel", "route", "ip", "add", "10.1.2.3/16", "office")
    assert r.exit_code == 0 and "10.1.0.0/16" in r.stdout
    assert ramp("tunnel", "route", "ip", "add", "2001:db8::/32", "office").exit_code == 0
    assert ramp("tunnel", "route", "ip", "add", "192.0.2.0/24", "lab").exit_code == 0

    r = ramp("tunnel", "list")
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ID", "CREATED", "ROUTES", "ZONES"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert rows["office"][1] == tunnel_id
    assert rows["office"][3] == "10.1.0.0/16,2001:db8::/32"
    assert rows["lab"][3] == "192.0.2.0/24"

    r = ramp("tunnel", "route", "ip", "list")
    assert [ln.split() for ln in r.stdout.splitlines()] == [
        ["CIDR", "TUNNEL", "VNET", "PROXY"],
        ["10.1.0.0/16", "office", "default", "-"],
        ["192.0.2.0/24", "lab", "default", "-"],
        ["2001:db8::/32", "office", "default", "-"],
    ]

    r = ramp("tunnel", "route", "ip", "add", "198.51.100.0/24", "lab", "--proxy-protocol", "v2")
    assert r.exit_code == 0
    assert r.stdout.endswith("origins get a PROXY v2 header\n")
    r = ramp("tunnel", "route", "ip", "add", "198.18.0.0/24", "lab", "--proxy-protocol", "v3")
    assert r.exit_code == 2 and "v3" in r.output
    r = ramp("tunnel", "route", "ip", "list")
    assert ["198.51.100.0/24", "lab", "default", "v2"] in [
        ln.split() for ln in r.stdout.splitlines()
    ]
    r = ramp("policy", "test", "--to", "198.51.100.10:80")
    assert "routed to tunnel lab (198.51.100.0/24)" in r.stdout
    assert "origins get a PROXY v2 header" in r.stdout
    assert ramp("tunnel", "route", "ip", "delete", "198.51.100.0/24").exit_code == 0

    r = ramp("tunnel", "route", "ip", "delete", "10.1.0.0/16")
    assert r.exit_code == 0 and "10.1.0.0/16" in r.stdout

    r = ramp("tunnel", "delete", "office")
    assert r.exit_code == 0 and tunnel_id in r.stdout
    r = ramp("tunnel", "route", "ip", "list")
    assert [ln.split() for ln in r.stdout.splitlines()] == [
        ["CIDR", "TUNNEL", "VNET", "PROXY"],
        ["192.0.2.0/24", "lab", "default", "-"],
    ]
    assert [ln.split()[0] for ln in ramp("tunnel", "list").stdout.splitlines()] == ["NAME", "lab"]
    # The store went where RAMP_HOME points.
    assert (home / "ramp.db").exists()


def test_token_prints_only_the_token(home: Path) -> None:
    ramp("tunnel", "create", "office")
    r = ramp("tunnel", "token", "office")
    assert r.exit_code == 0
    assert len(r.stdout.splitlines()) == 1
    tok = Token.decode(r.stdout.strip())
    assert tok.edges == ["127.0.0.1:7844"]
    with Store(home) as store:
        t = store.get_tunnel("office")
        assert t is not None and tok.tunnel_id == t.id
        assert store.verify_secret(t.id, tok.secret)
        assert tok.ca_fingerprint == store.edge_identity().ca_fingerprint
    # Printing again gives the same token.
    assert ramp("tunnel", "token", "office").stdout == r.stdout

    r = ramp(
        "tunnel", "token", "office", "--edge", "192.0.2.1:7844", "--edge", "[2001:db8::1]:7844"
    )
    assert Token.decode(r.stdout.strip()).edges == ["192.0.2.1:7844", "[2001:db8::1]:7844"]


def test_data_dir_flag_beats_ramp_home(home: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert ramp("tunnel", "create", "x", "--data-dir", str(other)).exit_code == 0
    assert (other / "ramp.db").exists()
    assert not (home / "ramp.db").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["tunnel", "delete", "ghost"], "unknown tunnel 'ghost'"),
        (["tunnel", "token", "ghost"], "unknown tunnel 'ghost'"),
        (["tunnel", "create", "bad name"], "bad tunnel name"),
        (["tunnel", "route", "ip", "add", "10.0.0.0/33", "office"], "bad CIDR"),
        (["tunnel", "route", "ip", "add", "10.0.0.0/8", "ghost"], "unknown tunnel 'ghost'"),
        (["tunnel", "route", "ip", "add", "192.0.2.0/24", "office"], "already exists"),
        (["tunnel", "route", "ip", "delete", "203.0.113.0/24"], "no route 203.0.113.0/24"),
        (["tunnel", "route", "ip", "add", "10.0.0.0/8", "office", "--vnet", "ghost"], "unknown"),
        (["tunnel", "create", "office"], "already exists"),
        (["tunnel", "token", "office", "--edge", "nohost"], "expected HOST:PORT"),
    ],
)
def test_errors_exit_2_with_a_message(home: Path, args: list[str], message: str) -> None:
    ramp("tunnel", "create", "office")
    ramp("tunnel", "route", "ip", "add", "192.0.2.0/24", "office")
    r = ramp(*args)
    assert r.exit_code == 2
    assert message in r.stderr
    assert "Traceback" not in r.output
    assert r.stdout == ""


@pytest.mark.parametrize("role, model", [("edge", EdgeConfig), ("connector", ConnectorConfig)])
def test_config_default_is_commented_yaml_of_the_defaults(
    home: Path, tmp_path: Path, role: str, model: type[EdgeConfig | ConnectorConfig]
) -> None:
    r = ramp("config", "default", "--role", role)
    assert r.exit_code == 0
    data = yaml.safe_load(r.stdout)
    assert set(data) == set(model.model_fields)
    assert data["data_dir"] == "~/.local/share/ramp"
    loaded = model(**data)
    exclude = {"data_dir"}
    assert loaded.model_dump(exclude=exclude) == model().model_dump(exclude=exclude)
    # Every key is preceded by its description.
    lines = r.stdout.splitlines()
    for name, field in model.model_fields.items():
        i = next(i for i, ln in enumerate(lines) if ln.startswith(f"{name}:"))
        assert lines[i - 1].startswith("# ")
        assert (field.description or "").split()[0] in "\n".join(lines[max(0, i - 3) : i])


class Recorder:
    def __init__(self, code: int = 0) -> None:
        self.code = code
        self.calls: list[Any] = []

    def __call__(self, *args: Any) -> int:
        self.calls.append(args)
        return self.code


@pytest.fixture
def fake_roles(monkeypatch: pytest.MonkeyPatch) -> dict[str, Recorder]:
    recs = {"edge": Recorder(0), "connector": Recorder(3), "up": Recorder(0)}
    for mod, fn in (("edge", "run_edge"), ("connector", "run_connector"), ("up", "run_up")):
        m = types.ModuleType(f"ramp.{mod}")
        setattr(m, fn, recs[mod])
        monkeypatch.setitem(sys.modules, f"ramp.{mod}", m)
    return recs


def test_edge_flags_beat_file_beat_defaults(
    home: Path, tmp_path: Path, fake_roles: dict[str, Recorder]
) -> None:
    cfg_file = tmp_path / "edge.yaml"
    cfg_file.write_text(
        "socks5-listen: 127.0.0.1:1999\n"
        "http_listen: 'off'\n"
        "max_flows: 7\n"
        "allow_direct_egress: true\n"
    )
    r = ramp(
        "edge",
        "--config",
        str(cfg_file),
        "--socks5-listen",
        "127.0.0.1:2000",
        "--no-allow-direct-egress",
        "--user",
        "alice:s3:cret",
        "--user",
        "bob:pw",
        "--log-level",
        "debug",
    )
    assert r.exit_code == 0, r.output
    cfg, reload = fake_roles["edge"].calls[0]
    assert isinstance(cfg, EdgeConfig)
    assert reload() == cfg  # SIGHUP re-reads the same file with the same flags
    assert cfg.socks5_listen == "127.0.0.1:2000"  # flag beats file
    assert cfg.http_listen == "off"  # file beats default
    assert cfg.max_flows == 7
    assert cfg.allow_direct_egress is False
    assert cfg.users == {"alice": "s3:cret", "bob": "pw"}
    assert cfg.log_level == "debug"
    assert cfg.tunnel_listen == "0.0.0.0:7844"  # default
    assert cfg.data_dir == home


def test_edge_config_errors(home: Path, tmp_path: Path, fake_roles: dict[str, Recorder]) -> None:
    r = ramp("edge", "--socks5-listen", "nonsense")
    assert r.exit_code == 2 and "socks5_listen" in r.stderr
    r = ramp("edge", "--user", "nocolon")
    assert r.exit_code == 2 and "NAME:PASSWORD" in r.stderr
    r = ramp("edge", "--config", str(tmp_path / "missing.yaml"))
    assert r.exit_code == 2 and "cannot read config file" in r.stderr
    (tmp_path / "bad.yaml").write_text("no_such_key: 1\n")
    r = ramp("edge", "--config", str(tmp_path / "bad.yaml"))
    assert r.exit_code == 2 and "no_such_key" in r.stderr
    assert fake_roles["edge"].calls == []
    assert "Traceback" not in r.output


def test_tunnel_run_token_from_flag_or_env(
    home: Path, fake_roles: dict[str, Recorder], tmp_path: Path
) -> None:
    ramp("tunnel", "create", "office")
    token = ramp("tunnel", "token", "office").stdout.strip()

    r = ramp("tunnel", "run", "--token", token, "--ha-connections", "2", "--edge", "192.0.2.1:7844")
    assert r.exit_code == 3  # the connector's return code
    (cfg,) = fake_roles["connector"].calls[0]
    assert isinstance(cfg, ConnectorConfig)
    assert cfg.token == token and cfg.ha_connections == 2 and cfg.edge == ["192.0.2.1:7844"]
    assert cfg.grace_period == 30.0

    r = ramp("tunnel", "run", env={"RAMP_TUNNEL_TOKEN": token})
    assert r.exit_code == 3
    assert fake_roles["connector"].calls[1][0].token == token

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"token: {token}\ngrace_period: 5\n")
    r = ramp("tunnel", "run", "--config", str(cfg_file), "--grace-period", "7")
    assert r.exit_code == 3
    assert fake_roles["connector"].calls[2][0].grace_period == 7.0


def test_tunnel_run_token_from_a_file(
    home: Path, fake_roles: dict[str, Recorder], tmp_path: Path
) -> None:
    ramp("tunnel", "create", "office")
    token = ramp("tunnel", "token", "office").stdout.strip()
    f = tmp_path / "token"
    f.write_text(f"\n  {token}\n")
    f.chmod(0o600)
    r = ramp("tunnel", "run", "--token-file", str(f))
    assert r.exit_code == 3, r.output  # the connector's return code
    (cfg,) = fake_roles["connector"].calls[0]
    assert cfg.token == token
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"token_file: {f}\n")
    assert ramp("tunnel", "run", "--config", str(cfg_file)).exit_code == 3
    assert fake_roles["connector"].calls[1][0].token == token


def test_tunnel_run_refuses_a_loose_missing_or_doubled_token_file(
    home: Path, fake_roles: dict[str, Recorder], tmp_path: Path
) -> None:
    ramp("tunnel", "create", "office")
    token = ramp("tunnel", "token", "office").stdout.strip()
    f = tmp_path / "token"
    f.write_text(token)
    f.chmod(0o644)
    r = ramp("tunnel", "run", "--token-file", str(f))
    assert r.exit_code == 2
    assert "accessible by group or others (mode 0644)" in r.stderr
    assert f"chmod 600 {f}" in r.stderr
    f.chmod(0o620)
    assert ramp("tunnel", "run", "--token-file", str(f)).exit_code == 2

    f.chmod(0o600)
    r = ramp("tunnel", "run", "--token-file", str(f), env={"RAMP_TUNNEL_TOKEN": token})
    assert r.exit_code == 2 and "both a token and a token file" in r.stderr
    r = ramp("tunnel", "run", "--token-file", str(f), "--token", token)
    assert r.exit_code == 2 and "both a token and a token file" in r.stderr

    r = ramp("tunnel", "run", "--token-file", str(tmp_path / "nope"))
    assert r.exit_code == 2 and "cannot read token file" in r.stderr and "nope" in r.stderr
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    r = ramp("tunnel", "run", "--token-file", str(empty))
    assert r.exit_code == 2 and "is empty" in r.stderr
    assert fake_roles["connector"].calls == []
    assert "Traceback" not in r.output


def test_tunnel_run_bad_or_missing_token(home: Path, fake_roles: dict[str, Recorder]) -> None:
    r = ramp("tunnel", "run")
    assert r.exit_code == 2 and "no token" in r.stderr
    ramp("tunnel", "create", "office")
    token = ramp("tunnel", "token", "office").stdout.strip()
    r = ramp("tunnel", "run", "--token", token[:-6])
    assert r.exit_code == 2 and "altered or truncated" in r.stderr
    r = ramp("tunnel", "run", "--token", "not*a*token")
    assert r.exit_code == 2 and "not base64" in r.stderr
    assert fake_roles["connector"].calls == []


def test_up_gets_data_dir_and_log_level(
    home: Path, tmp_path: Path, fake_roles: dict[str, Recorder]
) -> None:
    r = ramp("up", "--data-dir", str(tmp_path / "d"), "--log-level", "warning")
    assert r.exit_code == 0
    assert fake_roles["up"].calls == [(tmp_path / "d", "warning")]
    ramp("up")
    assert fake_roles["up"].calls[1] == (home, "info")


def test_every_command_takes_data_dir_and_log_level() -> None:
    commands = [
        ["edge"],
        ["up"],
        ["tunnel", "create"],
        ["tunnel", "list"],
        ["tunnel", "delete"],
        ["tunnel", "token"],
        ["tunnel", "run"],
        ["tunnel", "route", "ip", "add"],
        ["tunnel", "route", "ip", "list"],
        ["tunnel", "route", "ip", "delete"],
        ["tunnel", "route", "dns", "add"],
        ["tunnel", "route", "dns", "list"],
        ["tunnel", "route", "dns", "delete"],
        ["config", "default"],
    ]
    for cmd in commands:
        r = ramp(*cmd, "--help")
        assert r.exit_code == 0, cmd
        assert "--data-dir" in r.stdout and "--log-level" in r.stdout, cmd


def test_contract_flags_exist() -> None:
    edge_help = ramp("edge", "--help").stdout
    for flag in (
        "--config",
        "--tunnel-listen",
        "--socks5-listen",
        "--http-listen",
        "--metrics-listen",
    ):
        assert flag in edge_help
    run_help = ramp("tunnel", "run", "--help").stdout
    for flag in ("--token", "--ha-connections", "--metrics-listen", "--grace-period", "--config"):
        assert flag in run_help


def test_dns_route_lifecycle(home: Path) -> None:
    assert ramp("tunnel", "create", "office").exit_code == 0
    assert ramp("tunnel", "create", "lab").exit_code == 0
    r = ramp("tunnel", "route", "dns", "add", "Corp.Example.", "office")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "Added DNS route corp.example -> tunnel office"
    assert ramp("tunnel", "route", "dns", "add", "lab.example", "lab").exit_code == 0
    assert ramp("tunnel", "route", "dns", "add", "bücher.example", "office").exit_code == 0

    r = ramp("tunnel", "route", "dns", "list")
    assert [ln.split() for ln in r.stdout.splitlines()] == [
        ["ZONE", "TUNNEL"],
        ["corp.example", "office"],
        ["lab.example", "lab"],
        ["xn--bcher-kva.example", "office"],
    ]
    rows = {ln.split()[0]: ln.split() for ln in ramp("tunnel", "list").stdout.splitlines()[1:]}
    assert rows["office"][3:] == ["-", "corp.example,xn--bcher-kva.example"]
    assert rows["lab"][3:] == ["-", "lab.example"]

    r = ramp("tunnel", "route", "dns", "delete", "CORP.example")
    assert r.exit_code == 0 and r.stdout.strip() == "Deleted DNS route corp.example"
    assert ramp("tunnel", "delete", "lab").exit_code == 0
    r = ramp("tunnel", "route", "dns", "list")
    assert [ln.split() for ln in r.stdout.splitlines()] == [
        ["ZONE", "TUNNEL"],
        ["xn--bcher-kva.example", "office"],
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["tunnel", "route", "dns", "add", "a..b", "office"], "bad DNS zone 'a..b'"),
        (["tunnel", "route", "dns", "add", "lab.example", "ghost"], "unknown tunnel 'ghost'"),
        (["tunnel", "route", "dns", "add", "corp.example.", "office"], "already exists"),
        (["tunnel", "route", "dns", "delete", "lab.example"], "no DNS route lab.example"),
    ],
)
def test_dns_route_errors_exit_2_with_a_message(home: Path, args: list[str], message: str) -> None:
    ramp("tunnel", "create", "office")
    ramp("tunnel", "route", "dns", "add", "corp.example", "office")
    r = ramp(*args)
    assert r.exit_code == 2
    assert r.stdout == ""
    assert r.stderr.startswith("ramp: error: ") and message in r.stderr


def test_dns_flags_exist() -> None:
    edge_help = ramp("edge", "--help").stdout
    for flag in ("--dns-listen", "--dns-upstream", "--dns-timeout", "--udp-idle-timeout"):
        assert flag in edge_help
    run_help = ramp("tunnel", "run", "--help").stdout
    for flag in ("--dns-resolver", "--udp-idle-timeout"):
        assert flag in run_help


def test_dns_settings_from_flags_and_their_errors(
    home: Path, fake_roles: dict[str, Recorder]
) -> None:
    r = ramp(
        "edge",
        "--dns-listen",
        "0.0.0.0:5353",
        "--dns-upstream",
        "[2001:db8::53]:5300",
        "--dns-timeout",
        "2.5",
        "--udp-idle-timeout",
        "1",
    )
    assert r.exit_code == 0, r.output
    cfg, _ = fake_roles["edge"].calls[0]
    assert (cfg.dns_listen, cfg.dns_upstream) == ("0.0.0.0:5353", "[2001:db8::53]:5300")
    assert (cfg.dns_timeout, cfg.udp_idle_timeout) == (2.5, 1.0)
    assert EdgeConfig().dns_listen == "off" and EdgeConfig().dns_upstream == ""

    for args, key in (
        (["--dns-listen", "nonsense"], "dns_listen"),
        (["--dns-upstream", "ns.example:53"], "dns_upstream"),
        (["--dns-timeout", "0"], "dns_timeout"),
    ):
        r = ramp("edge", *args)
        assert r.exit_code == 2 and key in r.stderr, args
    assert "expected an IP address" in ramp("edge", "--dns-upstream", "ns.example").stderr

    assert ConnectorConfig(dns_resolver="192.0.2.53").dns_resolver == "192.0.2.53"
    assert ConnectorConfig().dns_resolver == "" and ConnectorConfig().udp_idle_timeout == 210.0
    with pytest.raises(ValueError, match="expected an IP address"):
        ConnectorConfig(dns_resolver="resolver.internal")


def test_restart_without_a_running_process_says_so(home: Path, tmp_path: Path) -> None:
    for role, what in (("edge", "edge"), ("tunnel", "connector")):
        r = ramp(role, "restart", "--data-dir", str(tmp_path))
        assert r.exit_code == 1
        assert f"no {what} runs with data directory {tmp_path}" in r.output
    # a stale socket file nobody answers on
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "restart.sock"))
    stale.close()
    r = ramp("edge", "restart", "--data-dir", str(tmp_path), "--timeout", "2")
    assert r.exit_code == 1 and "cannot reach the edge" in r.output
