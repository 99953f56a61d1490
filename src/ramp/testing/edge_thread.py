"""A ramp edge in this process, on an event loop of its own in a thread inside a lab
namespace: for tests and benchmarks that drive the edge's internal APIs (its packet path)
against real connectors the lab starts.

    edge = EdgeThread(lab)            # listens on the lab's tunnel address in E
    edge.call(lambda e: coroutine(e)) # run a coroutine function on the edge's loop
    edge.close()
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any

from ramp.edge import Edge
from ramp.testing.lab import EDGE_TUNNEL, Lab
from ramp.testing.loopback import loopback_edge_config


class EdgeThread:
    """A ramp edge on an event loop of its own, in a thread inside the lab's edge namespace;
    `call` runs a coroutine function there with the edge and returns its result."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.loop = asyncio.new_event_loop()
        self.edge: Edge | None = None
        self.received: list[tuple[str, bytes]] = []
        started: Future[None] = Future()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        started.result(30)

    def _run(self, started: Future[None]) -> None:
        self.lab.edge_ns._enter_current_thread()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as e:
            started.set_exception(e)
            return
        started.set_result(None)
        self.loop.run_forever()

    async def _start(self) -> None:
        config = loopback_edge_config(
            self.lab.data_dir, tunnel_listen=EDGE_TUNNEL, socks5_listen="off"
        )
        self.edge = Edge(config)
        await self.edge.start()
        assert self.edge.packets is not None
        # every packet a connector sent back, for the caller to look through
        self.edge.packets.on_packet = lambda tunnel, packet: self.received.append((tunnel, packet))

    def call(self, fn: Callable[[Edge], Coroutine[Any, Any, Any]], timeout: float = 60) -> Any:
        assert self.edge is not None
        return asyncio.run_coroutine_threadsafe(fn(self.edge), self.loop).result(timeout)

    def close(self) -> None:
        if self.edge is not None:
            with_edge = self.edge
            asyncio.run_coroutine_threadsafe(with_edge.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
