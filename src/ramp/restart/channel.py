"""The channel between a process and its successor during a restart: JSON messages with
descriptors attached (SCM_RIGHTS) over a SOCK_SEQPACKET socket pair, one message per packet;
the handoff's state travels in a memfd, so its size is not bound by a packet's.

The successor finds its end in `RAMP_HANDOFF_FD`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

HANDOFF_ENV = "RAMP_HANDOFF_FD"
MAX_MESSAGE = 64 * 1024
MAX_FDS = 253  # SCM_MAX_FD
MAX_STATE = 16 * 1024 * 1024


class ChannelError(Exception):
    """The other process sent something that is not a handoff message, or went away."""


class ChannelClosed(ChannelError):
    pass


@dataclass(slots=True)
class Message:
    kind: str
    body: dict[str, Any] = field(default_factory=dict)
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


def pair() -> tuple[socket.socket, socket.socket]:
    """(ours, theirs): `theirs` is inheritable, for the successor's pass_fds."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.set_inheritable(True)
    return ours, theirs


def encode(kind: str, body: dict[str, Any] | None = None) -> bytes:
    data = json.dumps({"kind": kind, **(body or {})}, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"handoff message too large: {len(data)} bytes")
    return data


def decode(data: bytes, fds: list[int]) -> Message:
    """One received packet as a message; closes its descriptors if it is none."""
    try:
        obj = json.loads(data)
        if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
            raise ValueError("not an object with a kind")
    except ValueError as e:
        Message("", {}, fds).close_fds()
        raise ChannelError(f"malformed handoff message: {e}") from None
    kind = obj.pop("kind")
    return Message(kind, obj, fds)


class Channel:
    """One end of the pair, used from an event loop (sends are small and never block for
    long: the peer reads them at once)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(False)

    @classmethod
    def from_fd(cls, fd: int) -> Channel:
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_SEQPACKET:
            sock.detach()
            raise ChannelError(f"descriptor {fd} is not a SOCK_SEQPACKET socket")
        os.set_inheritable(fd, False)
        return cls(sock)

    def send(self, kind: str, body: dict[str, Any] | None = None, fds: Sequence[int] = ()) -> None:
        data = encode(kind, body)
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.send(data)
        except (BlockingIOError, BrokenPipeError, ConnectionError) as e:
            raise ChannelClosed(f"the other process is gone: {e}") from None

    async def receive(self, timeout: float | None = None) -> Message:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(self.sock, MAX_MESSAGE, MAX_FDS)
            except BlockingIOError:
                ready = loop.create_future()
                fd = self.sock.fileno()  # the socket may be closed while this waits
                loop.add_reader(fd, ready.set_result, None)
                try:
                    async with asyncio.timeout(timeout):
                        await ready
                finally:
                    loop.remove_reader(fd)
                continue
            except (ConnectionError, OSError) as e:
                raise ChannelClosed(f"the other process is gone: {e}") from None
            if not data and not fds:
                raise ChannelClosed("the other process closed the channel")
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                Message("", {}, fds).close_fds()
                raise ChannelError("handoff message truncated")
            return decode(data, fds)

    async def expect(self, kind: str, timeout: float | None = None) -> Message:
        """The next message, which must be `kind` ("failed" carries the other's error)."""
        msg = await self.receive(timeout)
        if msg.kind == kind:
            return msg
        msg.close_fds()
        if msg.kind == "failed":
            raise ChannelError(str(msg.body.get("error", "failed")))
        raise ChannelError(f"expected {kind!r}, got {msg.kind!r}")

    def close(self) -> None:
        self.sock.close()


def state_memfd(state: dict[str, Any]) -> int:
    """A memfd holding `state` as JSON, read from its start."""
    fd = os.memfd_create("ramp-handoff", os.MFD_CLOEXEC)
    data = json.dumps(state).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def read_state(fd: int) -> dict[str, Any]:
    size = os.fstat(fd).st_size
    if size > MAX_STATE:
        raise ChannelError(f"handoff state too large: {size} bytes")
    data = os.pread(fd, size, 0)
    try:
        state = json.loads(data)
    except ValueError as e:
        raise ChannelError(f"malformed handoff state: {e}") from None
    if not isinstance(state, dict):
        raise ChannelError("malformed handoff state: not an object")
    return state
