"""`ramp client create/list/revoke/token`: what an operator types and sees."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from ramp.cli import main
from ramp.client_token import decode_client_token
from ramp.policy.identities import ClientCredentials
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
    return d


def ramp(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_client_lifecycle(home: Path) -> None:
    r = ramp("client", "create", "alice.laptop")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [
        "Created client alice.laptop",
        "Get its client token with: ramp client token alice.laptop --edge EDGE_HOST:443",
    ]
    assert ramp("client", "create", "bob").exit_code == 0

    r = ramp("client", "list")
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATUS", "CREATED", "REVOKED"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
    assert rows["alice.laptop"][1] == "active" and rows["alice.laptop"][3] == "-"
    assert rows["alice.laptop"][2].endswith("Z")

    r = ramp("client", "revoke", "alice.laptop")
    assert r.exit_code == 0 and r.stdout == "Revoked client alice.laptop\n"
    r = ramp("client", "revoke", "alice.laptop")
    assert r.exit_code == 0 and r.stdout.startswith("Client alice.laptop was already revoked")
    rows = {ln.split()[0]: ln.split() for ln in ramp("client", "list").stdout.splitlines()[1:]}
    assert rows["alice.laptop"][1] == "revoked" and rows["alice.laptop"][3].endswith("Z")
    assert rows["bob"][1] == "active"


def test_client_token_prints_only_the_token(home: Path) -> None:
    ramp("client", "create", "alice")
    r = ramp("client", "token", "alice")
    assert r.exit_code == 0
    assert len(r.stdout.splitlines()) == 1
    tok = decode_client_token(r.stdout.strip())
    assert tok.name == "alice" and tok.edges == ["127.0.0.1:443"]
    with Store(home) as store:
        assert tok.ca_fingerprint == store.edge_identity().ca_fingerprint
        assert ClientCredentials(store.verify_client).check_bearer(tok.bearer) == "alice"
    assert ramp("client", "token", "alice").stdout == r.stdout  # printed again: the same

    r = ramp("client", "token", "alice", "--edge", "192.0.2.1:443", "--edge", "[2001:db8::1]:4433")
    assert decode_client_token(r.stdout.strip()).edges == ["192.0.2.1:443", "[2001:db8::1]:4433"]


def test_data_dir_flag(home: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert ramp("client", "create", "x", "--data-dir", str(other)).exit_code == 0
    assert "x" in ramp("client", "list", "--data-dir", str(other)).stdout
    assert ramp("client", "list").stdout.splitlines()[1:] == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["client", "create", "bad name"], "bad client name"),
        (["client", "create", "alice"], "a client named 'alice' already exists"),
        (["client", "create", "gone"], "revoked names are not reused"),
        (["client", "revoke", "ghost"], "unknown client 'ghost'"),
        (["client", "token", "ghost"], "unknown client 'ghost'"),
        (["client", "token", "gone"], "client 'gone' was revoked"),
    ],
)
def test_errors_exit_2_with_a_message(home: Path, args: list[str], message: str) -> None:
    ramp("client", "create", "alice")
    ramp("client", "create", "gone")
    ramp("client", "revoke", "gone")
    r = ramp(*args)
    assert r.exit_code == 2
    assert r.stdout == ""
    assert r.stderr.startswith("ramp: error: ") and message in r.stderr


@pytest.mark.parametrize("edge", ["0.0.0.0:443", "[::]:443", "nohost"])
def test_a_token_never_carries_an_address_nobody_can_dial(home: Path, edge: str) -> None:
    ramp("client", "create", "alice")
    ramp("tunnel", "create", "office")
    for args in (["client", "token", "alice"], ["tunnel", "token", "office"]):
        r = CliRunner().invoke(main, [*args, "--edge", edge])
        assert r.exit_code == 2 and r.stdout == ""
        assert "Invalid value for '--edge'" in r.stderr


def test_the_client_token_is_not_a_connector_token(home: Path) -> None:
    ramp("client", "create", "alice")
    token = ramp("client", "token", "alice").stdout.strip()
    with pytest.raises(ValueError, match="this is a client token"):
        Token.decode(token)
    r = CliRunner().invoke(main, ["tunnel", "run", "--token", token])
    assert r.exit_code == 2
    assert "invalid token: this is a client token" in r.stderr
