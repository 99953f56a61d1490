"""Listening TCP sockets, made the same way for every on-ramp."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

from ramp.net.inherit import inherited, publish

log = logging.getLogger(__name__)


_share_ports = False


def share_ports(on: bool = True) -> None:
    """Bind every listener of this process with SO_REUSEPORT (a worker: its siblings bind
    the same ports, and the kernel spreads new connections over them)."""
    global _share_ports
    _share_ports = on


def sharing_ports() -> bool:
    return _share_ports


async def tcp_listen_socket(
    host: str, port: int, backlog: int = 1024, *, name: str | None = None
) -> socket.socket:
    """A non-blocking listening socket on host:port (port 0 picks one). `::` means IPv6
    only: a dual-stack listener is a separate, explicit choice. A listener with a `name`
    takes the socket given to the process under that name, if any (ramp.net.inherit)."""
    if name is not None:
        given = inherited().take(name, socket.SOCK_STREAM, host, port)
        if given is not None:
            publish(name, given)
            return given
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if _share_ports:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    if name is not None:
        publish(name, sock)
    return sock


# accept(2) failures that last (out of descriptors or kernel memory) rather than concern
# one connection (ECONNABORTED: the client gave up while it waited in the backlog)
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF_FIRST = 0.05
ACCEPT_BACKOFF_MAX = 1.0


class AcceptErrors:
    """How an accept loop rides out accept(2) failures.

    Out of descriptors, a loop that retries at once spins and logs without end; one that gives
    up stops serving. This one pauses, doubling the pause while the failures go on, keeps
    serving the connections it has (closing them is what frees descriptors), and says so once
    per episode: one warning when it starts, one line when accepting works again. Every
    failure is still counted (`on_error(errno name)`).
    """

    def __init__(self, name: str, on_error: Callable[[str], None] | None = None) -> None:
        self.name = name
        self._on_error = on_error
        self.failures = 0  # in the current episode
        self.delay = 0.0

    def failed(self, e: OSError) -> float:
        """Seconds to wait before accepting again."""
        what = errno.errorcode.get(e.errno or 0, "unknown")
        if self._on_error is not None:
            self._on_error(what)
        if e.errno not in _RESOURCE_ERRORS:
            log.debug("%s: accept failed: %s", self.name, e)
            return 0.0
        if self.failures == 0:
            log.warning(
                "%s: cannot accept connections: %s; pausing accepts until descriptors free "
                "up (open connections keep being served; ramp_accept_errors_total counts)",
                self.name,
                e.strerror or e,
            )
        self.failures += 1
        self.delay = min(ACCEPT_BACKOFF_MAX, max(ACCEPT_BACKOFF_FIRST, self.delay * 2))
        return self.delay

    def succeeded(self) -> None:
        if self.failures:
            log.warning("%s: accepting again after %d failed accepts", self.name, self.failures)
            self.failures = 0
            self.delay = 0.0


ACCEPT_BATCH = 64  # connections taken per wake-up before other tasks get the loop


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


async def accept_loop(
    lsock: socket.socket,
    handle: Callable[[socket.socket, Any], None],
    errors: AcceptErrors,
) -> None:
    """Accept connections on `lsock` for ever, handing each (non-blocking) to `handle`.

    accept(2) runs only in this task, never in a loop callback: cancelling the task (a
    listener that stops accepting while a successor serves the same socket) can then never
    lose a connection the kernel already handed over, as a cancelled `loop.sock_accept`
    could."""
    loop = asyncio.get_running_loop()
    fd = lsock.fileno()
    batch = 0
    while True:
        try:
            conn, addr = lsock.accept()
        except BlockingIOError:
            batch = 0
            ready = loop.create_future()
            loop.add_reader(fd, _wake, ready)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
            continue
        except OSError as e:
            delay = errors.failed(e)
            if delay:
                await asyncio.sleep(delay)
            continue
        errors.succeeded()
        conn.setblocking(False)
        handle(conn, addr)
        batch += 1
        if batch >= ACCEPT_BATCH:
            batch = 0
            await asyncio.sleep(0)
