"""docs/configuration.md, generated from the config models and the commands' options.

The models say what each key is; the click commands say which flag and environment variable set
it. The prose that no model holds lives here, so the whole file is generated and a test can
insist that the checked-in copy is current (`ramp config docs --output docs/configuration.md`).

The schema is walked generically: nested models, lists and mappings of models, Literals and
(discriminated) unions of models each get their own sub-table, so new nested keys need no code.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml
from pydantic import BaseModel, TypeAdapter, create_model
from pydantic.fields import FieldInfo

from ramp.onramps import registry as onramp_registry
from ramp.onramps.registry import OnRampOptions

REGENERATE = "ramp config docs --output docs/configuration.md"


@dataclass(frozen=True)
class RoleDoc:
    """One role's section: its model, the command whose options set its keys, an example."""

    title: str
    model: type[BaseModel]
    command: click.Command
    example_intro: str
    example_yaml: str


INTRO = """\
# Configuration

Each role reads its settings from three places, later ones winning:

1. the defaults below;
2. a YAML file given with `--config FILE` (keys as below; `-` and `_` are interchangeable in
   keys, also in nested ones, but not in free-form mappings such as the user names of `users`);
3. flags: every top-level key is also a flag, `--key-with-dashes VALUE` (booleans as
   `--key/--no-key`, `users` as repeatable `--user NAME:PASSWORD`, `edge` as repeatable
   `--edge HOST:PORT`); the tables below name each key's flag.

`--data-dir` defaults to `$RAMP_HOME`, else `~/.local/share/ramp`. The store there
(`ramp.db`, SQLite, mode 0600) holds tunnels, routes, client identities, the master key tunnel
and client secrets are derived from, and the edge's CA and certificate (made on first use). The
tunnel- and client-management commands (`ramp tunnel create|list|delete|route|token`, `ramp
client create|list|revoke|token`) work on that store; a running edge picks their changes up
within `store_poll_interval` (1 s).

The connector's token can also come from the environment variable `RAMP_TUNNEL_TOKEN`.

`ramp config default --role edge|connector` prints a file with every key at its default (shown
at the end of each role's section).

## Checking a file

`ramp config check FILE` validates FILE without starting anything. It prints
`FILE: valid edge configuration` (or `connector`) and exits 0, or prints every problem, one a
line, as `FILE:LINE: KEY: message` on stderr and exits 2. LINE is the line of the offending key,
nested keys included (`onramps.1.listen` is the `listen` of the second item of `onramps`);
unknown keys and YAML syntax errors are reported the same way. `ramp edge --config FILE` and
`ramp tunnel run --config FILE` refuse a bad file with the same lines, each after
`ramp: error: `.

Without `--role edge|connector` the role is told from the keys: a file with keys only a
connector has (`token`, `edge`, `ha_connections`, ...) is a connector config; any other file
(including one with only keys both roles share, such as `log_level`) is an edge config. A file
with keys only an edge has *and* keys only a connector has needs `--role`.

This file is generated: after changing a config model, run
`{regenerate}`.
"""

OUTRO = """\
## Timeouts and keepalives

| what | default | where |
|---|---|---|
| QUIC idle timeout (tunnel connection declared dead) | 5 s | `quic_idle_timeout`, both roles |
| QUIC PING when nothing was received for | 1 s | `keepalive_interval`, connector |
| QUIC handshake on the tunnel listener (half-open connection dropped) | 2 s | `quic_handshake_timeout`, edge |
| QUIC Retry token valid for | 10 s | `quic_retry_token_lifetime`, edge |
| registration must arrive within | 10 s | fixed |
| connector dial to an origin | 10 s | `connect_timeout`, connector |
| edge waits for a flow's outbound leg | 15 s | `connect_timeout`, edge |
| proxy client must finish its request | 10 s | `handshake_timeout`, edge |
| redial backoff (full jitter) | 1 s base, 60 s cap | fixed |
| graceful shutdown of a connector | 30 s | `grace_period`, connector |
| UDP session idle | 210 s | `udp_idle_timeout`, both roles (the smaller wins) |
| UDP session registration (repeated every 250 ms) | 15 s | `connect_timeout`, edge |
| UDP session moved off a silent tunnel connection | 2.5 s | fixed |
| DNS answer through a tunnel or from the upstream | 5 s | `dns_timeout`, edge |

## Exit codes

| code | meaning |
|---|---|
| 0 | clean shutdown |
| 1 | could not start (port in use, ...) |
| 2 | bad configuration, flag or token |
| 3 | the edge refused the connector for good (unknown or deleted tunnel, wrong secret, certificate not matching the token's pin) |
| 130 | a second SIGINT/SIGTERM during a graceful shutdown |
"""  # noqa: E501  (a Markdown table row is one line however long)


def render_config_docs(roles: Sequence[RoleDoc]) -> str:
    """The whole of docs/configuration.md."""
    header = (
        f"<!-- Generated by `{REGENERATE}` from the config models (src/ramp/config.py) and "
        "src/ramp/config_docs.py: edit those, not this file. -->\n\n"
    )
    parts = [header + INTRO.format(regenerate=REGENERATE)]
    for role in roles:
        parts.append(_role_section(role))
    parts.append(OUTRO)
    return "\n".join(parts)


# -- one role ---------------------------------------------------------------------------------


def _role_section(role: RoleDoc) -> str:
    options = {p.name: p for p in role.command.params if isinstance(p, click.Option) and p.name}
    out = [f"## {role.title}", ""]
    out += _field_table(role.model, options)
    for path, heading_models in _nested(role.model, ""):
        out += ["", *_nested_section(path, heading_models)]
        if [m for _, m in heading_models] == [OnRampOptions]:
            out += _onramp_types(path)
    out += ["", role.example_intro, "", "```yaml", role.example_yaml.rstrip("\n"), "```", ""]
    return "\n".join(out)


def _field_table(
    model: type[BaseModel], options: dict[str, click.Option] | None = None
) -> list[str]:
    with_flags = options is not None
    head = ["key", "type", "default", *(["flag"] if with_flags else []), "description"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, field in model.model_fields.items():
        key = field.alias or name
        # The field itself rides along: pydantic keeps a field's discriminator on it.
        type_text = _type_text(field.annotation, [*field.metadata, field])
        cells = [f"`{key}`", type_text, _default_text(field)]
        if options is not None:
            cells.append(_flag_text(options.get(name)))
        cells.append(" ".join((field.description or "").split()))
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return rows


def _nested_section(path: str, members: list[tuple[str, type[BaseModel]]]) -> list[str]:
    out = [f"### `{path}`", ""]
    if len(members) == 1:
        _, model = members[0]
        doc = _own_doc(model)
        return out + ([doc, ""] if doc else []) + _field_table(model)
    out += [f"Each `{path}` is one of the following ({len(members)} kinds).", ""]
    for label, model in members:
        out += [f"#### `{path}` {label}", ""]
        doc = _own_doc(model)
        out += ([doc, ""] if doc else []) + _field_table(model) + [""]
    return out[:-1]


def _onramp_types(path: str) -> list[str]:
    """Each registered on-ramp type's own keys (those beyond every entry's)."""
    out: list[str] = []
    common = set(OnRampOptions.model_fields)
    for name in onramp_registry.known():
        model = onramp_registry.lookup(name).options
        own = [k for k in model.model_fields if k not in common or k == "listen"]
        if model is OnRampOptions or own == ["listen"]:
            continue
        out += ["", f"#### `{path}` with `type: {name}`", ""]
        doc = _own_doc(model)
        out += [doc, ""] if doc else []
        out += _field_table(_only(model, own))
        for sub, members in _nested(model, f"{path}."):
            out += ["", *_nested_section(sub, members)]
    return out


def _only(model: type[BaseModel], keys: list[str]) -> type[BaseModel]:
    fields = {k: (f.annotation, f) for k, f in model.model_fields.items() if k in keys}
    return create_model(model.__name__, **fields)  # type: ignore[call-overload, no-any-return]


def _own_doc(model: type[BaseModel]) -> str:
    # A model without its own docstring would otherwise show its base class's.
    doc = model.__dict__.get("__doc__")
    return inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ") if doc else ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


# -- walking the schema -------------------------------------------------------------------------


def _unwrap(ann: Any) -> tuple[Any, list[Any]]:
    """The bare type and the metadata (constraints, FieldInfo) Annotated wrapped around it."""
    metadata: list[Any] = []
    while typing.get_origin(ann) is typing.Annotated:
        ann, *more = typing.get_args(ann)
        metadata += more
    return ann, metadata


def _union_members(ann: Any) -> tuple[Any, ...]:
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return typing.get_args(ann)
    return ()


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _discriminator(metadata: Sequence[Any]) -> str | None:
    for m in metadata:
        d = getattr(m, "discriminator", None)
        if isinstance(d, str):
            return d
    return None


def _nested(
    model: type[BaseModel], prefix: str, seen: frozenset[type[BaseModel]] = frozenset()
) -> Iterator[tuple[str, list[tuple[str, type[BaseModel]]]]]:
    """(`path`, [(label, model), ...]) for every place below `model` that holds models."""
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        yield from _nested_in(field.annotation, key, [*field.metadata, field], seen | {model})


def _nested_in(
    ann: Any, path: str, metadata: list[Any], seen: frozenset[type[BaseModel]]
) -> Iterator[tuple[str, list[tuple[str, type[BaseModel]]]]]:
    ann, more = _unwrap(ann)
    metadata = metadata + more
    members = [m for m in (_union_members(ann) or (ann,)) if m is not type(None)]
    models = [_unwrap(m)[0] for m in members if _is_model(_unwrap(m)[0])]
    if models:
        tag = _discriminator(metadata)
        labelled = [(_member_label(m, tag), m) for m in models]
        yield path, labelled
        for m in models:
            if m not in seen:
                yield from _nested(m, f"{path}.", seen)
        for m in members:  # a model or a list of them (`to: {host: H}` or `to: [rule, ...]`)
            if typing.get_origin(m) in (list, tuple) and typing.get_args(m):
                yield from _nested_in(typing.get_args(m)[0], f"{path}[]", [], seen)
        return
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (list, tuple, set, frozenset) and args:
        yield from _nested_in(args[0], f"{path}[]", [], seen)
    elif origin is dict and len(args) == 2:
        yield from _nested_in(args[1], f"{path}.<key>", [], seen)
    elif len(members) > 1:
        for m in members:
            yield from _nested_in(m, path, [], seen)


def _member_label(model: type[BaseModel], tag: str | None) -> str:
    if tag is not None and tag in model.model_fields:
        values = typing.get_args(_unwrap(model.model_fields[tag].annotation)[0])
        if values:
            return "with " + " or ".join(f"`{tag}: {v}`" for v in values)
    return f"as `{model.__name__}`"


# -- cells ----------------------------------------------------------------------------------------

_SCALARS: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    Path: "path",
    type(None): "null",
}
_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def _type_text(ann: Any, metadata: Sequence[Any] = ()) -> str:
    ann, more = _unwrap(ann)
    metadata = [*metadata, *more]
    text = _bare_type_text(ann, metadata)
    # Constraints given as `Annotated[int, Field(gt=0)]` sit in that FieldInfo's own metadata.
    constraints: list[Any] = []
    for m in metadata:
        for c in m.metadata if isinstance(m, FieldInfo) else [m]:
            if c not in constraints:  # a field's constraints are in its FieldInfo too
                constraints.append(c)
    metadata = constraints
    bounds = [
        f"{sym} {getattr(m, attr)}"
        for m in metadata
        for attr, sym in _BOUNDS
        if getattr(m, attr, None) is not None
    ]
    for m in metadata:
        for attr, what in (("min_length", "at least"), ("max_length", "at most")):
            if getattr(m, attr, None) is not None:
                bounds.append(f"{what} {getattr(m, attr)} long")
    return ", ".join([text, *bounds])


def _bare_type_text(ann: Any, metadata: Sequence[Any]) -> str:
    if ann in _SCALARS:
        return _SCALARS[ann]
    if _is_model(ann):
        return "mapping (see below)"
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    members = _union_members(ann)
    if members:
        present = [m for m in members if m is not type(None)]
        if present and all(_is_model(_unwrap(m)[0]) for m in present):
            tag = _discriminator(metadata)
            text = "mapping" + (f" chosen by `{tag}`" if tag else "") + " (see below)"
            return text + (" or null" if len(present) < len(members) else "")
        return " or ".join(_type_text(m) for m in members)
    if origin in (list, tuple, set, frozenset):
        return f"list of {_plural(_type_text(args[0]))}" if args else "list"
    if origin is dict:
        return f"mapping of {_type_text(args[0])} to {_type_text(args[1])}" if args else "mapping"
    return getattr(ann, "__name__", str(ann))


def _plural(text: str) -> str:
    word = text.split(" ")[0].rstrip(",")
    if word in (*_SCALARS.values(), "mapping") and word != "null":
        return word + "s" + text[len(word) :]
    return text


def _default_text(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    factory = field.default_factory
    if inspect.isfunction(factory) and factory.__doc__:
        # A computed default (from the environment, say) is described, never evaluated: the
        # docs must not depend on the machine that generated them.
        return inspect.cleandoc(factory.__doc__).split("\n\n")[0].rstrip(".")
    value = field.get_default(call_default_factory=True)
    try:
        value = TypeAdapter(field.annotation).dump_python(value, mode="json")
    except Exception:  # a default pydantic cannot dump is shown as Python has it
        return f"`{value!r}`"
    dumped = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False)
    return f"`{dumped.removesuffix(chr(10)).removesuffix('...').strip()}`"


def _flag_text(option: click.Option | None) -> str:
    if option is None:
        return "file only"
    names = " / ".join(f"`{o}`" for o in [*option.opts, *option.secondary_opts])
    if option.multiple:
        names = f"`{option.opts[0]} {option.metavar or 'VALUE'}`, repeatable"
    env = option.envvar if isinstance(option.envvar, str) else None
    return names + (f"; env `{env}`" if env else "")
