"""How flows leave this host for their origins: from which source address, sharing source
ports across destinations (ramp.net.connectx), and with a clear error when the ports are
really used up.

One `Egress` serves a role (the connector's origins, the edge's direct egress); its settings
are `egress_source` and `egress_share_ports`.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable

from ramp.flows.flow import FlowError, FlowResult
from ramp.net import netlink
from ramp.net.connectx import (
    MAX_UDP_PORT_TRIES,
    LookupUnavailable,
    PortRange,
    PortsExhausted,
    tcp_socket,
    udp_connectx,
    udp_plain,
)
from ramp.net.sources import SourcePool
from ramp.observe.loglimit import LogLimiter

log = logging.getLogger("ramp.egress")

EXHAUSTED = "source ports exhausted"
# errors of one source address that mean "no port left on it": try the next address
_TCP_PORTS_GONE = frozenset({errno.EADDRNOTAVAIL, errno.EADDRINUSE})
_UDP_PORTS_GONE = frozenset({errno.EADDRINUSE, errno.EAGAIN})


class SourcePortsExhausted(FlowError):
    """NET_UNREACHABLE, "source ports exhausted": every source address this flow may use has
    no port left towards its destination."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(
            FlowResult.NET_UNREACHABLE, f"{EXHAUSTED}: {detail}" if detail else EXHAUSTED
        )


Connect = Callable[[socket.socket, tuple], Awaitable[None]]


def _scoped(destination: tuple) -> bool:
    return len(destination) == 4 and bool(destination[3])


class Egress:
    """Source addresses (a pool, or the kernel's choice) and port sharing for one role."""

    def __init__(
        self,
        sources: Iterable[str] = (),
        share_ports: bool = True,
        *,
        on_exhausted: Callable[[str], None] | None = None,
        ports: PortRange | None = None,
    ) -> None:
        self.pool = SourcePool(sources)
        self.share_ports = share_ports
        self.on_exhausted = on_exhausted
        self.ports = ports or PortRange()
        self._log = LogLimiter()
        self.udp_lookup = True  # False once the kernel showed it cannot check UDP 4-tuples

    def _sources(self, family: int, destination: tuple) -> list[str | None]:
        """Source addresses to try, in order; [None] = let the kernel choose."""
        version = 6 if family == socket.AF_INET6 else 4
        if not self.pool.size(version) or _scoped(destination):
            # no address of the family in the pool (or a link-local destination, which must
            # leave by its interface's own address): the routing table chooses
            return [None]
        chosen: list[str | None] = list(self.pool.choose(version))
        if not chosen:
            raise FlowError(
                FlowResult.NET_UNREACHABLE,
                "no usable egress source address (none of egress_source can be bound)",
            )
        return chosen

    def _unusable(self, address: str, e: OSError) -> None:
        self.pool.unusable(address)
        if self._log.allow("unusable"):
            log.warning(
                "egress source %s cannot be bound (%s): left out for a while; is it an "
                "address of this host?",
                address,
                e.strerror or e,
            )

    def _none_left(self, protocol: str, destination: tuple, tried: list[str | None]) -> FlowError:
        if not tried:  # every address failed to bind: that is no port shortage
            return FlowError(
                FlowResult.NET_UNREACHABLE,
                "no usable egress source address (none of egress_source can be bound)",
            )
        if self.on_exhausted is not None:
            self.on_exhausted(protocol)
        sources = ", ".join(s or "the kernel's choice" for s in tried)
        detail = f"{protocol} from {sources} to {destination[0]}:{destination[1]}"
        if self._log.allow(("exhausted", protocol)):
            log.warning("%s: %s", EXHAUSTED, detail)
        return SourcePortsExhausted(detail)

    async def connect_tcp(self, family: int, destination: tuple, connect: Connect) -> socket.socket:
        """A TCP socket connected to `destination` by `connect`, from the first source address
        that has a port left; SourcePortsExhausted when none has. Other OSErrors of connect
        (refused, unreachable, ...) pass through."""
        tried: list[str | None] = []
        for source in self._sources(family, destination):
            try:
                sock = tcp_socket(family, source, self.share_ports)
            except OSError as e:
                if source is not None and e.errno == errno.EADDRNOTAVAIL:
                    self._unusable(source, e)
                    continue
                if source is not None and e.errno == errno.EADDRINUSE:
                    tried.append(source)  # bind reserved ports (share_ports off): none left
                    continue
                raise FlowError(FlowResult.ERROR, f"cannot create a socket: {e.strerror}") from e
            tried.append(source)
            try:
                await connect(sock, destination)
            except OSError as e:
                sock.close()
                if e.errno in _TCP_PORTS_GONE:
                    continue  # no port of this address is free towards the destination
                raise
            except BaseException:
                sock.close()
                raise
            return sock
        raise self._none_left("tcp", destination, tried)

    def udp_socket(self, family: int, destination: tuple) -> socket.socket:
        """A UDP socket connected to `destination` whose 4-tuple is its own; with port sharing
        its port may serve other destinations too. SourcePortsExhausted when no source address
        has a port left; other OSErrors (no route, ...) pass through."""
        sources = self._sources(family, destination)
        if sources == [None] and self.share_ports and not _scoped(destination):
            # connectx needs the whole 4-tuple up front: ask the routing table for the source
            sources = [netlink.route_source(family, destination[0])]
        tried: list[str | None] = []
        # one session's port budget, over all its addresses: a full range costs a bounded time
        tries = max(64, MAX_UDP_PORT_TRIES // len(sources))
        for source in sources:
            try:
                if self.share_ports and self.udp_lookup and source is not None:
                    return udp_connectx(family, source, destination, self.ports, tries)
                return udp_plain(family, source, destination)
            except PortsExhausted:
                tried.append(source)
            except LookupUnavailable as e:
                self.udp_lookup = False
                log.warning("UDP sessions get a port of their own from now on: %s", e.strerror)
                return udp_plain(family, source, destination)
            except OSError as e:
                if source is not None and e.errno == errno.EADDRNOTAVAIL:
                    self._unusable(source, e)
                elif e.errno in _UDP_PORTS_GONE:
                    tried.append(source)
                else:
                    raise
        raise self._none_left("udp", destination, tried)


DEFAULT_EGRESS = Egress()  # the kernel chooses the source; ports are shared
