"""A worker's side of its channel to the supervisor (ramp.workers.supervisor).

Messages, worker -> supervisor:

    listening  {slots}             its steered sockets are in their groups
    tunnels    {counts}            tunnel id: connections registered with this worker
    flow       {to, flow, plan}    + the client socket: for worker `to` (ramp.flows.moved)
    ask        {to, id, what, ...} a question for worker `to` (a DNS query through a tunnel
                                   only `to` holds)
    reply      {to, id, ...}       the answer to worker `to`'s question `id`
    store      {}                  it saw the store change: the others read it now too
    scraped    {id, ok, info}      + a memfd with its metrics, the answer to `scrape`
    unmovable  {tunnel}            it has no connection of the tunnel that can move (REDIAL)

supervisor -> worker:

    hello      {index, workers}    + the layout memfd, stderr, the groups' descriptors
    siblings   {tunnels}           tunnel id: the other workers holding connections of it
    rebalance  {tunnel, slot}      move one connection of the tunnel to the worker at that
                                   slot of the tunnel port's steering group (REDIAL)
    flow       {from, flow, plan}  + the client socket, from worker `from`
    ask, reply {from, id, ...}     passed on from worker `from`
    store      {from}              another worker saw the store change
    reload     {}                  SIGHUP reached the supervisor: reload the config
    stop       {}                  drain and exit (the supervisor stops)

A worker takes reloads and stops from its channel only: signals sent to the whole process
group (a terminal's Ctrl-C, a test's killpg) would otherwise reach it twice.
    scrape     {id}
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ramp.net.reuseport import SteeringGroup
from ramp.restart.channel import (
    Channel,
    ChannelClosed,
    ChannelError,
    Message,
    state_memfd,
)
from ramp.restart.successor import Predecessor

log = logging.getLogger("ramp.workers")

WORKER_ENV = "RAMP_WORKER_FD"
HELLO_TIMEOUT = 30.0
CHANNEL_BUFFER = 4 << 20  # flow moves come in bursts: room for thousands of messages

# (metrics exposition text, ready, ready info) of this worker
Scrape = Callable[[], tuple[str, bool, dict[str, Any]]]
# a moved flow's client socket and its description
Adopt = Callable[[socket.socket, dict[str, Any]], None]
# answers another worker's question (the body of an `ask`) with the body of the `reply`
Answerer = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def size_buffers(sock: socket.socket) -> None:
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, CHANNEL_BUFFER)


class WorkerLink:
    """This worker's index, its slots in the supervisor's steering groups, and what the
    other workers hold."""

    def __init__(
        self,
        channel: Channel,
        index: int,
        workers: int,
        groups: dict[str, tuple[SteeringGroup, int]],
    ) -> None:
        self.channel = channel
        self.index = index
        self.workers = workers
        self.groups = groups
        self.siblings: dict[str, list[int]] = {}
        self.scrape: Scrape | None = None
        self.adopt: Adopt | None = None
        self.answerers: dict[str, Answerer] = {}
        self.on_store: Callable[[], None] | None = None  # read the store again
        self.on_reload: Callable[[], None] | None = None  # SIGHUP, passed on
        # move a connection of a tunnel to the worker at a slot; False: none could move
        self.on_rebalance: Callable[[str, int], bool] | None = None
        self.stop = asyncio.Event()  # told to stop, or the supervisor is gone
        self._questions: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._question_ids = itertools.count(1)
        self._answering: set[asyncio.Task[None]] = set()
        self._turn = itertools.count()
        self._reader: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    @classmethod
    async def from_environment(
        cls, environ: MutableMapping[str, str] | None = None
    ) -> WorkerLink | None:
        """The link of a process started as a worker ($RAMP_WORKER_FD), else None."""
        env = os.environ if environ is None else environ
        raw = env.pop(WORKER_ENV, "")
        if not raw:
            return None
        if not raw.isdigit():
            raise ChannelError(f"{WORKER_ENV}={raw!r} is not a descriptor")
        channel = Channel.from_fd(int(raw))
        size_buffers(channel.sock)
        hello = await channel.expect("hello", HELLO_TIMEOUT)
        try:
            given = Predecessor.unpack(channel, hello)
            index, workers = int(hello.body["index"]), int(hello.body["workers"])
        except (KeyError, TypeError, ValueError) as e:
            hello.close_fds()
            raise ChannelError(f"malformed worker hello: {e!r}") from None
        os.close(given._stderr_fd)  # a worker writes to the stderr it was started with
        for _, sock in given.sockets:
            sock.close()
        return cls(channel, index, workers, given.groups)

    def steering(self, name: str) -> tuple[SteeringGroup, int] | None:
        return self.groups.get(name)

    def start(self) -> None:
        self._reader = asyncio.ensure_future(self._read())

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        for task in self._answering:
            task.cancel()
        self.channel.close()

    # -- to the supervisor ----------------------------------------------------------------

    def _send(self, kind: str, body: dict[str, Any], fds: list[int] | None = None) -> bool:
        try:
            self.channel.send(kind, body, fds or ())
        except (ChannelError, ValueError) as e:
            log.warning("worker %d: cannot tell the supervisor %r: %s", self.index, kind, e)
            return False
        return True

    def listening(self) -> None:
        self._send("listening", {"slots": {name: slot for name, (_, slot) in self.groups.items()}})

    def tunnels(self, counts: dict[str, int]) -> None:
        self._send("tunnels", {"counts": counts})

    def store_changed(self) -> None:
        """This worker loaded a new version of the store: so do the others, at once (not at
        their next poll), so that all of them decide by the same rules."""
        self._send("store", {})

    def elsewhere(self, tunnel_id: str) -> int | None:
        """A worker holding connections of `tunnel_id` (in turns when several do)."""
        holders = self.siblings.get(tunnel_id)
        if not holders:
            return None
        return holders[next(self._turn) % len(holders)]

    def move(self, sock: socket.socket, worker: int, body: dict[str, Any]) -> bool:
        """Send the client socket and the flow's description to `worker`."""
        return self._send("flow", {"to": worker, **body}, [sock.fileno()])

    async def ask(
        self, worker: int, what: str, body: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        """Ask `worker` (its answerer for `what`); raises TimeoutError or ChannelError."""
        qid = next(self._question_ids)
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._questions[qid] = waiter
        try:
            if not self._send("ask", {"to": worker, "id": qid, "what": what, **body}):
                raise ChannelError("the supervisor is gone")
            async with asyncio.timeout(timeout):
                return await waiter
        finally:
            self._questions.pop(qid, None)

    async def _answer(self, body: dict[str, Any]) -> None:
        answerer = self.answerers.get(str(body.get("what")))
        try:
            if answerer is None:
                raise ValueError(f"no answer for {body.get('what')!r}")
            answer = await answerer(body)
        except Exception as e:  # the asker gets the reason, not a silence
            answer = {"error": f"{type(e).__name__}: {e}"}
        self._send("reply", {"to": body.get("from"), "id": body.get("id"), **answer})

    # -- from the supervisor --------------------------------------------------------------

    async def _read(self) -> None:
        try:
            while True:
                msg = await self.channel.receive(None)
                try:
                    self._handle(msg)
                except Exception:
                    log.exception("worker %d: handling %r failed", self.index, msg.kind)
                finally:
                    msg.close_fds()
        except ChannelClosed:
            log.warning("worker %d: the supervisor is gone", self.index)
        except ChannelError as e:
            log.warning("worker %d: bad message from the supervisor: %s", self.index, e)
        finally:
            self.closed.set()
            self.stop.set()

    def _handle(self, msg: Message) -> None:
        if msg.kind == "siblings":
            tunnels = msg.body.get("tunnels", {})
            self.siblings = {str(t): [int(w) for w in ws] for t, ws in tunnels.items()}
        elif msg.kind == "rebalance":
            tunnel, slot = msg.body.get("tunnel"), msg.body.get("slot")
            valid = isinstance(tunnel, str) and isinstance(slot, int)
            if valid and self.on_rebalance is not None and not self.on_rebalance(tunnel, slot):
                self._send("unmovable", {"tunnel": tunnel})
        elif msg.kind == "scrape":
            self._answer_scrape(msg.body.get("id"))
        elif msg.kind == "ask":
            task = asyncio.ensure_future(self._answer(msg.body))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)
        elif msg.kind == "reload":
            if self.on_reload is not None:
                self.on_reload()
        elif msg.kind == "stop":
            self.stop.set()
        elif msg.kind == "store":
            if self.on_store is not None:
                self.on_store()
        elif msg.kind == "reply":
            waiter = self._questions.get(int(msg.body.get("id", 0)))
            if waiter is not None and not waiter.done():
                waiter.set_result(msg.body)
        elif msg.kind == "flow" and len(msg.fds) == 1:
            sock = socket.socket(fileno=msg.fds.pop())
            if self.adopt is None or sock.type != socket.SOCK_STREAM:
                log.warning("worker %d: a moved flow it cannot take: closed", self.index)
                sock.close()
                return
            sock.setblocking(False)
            self.adopt(sock, msg.body)
        else:
            log.warning("worker %d: unexpected %r from the supervisor", self.index, msg.kind)

    def _answer_scrape(self, scrape_id: object) -> None:
        if self.scrape is None:
            text, ok, info = "", False, {"status": "starting"}
        else:
            text, ok, info = self.scrape()
        fd = state_memfd({"metrics": text})
        try:
            self._send("scraped", {"id": scrape_id, "ok": ok, "info": info}, [fd])
        finally:
            os.close(fd)
