"""Which addresses direct egress must not reach unless policy names them: the edge's own
services (loopback, its interface addresses), link-local neighbours, cloud metadata
endpoints, and addresses that are not one host (unspecified, multicast, broadcast).

An authenticated user with direct egress otherwise reaches the edge's /metrics on 127.0.0.1,
or a metadata service's credentials, from outside."""

from __future__ import annotations

import array
import asyncio
import fcntl
import ipaddress
import json
import logging
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ramp.flows.flow import IPAddress, parse_ip

log = logging.getLogger("ramp.egress")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DENIED: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), what)
    for net, what in (
        ("169.254.169.254/32", "a metadata address"),  # AWS, GCP, Azure, OpenStack
        ("100.100.100.200/32", "a metadata address"),  # Alibaba Cloud
        ("fd00:ec2::254/128", "a metadata address"),  # AWS over IPv6
        ("127.0.0.0/8", "loopback"),
        ("::1/128", "loopback"),
        ("0.0.0.0/8", "unspecified"),  # Linux connects 0.0.0.0 to the local host
        ("::/128", "unspecified"),
        ("169.254.0.0/16", "link-local"),
        ("fe80::/10", "link-local"),
        ("224.0.0.0/4", "multicast"),
        ("ff00::/8", "multicast"),
        ("255.255.255.255/32", "broadcast"),
    )
)

REASON = "direct egress to loopback/link-local/metadata/edge address is not allowed"


def normalise(ip: IPAddress) -> IPAddress:
    """`::ffff:127.0.0.1` is 127.0.0.1 and `fe80::1%eth0` is fe80::1 for every check."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id is not None:
            return ipaddress.IPv6Address(int(ip))
    return ip


def denied_range(ip: IPAddress, own: frozenset[IPAddress]) -> tuple[IPNetwork | None, str] | None:
    """(the denied range `ip` is in, what it is) or None when direct egress may reach it;
    the range is None for the edge's own addresses."""
    ip = normalise(ip)
    for net, what in DENIED:
        if ip.version == net.version and ip in net:
            return net, what
    if ip in own:
        return None, "an address of the edge"
    return None


def allowed_by_rule(ip: IPAddress, denied: IPNetwork | None, rule_to: str | None) -> bool:
    """A rule allows a denied address only by naming it: its `to` is a CIDR inside the
    denied range (`127.0.0.1/32`, `169.254.0.0/16`), or for the edge's own addresses the
    address itself. A wider rule (`0.0.0.0/0`, the edge's LAN) is not an explicit yes."""
    if rule_to is None:
        return False
    try:
        net = ipaddress.ip_network(rule_to, strict=False)
    except ValueError:  # a host name pattern: names never allow a denied address
        return False
    ip = normalise(ip)
    if net.version != ip.version or ip not in net:
        return False
    if denied is None:
        return net.num_addresses == 1
    return net.subnet_of(denied)  # type: ignore[arg-type]


def interface_addresses() -> frozenset[IPAddress]:
    """Every address on this host's interfaces (in the edge's network namespace)."""
    found = _from_ip_command()
    if found is None:
        found = _ipv4_ioctl() | _ipv6_proc()
    return frozenset(normalise(ip) for ip in found)


def _from_ip_command() -> set[IPAddress] | None:
    # `ip -j addr` lists secondary addresses too, which the ioctl does not
    try:
        out = subprocess.run(
            ["ip", "-j", "addr"], capture_output=True, timeout=5, check=True
        ).stdout
        links = json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return set(_parse(a.get("local") for link in links for a in link.get("addr_info", ())))


def _parse(texts: Iterable[object]) -> Iterable[IPAddress]:
    for text in texts:
        ip = parse_ip(text) if isinstance(text, str) else None
        if ip is not None:
            yield ip


def _ipv4_ioctl() -> set[IPAddress]:
    SIOCGIFCONF = 0x8912
    size = 40  # struct ifreq on 64-bit Linux
    buf = array.array("B", b"\0" * size * 256)
    addr, _ = buf.buffer_info()
    found: set[IPAddress] = set()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            ifc = fcntl.ioctl(s.fileno(), SIOCGIFCONF, struct.pack("iL", len(buf), addr))
    except OSError:
        return found
    used = struct.unpack("iL", ifc)[0]
    data = buf.tobytes()[:used]
    for off in range(0, used, size):
        found.add(ipaddress.IPv4Address(data[off + 20 : off + 24]))
    return found


def _ipv6_proc(path: Path = Path("/proc/net/if_inet6")) -> set[IPAddress]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return set()
    return {ipaddress.IPv6Address(bytes.fromhex(line.split()[0])) for line in lines if line}


class EgressGuard:
    """The direct off-ramp's check, with the edge's addresses read at start and again at
    most every `refresh_after` seconds (interfaces come and go)."""

    def __init__(
        self, own: frozenset[IPAddress] | None = None, refresh_after: float = 30.0
    ) -> None:
        self.fixed = own is not None
        self.own = interface_addresses() if own is None else own
        self.refresh_after = refresh_after
        self._next = time.monotonic() + refresh_after
        self._refreshing = False

    def maybe_refresh(self) -> None:
        """Re-read the addresses in a thread when they are older than `refresh_after`; the
        flow that notices goes on with the addresses read last."""
        now = time.monotonic()
        if self.fixed or self._refreshing or now < self._next:
            return
        self._refreshing = True
        self._next = now + self.refresh_after
        fut = asyncio.get_running_loop().run_in_executor(None, interface_addresses)
        fut.add_done_callback(self._refreshed)

    def _refreshed(self, fut: asyncio.Future[frozenset[IPAddress]]) -> None:
        self._refreshing = False
        if not fut.cancelled() and fut.exception() is None:
            self.own = fut.result()

    def problem(self, address: str, rule_to: Callable[[], str | None]) -> str | None:
        """Why direct egress may not reach `address`, or None; `rule_to` gives the `to` of
        the rule that allowed the flow (asked only for a denied address)."""
        ip = parse_ip(address)
        if ip is None:
            return None  # the router resolves names before direct egress sees them
        hit = denied_range(ip, self.own)
        if hit is None or allowed_by_rule(ip, hit[0], rule_to()):
            return None
        return f"{REASON} ({normalise(ip)} is {hit[1]})"
