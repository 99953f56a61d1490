"""The `ramp` command line.

Command names and flags are a contract with operators and docs. The flags of `ramp edge` and
`ramp tunnel run` are generated from the config models, so a new config key is a new flag with
no further code; only flags actually given override the config file.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import ipaddress
import logging
import sys
import textwrap
import typing
import urllib.error
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from ramp import __version__
from ramp.client_token import ClientToken, decode_client_token
from ramp.config import (
    ClientConfig,
    ConfigError,
    ConnectorConfig,
    EdgeConfig,
    default_data_dir,
    load_config,
    parse_hostport,
)
from ramp.config_docs import RoleDoc, render_config_docs
from ramp.config_lines import ConfigIssues, locate, read_yaml_file, top_level_keys
from ramp.policy.hooks import HookLoadError
from ramp.policy.router import VnetRoutes
from ramp.policy.rules import ACTIONS, PROTOCOLS, Facts, Policy, Rule
from ramp.store.db import DEFAULT_VNET, Route, Store, StoreError
from ramp.tunnel.token import Token, TokenError, token_text

if typing.TYPE_CHECKING:
    from ramp.offramps.masque import EdgeTarget

LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_EDGE = "127.0.0.1:7844"
DEFAULT_MASQUE_PORT = 443
DATA_DIR_DEFAULT_TEXT = "~/.local/share/ramp"
_USER_ERRORS = (ConfigError, StoreError, TokenError, HookLoadError)

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=BaseModel)


def setup_logging(level: str) -> None:
    """Log to stderr, one compact line per record, naming the logger."""
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
        force=True,
    )


def _fail(message: str, code: int = 2) -> typing.NoReturn:
    # A config file can have several problems, one a line; each gets the prefix so that every
    # line on its own still says it is an error.
    for line in message.splitlines() or [""]:
        click.echo(f"ramp: error: {line}", err=True)
    raise SystemExit(code)


def _user_errors(f: F) -> F:
    """Operator mistakes get one line on stderr and exit status 2, not a traceback."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except _USER_ERRORS as e:
            _fail(str(e))

    return typing.cast(F, wrapper)


def _common(f: F) -> F:
    """`--data-dir` and `--log-level`, for commands whose flags do not come from a model."""
    f = click.option(
        "--log-level",
        type=click.Choice(LOG_LEVELS),
        default="info",
        show_default=True,
        help="Log verbosity.",
    )(f)
    f = click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help=f"Directory holding the store. [default: $RAMP_HOME, else {DATA_DIR_DEFAULT_TEXT}]",
    )(f)
    return f


def _data_dir(value: Path | None) -> Path:
    return (value or default_data_dir()).expanduser()


def _open_store(data_dir: Path | None, log_level: str) -> Store:
    """What every store command starts with: its logging, then the store."""
    setup_logging(log_level)
    return Store(_data_dir(data_dir))


# -- flags generated from the config models ---------------------------------------------------


def _default_text(name: str, field: FieldInfo) -> str:
    if name == "data_dir":
        return f"$RAMP_HOME, else {DATA_DIR_DEFAULT_TEXT}"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, bool):
        return "on" if value else "off"
    if value in ({}, [], ""):
        return "none"
    return str(value)


def _dict_flag(name: str) -> str:
    return name[:-1] if name.endswith("s") else name


def _option_for(name: str, field: FieldInfo, envvar: str | None) -> Callable[[F], F]:
    flag = "--" + name.replace("_", "-")
    ann = field.annotation
    origin = typing.get_origin(ann)
    help_text = f"{field.description or ''} [default: {_default_text(name, field)}]"
    if origin is dict:
        key_flag = "--" + _dict_flag(name).replace("_", "-")
        return click.option(
            key_flag,
            name,
            multiple=True,
            metavar="NAME:PASSWORD" if name == "users" else "KEY:VALUE",
            help=f"{field.description} Repeatable.",
        )
    if origin is list:
        return click.option(
            flag,
            name,
            multiple=True,
            metavar={"edge": "HOST:PORT", "egress_source": "CIDR"}.get(name, "VALUE"),
            help=f"{field.description} Repeatable.",
        )
    if ann is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
    if origin is typing.Literal:
        kind: click.ParamType = click.Choice([str(a) for a in typing.get_args(ann)])
    elif ann is int:
        kind = click.INT
    elif ann is float:
        kind = click.FLOAT
    elif ann is Path or ann == Path | None:
        kind = click.Path(path_type=Path)
    else:
        kind = click.STRING
    return click.option(flag, name, type=kind, default=None, envvar=envvar, help=help_text)


def _model_options(
    model: type[BaseModel], envvars: dict[str, str] | None = None
) -> Callable[[F], F]:
    envvars = envvars or {}

    def decorate(f: F) -> F:
        # click lists options in reverse order of decoration: go backwards to keep model order.
        for name, field in reversed(list(model.model_fields.items())):
            extra = field.json_schema_extra
            if isinstance(extra, dict) and extra.get("cli") is False:
                continue  # structured keys live in the config file only
            f = _option_for(name, field, envvars.get(name))(f)
        return click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="YAML config file (see `ramp config default`); flags override it.",
        )(f)

    return decorate


def _overrides(model: type[BaseModel], flags: dict[str, Any]) -> dict[str, Any]:
    """Only the flags the user gave, shaped for the model."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        value = flags.get(name)
        if value is None or value == ():
            continue
        origin = typing.get_origin(field.annotation)
        if origin is dict:
            pairs: dict[str, str] = {}
            for item in value:
                key, sep, val = item.partition(":")
                if not sep or not key:
                    raise ConfigError(
                        f"--{_dict_flag(name).replace('_', '-')} {item!r}: expected "
                        + ("NAME:PASSWORD" if name == "users" else "KEY:VALUE")
                    )
                pairs[key] = val
            value = pairs
        elif origin is list:
            value = list(value)
        out[name] = value
    return out


def _load(model: type[M], config_file: Path | None, flags: dict[str, Any]) -> M:
    cfg = load_config(model, config_file, _overrides(model, flags))
    cfg.data_dir = cfg.data_dir.expanduser()  # type: ignore[attr-defined]
    return cfg


def default_yaml(model: type[BaseModel], data_dir: str = DATA_DIR_DEFAULT_TEXT) -> str:
    """Every key of `model` with its default, each preceded by its description as a comment."""
    role, command = {
        EdgeConfig: ("edge", "ramp edge"),
        ClientConfig: ("client", "ramp client run"),
    }.get(model, ("connector", "ramp tunnel run"))
    defaults = model().model_dump(mode="json")
    lines = [
        f"# ramp {role} configuration, with every key at its default.",
        f"# Use it with: {command} --config FILE   (flags override the file)",
        "",
    ]
    for name, field in model.model_fields.items():
        text = field.description or name
        if name == "data_dir":
            text += f" Default: $RAMP_HOME if set, else {DATA_DIR_DEFAULT_TEXT}."
        lines += [f"# {line}" for line in textwrap.wrap(text, 96)]
        value = data_dir if name == "data_dir" else defaults[name]
        dumped = yaml.safe_dump({name: value}, default_flow_style=False, sort_keys=False)
        lines.append(dumped.rstrip("\n"))
        lines.append("")
    return "\n".join(lines)


# -- output helpers -----------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    out = []
    for row in [headers, *rows]:
        out.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(out)


# -- commands -----------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ramp")
def main() -> None:
    """ramp: reach services inside private networks without opening inbound ports.

    \b
    On a public machine:      ramp edge
    Create a tunnel:          ramp tunnel create NAME
    Route a network to it:    ramp tunnel route ip add 10.0.0.0/8 NAME
    ...in a virtual network:  ramp tunnel route ip add 10.0.0.0/8 NAME --vnet VNET
    Route a DNS zone to it:   ramp tunnel route dns add corp.example NAME
    Get its connector token:  ramp tunnel token NAME --edge EDGE_HOST:7844
    In the private network:   ramp tunnel run --token TOKEN
    Create a client identity: ramp client create NAME
    Get its client token:     ramp client token NAME --edge EDGE_HOST:443
    Everything on one host:   ramp up
    """


cli = main


@main.group(invoke_without_command=True, subcommand_metavar="[restart]")
@_model_options(EdgeConfig)
@_user_errors
@click.pass_context
def edge(ctx: click.Context, config_file: Path | None, **flags: Any) -> None:
    """Run the edge: proxy listeners, routing, and the tunnel listener connectors dial.

    SIGHUP reloads the config, SIGTERM drains (`--drain-timeout`) and exits, SIGQUIT starts
    a successor process that takes over without dropping anything (as `ramp edge restart`).
    """
    if ctx.invoked_subcommand is not None:
        return
    cfg = _load(EdgeConfig, config_file, flags)
    setup_logging(cfg.log_level)
    from ramp.edge import run_edge

    raise SystemExit(run_edge(cfg, lambda: _load(EdgeConfig, config_file, flags)))


def _restart(data_dir: Path | None, timeout: float, role: str) -> None:
    from ramp.restart.coordinator import CONNECTOR_SOCKET_NAME, SOCKET_NAME, request_restart

    path = _data_dir(data_dir) / (SOCKET_NAME if role == "edge" else CONNECTOR_SOCKET_NAME)
    if not path.exists():
        _fail(f"no {role} runs with data directory {path.parent} ({path} does not exist)", 1)
    try:
        answer = request_restart(path, timeout, lambda text: click.echo(f"... {text}"))
    except OSError as e:
        _fail(f"cannot reach the {role} at {path}: {e}", 1)
    if not answer.get("ok"):
        _fail(f"restart failed, the running {role} serves on: {answer.get('error')}", 1)
    click.echo(f"restarted: pid {answer.get('pid')} serves")


_RESTART_TIMEOUT = click.option(
    "--timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds to wait for the successor to take over.",
)


@edge.command("restart")
@_RESTART_TIMEOUT
@_common
@_user_errors
def edge_restart(data_dir: Path | None, log_level: str, timeout: float) -> None:
    """Restart the running edge in place: a successor (the installed ramp, the current
    config) takes over its sockets and tunnel connections; the old one drains and exits.
    Fails, with the successor's error, if it does not take over; the old one serves on."""
    setup_logging(log_level)
    _restart(data_dir, timeout, "edge")


@main.group()
def tunnel() -> None:
    """Create and manage tunnels, their routes and tokens; run a connector."""


@tunnel.command("restart")
@_RESTART_TIMEOUT
@_common
@_user_errors
def tunnel_restart(data_dir: Path | None, log_level: str, timeout: float) -> None:
    """Restart the running connector in place: a successor registers its tunnel connections
    before the old one unregisters, so the tunnel never has fewer than configured; flows in
    progress finish on the old one. Fails, with the successor's error, if it cannot."""
    setup_logging(log_level)
    _restart(data_dir, timeout, "connector")


@tunnel.command("create")
@click.argument("name")
@_common
@_user_errors
def tunnel_create(name: str, data_dir: Path | None, log_level: str) -> None:
    """Create a tunnel called NAME."""
    with _open_store(data_dir, log_level) as store:
        t = store.create_tunnel(name)
    click.echo(f"Created tunnel {t.name} with id {t.id}")
    click.echo(f"Get its connector token with: ramp tunnel token {t.name} --edge EDGE_HOST:7844")


@tunnel.command("list")
@_common
@_user_errors
def tunnel_list(data_dir: Path | None, log_level: str) -> None:
    """List tunnels and their routes."""
    with _open_store(data_dir, log_level) as store:
        tunnels = store.list_tunnels()
        routes = store.list_routes()
        dns_routes = store.list_dns_routes()
    by_tunnel: dict[str, list[str]] = {}
    for r in routes:
        by_tunnel.setdefault(r.tunnel_id, []).append(_route_text(r))
    zones: dict[str, list[str]] = {}
    for d in dns_routes:
        zones.setdefault(d.tunnel_id, []).append(d.zone)
    rows = [
        [
            t.name,
            t.id,
            t.created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            ",".join(by_tunnel.get(t.id, [])) or "-",
            ",".join(zones.get(t.id, [])) or "-",
        ]
        for t in tunnels
    ]
    click.echo(_table(["NAME", "ID", "CREATED", "ROUTES", "ZONES"], rows))


def _route_text(r: Route) -> str:
    # '@' cannot occur in a vnet name, so CIDR@VNET stays unambiguous; default routes stay bare.
    return r.cidr if r.vnet == DEFAULT_VNET else f"{r.cidr}@{r.vnet}"


@tunnel.command("delete")
@click.argument("name")
@_common
@_user_errors
def tunnel_delete(name: str, data_dir: Path | None, log_level: str) -> None:
    """Delete the tunnel NAME (a name or an id) and its IP and DNS routes."""
    with _open_store(data_dir, log_level) as store:
        t = store.delete_tunnel(name)
    click.echo(f"Deleted tunnel {t.name} ({t.id}) and its routes")


@tunnel.group("route")
def tunnel_route() -> None:
    """Route destinations to tunnels."""


@tunnel_route.group("ip")
def route_ip() -> None:
    """Route IP networks (CIDR) to tunnels; the longest matching prefix wins."""


def _vnet_option(help_text: str) -> Callable[[F], F]:
    return click.option(
        "--vnet",
        metavar="VNET",
        default=DEFAULT_VNET,
        show_default=True,
        help=help_text,
    )


@route_ip.command("add")
@click.argument("cidr")
@click.argument("name")
@_vnet_option("Virtual network the route is in (see `ramp vnet`).")
@click.option(
    "--proxy-protocol",
    type=click.Choice(["v1", "v2"]),
    default=None,
    help="Origins of this route get a PROXY protocol header with the client's address before "
    "the first byte (v2 also carries the identity and the flow id); TCP flows only.",
)
@_common
@_user_errors
def route_ip_add(
    cidr: str,
    name: str,
    vnet: str,
    proxy_protocol: str | None,
    data_dir: Path | None,
    log_level: str,
) -> None:
    """Send traffic for CIDR in virtual network VNET to the tunnel NAME."""
    with _open_store(data_dir, log_level) as store:
        r = store.add_route(cidr, name, vnet=vnet, proxy_protocol=proxy_protocol)
    click.echo(
        f"Added route {r.cidr} -> tunnel {r.tunnel_name} in virtual network {r.vnet}"
        + (f", origins get a PROXY {r.proxy_protocol} header" if r.proxy_protocol else "")
    )


@route_ip.command("list")
@click.option("--vnet", metavar="VNET", default=None, help="Only this virtual network's routes.")
@_common
@_user_errors
def route_ip_list(vnet: str | None, data_dir: Path | None, log_level: str) -> None:
    """List IP routes, with the virtual network each is in."""
    with _open_store(data_dir, log_level) as store:
        routes = store.list_routes(vnet)
    rows = [[r.cidr, r.tunnel_name, r.vnet, r.proxy_protocol or "-"] for r in routes]
    click.echo(_table(["CIDR", "TUNNEL", "VNET", "PROXY"], rows))


@route_ip.command("delete")
@click.argument("cidr")
@_vnet_option("Virtual network the route is in.")
@_common
@_user_errors
def route_ip_delete(cidr: str, vnet: str, data_dir: Path | None, log_level: str) -> None:
    """Delete the route for CIDR in virtual network VNET."""
    with _open_store(data_dir, log_level) as store:
        net = store.delete_route(cidr, vnet=vnet)
    click.echo(f"Deleted route {net} in virtual network {vnet}")


@tunnel_route.group("dns")
def route_dns() -> None:
    """Route DNS zones to tunnels: queries to the edge's DNS listener for names under a zone,
    and proxy requests for such names, are resolved by that tunnel's connector. The longest
    matching zone wins."""


@route_dns.command("add")
@click.argument("zone")
@click.argument("name")
@_common
@_user_errors
def route_dns_add(zone: str, name: str, data_dir: Path | None, log_level: str) -> None:
    """Resolve names under ZONE through the tunnel NAME."""
    with _open_store(data_dir, log_level) as store:
        r = store.add_dns_route(zone, name)
    click.echo(f"Added DNS route {r.zone} -> tunnel {r.tunnel_name}")


@route_dns.command("list")
@_common
@_user_errors
def route_dns_list(data_dir: Path | None, log_level: str) -> None:
    """List DNS routes."""
    with _open_store(data_dir, log_level) as store:
        routes = store.list_dns_routes()
    click.echo(_table(["ZONE", "TUNNEL"], [[r.zone, r.tunnel_name] for r in routes]))


@route_dns.command("delete")
@click.argument("zone")
@_common
@_user_errors
def route_dns_delete(zone: str, data_dir: Path | None, log_level: str) -> None:
    """Delete the DNS route for ZONE."""
    with _open_store(data_dir, log_level) as store:
        name = store.delete_dns_route(zone)
    click.echo(f"Deleted DNS route {name}")


def _dialable(edge_addr: str) -> str:
    """`edge_addr` if a connector or client can dial it; a wildcard is a listen address."""
    try:
        host, _port = parse_hostport(edge_addr)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    try:
        wildcard = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        wildcard = False  # a host name
    if wildcard:
        raise click.BadParameter(
            f"{edge_addr} is a listen address (any interface), not one to dial: give the "
            "edge's address as the connector or client reaches it"
        )
    return edge_addr


def _edges_or(default: Callable[[], str]) -> Callable[..., list[str]]:
    def check(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[str]:
        return [_dialable(e) for e in value] or [default()]

    return check


_check_edges = _edges_or(lambda: DEFAULT_EDGE)


def default_masque_edge() -> str:
    """Where clients reach the edge's MASQUE endpoint when --edge is not given: the edge
    config's `masque_listen` default when it has one, on loopback if that listens on every
    interface (a wildcard cannot be dialled), else 127.0.0.1:443."""
    field = EdgeConfig.model_fields.get("masque_listen")
    listen = field.get_default(call_default_factory=True) if field is not None else None
    if not isinstance(listen, str) or listen in ("", "off"):
        return f"127.0.0.1:{DEFAULT_MASQUE_PORT}"
    try:
        return _dialable(listen)
    except click.BadParameter:
        _host, port = parse_hostport(listen)
        return f"127.0.0.1:{port}"


@tunnel.command("token")
@click.argument("name")
@click.option(
    "--edge",
    "edges",
    multiple=True,
    metavar="HOST:PORT",
    callback=_check_edges,
    help=f"Edge tunnel address the connector dials. Repeatable. [default: {DEFAULT_EDGE}]",
)
@_common
@_user_errors
def tunnel_token(name: str, edges: list[str], data_dir: Path | None, log_level: str) -> None:
    """Print the connector token of tunnel NAME (and nothing else)."""
    with _open_store(data_dir, log_level) as store:
        t = store.get_tunnel(name)
        if t is None:
            raise StoreError(f"unknown tunnel {name!r}")
        token = Token(
            tunnel_id=t.id,
            secret=store.tunnel_secret(t.id),
            edges=edges,
            ca_fingerprint=store.edge_identity().ca_fingerprint,
        )
    click.echo(token.encode())


@tunnel.command("run")
@_model_options(ConnectorConfig, envvars={"token": "RAMP_TUNNEL_TOKEN"})
@_user_errors
def tunnel_run(config_file: Path | None, **flags: Any) -> None:
    """Run a connector: dial out to the edge(s) and serve the tunnel's flows.

    Give the token with --token-file FILE or the environment variable RAMP_TUNNEL_TOKEN:
    --token TOKEN works too, but shows in `ps` to every user of the machine.
    """
    cfg = _load(ConnectorConfig, config_file, flags)
    try:
        token = token_text(cfg.token, cfg.token_file)
    except TokenError as e:
        _fail(str(e))
    # From here on the token is the token, wherever it came from.
    cfg = cfg.model_copy(update={"token": token, "token_file": None})
    if not cfg.token:
        _fail(
            "no token: pass --token-file FILE, set RAMP_TUNNEL_TOKEN or pass --token TOKEN "
            "(see `ramp tunnel token`)"
        )
    try:
        Token.decode(cfg.token)
    except TokenError as e:
        _fail(f"invalid token: {e}")
    setup_logging(cfg.log_level)
    from ramp.connector import run_connector

    raise SystemExit(run_connector(cfg))


# -- client identities ------------------------------------------------------------------------


@main.group()
def client() -> None:
    """Client identities and the local proxy (MASQUE proxy mode)."""


def _ts_text(t: datetime.datetime | None) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ") if t is not None else "-"


@client.command("create")
@click.argument("name")
@_common
@_user_errors
def client_create(name: str, data_dir: Path | None, log_level: str) -> None:
    """Create the client identity NAME."""
    with _open_store(data_dir, log_level) as store:
        c = store.create_client(name)
    click.echo(f"Created client {c.name}")
    click.echo(f"Get its client token with: ramp client token {c.name} --edge EDGE_HOST:443")


@client.command("list")
@_common
@_user_errors
def client_list(data_dir: Path | None, log_level: str) -> None:
    """List client identities, revoked ones too."""
    with _open_store(data_dir, log_level) as store:
        clients = store.list_clients()
    rows = [[c.name, c.status, _ts_text(c.created_at), _ts_text(c.revoked_at)] for c in clients]
    click.echo(_table(["NAME", "STATUS", "CREATED", "REVOKED"], rows))


@client.command("revoke")
@click.argument("name")
@_common
@_user_errors
def client_revoke(name: str, data_dir: Path | None, log_level: str) -> None:
    """Revoke the client identity NAME.

    Its tokens stop working at once and its open flows end; the name is never reused."""
    with _open_store(data_dir, log_level) as store:
        was = store.get_client(name)
        c = store.revoke_client(name)
    if was is not None and was.revoked_at is not None:
        click.echo(f"Client {c.name} was already revoked ({_ts_text(c.revoked_at)})")
    else:
        click.echo(f"Revoked client {c.name}")


@client.command("token")
@click.argument("name")
@click.option(
    "--edge",
    "edges",
    multiple=True,
    metavar="HOST:PORT",
    callback=_edges_or(default_masque_edge),
    help="Edge MASQUE endpoint address the client dials. Repeatable. "
    f"[default: {default_masque_edge()}]",
)
@_common
@_user_errors
def client_token(name: str, edges: list[str], data_dir: Path | None, log_level: str) -> None:
    """Print the client token of NAME (and nothing else)."""
    with _open_store(data_dir, log_level) as store:
        token = ClientToken(
            name=name,
            secret=store.client_secret(name),
            edges=edges,
            ca_fingerprint=store.edge_identity().ca_fingerprint,
        )
    click.echo(token.encode())


@client.command("run")
@_model_options(ClientConfig, envvars={"token": "RAMP_CLIENT_TOKEN"})
@_user_errors
def client_run(config_file: Path | None, **flags: Any) -> None:
    """Run the local proxy: SOCKS5 and HTTP listeners on loopback whose flows go to the edge
    over one QUIC connection (MASQUE proxy mode: TCP as HTTP/3 CONNECT, UDP as connect-udp).

    Give the token with --token-file FILE or the environment variable RAMP_CLIENT_TOKEN:
    --token TOKEN works too, but shows in `ps` to every user of the machine. With --hop (a
    client token or a masque://NAME.SECRET@HOST:PORT?pin=CA_SHA256 URL, repeatable) the
    connection to the exit edge runs inside connect-udp on each hop in turn.
    """
    cfg = _load(ClientConfig, config_file, flags)
    try:
        text = token_text(cfg.token, cfg.token_file, envvar="RAMP_CLIENT_TOKEN")
    except TokenError as e:
        _fail(str(e))
    hops = [_hop_target(h) for h in cfg.hop]
    if not text and not hops:
        _fail(
            "no token: pass --token-file FILE, set RAMP_CLIENT_TOKEN or pass --token TOKEN "
            "(see `ramp client token`)"
        )
    if text:
        try:
            target = _client_target(decode_client_token(text))
        except TokenError as e:
            _fail(f"invalid token: {e}")
        if cfg.edge:
            target = dataclasses.replace(target, addresses=tuple(cfg.edge))
    else:
        target, hops = hops[-1], hops[:-1]  # the last hop is the exit edge
    cfg = cfg.model_copy(update={"token": "", "token_file": None})
    setup_logging(cfg.log_level)
    from ramp.client import run_client

    raise SystemExit(run_client(cfg, target, hops))


def _client_target(token: ClientToken) -> EdgeTarget:
    from ramp.offramps.masque import EdgeTarget

    return EdgeTarget(tuple(token.edges), token.ca_fingerprint, token.bearer)


def _hop_target(value: str) -> EdgeTarget:
    """A --hop: a client token, or masque://NAME.SECRET@HOST:PORT?pin=CA_SHA256."""
    if value.startswith("masque://"):
        url = urllib.parse.urlsplit(value)
        pin = urllib.parse.parse_qs(url.query).get("pin", [""])[0].lower()
        if not url.username or not url.hostname or not url.port or len(pin) != 64:
            raise click.BadParameter(
                "a hop URL is masque://NAME.SECRET@HOST:PORT?pin=CA_SHA256", param_hint="--hop"
            )
        host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
        bearer = urllib.parse.unquote(url.username)
        from ramp.offramps.masque import EdgeTarget

        return EdgeTarget((f"{host}:{url.port}",), pin, bearer)
    try:
        return _client_target(decode_client_token(value))
    except TokenError as e:
        raise click.BadParameter(f"not a client token: {e}", param_hint="--hop") from None


@client.command("status")
@click.option(
    "--metrics-listen",
    default="127.0.0.1:20243",
    show_default=True,
    metavar="HOST:PORT",
    help="Where the running client serves /ready (its --metrics-listen).",
)
@_user_errors
def client_status(metrics_listen: str) -> None:
    """Show the running client's edge connection (state, RTT) and flows, and with --tun the
    device's addresses, routes and packet counters; exit 1 when it is not connected."""
    import json
    import urllib.request

    host, port = parse_hostport(metrics_listen)
    url = f"http://{host}:{port}/ready"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            code, body = r.status, r.read()
    except urllib.error.HTTPError as e:
        code, body = e.code, e.read()
    except OSError as e:
        _fail(f"no client answers on {metrics_listen}: {e}")
    try:
        info = json.loads(body)
    except ValueError:
        _fail(f"{url} did not answer JSON")
    for key, value in info.items():
        if isinstance(value, dict) and key == "tun":  # --tun: the device, one line a field
            for sub, item in value.items():
                text = ", ".join(map(str, item)) or "none" if isinstance(item, list) else item
                click.echo(f"{'tun ' + sub:14} {text}")
            continue
        click.echo(f"{key:14} {value}")
    raise SystemExit(0 if code == 200 else 1)


# -- virtual networks -------------------------------------------------------------------------


@main.group()
def vnet() -> None:
    """Virtual networks: separate route tables, so the same CIDR can lead to different tunnels.

    A flow uses the vnet its identity is assigned to, else its on-ramp's (`vnet:` in the on-ramp's
    config), else `default`, which always exists.
    """


@vnet.command("add")
@click.argument("name")
@_common
@_user_errors
def vnet_add(name: str, data_dir: Path | None, log_level: str) -> None:
    """Create a virtual network called NAME."""
    with _open_store(data_dir, log_level) as store:
        v = store.add_vnet(name)
    click.echo(f"Added virtual network {v.name}")


@vnet.command("list")
@_common
@_user_errors
def vnet_list(data_dir: Path | None, log_level: str) -> None:
    """List virtual networks, their route counts and assigned identities."""
    with _open_store(data_dir, log_level) as store:
        vnets = store.list_vnets()
        routes = store.list_routes()
        assignments = store.vnet_assignments()
    counts: dict[str, int] = {}
    for r in routes:
        counts[r.vnet] = counts.get(r.vnet, 0) + 1
    identities: dict[str, list[str]] = {}
    for identity, name in assignments.items():
        identities.setdefault(name, []).append(identity)
    rows = [
        [v.name, str(counts.get(v.name, 0)), ",".join(identities.get(v.name, [])) or "-"]
        for v in vnets
    ]
    click.echo(_table(["NAME", "ROUTES", "IDENTITIES"], rows))


@vnet.command("delete")
@click.argument("name")
@_common
@_user_errors
def vnet_delete(name: str, data_dir: Path | None, log_level: str) -> None:
    """Delete the virtual network NAME (it must have no routes and no assigned identities)."""
    with _open_store(data_dir, log_level) as store:
        v = store.delete_vnet(name)
    click.echo(f"Deleted virtual network {v.name}")


@vnet.command("assign")
@click.argument("name")
@click.option("--identity", required=True, metavar="USER", help="Proxy user name to assign.")
@_common
@_user_errors
def vnet_assign(name: str, identity: str, data_dir: Path | None, log_level: str) -> None:
    """Assign proxy user USER to virtual network NAME.

    The user's flows then use NAME's routes, whatever on-ramp they come through.
    """
    with _open_store(data_dir, log_level) as store:
        before = store.assign_vnet(name, identity)
    moved = f" (was {before})" if before is not None and before != name else ""
    click.echo(f"Assigned identity {identity} to virtual network {name}{moved}")


@vnet.command("unassign")
@click.option("--identity", required=True, metavar="USER", help="Proxy user name to unassign.")
@_common
@_user_errors
def vnet_unassign(identity: str, data_dir: Path | None, log_level: str) -> None:
    """Remove proxy user USER's assignment.

    The user's flows then use their on-ramp's virtual network again.
    """
    with _open_store(data_dir, log_level) as store:
        name = store.unassign_vnet(identity)
    click.echo(f"Unassigned identity {identity} from virtual network {name}")


@main.group()
def policy() -> None:
    """Allow or deny flows: ordered rules, the first match wins, no match denies.

    \b
    A new store has one rule, `default`, allowing every identity to every routed
    destination; delete it to start from deny-all. A running edge picks up changes within
    about a second, and ends open flows that a change now denies.
    """


def _rule_row(position: int, r: Rule) -> list[str]:
    return [
        str(position),
        r.id,
        r.action,
        r.identity or "*",
        r.group or "*",
        r.onramp or "*",
        r.source or "*",
        r.to or "*",
        r.ports or "*",
        r.protocol,
    ]


@policy.command("add")
@click.argument("rule_id", metavar="ID")
@click.option("--action", type=click.Choice(ACTIONS), required=True, help="What a match does.")
@click.option("--identity", help="Match this user name only.")
@click.option("--group", help="Match members of this group only (edge config `groups`).")
@click.option("--onramp", help="Match flows from this on-ramp type only (socks5, http, ...).")
@click.option("--from", "source", metavar="CIDR", help="Match client addresses in CIDR.")
@click.option(
    "--to",
    metavar="CIDR|HOSTPATTERN",
    help="Match destinations in CIDR, or names: db.corp.example, *.corp.example.",
)
@click.option("--ports", metavar="LIST", help="Match destination ports: 80,443,8000-8100.")
@click.option(
    "--protocol", type=click.Choice(PROTOCOLS), default="any", show_default=True, help="Match."
)
@click.option(
    "--position", type=click.IntRange(min=1), help="1-based place in the order [default: last]"
)
@_common
@_user_errors
def policy_add(
    rule_id: str,
    action: str,
    identity: str | None,
    group: str | None,
    onramp: str | None,
    source: str | None,
    to: str | None,
    ports: str | None,
    protocol: str,
    position: int | None,
    data_dir: Path | None,
    log_level: str,
) -> None:
    """Add the rule ID."""
    setup_logging(log_level)
    rule = Rule(rule_id, action, identity, group, onramp, source, to, ports, protocol)
    with Store(_data_dir(data_dir)) as store:
        at = store.add_rule(rule, position)
        stored = next(r for r in store.list_rules() if r.id == rule_id)
    click.echo(f"Added rule {stored.id} at position {at}: {stored.describe()}")


@policy.command("list")
@_common
@_user_errors
def policy_list(data_dir: Path | None, log_level: str) -> None:
    """List the rules in the order they are checked."""
    with _open_store(data_dir, log_level) as store:
        rules = store.list_rules()
    headers = ["#", "ID", "ACTION", "IDENTITY", "GROUP", "ONRAMP", "FROM", "TO", "PORTS", "PROTO"]
    click.echo(_table(headers, [_rule_row(i, r) for i, r in enumerate(rules, 1)]))
    if not rules:
        click.echo("(no rules: every flow is denied)")


@policy.command("delete")
@click.argument("rule_id", metavar="ID")
@_common
@_user_errors
def policy_delete(rule_id: str, data_dir: Path | None, log_level: str) -> None:
    """Delete the rule ID."""
    with _open_store(data_dir, log_level) as store:
        store.delete_rule(rule_id)
        left = len(store.list_rules())
    click.echo(f"Deleted rule {rule_id}" + ("" if left else " (no rules left: deny-all)"))


def _split_test_target(value: str) -> tuple[str, int, str]:
    target, _, proto = value.partition("/")
    proto = proto.lower() or "tcp"
    if proto not in PROTOCOLS or proto == "any":
        raise click.BadParameter(f"protocol {proto!r}: use tcp, udp or icmp")
    try:
        host, port = parse_hostport(target)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return host, port, proto


@policy.command("test")
@click.option("--identity", help="The user name (omit for an anonymous flow).")
@click.option("--group", "groups", multiple=True, help="A group of the identity. Repeatable.")
@click.option(
    "--to", "target", required=True, metavar="HOST:PORT[/PROTOCOL]", help="The destination."
)
@click.option("--onramp", default="socks5", show_default=True, help="The on-ramp type.")
@click.option("--from", "source", default="127.0.0.1", show_default=True, help="Client IP.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Edge config file to take `groups` from.",
)
@_common
@_user_errors
def policy_test(
    identity: str | None,
    groups: tuple[str, ...],
    target: str,
    onramp: str,
    source: str,
    config_file: Path | None,
    data_dir: Path | None,
    log_level: str,
) -> None:
    """Say what the policy decides for a flow: `allow RULE` or `deny RULE`, then why."""
    setup_logging(log_level)
    host, port, proto = _split_test_target(target)
    member = set(groups)
    if config_file is not None and identity is not None:
        cfg = load_config(EdgeConfig, config_file, {})
        member |= {g for g, users in cfg.groups.items() if identity in users}
    with Store(_data_dir(data_dir)) as store:
        rules = store.list_rules()
        routes = store.list_routes()
        vnet_name = store.vnet_assignments().get(identity or "", DEFAULT_VNET)
    facts = Facts(
        identity=identity,
        groups=frozenset(member),
        onramp=onramp,
        source=source,
        host=None if _is_ip(host) else host.lower().rstrip("."),
        address=host if _is_ip(host) else None,
        port=port,
        protocol=proto,
    )
    verdict = Policy(rules).decide(facts)
    click.echo(f"{'allow' if verdict.allowed else 'deny'} {verdict.rule}")
    click.echo(f"  {verdict.why}")
    who = identity or "an anonymous client"
    if member:
        who += f" (groups {', '.join(sorted(member))})"
    click.echo(f"  flow: {who} from {source} via {onramp} to {host}:{port}/{proto}")
    if facts.address is None:
        click.echo("  the destination is a name: CIDR rules match it once the edge resolves it")
    else:
        hit = VnetRoutes(routes).lookup(vnet_name, facts.address)
        if hit is None:
            click.echo(
                f"  no route to {host} in virtual network {vnet_name}: the edge refuses the "
                "flow anyway unless direct egress is on"
            )
        else:
            click.echo(
                f"  routed to tunnel {hit.tunnel_name} ({hit.network}) in {vnet_name}"
                + (
                    f"; origins get a PROXY {hit.proxy_protocol} header"
                    if hit.proxy_protocol
                    else ""
                )
            )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@main.command()
@_common
@_user_errors
def up(data_dir: Path | None, log_level: str) -> None:
    """Run an edge and a connector together on this host (tunnel `local`)."""
    setup_logging(log_level)
    from ramp.up import run_up

    raise SystemExit(run_up(_data_dir(data_dir), log_level))


@main.group()
def config() -> None:
    """Configuration files."""


@config.command("default")
@click.option(
    "--role",
    type=click.Choice(["edge", "connector", "client"]),
    required=True,
    help="Whose config.",
)
@_common
def config_default(role: str, data_dir: Path | None, log_level: str) -> None:
    """Print the full default config of ROLE as YAML, every key commented."""
    model: type[BaseModel] = ROLE_MODELS[role]
    click.echo(default_yaml(model, str(data_dir) if data_dir else DATA_DIR_DEFAULT_TEXT), nl=False)


ROLE_MODELS: dict[str, type[EdgeConfig] | type[ConnectorConfig] | type[ClientConfig]] = {
    "edge": EdgeConfig,
    "connector": ConnectorConfig,
    "client": ClientConfig,
}


def _role_only_keys(keys: set[str]) -> tuple[set[str], set[str]]:
    """(keys only an edge has, keys only a connector has) among `keys`."""
    edge_keys, connector_keys = set(EdgeConfig.model_fields), set(ConnectorConfig.model_fields)
    return keys & (edge_keys - connector_keys), keys & (connector_keys - edge_keys)


def detect_role(keys: set[str]) -> str | None:
    """`connector` for a file with keys only a connector has, `edge` for any other, None when
    it has keys only one role has and keys only the other has (no guess can be right then)."""
    edge_only, connector_only = _role_only_keys(keys)
    if edge_only and connector_only:
        return None
    return "connector" if connector_only else "edge"


@config.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--role",
    type=click.Choice(list(ROLE_MODELS)),
    default=None,
    help="Whose config. [default: connector if FILE has connector-only keys, else edge]",
)
def config_check(file: Path, role: str | None) -> None:
    """Check the config file FILE; print each problem as FILE:LINE: KEY: message.

    Without --role, a file with keys only a connector has (token, edge, ha_connections, ...) is
    checked as a connector config and any other as an edge config; a file with keys only one
    role has and keys only the other has needs --role. Exit status 0 if valid, 2 if not.
    """
    try:
        parsed = read_yaml_file(file)
    except ConfigIssues as e:
        _report_problems(str(e))
    if role is None:
        role = detect_role(top_level_keys(parsed))
        if role is None:
            edge_only, connector_only = _role_only_keys(top_level_keys(parsed))
            _report_problems(
                f"{file}: has edge keys ({', '.join(sorted(edge_only))}) and connector keys "
                f"({', '.join(sorted(connector_only))}); pass --role edge or --role connector"
            )
    try:
        cfg = load_config(ROLE_MODELS[role], file, {})
    except ConfigError as e:
        _report_problems(str(e))
    if isinstance(cfg, ConnectorConfig) and cfg.token:
        # `ramp tunnel run` refuses a token it cannot decode: so does the check.
        try:
            Token.decode(cfg.token)
        except TokenError as e:
            _, line = locate(parsed.root, ["token"])
            _report_problems(f"{file}:{line}: token: invalid token: {e}")
    click.echo(f"{file}: valid {role} configuration")


def config_docs_markdown() -> str:
    """docs/configuration.md as `ramp config docs` prints it."""
    roles = []
    for title, command, model, cmd, role in (
        ("Edge", "ramp edge", EdgeConfig, edge, "edge"),
        ("Connector", "ramp tunnel run", ConnectorConfig, tunnel_run, "connector"),
        ("Client", "ramp client run", ClientConfig, client_run, "client"),
    ):
        intro = f"Every key at its default, as `ramp config default --role {role}` prints it:"
        roles.append(RoleDoc(f"{title} (`{command}`)", model, cmd, intro, default_yaml(model)))
    return render_config_docs(roles)


@config.command("docs")
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the Markdown to this file instead of stdout (docs/configuration.md).",
)
def config_docs(output: Path | None) -> None:
    """Print the reference of every config key of both roles, as Markdown."""
    text = config_docs_markdown()
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text)


def _report_problems(text: str) -> typing.NoReturn:
    # Bare `FILE:LINE: ...` lines, the form editors and CI annotators recognise.
    click.echo(text, err=True)
    raise SystemExit(2)


# -- systemd units ----------------------------------------------------------------------------


@main.group("systemd")
def systemd_group() -> None:
    """systemd unit files for the edge and the connector (docs/systemd.md)."""


@systemd_group.command("units")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    default=None,
    help="Write the unit files into DIR (e.g. /etc/systemd/system) instead of printing them.",
)
@click.option(
    "--ramp",
    "ramp_path",
    metavar="PATH",
    default=None,
    help="The ramp executable for ExecStart. [default: `ramp` on PATH, else /usr/local/bin/ramp]",
)
@click.option("--force", is_flag=True, help="Overwrite unit files already in DIR.")
def systemd_units(out: Path | None, ramp_path: str | None, force: bool) -> None:
    """Print ramp's systemd units (ramp-edge.service, ramp-edge.socket,
    ramp-connector.service), each after a `# file: NAME` line, or write them into DIR."""
    import os
    import shutil

    from ramp.systemd import DEFAULT_RAMP, HIDDEN_PREFIXES, units

    if force and out is None:
        _fail("--force goes with --out")
    if ramp_path is None:
        found = shutil.which("ramp")
        ramp_path = os.path.abspath(found) if found else DEFAULT_RAMP
    try:
        files = units(ramp_path)
    except ValueError as e:
        _fail(str(e))
    if ramp_path.startswith(HIDDEN_PREFIXES):
        click.echo(
            f"warning: {ramp_path} is hidden from the services by ProtectHome=/PrivateTmp=: "
            "pass --ramp with a path under /usr or /opt",
            err=True,
        )
    if out is None:
        for name, text in files.items():
            click.echo(f"# file: {name}")
            click.echo(text, nl=False)
        return
    there = [n for n in files if (out / n).exists() or (out / n).is_symlink()]
    if there and not force:
        _fail(f"{out}: {', '.join(there)} already there; pass --force to overwrite")
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.chmod(0o644)
        tmp.replace(out / name)  # replaces a symlink itself, not the file it points to
        click.echo(f"wrote {out / name}")
    click.echo("then: systemctl daemon-reload", err=True)


if __name__ == "__main__":
    main()
