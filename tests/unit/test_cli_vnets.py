"""`ramp vnet ...` and the `--vnet` flag of `ramp tunnel route ip`, as an operator sees them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from ramp.cli import main
from ramp.store.db import Store


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


def ok(*args: str) -> str:
    r = ramp(*args)
    assert r.exit_code == 0, r.output
    return r.stdout


def rows(text: str) -> list[list[str]]:
    return [ln.split() for ln in text.splitlines()]


def test_two_tenants_route_the_same_network_to_their_own_tunnels(home: Path) -> None:
    assert rows(ok("vnet", "list")) == [["NAME", "ROUTES", "IDENTITIES"], ["default", "0", "-"]]
    ok("tunnel", "create", "a-tun")
    ok("tunnel", "create", "b-tun")
    assert ok("vnet", "add", "tenant-a") == "Added virtual network tenant-a\n"
    ok("vnet", "add", "tenant-b")
    out = ok("tunnel", "route", "ip", "add", "198.51.100.0/24", "a-tun", "--vnet", "tenant-a")
    assert out == "Added route 198.51.100.0/24 -> tunnel a-tun in virtual network tenant-a\n"
    ok("tunnel", "route", "ip", "add", "198.51.100.9/24", "b-tun", "--vnet", "tenant-b")
    out = ok("tunnel", "route", "ip", "add", "10.0.0.0/8", "a-tun")
    assert out == "Added route 10.0.0.0/8 -> tunnel a-tun in virtual network default\n"

    assert rows(ok("tunnel", "route", "ip", "list")) == [
        ["CIDR", "TUNNEL", "VNET", "PROXY"],
        ["10.0.0.0/8", "a-tun", "default", "-"],
        ["198.51.100.0/24", "a-tun", "tenant-a", "-"],
        ["198.51.100.0/24", "b-tun", "tenant-b", "-"],
    ]
    assert rows(ok("tunnel", "route", "ip", "list", "--vnet", "tenant-b")) == [
        ["CIDR", "TUNNEL", "VNET", "PROXY"],
        ["198.51.100.0/24", "b-tun", "tenant-b", "-"],
    ]
    # `ramp tunnel list` still works and tells the vnet of routes outside default.
    tunnels = {row[0]: row for row in rows(ok("tunnel", "list"))[1:]}
    assert tunnels["a-tun"][3] == "10.0.0.0/8,198.51.100.0/24@tenant-a"
    assert tunnels["b-tun"][3] == "198.51.100.0/24@tenant-b"

    ok("vnet", "assign", "tenant-a", "--identity", "alice")
    ok("vnet", "assign", "tenant-a", "--identity", "carol")
    ok("vnet", "assign", "tenant-b", "--identity", "bob")
    assert rows(ok("vnet", "list")) == [
        ["NAME", "ROUTES", "IDENTITIES"],
        ["default", "1", "-"],
        ["tenant-a", "1", "alice,carol"],
        ["tenant-b", "1", "bob"],
    ]

    out = ok("tunnel", "route", "ip", "delete", "198.51.100.0/24", "--vnet", "tenant-b")
    assert out == "Deleted route 198.51.100.0/24 in virtual network tenant-b\n"
    assert ok("vnet", "unassign", "--identity", "bob") == (
        "Unassigned identity bob from virtual network tenant-b\n"
    )
    assert ok("vnet", "delete", "tenant-b") == "Deleted virtual network tenant-b\n"
    assert [r[0] for r in rows(ok("vnet", "list"))] == ["NAME", "default", "tenant-a"]
    # tenant-a's route was untouched by deleting tenant-b's.
    listed = rows(ok("tunnel", "route", "ip", "list"))
    assert ["198.51.100.0/24", "a-tun", "tenant-a", "-"] in listed


def test_assign_moves_an_identity_and_says_from_where(home: Path) -> None:
    ok("vnet", "add", "t1")
    ok("vnet", "add", "t2")
    assert ok("vnet", "assign", "t1", "--identity", "alice") == (
        "Assigned identity alice to virtual network t1\n"
    )
    assert ok("vnet", "assign", "t2", "--identity", "alice") == (
        "Assigned identity alice to virtual network t2 (was t1)\n"
    )
    with Store(home) as store:
        assert store.vnet_assignments() == {"alice": "t2"}


def test_route_delete_without_vnet_means_default(home: Path) -> None:
    ok("tunnel", "create", "a")
    ok("vnet", "add", "t1")
    ok("tunnel", "route", "ip", "add", "10.0.0.0/8", "a", "--vnet", "t1")
    r = ramp("tunnel", "route", "ip", "delete", "10.0.0.0/8")
    assert r.exit_code == 2
    assert "no route 10.0.0.0/8 in virtual network 'default'" in r.stderr
    assert rows(ok("tunnel", "route", "ip", "list"))[1:] == [["10.0.0.0/8", "a", "t1", "-"]]


@pytest.mark.parametrize(
    "args, message",
    [
        (["vnet", "add", "used"], "a virtual network named 'used' already exists"),
        (["vnet", "add", "default"], "already exists"),
        (["vnet", "add", "bad name"], "bad virtual network name"),
        (["vnet", "delete", "default"], "the 'default' virtual network cannot be deleted"),
        (["vnet", "delete", "ghost"], "unknown virtual network 'ghost'"),
        (["vnet", "delete", "used"], "virtual network 'used' is in use (1 route and 1 assigned"),
        (["vnet", "assign", "ghost", "--identity", "bob"], "unknown virtual network 'ghost'"),
        (["vnet", "assign", "used", "--identity", "a:b"], "bad identity"),
        (["vnet", "unassign", "--identity", "bob"], "'bob' is not assigned"),
        (
            ["tunnel", "route", "ip", "add", "10.0.0.0/8", "office", "--vnet", "ghost"],
            "unknown virtual network 'ghost'",
        ),
        (
            ["tunnel", "route", "ip", "add", "10.0.0.0/8", "office", "--vnet", "used"],
            "route 10.0.0.0/8 already exists (tunnel 'office', virtual network 'used')",
        ),
        (
            ["tunnel", "route", "ip", "delete", "10.0.0.0/8", "--vnet", "ghost"],
            "unknown virtual network 'ghost'",
        ),
        (["tunnel", "route", "ip", "list", "--vnet", "ghost"], "unknown virtual network 'ghost'"),
    ],
)
def test_bad_input_is_refused_with_a_message_and_changes_nothing(
    home: Path, args: list[str], message: str
) -> None:
    ok("tunnel", "create", "office")
    ok("vnet", "add", "used")
    ok("tunnel", "route", "ip", "add", "10.0.0.0/8", "office", "--vnet", "used")
    ok("vnet", "assign", "used", "--identity", "alice")
    before = (ok("vnet", "list"), ok("tunnel", "route", "ip", "list"))
    with Store(home) as store:
        version = store.data_version()

    r = ramp(*args)
    assert r.exit_code == 2
    assert message in r.stderr
    assert "Traceback" not in r.output
    assert r.stdout == ""

    assert (ok("vnet", "list"), ok("tunnel", "route", "ip", "list")) == before
    with Store(home) as store:
        assert store.data_version() == version


def test_identity_is_required(home: Path) -> None:
    r = ramp("vnet", "assign", "default")
    assert r.exit_code == 2 and "Missing option '--identity'" in r.stderr
