"""Running a role: the event loop, signals, and exit codes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable

log = logging.getLogger("ramp")

EXIT_SECOND_SIGNAL = 130


def run_until_signal(
    main: Callable[[asyncio.Event], Awaitable[int]],
    reload: Callable[[], None] | None = None,
    upgrade: Callable[[], None] | None = None,
) -> int:
    """Run `main(stop)` on uvloop (if installed). The first SIGINT/SIGTERM sets `stop` so the
    role can shut down gracefully; a second one exits at once. SIGHUP calls `reload`, SIGQUIT
    `upgrade` (a restart into a successor process)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but stay usable
        uvloop = None

    async def runner() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal(signum: int) -> None:
            if stop.is_set():
                log.warning("second %s: exiting now", signal.Signals(signum).name)
                logging.shutdown()
                os._exit(EXIT_SECOND_SIGNAL)
            log.info(
                "%s: shutting down (send it again to exit at once)", signal.Signals(signum).name
            )
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        if reload is not None:

            def on_hup() -> None:
                log.info("SIGHUP: reloading the configuration")
                try:
                    reload()
                except Exception:  # the reload reports its own errors; never die of one
                    log.exception("reload failed")

            loop.add_signal_handler(signal.SIGHUP, on_hup)
        if upgrade is not None:

            def on_quit() -> None:
                log.info("SIGQUIT: starting a successor")
                upgrade()

            loop.add_signal_handler(signal.SIGQUIT, on_quit)
        return await main(stop)

    if uvloop is not None:
        return uvloop.run(runner())
    return asyncio.run(runner())


async def stop_when(event: asyncio.Event, stop: asyncio.Event) -> None:
    """Set `stop` once `event` is set (a worker told to stop, or left by its supervisor)."""
    await event.wait()
    stop.set()
