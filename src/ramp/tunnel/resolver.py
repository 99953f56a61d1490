"""The connector's resolver: names the edge forwards (DNS queries, hostnames of flows under a
routed zone) are resolved inside the private network, by the resolver configured with
`--dns-resolver`, else the first nameserver of /etc/resolv.conf."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.resolver

from ramp.config import parse_hostport
from ramp.flows.flow import FlowError, FlowResult

log = logging.getLogger("ramp.connector.dns")

RESOLVER_HOST = "%resolver"  # destination name the edge uses for "the connector's resolver"


def system_nameserver(resolv_conf: Path = Path("/etc/resolv.conf")) -> str | None:
    try:
        text = resolv_conf.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                ipaddress.ip_address(parts[1].split("%")[0])
            except ValueError:
                continue
            return parts[1]
    return None


class Resolver:
    def __init__(self, address: str = "", timeout: float = 5.0) -> None:
        if address:
            self.host, self.port = parse_hostport(address, default_port=53)
        else:
            ns = system_nameserver()
            self.host, self.port = (ns, 53) if ns else ("", 53)
        self._resolver = dns.asyncresolver.Resolver(configure=False)
        if self.host:
            self._resolver.nameservers = [self.host]
            self._resolver.port = self.port
        self._resolver.lifetime = timeout

    @property
    def address(self) -> tuple[str, int] | None:
        return (self.host, self.port) if self.host else None

    async def resolve(self, name: str) -> list[str]:
        """IPv4 addresses first, then IPv6; FlowError(HOST_UNREACHABLE) when there are none."""
        if not self.host:
            raise FlowError(FlowResult.HOST_UNREACHABLE, "the connector has no DNS resolver")
        addrs: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._resolver.resolve(name, rdtype, search=False)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException as e:
                raise FlowError(FlowResult.HOST_UNREACHABLE, f"cannot resolve {name}: {e}") from e
            addrs += [r.to_text() for r in answer]
            if addrs:
                break
        if not addrs:
            raise FlowError(FlowResult.HOST_UNREACHABLE, f"{name} does not resolve")
        return addrs
