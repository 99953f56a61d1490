"""`--workers N`: a supervisor process and N workers (docs/workers.md).

The supervisor serves nothing itself but the status listener. It starts N copies of its own
command line as workers (`python -m ramp ...` with $RAMP_WORKER_FD), each with a channel
(ramp.workers.link) and, on the edge, a slot of its own in every UDP steering group: each
worker binds the same ports with SO_REUSEPORT, TCP connections are spread by the kernel, and
QUIC packets reach the worker whose connection ids they carry (ramp.net.reuseport).

It keeps one view of the workers: which tunnels each holds connections of (told to every
worker, so a TCP flow can move to a worker that has its tunnel), one /metrics with their
samples summed, one /ready. A worker that exits is started again, after a pause that grows
while it keeps dying young; its flows are lost, no others.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from ramp.net.reuseport import SteeringGroup
from ramp.observe.sdnotify import Notifier
from ramp.observe.status import StatusServer, start_status_server
from ramp.restart.channel import (
    Channel,
    ChannelClosed,
    ChannelError,
    Message,
    pair,
    read_state,
    state_memfd,
)
from ramp.restart.coordinator import RestartRefused, RestartServer, open_restart_server
from ramp.restart.successor import Handoff
from ramp.workers.balance import SETTLE, Balancer
from ramp.workers.link import WORKER_ENV, size_buffers
from ramp.workers.metrics_sum import SummedCollector, sum_expositions

log = logging.getLogger("ramp.workers")

SCRAPE_TIMEOUT = 2.0
STOP_TIMEOUT = 45.0  # SIGTERM drains (up to --drain-timeout) before this kills
YOUNG = 5.0  # a worker that dies sooner than this after its start is restarted slower
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
NO_RESTART = (
    "a role running --workers does not restart in place: a worker that exits is started "
    "again by the supervisor; to upgrade, stop it (SIGTERM drains) and start it again"
)


@dataclass(slots=True, eq=False)
class Worker:
    index: int
    proc: asyncio.subprocess.Process
    channel: Channel
    started: float
    listening: bool = False
    tunnels: dict[str, int] = field(default_factory=dict)
    slots: dict[str, int] = field(default_factory=dict)  # steering group name: its slot
    reader: asyncio.Task[None] | None = None


class SupervisorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.workers = Gauge("ramp_workers", "Worker processes running.", registry=registry)
        self.restarts = Counter(
            "ramp_worker_restarts",
            "Workers started again after they exited, by how they exited.",
            ["how"],
            registry=registry,
        )
        self.moves = Counter(
            "ramp_worker_flow_moves",
            "Moved flows the supervisor passed on (ok) or closed (no_worker: the worker it "
            "was for is gone).",
            ["outcome"],
            registry=registry,
        )
        self.questions = Counter(
            "ramp_worker_questions",
            "Questions one worker passed to another through the supervisor (dns: a query "
            "through a tunnel only the other worker holds).",
            ["what"],
            registry=registry,
        )
        self.rebalances = Counter(
            "ramp_worker_rebalances",
            "Tunnel connections the supervisor asked a worker to move to another worker "
            "(ramp.workers.balance).",
            registry=registry,
        )
        self.scrape_failures = Counter(
            "ramp_worker_scrape_failures",
            "Workers that did not answer a /metrics or /ready scrape in time.",
            registry=registry,
        )


class Supervisor:
    def __init__(
        self,
        role: str,
        command: Sequence[str],
        workers: int,
        status_listen: str,
        groups: dict[str, SteeringGroup] | None = None,
        restart_socket: Path | None = None,
    ) -> None:
        if workers < 2:
            raise ValueError("a supervisor needs at least 2 workers")
        self.role = role
        self.command = list(command)
        self.count = workers
        self.status_listen = status_listen
        self.groups = groups or {}
        self.registry = CollectorRegistry()
        self.metrics = SupervisorMetrics(self.registry)
        self.summed = SummedCollector()
        self.registry.register(self.summed)
        self.workers: dict[int, Worker] = {}
        self._ready: tuple[bool, dict[str, Any]] = (False, {"status": "starting"})
        self._scrapes: dict[int, tuple[int, asyncio.Future[Message]]] = {}
        self._scrape_ids = itertools.count(1)
        self._backoff: dict[int, float] = {}
        self._stopping = False
        self.status: StatusServer | None = None
        self.restart_socket = restart_socket
        self.restart_server: RestartServer | None = None
        self.exited = asyncio.Queue[Worker]()
        self.notify = Notifier()
        self.status_code = 0  # what the supervisor exits with
        self._told_ready = False
        self.balancer = Balancer()

    # -- workers ----------------------------------------------------------------------------

    async def spawn(self, index: int) -> Worker:
        ours, theirs = pair()
        size_buffers(ours)
        env = dict(os.environ)
        env[WORKER_ENV] = str(theirs.fileno())
        for key in ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "LISTEN_PID", "LISTEN_FDS"):
            env.pop(key, None)  # systemd talks to the supervisor only
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command,
                pass_fds=(theirs.fileno(),),
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        loop = asyncio.get_running_loop()
        worker = Worker(index, proc, Channel(ours), loop.time())
        handoff = Handoff([], {name: (g, index) for name, g in self.groups.items()})
        layout, fds = handoff.layout()
        memfd = state_memfd(layout)
        try:
            worker.channel.send(
                "hello",
                {"pid": os.getpid(), "index": index, "workers": self.count},
                [memfd, 2, *fds],
            )
        except ChannelClosed:
            pass  # it died at once: its reader sees the exit
        finally:
            os.close(memfd)
        self.workers[index] = worker
        worker.reader = asyncio.ensure_future(self._read(worker))
        self.metrics.workers.set(len(self.workers))
        log.info("worker %d started: pid %d", index, proc.pid)
        return worker

    async def _read(self, worker: Worker) -> None:
        try:
            while True:
                msg = await worker.channel.receive(None)
                try:
                    self._handle(worker, msg)
                except Exception:
                    log.exception("worker %d: handling %r failed", worker.index, msg.kind)
                finally:
                    msg.close_fds()
        except ChannelClosed:
            pass
        except ChannelError as e:
            log.warning("worker %d: bad message: %s; stopping it", worker.index, e)
            with contextlib.suppress(ProcessLookupError):
                worker.proc.kill()
        code = await worker.proc.wait()
        self._gone(worker, code)

    def _handle(self, worker: Worker, msg: Message) -> None:
        if msg.kind == "listening":
            worker.listening = True
            slots = msg.body.get("slots", {})
            if isinstance(slots, dict):
                worker.slots = {str(k): int(v) for k, v in slots.items() if isinstance(v, int)}
            for group in self.groups.values():
                group.joined(worker.index)
            self._set_working()
            if (
                not self._told_ready
                and len(self.workers) == self.count
                and all(w.listening for w in self.workers.values())
            ):
                self._told_ready = True
                self.notify.ready(f"{self.count} workers listening")
            self.balance()
        elif msg.kind == "tunnels":
            counts = msg.body.get("counts", {})
            worker.tunnels = {str(t): int(n) for t, n in counts.items() if int(n) > 0}
            self._tell_siblings()
            self.balance()
        elif msg.kind == "unmovable":
            tunnel = str(msg.body.get("tunnel", ""))
            log.info("tunnel %s: worker %d has no connection that can move", tunnel, worker.index)
            self.balancer.cannot(tunnel, {w.index: w.tunnels for w in self.workers.values()})
        elif msg.kind == "flow":
            self._pass_flow(worker, msg)
        elif msg.kind in ("ask", "reply"):
            self._pass_on(worker, msg)
        elif msg.kind == "store":
            for other in list(self.workers.values()):
                if other is not worker:
                    with contextlib.suppress(ChannelError):
                        other.channel.send("store", {"from": worker.index})
        elif msg.kind == "scraped":
            scrape_id, waiter = self._scrapes.get(worker.index, (0, None))
            if waiter is not None and not waiter.done() and msg.body.get("id") == scrape_id:
                waiter.set_result(Message(msg.kind, msg.body, list(msg.fds)))
                msg.fds = []  # the waiter reads and closes them
        else:
            log.warning("worker %d: unexpected %r", worker.index, msg.kind)

    def _set_working(self) -> None:
        """New connections of every steered port go to the listening workers' slots."""
        slots = sorted(w.index for w in self.workers.values() if w.listening)
        for group in self.groups.values():
            group.set_working(slots)

    def balance(self) -> None:
        """Ask for the moves that spread each tunnel's connections over the workers."""
        listening = [w.index for w in self.workers.values() if w.listening and "tunnel" in w.slots]
        holdings = {w.index: w.tunnels for w in self.workers.values()}
        now = asyncio.get_running_loop().time()
        for move in self.balancer.due(holdings, listening, now):
            source, target = self.workers[move.source], self.workers[move.target]
            log.info(
                "tunnel %s: %d connections on worker %d, %d on worker %d: moving one",
                move.tunnel,
                source.tunnels.get(move.tunnel, 0),
                source.index,
                target.tunnels.get(move.tunnel, 0),
                target.index,
            )
            with contextlib.suppress(ChannelError, ValueError):
                source.channel.send(
                    "rebalance", {"tunnel": move.tunnel, "slot": target.slots["tunnel"]}
                )
                self.metrics.rebalances.inc()

    async def _rebalancing(self) -> None:
        """Moves given up (SETTLE) are asked again even when no worker reports a change."""
        while True:
            await asyncio.sleep(SETTLE / 2)
            self.balance()

    def _tell_siblings(self) -> None:
        for worker in self.workers.values():
            others: dict[str, list[int]] = {}
            for other in self.workers.values():
                if other is worker:
                    continue
                for tunnel in other.tunnels:
                    others.setdefault(tunnel, []).append(other.index)
            with contextlib.suppress(ChannelError):
                worker.channel.send("siblings", {"tunnels": others})

    def _pass_flow(self, worker: Worker, msg: Message) -> None:
        body = dict(msg.body)
        to = self.workers.get(int(body.pop("to", -1)))
        if to is None or len(msg.fds) != 1:
            self.metrics.moves.labels("no_worker").inc()
            log.warning("worker %d moved a flow to a worker that is gone: closed", worker.index)
            return
        body["from"] = worker.index
        try:
            to.channel.send("flow", body, msg.fds)
        except (ChannelError, ValueError) as e:
            self.metrics.moves.labels("no_worker").inc()
            log.warning("a flow for worker %d could not be passed on: %s", to.index, e)
            return
        self.metrics.moves.labels("ok").inc()

    def _pass_on(self, worker: Worker, msg: Message) -> None:
        """A question to another worker, or its answer: passed on with who sent it. A
        question for a worker that is gone gets an error reply at once."""
        body = dict(msg.body)
        target = body.pop("to", None)
        to = self.workers.get(target) if isinstance(target, int) else None
        body["from"] = worker.index
        if msg.kind == "ask":
            self.metrics.questions.labels(str(body.get("what", ""))[:16]).inc()
        if to is not None:
            with contextlib.suppress(ChannelError, ValueError):
                to.channel.send(msg.kind, body)
                return
        if msg.kind == "ask":
            with contextlib.suppress(ChannelError, ValueError):
                worker.channel.send(
                    "reply", {"id": body.get("id"), "error": "that worker is gone", "from": -1}
                )

    def _gone(self, worker: Worker, code: int) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        worker.channel.close()
        self.metrics.workers.set(len(self.workers))
        for group in self.groups.values():
            with contextlib.suppress(OSError, ValueError):
                group.release(worker.index)
        self._set_working()
        self._tell_siblings()
        self.balance()
        how = f"signal {-code}" if code < 0 else f"status {code}"
        if self._stopping:
            log.info("worker %d (pid %d) exited: %s", worker.index, worker.proc.pid, how)
        else:
            log.warning(
                "worker %d (pid %d) exited (%s): its flows are lost; starting it again",
                worker.index,
                worker.proc.pid,
                how,
            )
        self.exited.put_nowait(worker)

    async def _keep(self, stop: asyncio.Event) -> None:
        """Start each worker that exits again (unless stopping)."""
        loop = asyncio.get_running_loop()
        while True:
            worker = await self.exited.get()
            if self._stopping or stop.is_set():
                continue
            code = worker.proc.returncode or 0
            if code >= 2 or (code > 0 and not worker.listening):
                # it chose to exit (a config, token or registration error, or a listener it
                # cannot bind): every worker would, so the supervisor exits with it
                log.error(
                    "worker %d exited with status %d%s: stopping the %s",
                    worker.index,
                    code,
                    "" if worker.listening else " before it listened",
                    self.role,
                )
                self.status_code = code
                stop.set()
                continue
            self.metrics.restarts.labels("signal" if code < 0 else "exit").inc()
            young = loop.time() - worker.started < YOUNG
            pause = self._backoff.get(worker.index, 0.0)
            pause = min(BACKOFF_MAX, max(BACKOFF_FIRST, pause * 2)) if young else 0.0
            self._backoff[worker.index] = pause
            if pause:
                log.warning("worker %d died young: waiting %.1f s first", worker.index, pause)
                await asyncio.sleep(pause)
            if not (self._stopping or stop.is_set()):
                await self.spawn(worker.index)

    # -- one view ---------------------------------------------------------------------------

    async def _scrape(self, worker: Worker) -> tuple[str, bool, dict[str, Any]] | None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Message] = loop.create_future()
        scrape_id = next(self._scrape_ids)
        self._scrapes[worker.index] = (scrape_id, waiter)
        try:
            worker.channel.send("scrape", {"id": scrape_id})
            async with asyncio.timeout(SCRAPE_TIMEOUT):
                msg = await waiter
        except (ChannelError, TimeoutError):
            self.metrics.scrape_failures.inc()
            return None
        finally:
            if self._scrapes.get(worker.index, (0, None))[1] is waiter:
                del self._scrapes[worker.index]
        try:
            text = str(read_state(msg.fds[0]).get("metrics", "")) if msg.fds else ""
        except (ChannelError, OSError):
            text = ""
        finally:
            msg.close_fds()
        return text, bool(msg.body.get("ok")), dict(msg.body.get("info", {}))

    async def refresh(self) -> None:
        """Scrape every worker: the summed families and the ready answer are served next."""
        workers = list(self.workers.values())
        results = await asyncio.gather(*(self._scrape(w) for w in workers))
        got = [(w, r) for w, r in zip(workers, results, strict=True) if r is not None]
        try:
            self.summed.update(sum_expositions(text for _, (text, _, _) in got))
        except ValueError as e:
            log.warning("a worker's metrics could not be read: %s", e)
        self._ready = merge_ready([(w.index, w.proc.pid, ok, info) for w, (_, ok, info) in got])

    def ready(self) -> tuple[bool, dict[str, Any]]:
        return self._ready

    # -- the process ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, reload: asyncio.Event | None = None) -> int:
        self.status = await start_status_server(
            self.status_listen, self.registry, self.ready, refresh=self.refresh
        )
        if self.restart_socket is not None:  # answers, so `ramp ... restart` says why not
            self.restart_server = await open_restart_server(
                self.restart_socket, self._restart, lambda outcome: None, None, self.role
            )
        for index in range(self.count):
            await self.spawn(index)
        log.info("%s supervisor: %d workers", self.role, self.count)
        self.notify.start_watchdog()
        keeper = asyncio.ensure_future(self._keep(stop))
        forwarder = asyncio.ensure_future(self._forward(reload)) if reload is not None else None
        balancer = asyncio.ensure_future(self._rebalancing()) if "tunnel" in self.groups else None
        try:
            await stop.wait()
        finally:
            self._stopping = True
            if balancer is not None:
                balancer.cancel()
            self.notify.stopping(f"stopping {len(self.workers)} workers")
            keeper.cancel()
            if forwarder is not None:
                forwarder.cancel()
            await self.stop_workers()
            if self.restart_server is not None:
                await self.restart_server.close()
            if self.status is not None:
                await self.status.close()
            for group in self.groups.values():
                group.close()
            await self.notify.close()
        return self.status_code

    async def _restart(self, progress: Callable[[str], None]) -> int:
        raise RestartRefused(NO_RESTART)

    async def _forward(self, reload: asyncio.Event) -> None:
        while True:
            await reload.wait()
            reload.clear()
            self.reloaded()

    def tell_all(self, kind: str) -> None:
        """A message to every worker; one that cannot take it gets the signal instead."""
        for worker in list(self.workers.values()):
            try:
                worker.channel.send(kind, {})
            except ChannelError:
                sig = signal.SIGHUP if kind == "reload" else signal.SIGTERM
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(sig)

    def reloaded(self) -> None:
        self.notify.reloading()
        self.tell_all("reload")
        self.notify.ready(f"{len(self.workers)} workers; reload passed to each")

    def signal_all(self, sig: int) -> None:
        for worker in list(self.workers.values()):
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(sig)

    async def stop_workers(self, timeout: float = STOP_TIMEOUT) -> None:
        """`stop` (each drains), then SIGKILL for those still running after `timeout`."""
        workers = list(self.workers.values())
        self.tell_all("stop")
        waits = [asyncio.ensure_future(w.proc.wait()) for w in workers]
        if waits:
            await asyncio.wait(waits, timeout=timeout)
            for worker in workers:
                if worker.proc.returncode is None:
                    log.warning("worker %d did not stop in %.0f s: killed", worker.index, timeout)
                    with contextlib.suppress(ProcessLookupError):
                        worker.proc.kill()
            await asyncio.gather(*(w.proc.wait() for w in workers))
        for worker in workers:
            if worker.reader is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await worker.reader


def merge_ready(
    answers: list[tuple[int, int, bool, dict[str, Any]]],
) -> tuple[bool, dict[str, Any]]:
    """One /ready for all workers: ready when any worker is; numbers and per-name counts
    summed; every worker's own answer under "workers"."""
    ok = any(a[2] for a in answers)
    merged: dict[str, Any] = {}
    for _, _, _, info in answers:
        for key, value in info.items():
            if isinstance(value, bool) or key == "status":
                continue
            if isinstance(value, int | float):
                merged[key] = merged.get(key, 0) + value
            elif isinstance(value, dict) and all(isinstance(v, int) for v in value.values()):
                into = merged.setdefault(key, {})
                for name, n in value.items():
                    into[name] = into.get(name, 0) + n
            else:
                merged.setdefault(key, value)
    statuses = [str(a[3].get("status", "")) for a in answers if a[2] == ok]
    merged["status"] = statuses[0] if statuses else "no worker answered"
    merged["workers"] = [
        {
            "index": i,
            "pid": pid,
            "ready": r,
            "status": info.get("status", ""),
            **({"connections": info["connections"]} if "connections" in info else {}),
        }
        for i, pid, r, info in answers
    ]
    return ok, merged


def supervise(
    role: str,
    command: Sequence[str],
    workers: int,
    status_listen: str,
    groups: Callable[[], dict[str, SteeringGroup]] = dict,
    restart_socket: Path | None = None,
) -> int:
    """Run a supervisor until SIGINT/SIGTERM; SIGHUP goes to every worker; SIGQUIT (an
    in-place restart elsewhere) is refused with a log line."""
    from ramp.runtime import run_until_signal

    reload: asyncio.Event | None = None

    async def main(stop: asyncio.Event) -> int:
        nonlocal reload
        reload = asyncio.Event()
        supervisor = Supervisor(role, command, workers, status_listen, groups(), restart_socket)
        return await supervisor.run(stop, reload)

    def on_hup() -> None:
        if reload is not None:
            reload.set()

    def on_quit() -> None:
        log.warning("SIGQUIT: %s", NO_RESTART)

    return run_until_signal(main, on_hup, on_quit)
