"""The systemd units shipped in ramp.systemd: packaged, well-formed for systemd itself, and
running only commands and flags the real CLI has."""

from __future__ import annotations

import configparser
import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from ramp.cli import main
from ramp.onramps import registry
from ramp.systemd import DEFAULT_RAMP, UNITS, unit_text

ROOT = Path(__file__).resolve().parents[2]
SERVICES = [n for n in UNITS if n.endswith(".service")]
# What systemd-analyze says about a unit file it cannot read as written; other lines (no
# running manager, a user or directory missing on this machine) are about the machine.
SYNTAX = re.compile(
    r"Unknown (key|lvalue|section)|Failed to parse|Missing '='|bad unit file setting|"
    r"is not executable|not loaded, socket cannot be started|Refusing"
)


def ramp(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def parse(text: str) -> configparser.ConfigParser:
    # systemd allows a key more than once (a list, or a reset): keep the last like it does
    ini = configparser.ConfigParser(
        interpolation=None, strict=False, comment_prefixes=("#", ";"), delimiters=("=",)
    )
    ini.optionxform = str  # type: ignore[method-assign]  # systemd's keys are case-sensitive
    ini.read_string(text)
    return ini


def exec_start(name: str, text: str | None = None) -> list[str]:
    return shlex.split(parse(text or unit_text(name))["Service"]["ExecStart"])


@pytest.fixture
def wrapper(tmp_path: Path) -> Path:
    """A real ramp executable: this interpreter running the ramp under test."""
    path = tmp_path / "bin" / "ramp"
    path.parent.mkdir()
    path.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m ramp "$@"\n')
    path.chmod(0o755)
    return path


@pytest.fixture
def written(tmp_path: Path, wrapper: Path) -> Path:
    out = tmp_path / "units"
    result = ramp("systemd", "units", "--out", str(out), "--ramp", str(wrapper))
    assert result.exit_code == 0, result.output
    return out


def test_the_units_are_in_the_package_and_read_as_ini_sections() -> None:
    files = resources.files("ramp.systemd")
    for name in UNITS:
        assert files.joinpath(name).is_file(), name
        ini = parse(unit_text(name))
        main_section = "Socket" if name.endswith(".socket") else "Service"
        assert {"Unit", main_section, "Install"} <= set(ini.sections()), name
    assert parse(unit_text("ramp-edge.service"))["Service"]["Type"] == "notify-reload"
    assert parse(unit_text("ramp-connector.service"))["Service"]["Type"] == "notify"


def test_packaging_takes_every_unit_file(tmp_path: Path) -> None:
    # What a wheel or a non-editable install holds: setuptools' build_py with the project's
    # own configuration, in a copy of the tree (it writes metadata next to the sources)
    pytest.importorskip("setuptools")
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    build = tmp_path / "build"
    setup = [sys.executable, "-c", "import setuptools; setuptools.setup()", "-q"]
    subprocess.run(
        [*setup, "build_py", "--build-lib", str(build)],
        cwd=tree,
        check=True,
        capture_output=True,
        timeout=120,
    )
    shipped = {p.name for p in (build / "ramp" / "systemd").iterdir() if p.suffix != ".py"}
    assert shipped == set(UNITS)
    # and every unit file in the source tree is one ramp knows about
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = data["tool"]["setuptools"]["package-data"]["ramp.systemd"]
    in_tree = {p.name for p in (ROOT / "src/ramp/systemd").iterdir()}
    assert {n for n in in_tree if any(fnmatch.fnmatch(n, g) for g in globs)} == set(UNITS)


def test_printed_units_each_follow_a_file_line_with_ramp_s_path(wrapper: Path) -> None:
    result = ramp("systemd", "units", "--ramp", str(wrapper))
    assert result.exit_code == 0, result.output
    parts = re.split(r"^# file: (\S+)\n", result.stdout, flags=re.M)
    assert parts[0] == ""
    printed = dict(zip(parts[1::2], parts[2::2], strict=True))
    assert list(printed) == list(UNITS)
    for name in SERVICES:
        assert exec_start(name, printed[name])[0] == str(wrapper)
        assert DEFAULT_RAMP not in printed[name]
    assert printed["ramp-edge.socket"] == unit_text("ramp-edge.socket")


def test_written_units_differ_from_the_shipped_ones_only_in_ramp_s_path(
    written: Path, wrapper: Path
) -> None:
    assert sorted(p.name for p in written.iterdir()) == sorted(UNITS)
    for name in UNITS:
        text = (written / name).read_text()
        assert text == unit_text(name).replace(f"={DEFAULT_RAMP} ", f"={wrapper} "), name
    for name in SERVICES:
        assert exec_start(name, (written / name).read_text())[0] == str(wrapper)


def test_out_refuses_to_overwrite_without_force(written: Path, wrapper: Path) -> None:
    edited = written / "ramp-edge.service"
    edited.write_text("# the operator's own\n")
    result = ramp("systemd", "units", "--out", str(written), "--ramp", str(wrapper))
    assert result.exit_code == 2
    assert "--force" in result.stderr and "ramp-edge.service" in result.stderr
    assert edited.read_text() == "# the operator's own\n"  # nothing written, not even one

    result = ramp("systemd", "units", "--out", str(written), "--ramp", str(wrapper), "--force")
    assert result.exit_code == 0, result.output
    assert "[Service]" in edited.read_text()


def test_a_path_systemd_would_misread_is_refused(tmp_path: Path) -> None:
    for bad in ("bin/ramp", "/opt/my ramp/ramp", "/opt/ramp%i", "/opt/$ramp"):
        result = ramp("systemd", "units", "--out", str(tmp_path / "u"), "--ramp", bad)
        assert result.exit_code == 2, bad
        assert not (tmp_path / "u").exists()


def _systemd_version() -> int:
    out = subprocess.run(
        ["systemd-analyze", "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    match = re.match(r"systemd (\d+)", out)
    assert match, out
    return int(match.group(1))


def _verify(paths: list[Path]) -> list[str]:
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return [line for line in (proc.stdout + proc.stderr).splitlines() if SYNTAX.search(line)]


def test_systemd_analyze_verify_finds_nothing_wrong(written: Path) -> None:
    if _systemd_version() < 253:
        # Type=notify-reload is systemd 253's: an older one reads it as a mistake (and the
        # edge as Type=simple; docs/systemd.md has the drop-in). Check the rest as notify.
        edge = written / "ramp-edge.service"
        text = edge.read_text()
        assert "\nType=notify-reload\n" in text
        edge.write_text(text.replace("\nType=notify-reload\n", "\nType=notify\n"))
    paths = [written / name for name in UNITS]
    assert _verify(paths) == []

    # The same check sees a mistake when there is one (it is not just quiet here)
    broken = written / "ramp-connector.service"
    broken.write_text(broken.read_text().replace("[Service]\n", "[Service]\nNoSuchKey=1\n"))
    assert any("NoSuchKey" in line for line in _verify(paths))


def test_every_capability_is_one_systemd_knows() -> None:
    for name in SERVICES:
        ini = parse(unit_text(name))["Service"]
        caps = set(ini["AmbientCapabilities"].split())
        assert caps == set(ini["CapabilityBoundingSet"].split()), name
        proc = subprocess.run(
            ["systemd-analyze", "capability", *sorted(caps)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 0, proc.stderr


def _leaf_context(args: list[str]) -> click.Context:
    """Parse `args` as `ramp ARGS` would, down to the command, without running anything:
    an unknown command or flag, or a bad value, raises a click error."""
    command: click.Command = main
    name, ctx = "ramp", None
    while isinstance(command, click.Group):
        if command.invoke_without_command and (not args or args[0].startswith("-")):
            break  # `ramp edge [OPTIONS]` runs the group itself (`ramp edge restart` is its own)
        ctx = click.Context(command, info_name=name, parent=ctx)
        resolved, sub, args = command.resolve_command(ctx, args)
        assert resolved is not None and sub is not None
        name, command = resolved, sub
    return command.make_context(name, args, parent=ctx)


@pytest.mark.parametrize("name", SERVICES)
def test_every_execstart_flag_is_the_cli_s(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAMP_TUNNEL_TOKEN", raising=False)  # it would count as a given flag
    argv = exec_start(name)
    assert argv[0] == DEFAULT_RAMP
    ctx = _leaf_context(argv[1:])
    given = {k for k, v in ctx.params.items() if v is not None and v != () and v is not False}
    assert len(given) == sum(a.startswith("--") for a in argv[1:]), (given, argv)
    with pytest.raises(click.NoSuchOption):
        _leaf_context([*argv[1:], "--no-such-flag"])


def test_the_unit_files_commands_are_the_roles() -> None:
    assert _leaf_context(exec_start("ramp-edge.service")[1:]).command.name == "edge"
    ctx = _leaf_context(exec_start("ramp-connector.service")[1:])
    assert ctx.command_path == "ramp tunnel run"
    assert ctx.params["token_file"] == Path("/etc/ramp/connector.token")


def test_the_socket_is_named_for_a_listener_the_edge_has() -> None:
    ini = parse(unit_text("ramp-edge.socket"))["Socket"]
    assert ini["FileDescriptorName"] in set(registry.known()) | {"tunnel", "masque"}
    assert ini["Service"] == "ramp-edge.service"
    assert ini["Service"] in UNITS
