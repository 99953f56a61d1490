"""docs/configuration.md is generated from the config models and must be current."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import click
import pytest
from click.testing import CliRunner
from pydantic import BaseModel, Field

from ramp.cli import config_docs_markdown, edge, main, tunnel_run
from ramp.config import ConnectorConfig, EdgeConfig
from ramp.config_docs import RoleDoc, render_config_docs

DOCS = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_checked_in_docs_are_current() -> None:
    assert DOCS.read_text() == config_docs_markdown(), (
        "docs/configuration.md differs from the config models: run "
        "`ramp config docs --output docs/configuration.md` and commit the result"
    )


def test_docs_do_not_depend_on_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    before = config_docs_markdown()
    monkeypatch.setenv("RAMP_HOME", "/somewhere/else")
    assert config_docs_markdown() == before


def test_output_flag_writes_what_stdout_shows(tmp_path: Path) -> None:
    out = tmp_path / "configuration.md"
    r = CliRunner().invoke(main, ["config", "docs", "--output", str(out)])
    assert r.exit_code == 0, r.output
    shown = CliRunner().invoke(main, ["config", "docs"])
    assert shown.exit_code == 0
    assert out.read_text() == shown.stdout == config_docs_markdown()


def _row(doc: str, section: str, key: str) -> list[str]:
    """The cells of `key`'s row in the first table after the heading `section`."""
    body = doc.split(f"\n{section}\n", 1)[1]
    for line in body.splitlines():
        if line.startswith(f"| `{key}` |"):
            return [c.strip() for c in line.strip("|").split(" | ")]
    raise AssertionError(f"no row for {key} under {section}")


@pytest.mark.parametrize(
    "section, model",
    [("## Edge (`ramp edge`)", EdgeConfig), ("## Connector (`ramp tunnel run`)", ConnectorConfig)],
)
def test_every_key_has_a_row_with_its_description(section: str, model: type[BaseModel]) -> None:
    doc = config_docs_markdown()
    for name, field in model.model_fields.items():
        row = _row(doc, section, name)
        assert row[-1] == " ".join((field.description or "").split())
        extra = field.json_schema_extra
        file_only = isinstance(extra, dict) and extra.get("cli") is False
        # every top-level key is a flag too, but for the structured ones marked file-only
        assert (row[3] == "file only") == file_only, name


def test_rows_say_type_default_flag_and_env() -> None:
    doc = config_docs_markdown()
    edge_s, conn_s = "## Edge (`ramp edge`)", "## Connector (`ramp tunnel run`)"
    assert _row(doc, edge_s, "max_flows")[1:4] == ["integer, > 0", "`10000`", "`--max-flows`"]
    assert _row(doc, edge_s, "dns_listen")[2] == "`'off'`"
    assert _row(doc, edge_s, "allow_direct_egress")[1:4] == [
        "boolean",
        "`false`",
        "`--allow-direct-egress` / `--no-allow-direct-egress`",
    ]
    assert _row(doc, edge_s, "users")[3] == "`--user NAME:PASSWORD`, repeatable"
    assert _row(doc, edge_s, "log_level")[1] == "one of `debug`, `info`, `warning`, `error`"
    assert _row(doc, edge_s, "data_dir")[2] == "`$RAMP_HOME`, else `~/.local/share/ramp`"
    assert _row(doc, conn_s, "token")[3] == "`--token`; env `RAMP_TUNNEL_TOKEN`"
    assert _row(doc, conn_s, "ha_connections")[1] == "integer, >= 1, <= 16"
    assert _row(doc, conn_s, "edge")[1:4] == [
        "list of strings",
        "`[]`",
        "`--edge HOST:PORT`, repeatable",
    ]


def test_keeps_the_prose() -> None:
    doc = config_docs_markdown()
    assert "later ones winning" in doc  # flags > file > defaults
    assert "```yaml\n# ramp edge configuration" in doc
    assert "```yaml\n# ramp connector configuration" in doc
    assert "## Timeouts and keepalives" in doc and "## Exit codes" in doc
    assert "`ramp config check FILE`" in doc


# The schema walk, on models shaped like the nested keys on their way.


class Socks5(BaseModel):
    """A SOCKS5 listener."""

    type: Literal["socks5"]
    listen: str = Field(description="HOST:PORT to listen on.")


class Http(BaseModel):
    type: Literal["http"]
    listen: str = Field(description="HOST:PORT to listen on.")
    timeout: float = Field(10.0, gt=0, description="Seconds.")


class Rule(BaseModel):
    match: str = Field(description="CIDR or zone.")
    action: Literal["allow", "deny"] = Field("allow", description="What to do.")


class Policy(BaseModel):
    """Who may reach what."""

    default: Literal["allow", "deny"] = Field("deny", description="When no rule matches.")
    rules: list[Rule] = Field(default_factory=list, description="First match wins.")


class Webhook(BaseModel):
    url: str


class Script(BaseModel):
    path: str


class Nested(BaseModel):
    onramps: list[Annotated[Socks5 | Http, Field(discriminator="type")]] = Field(
        default_factory=list, description="Listeners."
    )
    policy: Policy = Field(default_factory=Policy, description="Access policy.")
    hooks: list[Webhook | Script] = Field(default_factory=list, description="Hooks.")
    zones: dict[str, Rule] = Field(default_factory=dict, description="Per zone.")
    limit: int | None = Field(None, description="Optional.")
    upstream: Socks5 | Http | None = Field(None, discriminator="type", description="Where to.")
    ports: list[Annotated[int, Field(gt=0)]] = Field(default_factory=list, description="Ports.")


@click.command()
@click.option("--policy")
def nested_cmd(policy: str) -> None:
    """A stand-in command with one of the keys as a flag."""


def test_nested_models_get_sub_tables() -> None:
    doc = render_config_docs([RoleDoc("Nested", Nested, nested_cmd, "Example:", "a: 1\n")])
    assert _row(doc, "## Nested", "onramps")[1:4] == [
        "list of mappings chosen by `type` (see below)",
        "`[]`",
        "file only",
    ]
    assert _row(doc, "## Nested", "policy")[1:4] == [
        "mapping (see below)",
        "`{default: deny, rules: []}`",
        "`--policy`",
    ]
    assert _row(doc, "## Nested", "limit")[1:3] == ["integer or null", "`null`"]
    assert _row(doc, "## Nested", "zones")[1] == "mapping of string to mapping (see below)"
    assert _row(doc, "## Nested", "upstream")[1] == "mapping chosen by `type` (see below) or null"
    assert _row(doc, "## Nested", "ports")[1] == "list of integers, > 0"
    assert "#### `upstream` with `type: http`" in doc

    assert "Each `onramps[]` is one of the following (2 kinds)." in doc
    assert _row(doc, "#### `onramps[]` with `type: socks5`", "listen") == [
        "`listen`",
        "string",
        "required",
        "HOST:PORT to listen on.",
    ]
    assert "#### `onramps[]` with `type: socks5`\n\nA SOCKS5 listener.\n" in doc
    assert _row(doc, "#### `onramps[]` with `type: http`", "timeout")[1:3] == [
        "number, > 0",
        "`10.0`",
    ]
    assert "### `policy`\n\nWho may reach what.\n" in doc
    assert _row(doc, "### `policy.rules[]`", "action")[1] == "one of `allow`, `deny`"
    assert _row(doc, "#### `hooks[]` as `Webhook`", "url")[1:3] == ["string", "required"]
    assert _row(doc, "#### `hooks[]` as `Script`", "path")[1:3] == ["string", "required"]
    assert _row(doc, "### `zones.<key>`", "match")[1] == "string"
    # Sub-tables come before the role's example.
    assert doc.index("### `zones.<key>`") < doc.index("Example:\n\n```yaml\na: 1\n```")


def test_commands_of_the_roles_are_the_ones_documented() -> None:
    # The flag column is read off these commands; a renamed command would silently drop it.
    flagged = {
        name
        for name, f in EdgeConfig.model_fields.items()
        if not (isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("cli") is False)
    }
    assert {p.name for p in edge.params} >= flagged
    assert {p.name for p in tunnel_run.params} >= set(ConnectorConfig.model_fields)
