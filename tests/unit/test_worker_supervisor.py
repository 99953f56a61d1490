"""The supervisor with stand-in workers (a few lines on WorkerLink): one view of their
metrics and readiness, a worker that dies is started again, a worker that sends garbage is
stopped (and started again), a flow for a worker that is gone is closed and counted."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from ramp.testing.wait import DEADLINE
from ramp.workers.supervisor import Supervisor

FAKE = """
import asyncio, os, socket, sys
from ramp.workers.link import WorkerLink

async def main():
    link = await WorkerLink.from_environment()
    text = "# TYPE ramp_flows counter\\nramp_flows_total{result=\\"ok\\"} %d\\n" % (link.index + 1)
    link.scrape = lambda: (text, link.index == 0, {"status": "s", "flows": 10})
    link.start()
    link.listening()
    mode = os.environ.get("FAKE_MODE", "")
    marker = os.environ["FAKE_MARKER"]
    if mode == "garbage" and link.index == 1 and not os.path.exists(marker):
        open(marker, "w").close()  # once: the worker started again behaves
        link.channel.sock.send(b"this is not json")
    if mode == "move" and link.index == 1:
        a, b = socket.socketpair()
        link.move(a, 7, {"flow": {}, "plan": {}})
    await link.stop.wait()

asyncio.run(main())
"""


async def _until(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(DEADLINE):
        while not predicate():
            await asyncio.sleep(0.05)


def _supervisor(tmp_path: Path, mode: str) -> Supervisor:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE)
    os.environ["FAKE_MODE"] = mode
    os.environ["FAKE_MARKER"] = str(tmp_path / "garbage-sent")
    return Supervisor("edge", [sys.executable, str(script)], 2, "off")


async def _run(sup: Supervisor, body) -> None:  # type: ignore[no-untyped-def]
    stop = asyncio.Event()
    task = asyncio.ensure_future(sup.run(stop))
    try:
        await _until(
            lambda: len(sup.workers) == 2 and all(w.listening for w in sup.workers.values()),
            "workers",
        )
        await body()
    finally:
        stop.set()
        await asyncio.wait_for(task, DEADLINE)
        os.environ.pop("FAKE_MODE", None)


def test_one_view_of_the_workers_and_a_dead_one_comes_back(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path, "")

    async def body() -> None:
        await sup.refresh()
        ok, doc = sup.ready()
        assert ok and doc["flows"] == 20 and len(doc["workers"]) == 2
        assert sup.registry.get_sample_value("ramp_flows_total", {"result": "ok"}) == 3
        pid = sup.workers[1].proc.pid
        os.kill(pid, 9)
        await _until(lambda: 1 in sup.workers and sup.workers[1].proc.pid != pid, "a new worker 1")
        assert sup.registry.get_sample_value("ramp_worker_restarts_total", {"how": "signal"}) == 1

    asyncio.run(_run(sup, body))


def test_a_worker_sending_garbage_is_stopped_and_started_again(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path, "garbage")

    async def body() -> None:
        pid0 = sup.workers[0].proc.pid
        await _until(
            lambda: (
                sup.registry.get_sample_value("ramp_worker_restarts_total", {"how": "signal"}) == 1
                and 1 in sup.workers
                and sup.workers[1].listening
            ),
            "worker 1 stopped and started again",
        )
        assert (tmp_path / "garbage-sent").exists()
        assert sup.workers[0].proc.pid == pid0
        assert 0 in sup.workers  # the other one is untouched

    asyncio.run(_run(sup, body))


def test_a_flow_for_a_worker_that_is_gone_is_closed_and_counted(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path, "move")

    async def body() -> None:
        await _until(
            lambda: (
                sup.registry.get_sample_value(
                    "ramp_worker_flow_moves_total", {"outcome": "no_worker"}
                )
                == 1
            ),
            "counted",
        )
        assert len(sup.workers) == 2

    asyncio.run(_run(sup, body))
