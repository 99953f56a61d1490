"""Name resolution without getaddrinfo: /etc/hosts, then DNS through dnspython's asyncio
resolver, each query bounded in time and the number of queries in flight bounded.

getaddrinfo runs in a small thread pool (libuv's has 4 threads): a few names whose resolver
never answers used to hold every thread, and every later lookup, even of an IP literal,
queued behind them. Here a query that hangs costs a timer and a socket, nothing shared."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
from collections.abc import Callable
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.resolver

from ramp.flows.flow import FlowError, FlowResult, parse_ip

log = logging.getLogger("ramp.resolve")

_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)\Z", re.IGNORECASE)


@functools.lru_cache(maxsize=4096)
def hostname_problem(name: str) -> str | None:
    """Why `name` is not a host name one could resolve (RFC 1123 labels, 253 characters in
    all), or None when it is one. Underscores are let through: they are common in names
    inside private networks and harmless to a resolver."""
    if not name.isascii():  # getaddrinfo took IDNs too: check the name that goes on the wire
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return "not a valid internationalised host name"
    if name.endswith("."):
        name = name[:-1]
    if not name:
        return "empty host name"
    if len(name) > 253:
        return "host name longer than 253 characters"
    for label in name.split("."):
        if not label:
            return "empty label in host name"
        if not _LABEL.match(label):
            if len(label) > 63:
                return "label longer than 63 characters in host name"
            if label[0] == "-" or label[-1] == "-":
                return "label starts or ends with '-' in host name"
            return "invalid character in host name"
    return None


def check_hostname(name: str) -> None:
    """FlowError(BAD_DESTINATION) when `name` is not a valid host name."""
    problem = hostname_problem(name)
    if problem is not None:
        raise FlowError(FlowResult.BAD_DESTINATION, f"{problem}: {name[:80]!r}")


class HostsFile:
    """Name -> addresses from /etc/hosts, re-read when the file changes (dnspython never
    looks at it, and `localhost` and the lab's names live there)."""

    def __init__(self, path: Path = Path("/etc/hosts")) -> None:
        self.path = path
        self._stamp: tuple[float, int] | None = None
        self._names: dict[str, list[str]] = {}

    def lookup(self, name: str) -> list[str]:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime, st.st_size)
        except OSError:
            stamp = None
        if stamp != self._stamp:
            self._stamp = stamp
            self._names = self._parse() if stamp is not None else {}
        return self._names.get(name.lower().rstrip("."), [])

    def _parse(self) -> dict[str, list[str]]:
        names: dict[str, list[str]] = {}
        try:
            text = self.path.read_text(errors="replace")
        except OSError:
            return names
        for line in text.splitlines():
            fields = line.split("#", 1)[0].split()
            if len(fields) < 2:
                continue
            try:
                ip = ipaddress.ip_address(fields[0].split("%", 1)[0])
            except ValueError:
                continue
            for n in fields[1:]:
                addrs = names.setdefault(n.lower(), [])
                if str(ip) not in addrs:
                    addrs.append(str(ip))
        # IPv4 first, like the DNS path, so a dial tries the family most origins listen on
        for addrs in names.values():
            addrs.sort(key=lambda a: ":" in a)
        return names


class AsyncResolver:
    """A and AAAA for a name: /etc/hosts first, then the nameservers of /etc/resolv.conf.

    At most `max_concurrent` queries are in flight; past that a lookup fails at once with
    HOST_UNREACHABLE "resolver busy" (and `on_busy` is called) rather than queue behind
    queries that may never be answered."""

    def __init__(
        self,
        timeout: float = 5.0,
        max_concurrent: int = 64,
        *,
        on_busy: Callable[[], None] | None = None,
        hosts: HostsFile | None = None,
        nameservers: list[str] | None = None,
        port: int = 53,
    ) -> None:
        self.timeout = timeout
        self.max_concurrent = max_concurrent
        self.on_busy = on_busy
        self.hosts = hosts if hosts is not None else HostsFile()
        self.in_flight = 0
        # the system's resolver applies resolv.conf's search list to short names, as
        # getaddrinfo did; explicit nameservers come without one
        self._search = nameservers is None
        if nameservers is None:
            try:
                self._dns = dns.asyncresolver.Resolver()
            except dns.resolver.NoResolverConfiguration:
                log.warning("no nameserver in /etc/resolv.conf: only /etc/hosts names resolve")
                self._dns = dns.asyncresolver.Resolver(configure=False)
                self._dns.nameservers = []
        else:
            self._dns = dns.asyncresolver.Resolver(configure=False)
            self._dns.nameservers = nameservers
            self._dns.port = port
        self._dns.lifetime = timeout

    async def resolve(self, name: str) -> list[str]:
        """Addresses of `name`, IPv4 first; FlowError when it has none or is not a name."""
        if parse_ip(name) is not None:
            return [name]
        check_hostname(name)
        found = self.hosts.lookup(name)
        if found:
            return found
        if not self._dns.nameservers:
            raise FlowError(FlowResult.HOST_UNREACHABLE, f"cannot resolve {name}: no nameserver")
        if self.in_flight >= self.max_concurrent:
            if self.on_busy is not None:
                self.on_busy()
            raise FlowError(FlowResult.HOST_UNREACHABLE, f"cannot resolve {name}: resolver busy")
        self.in_flight += 1
        try:
            # dnspython's lifetime bounds each query; the outer timeout also covers both
            async with asyncio.timeout(self.timeout):
                v4, v6 = await asyncio.gather(self._query(name, "A"), self._query(name, "AAAA"))
        except TimeoutError:
            raise FlowError(
                FlowResult.HOST_UNREACHABLE,
                f"cannot resolve {name}: no answer within {self.timeout:g}s",
            ) from None
        finally:
            self.in_flight -= 1
        addrs = [a for got in (v4, v6) if isinstance(got, list) for a in got]
        if not addrs:
            errors = [got for got in (v4, v6) if isinstance(got, FlowError)]
            raise (
                errors[0]
                if errors
                else FlowError(FlowResult.HOST_UNREACHABLE, f"{name} does not resolve")
            )
        return addrs

    async def _query(self, name: str, rdtype: str) -> list[str] | FlowError:
        try:
            answer = await self._dns.resolve(name, rdtype, search=self._search)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.exception.Timeout:
            return FlowError(
                FlowResult.HOST_UNREACHABLE,
                f"cannot resolve {name}: no answer within {self.timeout:g}s",
            )
        except dns.exception.DNSException as e:
            return FlowError(FlowResult.HOST_UNREACHABLE, f"cannot resolve {name}: {e}")
        return [r.to_text() for r in answer]


_default: AsyncResolver | None = None


def default_resolver() -> AsyncResolver:
    """The process's resolver for code that was not handed one (built on first use)."""
    global _default
    if _default is None:
        _default = AsyncResolver()
    return _default


def set_default_resolver(resolver: AsyncResolver) -> None:
    global _default
    _default = resolver
