"""systemd's service notifications (sd_notify(3)): READY, RELOADING, STOPPING, STATUS and the
watchdog, so a `Type=notify` (or `notify-reload`) unit knows when a role serves.

Without NOTIFY_SOCKET in the environment every call is a no-op: the same code runs under
systemd, under another supervisor, and by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("ramp.sdnotify")

# systemd pings at least this often even when WATCHDOG_USEC asks for more (its own minimum
# period is 1 s; a ping every half period leaves room for one late tick)
WATCHDOG_FRACTION = 0.5


def encode(fields: Mapping[str, str | int]) -> bytes:
    """One notification datagram: KEY=VALUE lines. A value cannot hold a newline (it would
    start a new assignment), so newlines become spaces."""
    lines = []
    for key, value in fields.items():
        if not key or not key.replace("_", "").isalnum() or not key.isupper():
            raise ValueError(f"not a notification key: {key!r}")
        text = str(value).replace("\n", " ")
        lines.append(f"{key}={text}")
    return ("\n".join(lines) + "\n").encode()


def socket_address(value: str) -> str | bytes | None:
    """NOTIFY_SOCKET as an AF_UNIX address: a path, or '@name' for the abstract namespace.
    None for what this module cannot use (vsock addresses, anything relative)."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between watchdog pings, or None when no watchdog is asked for this process."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and owner != str(pid):
        return None  # the watchdog is someone else's (a parent that exec'd us would unset it)
    return int(usec) / 1e6 * WATCHDOG_FRACTION


class Notifier:
    """Sends a role's state to the service manager."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = socket_address(raw) if raw else None
        if raw and self.address is None:
            log.warning("NOTIFY_SOCKET=%r is not a Unix socket address: not notifying", raw)
        self.watchdog_every = watchdog_interval(env, os.getpid()) if self.address else None
        self.sent = 0
        self.failed = 0
        self._sock: socket.socket | None = None
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send one notification; False (logged once per failure, counted) if it could not
        go. A service manager that went away must not take the role down with it."""
        if self.address is None:
            return False
        data = encode(fields)
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(data, self.address)
        except OSError as e:
            self.failed += 1
            log.warning("cannot notify the service manager: %s", e)
            return False
        self.sent += 1
        return True

    def ready(self, status: str = "") -> None:
        self.send(READY=1, **({"STATUS": status} if status else {}))

    def main_pid(self, pid: int) -> None:
        """A restart's successor takes over as the service's main process (the unit needs
        NotifyAccess=all to accept it from a new pid)."""
        self.send(MAINPID=pid)

    def reloading(self) -> None:
        # notify-reload units need the monotonic time of the reload's start with it
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str = "") -> None:
        self.send(STOPPING=1, **({"STATUS": status} if status else {}))

    def status(self, text: str) -> None:
        self.send(STATUS=text)

    def start_watchdog(self) -> None:
        """Ping from the event loop: a loop that is stuck stops pinging, and systemd restarts
        the service, which is the point of the watchdog."""
        if self.watchdog_every is None or self._watchdog is not None:
            return
        self._watchdog = asyncio.ensure_future(self._ping(self.watchdog_every))

    async def _ping(self, every: float) -> None:
        while True:
            self.send(WATCHDOG=1)
            await asyncio.sleep(every)

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
