"""Kernel-to-kernel TCP relay with splice(2): bytes move socket -> pipe -> socket and never
enter Python. Used where both legs of a flow are kernel sockets (direct egress).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass

PIPE_SIZE = 1024 * 1024
F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ exists only on Python >= 3.10 builds with the header
_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_LINGER_RST = struct.pack("ii", 1, 0)


@dataclass(slots=True)
class SpliceResult:
    a_to_b: int = 0
    b_to_a: int = 0
    reset: bool = False


class _Direction:
    """One direction: src socket -> pipe -> dst socket."""

    def __init__(self, loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket):
        self.loop = loop
        self.src = src
        self.dst = dst
        self.rpipe, self.wpipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.wpipe, getattr(fcntl, "F_SETPIPE_SZ", F_SETPIPE_SZ), PIPE_SIZE)
        except OSError:
            pass  # keep the default 64 KiB pipe (limited by /proc/sys/fs/pipe-max-size)
        self.in_pipe = 0
        self.eof = False
        self.moved = 0
        self.done: asyncio.Future[None] = loop.create_future()
        self.reset = False

    def close(self) -> None:
        for fd in (self.rpipe, self.wpipe):
            try:
                os.close(fd)
            except OSError:
                pass

    async def run(self) -> None:
        src, dst = self.src.fileno(), self.dst.fileno()
        # A pipe holds 16 buffers (or what F_SETPIPE_SZ gave), one per socket segment, so it
        # can be full long before it holds PIPE_SIZE bytes. An EAGAIN from splicing in while
        # the pipe holds data therefore means "wait for the sink", not "wait for the source"
        # (the source is readable, and waiting on it would spin).
        pipe_full = False
        try:
            while True:
                if not self.eof and not pipe_full:
                    try:
                        n = os.splice(src, self.wpipe, PIPE_SIZE, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        n = -1
                        pipe_full = self.in_pipe > 0
                    if n == 0:
                        self.eof = True
                    elif n > 0:
                        self.in_pipe += n
                if self.in_pipe:
                    try:
                        n = os.splice(self.rpipe, dst, self.in_pipe, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        n = 0
                    if n > 0:
                        self.in_pipe -= n
                        self.moved += n
                        pipe_full = False
                if self.eof and not self.in_pipe:
                    try:
                        self.dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                await self._wait(want_read=not self.eof and not pipe_full)
        except OSError as e:
            if e.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
                self.reset = True
                return
            raise

    async def _wait(self, want_read: bool) -> None:
        """Sleep until the source is readable or the sink writable, as needed."""
        fut = self.loop.create_future()
        src, dst = self.src.fileno(), self.dst.fileno()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        want_write = self.in_pipe > 0
        if want_read:
            self.loop.add_reader(src, wake)
        if want_write:
            self.loop.add_writer(dst, wake)
        try:
            await fut
        finally:
            if want_read:
                self.loop.remove_reader(src)
            if want_write:
                self.loop.remove_writer(dst)


async def splice_relay(a: socket.socket, b: socket.socket, initial: bytes = b"") -> SpliceResult:
    """Relay both ways between two connected TCP sockets until both directions are closed.

    Half-close is carried over (EOF on one side becomes shutdown(SHUT_WR) on the other); a
    reset on either side resets the other. Both sockets are closed on return.
    """
    loop = asyncio.get_running_loop()
    a.setblocking(False)
    b.setblocking(False)
    result = SpliceResult()
    ab = _Direction(loop, a, b)
    ba = _Direction(loop, b, a)
    tasks: list[asyncio.Future[None]] = []
    try:
        if initial:
            await loop.sock_sendall(b, initial)
            result.a_to_b += len(initial)
        tasks = [asyncio.ensure_future(ab.run()), asyncio.ensure_future(ba.run())]
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()
            if ab.reset or ba.reset:
                result.reset = True
                break
    except OSError:  # ETIMEDOUT, EHOSTUNREACH, ... mid-flow: the flow broke like a reset
        result.reset = True
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        ab.close()
        ba.close()
        result.a_to_b += ab.moved
        result.b_to_a += ba.moved
        for s in (a, b):
            if result.reset:
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                except OSError:
                    pass
            s.close()
    return result
