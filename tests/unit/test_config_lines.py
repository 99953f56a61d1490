"""Config problems name the key and the line of the file it is on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from ramp.config import ConfigError, ConnectorConfig, EdgeConfig, load_config


def problems(model: type[BaseModel], path: Path, **overrides: object) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(model, path, dict(overrides))  # type: ignore[type-var]
    return str(e.value).splitlines()


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return tmp_path / "ramp.yaml"


def test_valid_file_loads_with_dashes_or_underscores(cfg: Path) -> None:
    cfg.write_text("# edge\nsocks5-listen: 127.0.0.1:1999\nmax_flows: 7\nusers: {bob-x: pw}\n")
    loaded = load_config(EdgeConfig, cfg, {})
    assert (loaded.socks5_listen, loaded.max_flows) == ("127.0.0.1:1999", 7)
    assert loaded.users == {"bob-x": "pw"}  # a user name is data, not a key to rewrite


def test_empty_file_is_all_defaults(cfg: Path) -> None:
    cfg.write_text("# nothing set\n")
    assert load_config(ConnectorConfig, cfg, {}) == ConnectorConfig()


def test_each_error_names_key_and_line(cfg: Path) -> None:
    cfg.write_text(
        "log_level: info\n"
        "max_flows: many\n"  # 2: wrong type
        "\n"
        "connect_timeout: 0\n"  # 4: out of range
        "socks5-listen: nonsense\n"  # 5: our own validator
        "max_flow: 3\n"  # 6: unknown key
        "users:\n"
        "  alice: pw\n"
        "  bob: [1]\n"  # 9: nested key
    )
    assert problems(EdgeConfig, cfg) == [
        f"{cfg}:2: max_flows: Input should be a valid integer, unable to parse string as an "
        "integer",
        f"{cfg}:4: connect_timeout: Input should be greater than 0",
        f"{cfg}:5: socks5_listen: bad address 'nonsense': expected HOST:PORT",
        f"{cfg}:6: max_flow: unknown key; did you mean 'max_flows'?",
        f"{cfg}:9: users.bob: Input should be a valid string",
    ]


def test_free_form_keys_are_found_as_written(cfg: Path) -> None:
    cfg.write_text("users:\n  bob_x: [1]\n  bob-x: pw\n")
    assert problems(EdgeConfig, cfg) == [f"{cfg}:2: users.bob_x: Input should be a valid string"]


def test_range_error_on_connector(cfg: Path) -> None:
    cfg.write_text("token: abc\nedge:\n  - 192.0.2.1:7844\nha_connections: 17\n")
    assert problems(ConnectorConfig, cfg) == [
        f"{cfg}:4: ha_connections: Input should be less than or equal to 16"
    ]


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("a: 1\nb: [1,\nc: d: e\n", 3, "expected ',' or ']', but got ':'"),
        ("a: 1\n\tb: 2\n", 2, "found character '\\t' that cannot start any token"),
        ("a: 1\nb: c: d\n", 2, "mapping values are not allowed here"),
        ("a: !secret x\n", 1, "could not determine a constructor for the tag '!secret'"),
    ],
)
def test_bad_yaml_names_the_line(cfg: Path, text: str, line: int, message: str) -> None:
    cfg.write_text(text)
    (problem,) = problems(EdgeConfig, cfg)
    assert problem.startswith(f"{cfg}:{line}: invalid YAML: {message}")


def test_not_a_mapping(cfg: Path) -> None:
    cfg.write_text("# a list\n- socks5_listen: 127.0.0.1:1\n")
    assert problems(EdgeConfig, cfg) == [f"{cfg}:2: config: must be a mapping of keys, not a list"]


def test_unreadable_file(tmp_path: Path) -> None:
    assert problems(EdgeConfig, tmp_path / "missing.yaml") == [
        f"cannot read config file {tmp_path / 'missing.yaml'}: No such file or directory"
    ]
    (tmp_path / "latin1.yaml").write_bytes(b"log_level: \xe9\n")
    assert problems(EdgeConfig, tmp_path / "latin1.yaml") == [
        f"{tmp_path / 'latin1.yaml'}: not UTF-8 text"
    ]


def test_flag_errors_have_no_file_line(cfg: Path) -> None:
    # The file's value is overridden, so pointing at its line would blame the wrong thing.
    cfg.write_text("max_flows: 7\nhandshake_timeout: -1\n")
    assert problems(EdgeConfig, cfg, max_flows=0) == [
        "max_flows: Input should be greater than 0 (from the command line)",
        f"{cfg}:2: handshake_timeout: Input should be greater than 0",
    ]


# Nested keys: models shaped like the ones being added (a tagged list of on-ramps, a nested
# policy, a list of hooks that may be one of several models), to show the lookup is generic.


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Socks5(_Strict):
    type: Literal["socks5"]
    listen: str
    users: dict[str, str] = {}


class Http(_Strict):
    type: Literal["http"]
    listen: str
    timeout: float = Field(10.0, gt=0)


class Rule(_Strict):
    match: str
    action: Literal["allow", "deny"] = "allow"


class Policy(_Strict):
    default: Literal["allow", "deny"] = "deny"
    log_denied: bool = False
    rules: list[Rule] = []


class Webhook(_Strict):
    url: str


class Script(_Strict):
    path: str


class Nested(_Strict):
    log_level: str = "info"
    onramps: list[Annotated[Socks5 | Http, Field(discriminator="type")]] = []
    policy: Policy = Policy()
    hooks: list[Webhook | Script] = []
    upstream: Socks5 | Http | None = Field(None, discriminator="type")


NESTED = """\
log_level: info
onramps:
  - type: socks5
    listen: 127.0.0.1:1080
  - type: http
    listen: [not, a, string]
    timeout: 0
  - type: socks5
    listne: 127.0.0.1:1081
  - type: ftp
    listen: 127.0.0.1:21
policy:
  default: deny
  rules:
    - match: 10.0.0.0/8
    - match: 192.0.2.0/24
      action: maybe
hooks:
  - url: https://hooks.example/
  - {pth: /bin/true}
upstream:
  type: http
  listen: 127.0.0.1:3128
  timeot: 5
"""


def test_nested_keys_point_at_their_own_line(cfg: Path) -> None:
    cfg.write_text(NESTED)
    assert problems(Nested, cfg) == [
        f"{cfg}:6: onramps.1.listen: Input should be a valid string",
        f"{cfg}:7: onramps.1.timeout: Input should be greater than 0",
        f"{cfg}:8: onramps.2.listen: required key is missing",
        f"{cfg}:9: onramps.2.listne: unknown key; did you mean 'listen'?",
        f"{cfg}:10: onramps.3.type: Input tag 'ftp' found using 'type' does not match any of "
        "the expected tags: 'socks5', 'http'",
        f"{cfg}:17: policy.rules.1.action: Input should be 'allow' or 'deny'",
        # Not tagged: pydantic tries both models, each with its own complaint.
        f"{cfg}:20: hooks.1.url: required key is missing",
        f"{cfg}:20: hooks.1.path: required key is missing",
        f"{cfg}:20: hooks.1.pth: unknown key; did you mean 'path'?",
        f"{cfg}:24: upstream.timeot: unknown key; did you mean 'timeout'?",
    ]


def test_nested_dashed_keys_are_accepted(cfg: Path) -> None:
    cfg.write_text("log-level: debug\npolicy:\n  log-denied: true\n  rules:\n    - {match: any}\n")
    loaded = load_config(Nested, cfg, {})  # type: ignore[type-var]
    assert loaded.policy.log_denied is True
    assert loaded.policy.rules == [Rule(match="any")]
