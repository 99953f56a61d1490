"""Config file problems as `FILE:LINE: KEY: message`, pointing at the line of the offending key.

pydantic reports a location as a path of keys and list indexes (`onramps.1.listen`); the YAML
node tree from the same parse knows where each key and list item sits in the file. Both are
walked generically, so nested mappings, lists and unions of models need no code here.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

Loc = Sequence[int | str]


@dataclass(frozen=True)
class ConfigIssue:
    """One problem: where (file and 1-based line, when it came from a file), which key, why."""

    key: str
    message: str
    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        parts = []
        if self.file is not None:
            parts.append(self.file if self.line is None else f"{self.file}:{self.line}")
        if self.key:
            parts.append(self.key)
        return ": ".join([*parts, self.message])


class ConfigIssues(Exception):
    """The file could not be read or parsed at all; `issues` says where and why."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        super().__init__("\n".join(str(i) for i in issues))
        self.issues = issues


@dataclass(frozen=True)
class ParsedYaml:
    """A config file's data and the node tree it was built from (for line numbers)."""

    file: str
    data: dict[Any, Any]
    root: yaml.Node | None


def parse_yaml(text: str, file: str) -> ParsedYaml:
    """Parse once, keeping the nodes; an empty document is an empty mapping."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "unreadable"
        if e.context and e.problem and e.context_mark is not None:
            # The problem is often found far below where the broken construct began.
            problem += f" ({e.context} at line {e.context_mark.line + 1})"
        line = mark.line + 1 if mark is not None else None
        raise ConfigIssues([ConfigIssue("", f"invalid YAML: {problem}", file, line)]) from e
    except yaml.YAMLError as e:
        raise ConfigIssues([ConfigIssue("", f"invalid YAML: {e}", file)]) from e
    finally:
        loader.dispose()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        line = root.start_mark.line + 1 if root is not None else 1
        kind = "a list" if isinstance(data, list) else f"{type(data).__name__} {data!r}"
        raise ConfigIssues(
            [ConfigIssue("config", f"must be a mapping of keys, not {kind}", file, line)]
        )
    return ParsedYaml(file, data, root)


def read_yaml_file(path: Path) -> ParsedYaml:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigIssues(
            [ConfigIssue("", f"cannot read config file {path}: {e.strerror}")]
        ) from e
    except UnicodeDecodeError as e:
        raise ConfigIssues([ConfigIssue("", "not UTF-8 text", str(path))]) from e
    return parse_yaml(text, str(path))


# -- where a pydantic location is in the file --------------------------------------------------


def _child(node: yaml.Node | None, elem: int | str) -> tuple[yaml.Node, yaml.Node] | None:
    """(node whose line to report, node to descend into) for `elem` under `node`."""
    if isinstance(node, yaml.MappingNode):
        pairs = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)]
        exact = [(k, v) for k, v in pairs if k.value == str(elem)]
        # `max-flows` was loaded as `max_flows`; an exact match still wins, since free-form
        # mappings (user names) keep their keys as written.
        dashed = [(k, v) for k, v in pairs if k.value.replace("-", "_") == elem]
        found = exact or dashed
        return found[-1] if found else None  # the last one wins, as it does when loading
    if (
        isinstance(node, yaml.SequenceNode)
        and isinstance(elem, int)
        and 0 <= elem < len(node.value)
    ):
        item = node.value[elem]
        return item, item
    return None


def locate(root: yaml.Node | None, loc: Loc) -> tuple[str, int]:
    """The dotted key and 1-based line for a pydantic error location.

    Elements that name no key or item in the file are union member tags (`socks5` in
    `onramps.1.socks5.listen`) and are dropped, except a last element under a mapping: that is
    a required key the file lacks, reported at the line of the mapping that should hold it.
    """
    node = root
    line = root.start_mark.line + 1 if root is not None else 1
    parts: list[str] = []
    for i, elem in enumerate(loc):
        found = _child(node, elem)
        if found is not None:
            mark_node, node = found
            line = mark_node.start_mark.line + 1
            parts.append(str(elem))
        elif i == len(loc) - 1 and (isinstance(node, yaml.MappingNode) or node is None):
            parts.append(str(elem))
    return ".".join(parts) or "config", line


# -- pydantic errors as issues --------------------------------------------------------------------


def _unwrap(ann: Any) -> Any:
    while typing.get_origin(ann) is typing.Annotated:
        ann = typing.get_args(ann)[0]
    return ann


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _union_members(ann: Any) -> tuple[Any, ...]:
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return tuple(_unwrap(a) for a in typing.get_args(ann))
    return ()


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _model_at(model: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """The model that holds the last element of `loc`, when the type walk can tell."""
    ann: Any = model
    for elem in loc[:-1]:
        ann = _unwrap(ann)
        members = _union_members(ann)
        if members:
            # pydantic names the member that failed: a tag value or the class name.
            by_name = [m for m in members if _is_model(m) and m.__name__ == elem]
            by_tag = [m for m in members if _is_model(m) and elem in _tag_values(m)]
            chosen = by_name or by_tag or [m for m in members if m is not type(None)]
            if len(chosen) != 1:
                return None
            ann = chosen[0]
            if by_name or by_tag:
                continue
        if _is_model(ann):
            fields = {f.alias or n: f for n, f in ann.model_fields.items()}
            if elem not in fields:
                return None
            ann = fields[str(elem)].annotation
            continue
        origin = typing.get_origin(ann)
        args = typing.get_args(ann)
        if origin in (list, tuple, set, frozenset) and args:
            ann = args[0]
        elif origin is dict and len(args) == 2:
            ann = args[1]
        else:
            return None
    ann = _unwrap(ann)
    return ann if _is_model(ann) else None


def _tag_values(model: type[BaseModel]) -> set[Any]:
    """Every Literal value a model's fields accept: a discriminated union tags by one of them."""
    values: set[Any] = set()
    for f in model.model_fields.values():
        ann = _unwrap(f.annotation)
        if typing.get_origin(ann) is typing.Literal:
            values.update(typing.get_args(ann))
    return values


def _message(err: ErrorDetails, model: type[BaseModel]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        owner = _model_at(model, err["loc"])
        hint = ""
        if owner is not None:
            close = difflib.get_close_matches(
                str(err["loc"][-1]).replace("-", "_"), _field_names(owner), n=1
            )
            hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown key{hint}"
    if kind == "missing":
        return "required key is missing"
    msg = err["msg"]
    # Our validators raise ValueError with a full sentence; pydantic's prefix adds nothing.
    return msg.removeprefix("Value error, ")


def issues_from_validation(
    error: ValidationError,
    model: type[BaseModel],
    parsed: ParsedYaml | None,
    from_flags: Collection[str] = (),
) -> list[ConfigIssue]:
    """One issue per error, with the file line when the value came from the file.

    Keys in `from_flags` were overridden on the command line, so a line in the file would point
    at a value that was never used.
    """
    out: list[ConfigIssue] = []
    for err in error.errors():
        loc: list[int | str] = list(err["loc"])
        if err["type"] == "union_tag_invalid":
            # Point at the tag itself (`type: nosuch`), not at the whole item.
            tag = str(err.get("ctx", {}).get("discriminator", "")).strip("'\"")
            if tag:
                loc.append(tag)
        message = _message(err, model)
        if parsed is None or (loc and loc[0] in from_flags):
            key = ".".join(str(p) for p in loc) or "config"
            given = bool(loc) and loc[0] in from_flags
            issue = ConfigIssue(key, message + (" (from the command line)" if given else ""))
        else:
            key, line = locate(parsed.root, loc)
            issue = ConfigIssue(key, message, parsed.file, line)
        out.append(issue)
    # Unions of models report a problem once per member, some with a hint (`did you mean`)
    # that the others lack: keep one of each, the most helpful.
    out = [
        i
        for n, i in enumerate(out)
        if i not in out[:n]
        and not any(
            o != i
            and (o.file, o.line, o.key) == (i.file, i.line, i.key)
            and o.message.startswith(i.message)
            for o in out
        )
    ]
    # Command-line problems first, then the file's from top to bottom, as an editor shows them.
    return sorted(out, key=lambda i: (i.line is not None, i.line or 0))


# -- `-` and `_` in keys --------------------------------------------------------------------------


def normalize_keys(model: type[BaseModel], data: dict[Any, Any]) -> dict[Any, Any]:
    """Rename `key-with-dashes` to the field `key_with_dashes` wherever the schema has a model.

    Guided by the schema so that free-form mappings (user names in `users`) keep their keys.
    """
    return typing.cast(dict[Any, Any], _normalize(model, data))


def _normalize(ann: Any, value: Any) -> Any:
    ann = _unwrap(ann)
    members = _union_members(ann)
    if members:
        models = [m for m in members if _is_model(m)]
        if isinstance(value, dict) and models:
            fitting = [m for m in models if _fits(m, value)]
            return _normalize(fitting[0], value) if fitting else value
        rest = [m for m in members if not _is_model(m) and m is not type(None)]
        return _normalize(rest[0], value) if len(rest) == 1 else value
    if _is_model(ann):
        if not isinstance(value, dict):
            return value
        fields = {f.alias or n: f for n, f in ann.model_fields.items()}
        out: dict[Any, Any] = {}
        for k, v in value.items():
            name = k
            if isinstance(k, str) and k not in fields and k.replace("-", "_") in fields:
                name = k.replace("-", "_")
            out[name] = _normalize(fields[name].annotation, v) if name in fields else v
        return out
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin in (list, tuple, set, frozenset) and args and isinstance(value, list):
        return [_normalize(args[0], v) for v in value]
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        return {k: _normalize(args[1], v) for k, v in value.items()}
    return value


def _fits(model: type[BaseModel], value: dict[Any, Any]) -> bool:
    """Whether every key of `value` names a field of `model`, and its tags (Literal fields
    given in `value`) match: how to pick a union member before pydantic has seen the data."""
    fields = {f.alias or n: f for n, f in model.model_fields.items()}
    for k, v in value.items():
        name = k.replace("-", "_") if isinstance(k, str) and k not in fields else k
        if name not in fields:
            return False
        ann = _unwrap(fields[name].annotation)
        if typing.get_origin(ann) is typing.Literal and v not in typing.get_args(ann):
            return False
    return True


def top_level_keys(parsed: ParsedYaml) -> set[str]:
    return {k.replace("-", "_") for k in parsed.data if isinstance(k, str)}


def format_issues(issues: Iterable[ConfigIssue]) -> str:
    return "\n".join(str(i) for i in issues)
