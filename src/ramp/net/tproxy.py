"""The routing and firewall state an any-port listener needs, set up and torn down by the edge.

Two ways to get every port of a prefix to one socket (reference: spectrum-tproxy-any-port.de.txt,
socket-lookup-bpf-any-port.txt):

- sk_lookup (`ramp.net.sk_lookup`) steers packets that are *local*; the prefix is made local
  with the AnyIP route `local PREFIX dev lo` (in the local table, marked `proto 245`).
- TPROXY: an nftables rule in prerouting `ip daddr PREFIX tcp dport RANGE tproxy to
  LISTEN meta mark set T`, the rule `fwmark T lookup T` and the route `local 0.0.0.0/0 dev lo
  table T`, so marked packets are delivered locally to the IP_TRANSPARENT socket.

T is a routing table (and fwmark) number of ramp's own range, free in this namespace. What is
created is written first to a state file (`StateDir`); an edge that starts finds the files of
edges that died without cleaning up (SIGKILL, a crash) and removes what they list. Rules carry
`protocol RTPROT_RAMP` (245), so `ip rule` and `ip route` show whose they are. Two listeners
of one prefix (TCP and UDP) share the AnyIP route: it goes when the last of them does. The
commands are iproute2's and nftables', run as subprocesses: what the edge does can be read and
repeated by hand. (pyroute2 would save the processes, but its synchronous API runs an event
loop of its own, which cannot run inside the edge's, and these few calls at start and stop do
not warrant making the on-ramp's setup asynchronous netlink code.)
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

IP_TRANSPARENT = 19  # include/uapi/linux/in.h
IP_RECVORIGDSTADDR = 20  # same value as IP_ORIGDSTADDR, the control message type
IP_ORIGDSTADDR = 20
IPV6_TRANSPARENT = 75  # include/uapi/linux/in6.h
IPV6_RECVORIGDSTADDR = 74
IPV6_ORIGDSTADDR = 74

RTPROT_RAMP = 245  # rtnetlink route/rule protocol number marking ramp's rules (unassigned)
TABLE_BASE = 0x72610000  # ramp's routing table / fwmark numbers: TABLE_BASE + 0..MAX_TABLES-1
MAX_TABLES = 4096
RULE_PRIORITY = 90  # after the local table's rule (0), before main (32766)
NFT_TABLE_PREFIX = "ramp_anyport_"


class SteeringError(OSError):
    """Steering could not be set up (a command failed: the message holds it and its stderr;
    or the BPF program did not load). An OSError: the edge cannot start, as when a port is
    taken (exit code 1, one line saying why)."""


def _run(args: Sequence[str], *, input: str | None = None, check: bool = True) -> str:
    try:
        proc = subprocess.run(
            list(args), input=input, capture_output=True, text=True, timeout=30, check=False
        )
    except FileNotFoundError as e:
        raise SteeringError(f"{args[0]} not found (install iproute2 and nftables)") from e
    if check and proc.returncode != 0:
        raise SteeringError(f"`{' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc.stdout


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def nft_ruleset(
    table: str,
    protocol: str,
    network: Network,
    ports: tuple[int, int],
    listen: tuple[str, int],
    mark: int,
) -> str:
    """The nftables table of one TPROXY listener (the text `nft -f` reads)."""
    dport = str(ports[0]) if ports[0] == ports[1] else f"{ports[0]}-{ports[1]}"
    family = "ip6" if network.version == 6 else "ip"
    to = f"[{listen[0]}]:{listen[1]}" if network.version == 6 else f"{listen[0]}:{listen[1]}"
    return (
        f"table {family} {table} {{\n"
        "    chain prerouting {\n"
        "        type filter hook prerouting priority mangle; policy accept;\n"
        f"        {family} daddr {network} {protocol} dport {dport} "
        f"tproxy to {to} meta mark set {mark:#x} accept\n"
        "    }\n"
        "}\n"
    )


@dataclass
class Steering:
    """What one listener created: routing rules, routes and an nftables table."""

    pid: int
    rules: list[list[str]] = field(default_factory=list)  # `ip rule add` arguments
    routes: list[list[str]] = field(default_factory=list)  # `ip route add` arguments
    nft_table: str | None = None
    version: int = 4  # IP version of the rules, routes and table

    def to_json(self) -> str:
        return json.dumps(
            {
                "pid": self.pid,
                "rules": self.rules,
                "routes": self.routes,
                "nft": self.nft_table,
                "version": self.version,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Steering:
        data = json.loads(text)
        return cls(
            int(data["pid"]),
            data["rules"],
            data["routes"],
            data.get("nft"),
            int(data.get("version", 4)),
        )

    @property
    def nft_family(self) -> str:
        return "ip6" if self.version == 6 else "ip"

    def ip(self, *args: str) -> list[str]:
        return ["ip", f"-{self.version}", *args]

    def undo(self, keep: Steering | None = None, keep_tables: frozenset[str] = frozenset()) -> None:
        """Remove everything listed but what `keep` and `keep_tables` list too (other running
        listeners still need it: the AnyIP route of a prefix served over TCP and UDP); what
        is gone already is no error."""
        if self.nft_table and self.nft_table not in keep_tables:
            _run(["nft", "delete", "table", self.nft_family, self.nft_table], check=False)
        for args in self.routes:
            if keep is None or args not in keep.routes:
                _run(self.ip("route", "del", *args), check=False)
        for args in self.rules:
            if keep is None or args not in keep.rules:
                _run(self.ip("rule", "del", *args), check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StateDir:
    """One JSON file per listener's steering, in the role's data directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> dict[Path, Steering]:
        found: dict[Path, Steering] = {}
        if not self.path.is_dir():
            return found
        for file in sorted(self.path.glob("*.json")):
            try:
                found[file] = Steering.from_json(file.read_text())
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("anyport: unreadable steering state %s (%s); removing it", file, e)
                file.unlink(missing_ok=True)
        return found

    def live(self, but: Path | None = None) -> tuple[Steering, frozenset[str]]:
        """The rules and routes the files of running listeners list (but `but`), as one
        Steering, and their nftables tables."""
        union = Steering(0)
        tables: set[str] = set()
        for file, state in self._read().items():
            if file != but and _pid_alive(state.pid):
                union.rules += state.rules
                union.routes += state.routes
                if state.nft_table:
                    tables.add(state.nft_table)
        return union, frozenset(tables)

    def remove(self, file: Path, state: Steering) -> None:
        """Undo `state` (what no other running listener shares) and delete its file."""
        file.unlink(missing_ok=True)
        keep, tables = self.live(but=file)
        state.undo(keep, tables)

    def reap(self) -> list[Path]:
        """Undo the steering of every file whose edge is gone; returns the files removed."""
        reaped: list[Path] = []
        for file, state in self._read().items():
            if _pid_alive(state.pid):
                continue
            log.warning(
                "anyport: removing steering left by process %d (it ended without cleaning up): %s",
                state.pid,
                ", ".join(
                    [*(f"ip rule {' '.join(r)}" for r in state.rules)]
                    + [*(f"ip route {' '.join(r)}" for r in state.routes)]
                    + (
                        [f"nft table {state.nft_family} {state.nft_table}"]
                        if state.nft_table
                        else []
                    )
                ),
            )
            self.remove(file, state)
            reaped.append(file)
        return reaped

    def write(self, name: str, state: Steering) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        file = self.path / f"{name}.json"
        tmp = file.with_suffix(".tmp")
        tmp.write_text(state.to_json())
        tmp.replace(file)
        return file


def used_tables() -> set[int]:
    """Routing table numbers that `ip rule` refers to in this namespace (IPv4 and IPv6)."""
    out = _run(["ip", "-4", "rule", "list"]) + _run(["ip", "-6", "rule", "list"], check=False)
    return {int(m) for m in re.findall(r"lookup (\d+)", out)}


def free_table(taken: set[int]) -> int:
    for n in range(TABLE_BASE, TABLE_BASE + MAX_TABLES):
        if n not in taken:
            return n
    raise SteeringError("no free routing table number left for an any-port listener")


class Installed:
    """Steering set up for one listener; `remove()` undoes it and deletes its state file."""

    def __init__(self, states: StateDir, state: Steering, file: Path) -> None:
        self.states = states
        self.state = state
        self.file = file

    def remove(self) -> None:
        self.states.remove(self.file, self.state)


def _install(states: StateDir, name: str, state: Steering, nft: str | None) -> Installed:
    # the state file first: a crash halfway still leaves a list of what to remove
    file = states.write(name, state)
    installed = Installed(states, state, file)
    try:
        if nft is not None:
            assert state.nft_table is not None
            _run(["nft", "delete", "table", state.nft_family, state.nft_table], check=False)
            _run(["nft", "-f", "-"], input=nft)
        for args in state.routes:
            _run(state.ip("route", "replace", *args))
        for args in state.rules:
            _run(state.ip("rule", "add", *args))
    except BaseException:
        installed.remove()
        raise
    return installed


def install_local_prefix(states: StateDir, name: str, network: Network) -> Installed:
    """Make every address of `network` local (for sk_lookup): the AnyIP route `local NETWORK
    dev lo` in the local table. Not in a table of ramp's own: a reply's source address counts
    as local only when the local table says so (the kernel's __ip_dev_find)."""
    v = network.version
    route = ["local", str(network), "dev", "lo", "table", "local", "protocol", str(RTPROT_RAMP)]
    existing = _run(["ip", f"-{v}", "route", "show", "table", "local", "exact", str(network)])
    if existing.strip() and f"proto {RTPROT_RAMP}" not in existing:
        # the operator's own AnyIP route: use it, and leave it alone at exit
        log.info("anyport: %s is local already (%s)", network, existing.strip())
        return _install(states, name, Steering(os.getpid(), version=v), None)
    return _install(states, name, Steering(os.getpid(), routes=[route], version=v), None)


def install_tproxy(
    states: StateDir,
    name: str,
    protocol: str,
    network: Network,
    ports: tuple[int, int],
    listen: tuple[str, int],
) -> Installed:
    """The nftables tproxy rule and the fwmark routing of one TPROXY listener."""
    table = free_table(used_tables())
    everything = "::/0" if network.version == 6 else "0.0.0.0/0"
    state = Steering(
        os.getpid(),
        rules=[
            [
                "fwmark",
                str(table),
                "lookup",
                str(table),
                "priority",
                str(RULE_PRIORITY),
                "protocol",
                str(RTPROT_RAMP),
            ]
        ],
        routes=[["local", everything, "dev", "lo", "table", str(table)]],
        nft_table=f"{NFT_TABLE_PREFIX}{table:x}",
        version=network.version,
    )
    assert state.nft_table is not None
    nft = nft_ruleset(state.nft_table, protocol, network, ports, listen, table)
    return _install(states, name, state, nft)


__all__ = [
    "IPV6_ORIGDSTADDR",
    "IPV6_RECVORIGDSTADDR",
    "IPV6_TRANSPARENT",
    "IP_ORIGDSTADDR",
    "IP_RECVORIGDSTADDR",
    "IP_TRANSPARENT",
    "Installed",
    "StateDir",
    "SteeringError",
    "install_local_prefix",
    "install_tproxy",
    "nft_ruleset",
]
