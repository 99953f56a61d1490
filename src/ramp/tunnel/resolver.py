"""The connector's resolver: names the edge forwards (DNS queries, hostnames of flows under a
routed zone) are resolved inside the private network, by the resolver configured with
`--dns-resolver`, else the first nameserver of /etc/resolv.conf."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from pathlib import Path

from ramp.config import parse_hostport
from ramp.flows.flow import FlowError, FlowResult, parse_ip
from ramp.net.resolve import AsyncResolver

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


class Resolver(AsyncResolver):
    """The edge's resolver (bounded in time and in queries in flight, no getaddrinfo), asking
    one nameserver inside the private network."""

    def __init__(
        self,
        address: str = "",
        timeout: float = 5.0,
        max_concurrent: int = 64,
        *,
        on_busy: Callable[[], None] | None = None,
    ) -> None:
        if address:
            self.host, self.port = parse_hostport(address, default_port=53)
        else:
            ns = system_nameserver()
            self.host, self.port = (ns, 53) if ns else ("", 53)
        super().__init__(
            timeout,
            max_concurrent,
            on_busy=on_busy,
            nameservers=[self.host] if self.host else [],
            port=self.port,
        )

    @property
    def address(self) -> tuple[str, int] | None:
        return (self.host, self.port) if self.host else None

    async def resolve(self, name: str) -> list[str]:
        """IPv4 addresses first, then IPv6; FlowError(HOST_UNREACHABLE) when there are none."""
        if not self.host and parse_ip(name) is None:
            raise FlowError(FlowResult.HOST_UNREACHABLE, "the connector has no DNS resolver")
        return await super().resolve(name)
