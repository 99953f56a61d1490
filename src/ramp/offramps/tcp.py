"""TCP off-ramp: dial an origin, map dial errors to flow results, relay with splice."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import Awaitable, Callable

from ramp.flows.endpoint import SocketEndpoint, StreamEndpoint
from ramp.flows.flow import Flow, FlowError, FlowResult
from ramp.flows.relay import RelayResult, relay_streams
from ramp.net.splice import SpliceResult, splice_relay

_ERRNO_RESULTS = {
    errno.ECONNREFUSED: FlowResult.REFUSED,
    errno.ENETUNREACH: FlowResult.NET_UNREACHABLE,
    errno.ENETDOWN: FlowResult.NET_UNREACHABLE,
    errno.EHOSTUNREACH: FlowResult.HOST_UNREACHABLE,
    errno.EHOSTDOWN: FlowResult.HOST_UNREACHABLE,
    errno.ETIMEDOUT: FlowResult.TIMEOUT,
    errno.EACCES: FlowResult.NOT_PERMITTED,
    errno.EPERM: FlowResult.NOT_PERMITTED,
}


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def resolve(host: str, port: int) -> list[tuple[int, tuple]]:
    """Addresses for `host` as (family, sockaddr), IP literals without a lookup."""
    if is_ip_literal(host):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        return [(fam, (host, port))]
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise FlowError(FlowResult.HOST_UNREACHABLE, f"cannot resolve {host}: {e.strerror}") from e
    except (UnicodeError, ValueError) as e:  # e.g. "a..b": not a valid name at all
        raise FlowError(FlowResult.HOST_UNREACHABLE, f"invalid host name {host!r}") from e
    return [(fam, addr) for fam, _, _, _, addr in infos]


NameResolver = Callable[[str], Awaitable[list[str]]]


async def dial_tcp(
    host: str, port: int, timeout: float, resolver: NameResolver | None = None
) -> socket.socket:
    """Connect to host:port trying each address in turn within `timeout` seconds in total.

    Names go to `resolver` when given (the connector's private resolver), else to the system.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    if resolver is not None and not is_ip_literal(host):
        addrs = [
            (socket.AF_INET6 if ":" in ip else socket.AF_INET, (ip, port))
            for ip in await resolver(host)
        ]
    else:
        addrs = await resolve(host, port)
    last: FlowError | None = None
    for fam, addr in addrs:
        try:
            sock = socket.socket(fam, socket.SOCK_STREAM)
        except OSError as e:  # EMFILE and friends
            raise FlowError(FlowResult.ERROR, f"cannot create a socket: {e.strerror}") from e
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):
                await loop.sock_connect(sock, addr)
            return sock
        except TimeoutError:
            sock.close()
            raise FlowError(
                FlowResult.TIMEOUT, f"connect to {addr[0]}:{port} timed out after {timeout:g}s"
            ) from None
        except OSError as e:
            sock.close()
            result = _ERRNO_RESULTS.get(e.errno or 0, FlowResult.ERROR)
            last = FlowError(result, f"connect to {addr[0]}:{port}: {e.strerror or e}")
        except BaseException:
            sock.close()
            raise
    assert last is not None
    raise last


class DirectLeg:
    """An origin socket dialled by the edge itself; relayed with splice."""

    def __init__(self, flow: Flow, sock: socket.socket) -> None:
        self.flow = flow
        self.sock = sock

    async def relay(self, client: socket.socket | StreamEndpoint, initial: bytes = b"") -> None:
        if isinstance(client, SocketEndpoint):
            client = client.sock
        if isinstance(client, socket.socket):
            # both ends are kernel sockets: bytes move with splice and never enter Python
            result: SpliceResult | RelayResult = await splice_relay(client, self.sock, initial)
        else:
            result = await relay_streams(client, SocketEndpoint(self.sock), initial)
        self.flow.bytes_up += result.a_to_b
        self.flow.bytes_down += result.b_to_a
        if result.reset:
            self.flow.result = FlowResult.RESET
            self.flow.reason = "connection reset"

    def abort(self) -> None:
        self.sock.close()
