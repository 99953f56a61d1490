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
from ramp.offramps.egress import DEFAULT_EGRESS, Egress

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


# RFC 8305 section 5: the recommended "Connection Attempt Delay" before the next address
ATTEMPT_DELAY = 0.25


def interleave(addrs: list[tuple[int, tuple]]) -> list[tuple[int, tuple]]:
    """RFC 8305 section 4: alternate the address families, each in the resolver's order,
    starting with the family of the first address (the resolver puts IPv4 first, the family
    most private origins listen on)."""
    if len(addrs) < 2:
        return addrs
    first = addrs[0][0]
    a = [x for x in addrs if x[0] == first]
    b = [x for x in addrs if x[0] != first]
    out: list[tuple[int, tuple]] = []
    for i in range(max(len(a), len(b))):
        out += a[i : i + 1] + b[i : i + 1]
    return out


def _close_result(task: asyncio.Task[socket.socket]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()  # a later winner of a race already decided


async def happy_eyeballs(
    addrs: list[tuple[int, tuple]],
    attempt: Callable[[int, tuple], Awaitable[socket.socket]],
    delay: float = ATTEMPT_DELAY,
) -> socket.socket:
    """RFC 8305 section 5: start a connection attempt to each address in turn, the next one
    `delay` seconds after the previous (or at once when every attempt so far failed); the
    first to connect wins and the others are cancelled. FlowError of the last address when
    all fail.

    Not asyncio's own (`create_connection(happy_eyeballs_delay=...)`): that one resolves
    with getaddrinfo, and its sockets cannot be bound with IP_BIND_ADDRESS_NO_PORT first."""
    if len(addrs) == 1:
        return await attempt(*addrs[0])
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(attempt(*addr)) for addr in addrs[:1]]
    winner: asyncio.Task[socket.socket] | None = None
    try:
        while True:
            pending = [t for t in tasks if not t.done()]
            more = len(tasks) < len(addrs)
            if pending:
                await asyncio.wait(
                    pending, timeout=delay if more else None, return_when=asyncio.FIRST_COMPLETED
                )
            winner = next(
                (t for t in tasks if t.done() and not t.cancelled() and t.exception() is None),
                None,
            )
            if winner is not None:
                return winner.result()
            if not more and all(t.done() for t in tasks):
                break
            if more:
                tasks.append(loop.create_task(attempt(*addrs[len(tasks)])))
        last = tasks[-1].exception()
        assert last is not None
        raise last
    finally:
        for t in tasks:
            if t is winner:
                continue
            if t.done():
                _close_result(t)
            else:
                t.cancel()
                t.add_done_callback(_close_result)


async def dial_tcp(
    host: str,
    port: int,
    timeout: float,
    resolver: NameResolver | None = None,
    egress: Egress | None = None,
) -> socket.socket:
    """Connect to host:port within `timeout` seconds in total; a name with several addresses
    gets happy eyeballs (RFC 8305) across them.

    Names go to `resolver` when given (the connector's private resolver), else to the
    process's async resolver (ramp.net.resolve); getaddrinfo is never called. `egress` says
    from which source addresses, and whether ports are shared (ramp.offramps.egress).
    """
    loop = asyncio.get_running_loop()
    out = egress or DEFAULT_EGRESS
    deadline = loop.time() + timeout
    if parse_ip(host) is not None:
        ips = [host]
    else:
        check_hostname(host)
        ips = await (resolver or default_resolver().resolve)(host)
    addrs = interleave([_sockaddr(ip, port) for ip in ips])

    async def attempt(fam: int, addr: tuple) -> socket.socket:
        try:
            return await out.connect_tcp(fam, addr, lambda s, a: _connect(loop, s, a))
        except OSError as e:
            result = _ERRNO_RESULTS.get(e.errno or 0, FlowResult.ERROR)
            raise FlowError(result, f"connect to {addr[0]}:{port}: {e.strerror or e}") from None

    remaining = deadline - loop.time()
    try:
        if remaining <= 0:
            raise TimeoutError
        async with asyncio.timeout(remaining):
            return await happy_eyeballs(addrs, attempt)
    except TimeoutError:
        where = f"{addrs[0][1][0]}:{port}" if len(addrs) == 1 else f"{host}:{port}"
        raise FlowError(
            FlowResult.TIMEOUT, f"connect to {where} timed out after {timeout:g}s"
        ) from None


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
