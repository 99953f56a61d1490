"""Both ends of a restart's handover (the shellflip idea, reference:
oxy-graceful-restarts.txt): the running process starts its successor with the same command
line, hands it the listening sockets, the steering groups and its state, and waits; the
successor reports each step. Messages, in order:

    old -> new  hello      memfd state, the old's stderr, the sockets, the groups' descriptors
    new -> old  listening  {pid, edge_id, slots}   its tunnel socket is in the groups
    old -> new  expect     {tunnels}               connections told to follow, by tunnel
    new -> old  ready      {}                      those connections registered with it
    old -> new  serve      {}
    new -> old  serving    {slots}                 its listeners accept, status and all
    new -> old  failed     {error}                 instead of any of its messages

Until `serving` the successor's stderr is a pipe the old process reads, so a successor that
dies (a broken config, a traceback) is reported with its own words; at `serving` it takes
over the old's stderr. If anything fails before `serving` the old process kills the
successor, puts the steering back and keeps serving.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ramp.net.reuseport import SteeringGroup
from ramp.restart.channel import (
    HANDOFF_ENV,
    Channel,
    ChannelClosed,
    ChannelError,
    Message,
    pair,
    read_state,
    state_memfd,
)

log = logging.getLogger("ramp.restart")

STEP_TIMEOUT = 30.0  # each of the successor's steps; `ready` may wait for connectors
STDERR_TAIL = 20  # lines of the successor's stderr kept for the error message
_KINDS = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM, "unix": socket.SOCK_STREAM}


class SuccessorFailed(Exception):
    """The successor did not take over; the message says why (its last words included)."""


@dataclass(slots=True)
class Handoff:
    """What a process hands its successor."""

    sockets: list[tuple[str, socket.socket]] = field(default_factory=list)
    groups: dict[str, tuple[SteeringGroup, int]] = field(default_factory=dict)  # name: ours
    state: dict[str, Any] = field(default_factory=dict)

    def layout(self) -> tuple[dict[str, Any], list[int]]:
        entries, fds = [], []
        for name, sock in self.sockets:
            kind = (
                "unix"
                if sock.family == socket.AF_UNIX
                else ("udp" if sock.type == socket.SOCK_DGRAM else "tcp")
            )
            entries.append({"name": name, "kind": kind})
            fds.append(sock.fileno())
        groups = {}
        for name, (group, slot) in self.groups.items():
            gfds, meta = group.handoff()
            groups[name] = {"meta": meta, "nfds": len(gfds), "slot": slot}
            fds += gfds
        return {"sockets": entries, "groups": groups, "state": self.state}, fds


def successor_command() -> list[str]:
    """This process's command line, run by this interpreter: `python -m ramp ARGS`, so an
    upgraded package installed in place is what the successor runs."""
    return [sys.executable, "-m", "ramp", *sys.argv[1:]]


def successor_environment(environ: Mapping[str, str], channel_fd: int) -> dict[str, str]:
    env = dict(environ)
    env[HANDOFF_ENV] = str(channel_fd)
    # the watchdog and systemd's sockets are the old pid's until the successor says MAINPID
    for key in ("WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    return env


class Successor:
    """The old process's view of its successor."""

    def __init__(self, proc: asyncio.subprocess.Process, channel: Channel) -> None:
        self.proc = proc
        self.channel = channel
        self.tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        self._relay = asyncio.ensure_future(self._relay_stderr())

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    async def spawn(
        cls, argv: Sequence[str], handoff: Handoff, environ: Mapping[str, str] | None = None
    ) -> Successor:
        ours, theirs = pair()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                pass_fds=(theirs.fileno(),),
                env=successor_environment(
                    os.environ if environ is None else environ, theirs.fileno()
                ),
                stdin=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        finally:
            theirs.close()
        successor = cls(proc, Channel(ours))
        layout, fds = handoff.layout()
        memfd = state_memfd(layout)
        try:
            successor.channel.send("hello", {"pid": os.getpid()}, [memfd, 2, *fds])
        except ChannelClosed:
            pass  # it died at once: wait_for says how
        finally:
            os.close(memfd)
        return successor

    async def _relay_stderr(self) -> None:
        assert self.proc.stderr is not None
        out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
        while line := await self.proc.stderr.readline():
            self.tail.append(line.decode(errors="replace").rstrip())
            if out is not None:
                with contextlib.suppress(OSError, ValueError):
                    out.write(line)
                    out.flush()

    def _why(self, reason: str) -> str:
        said = "\n".join(self.tail)
        return f"{reason}\n{said}" if said else reason

    async def wait_for(self, kind: str, timeout: float = STEP_TIMEOUT) -> Message:
        """The successor's next message, which must be `kind`; SuccessorFailed otherwise
        (an error it sent, its exit, silence past `timeout`)."""
        got = asyncio.ensure_future(self.channel.expect(kind, timeout))
        exited = asyncio.ensure_future(self.proc.wait())
        try:
            await asyncio.wait({got, exited}, return_when=asyncio.FIRST_COMPLETED)
            if got.done():
                try:
                    return got.result()
                except TimeoutError:
                    raise SuccessorFailed(
                        self._why(f"the successor sent no {kind!r} within {timeout:.0f} s")
                    ) from None
                except ChannelClosed:
                    pass  # it exited: say with which status
                except ChannelError as e:
                    raise SuccessorFailed(self._why(f"the successor failed: {e}")) from None
            code = await self.proc.wait()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._relay  # its last lines
            raise SuccessorFailed(
                self._why(f"the successor exited with status {code} before {kind!r}")
            )
        finally:
            got.cancel()
            exited.cancel()

    def send(self, kind: str, body: dict[str, Any] | None = None) -> None:
        try:
            self.channel.send(kind, body)
        except ChannelClosed as e:
            raise SuccessorFailed(self._why(str(e))) from None

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        self._relay.cancel()
        self.channel.close()

    def release(self) -> None:
        """The handover is done: the successor lives on. The channel stays open until this
        process exits, which is how the successor learns that it has (`Predecessor.gone`)."""
        self._relay.cancel()


async def hand_over(
    successor: Successor,
    *,
    on_listening: Callable[[dict[str, Any]], dict[str, Any]],
    on_serving: Callable[[dict[str, Any]], None],
    progress: Callable[[str], None],
) -> None:
    """The old process's side of the steps (module doc): `on_listening(body)` returns what the
    successor is to expect; raises SuccessorFailed at the first step that fails."""
    listening = await successor.wait_for("listening")
    successor.send("expect", on_listening(listening.body))
    await successor.wait_for("ready")
    progress("the successor is ready; handing over the listeners")
    successor.send("serve")
    serving = await successor.wait_for("serving")
    on_serving(serving.body)


async def take_over(
    predecessor: Predecessor,
    listening: dict[str, Any],
    *,
    until_ready: Callable[[dict[str, Any]], Awaitable[None]],
    serve: Callable[[], Awaitable[None]],
) -> None:
    """The successor's side: say `listening`, wait for what the predecessor says to expect
    (`until_ready`), then start serving (`serve`) when it says so."""
    predecessor.send("listening", {"pid": os.getpid(), **listening, "slots": predecessor.joined()})
    expect = await predecessor.expect("expect")
    await until_ready(expect.body)
    predecessor.send("ready")
    await predecessor.expect("serve")
    await serve()
    predecessor.take_stderr()
    predecessor.send("serving", {"slots": predecessor.joined()})
    predecessor.working()
    log.info("took over from pid %d", predecessor.pid)


class Predecessor:
    """The successor's view of the process it takes over from."""

    def __init__(
        self,
        channel: Channel,
        pid: int,
        sockets: list[tuple[str, socket.socket]],
        groups: dict[str, tuple[SteeringGroup, int]],
        state: dict[str, Any],
        stderr_fd: int,
    ) -> None:
        self.channel = channel
        self.pid = pid
        self.sockets = sockets
        self.groups = groups  # name: (group, the predecessor's slot)
        self.state = state
        self._stderr_fd = stderr_fd
        self._slots: dict[str, int] = {}

    @classmethod
    async def from_environment(
        cls, environ: MutableMapping[str, str] | None = None, timeout: float = STEP_TIMEOUT
    ) -> Predecessor | None:
        """The predecessor that started this process, if one did ($RAMP_HANDOFF_FD)."""
        env = os.environ if environ is None else environ
        raw = env.pop(HANDOFF_ENV, "")
        if not raw:
            return None
        if not raw.isdigit():
            raise ChannelError(f"{HANDOFF_ENV}={raw!r} is not a descriptor")
        channel = Channel.from_fd(int(raw))
        hello = await channel.expect("hello", timeout)
        try:
            return cls.unpack(channel, hello)
        except (KeyError, TypeError, ValueError) as e:
            hello.close_fds()
            raise ChannelError(f"malformed handoff: {e!r}") from None

    @classmethod
    def unpack(cls, channel: Channel, hello: Message) -> Predecessor:
        fds = list(hello.fds)
        if len(fds) < 2:
            raise ValueError("no state in the handoff")
        memfd, stderr_fd, rest = fds[0], fds[1], fds[2:]
        layout = read_state(memfd)
        needed = len(layout["sockets"]) + sum(int(g["nfds"]) for g in layout["groups"].values())
        if len(rest) < needed:
            raise ValueError(f"{len(rest)} descriptors where the layout names {needed}")
        sockets: list[tuple[str, socket.socket]] = []
        groups = {}
        try:
            for entry in layout["sockets"]:
                sock = socket.socket(fileno=rest.pop(0))
                sockets.append((str(entry["name"]), sock))
                if sock.type != _KINDS[entry["kind"]]:
                    raise ValueError(f"socket {entry['name']} is not {entry['kind']}")
            for name, g in layout["groups"].items():
                n = int(g["nfds"])
                gfds, rest = rest[:n], rest[n:]
                meta, slot = dict(g["meta"]), int(g["slot"])
                groups[name] = (SteeringGroup.from_handoff(gfds, meta), slot)
        except BaseException:
            for _, sock in sockets:
                sock.detach()  # the caller closes every descriptor of the message, once
            for group, _ in groups.values():
                group.detach()
            raise
        os.close(memfd)
        for fd in rest:
            os.close(fd)
        return cls(
            channel, int(hello.body["pid"]), sockets, groups, dict(layout["state"]), stderr_fd
        )

    def steering(self, name: str) -> tuple[SteeringGroup, int] | None:
        """The group `name` and this process's slot in it: the one after its predecessor's."""
        if name not in self.groups:
            return None
        group, theirs = self.groups[name]
        slot = (theirs + 1) % group.max_slots
        self._slots[name] = slot
        return group, slot

    def working(self) -> None:
        """The predecessor has made our slots the working ones (at `listening` and at
        `serving`): our groups' view says so too, so releasing its slot later keeps them."""
        for name, slot in self._slots.items():
            self.groups[name][0].assume_working([slot])

    def joined(self) -> dict[str, int]:
        """The slots taken so far (for `listening` and `serving`)."""
        return dict(self._slots)

    def send(self, kind: str, body: dict[str, Any] | None = None) -> None:
        self.channel.send(kind, body)

    def failed(self, error: str) -> None:
        with contextlib.suppress(ChannelError, OSError):
            self.channel.send("failed", {"error": error})

    async def expect(self, kind: str, timeout: float | None = STEP_TIMEOUT) -> Message:
        return await self.channel.expect(kind, timeout)

    def take_stderr(self) -> None:
        """Write to the predecessor's stderr from now on (its pipe to us closes)."""
        os.dup2(self._stderr_fd, 2)
        os.close(self._stderr_fd)

    async def gone(self, on_gone: Callable[[], None]) -> None:
        """Call `on_gone` once the predecessor has exited (its channel end closed)."""
        with contextlib.suppress(ChannelError, OSError):
            while True:
                (await self.channel.receive(None)).close_fds()
        self.channel.close()
        for group, slot in self.groups.values():
            with contextlib.suppress(OSError, ValueError):
                group.release(slot)  # its socket is closed: classic BPF must forget it
        on_gone()
