"""TCP off-ramp: dial an origin, map dial errors to flow results, relay with splice."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Awaitable, Callable

from ramp.flows.endpoint import SocketEndpoint, StreamEndpoint
from ramp.flows.flow import Flow, FlowError, FlowResult, parse_ip
from ramp.flows.relay import RelayResult, relay_streams
from ramp.net.resolve import check_hostname, default_resolver
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
    return parse_ip(host) is not None


async def resolve(host: str, port: int) -> list[tuple[int, tuple]]:
    """Addresses for `host` as (family, sockaddr), IP literals without a lookup."""
    return [_sockaddr(ip, port) for ip in await default_resolver().resolve(host)]


def _sockaddr(ip: str, port: int) -> tuple[int, tuple]:
    if ":" in ip:
        addr, _, scope = ip.partition("%")
        try:
            index = int(scope) if scope.isdigit() else socket.if_nametoindex(scope) if scope else 0
        except OSError:
            raise FlowError(FlowResult.BAD_DESTINATION, f"no interface {scope!r}") from None
        return socket.AF_INET6, (addr, port, 0, index)
    return socket.AF_INET, (ip, port)


NameResolver = Callable[[str], Awaitable[list[str]]]


async def _connect(loop: asyncio.AbstractEventLoop, sock: socket.socket, addr: tuple) -> None:
    """Non-blocking connect to a numeric sockaddr. Not loop.sock_connect: uvloop's runs
    getaddrinfo in its thread pool even for numeric addresses, so one dial to an IP waited
    behind every hung name lookup."""
    err = sock.connect_ex(addr)
    if err in (errno.EINPROGRESS, errno.EAGAIN):
        done = loop.create_future()
        fd = sock.fileno()
        loop.add_writer(fd, lambda: done.done() or done.set_result(None))
        try:
            await done
        finally:
            loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


async def dial_tcp(
    host: str, port: int, timeout: float, resolver: NameResolver | None = None
) -> socket.socket:
    """Connect to host:port trying each address in turn within `timeout` seconds in total.

    Names go to `resolver` when given (the connector's private resolver), else to the
    process's async resolver (ramp.net.resolve); getaddrinfo is never called.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    if parse_ip(host) is not None:
        ips = [host]
    else:
        check_hostname(host)
        ips = await (resolver or default_resolver().resolve)(host)
    addrs = [_sockaddr(ip, port) for ip in ips]
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
                await _connect(loop, sock, addr)
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
