"""The restart coordination socket: `ramp edge restart` (or `ramp tunnel restart`) asks the
running process, over a Unix socket in its data directory, to start its successor.

Only the process's own user (or root) may ask: the socket is mode 0600 and every peer's
credentials (SO_PEERCRED) are checked. A request is one JSON line, `{"op": "restart"}`; the
answer is JSON lines, `{"progress": "..."}` while it runs, then `{"ok": true, "pid": N}` or
`{"ok": false, "error": "..."}`. One restart runs at a time; bad input gets an error line
and a closed connection, never a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("ramp.restart")

SOCKET_NAME = "restart.sock"  # the edge's, in its data directory
CONNECTOR_SOCKET_NAME = "tunnel-restart.sock"  # a connector's (both may share a directory)
MAX_REQUEST = 4096
REQUEST_TIMEOUT = 5.0  # to send the request line once connected
_UCRED = struct.Struct("3i")  # pid, uid, gid

Progress = Callable[[str], None]
RestartFn = Callable[[Progress], Awaitable[int]]  # returns the successor's pid


class RestartRefused(Exception):
    """The process cannot restart now (one is running, it is handing over already)."""


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid, gid


class RestartServer:
    """Serves the coordination socket for one process."""

    def __init__(
        self, path: Path, restart: RestartFn, on_request: Callable[[str], None] = lambda r: None
    ) -> None:
        self.path = path
        self._restart = restart
        self._on_request = on_request  # the outcome, for a counter
        self._server: asyncio.AbstractServer | None = None
        self.sock: socket.socket | None = None
        self._running = False
        self.refusal: str | None = None  # set while the process cannot restart
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, given: socket.socket | None = None) -> None:
        """Listen on `path` (or on a predecessor's socket for it)."""
        if given is None:
            given = bind_unix(self.path)
        self.sock = given
        self._server = await asyncio.start_unix_server(self._client, sock=given)

    def stop_accepting(self) -> None:
        """Close our listener (a successor holds the same socket and answers from now on)."""
        if self._server is not None:
            self._server.close()
            self._server = None

    async def close(self, unlink: bool = True) -> None:
        self.stop_accepting()
        for task in list(self._tasks):
            task.cancel()
        if unlink:
            with contextlib.suppress(OSError):
                self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, OSError):
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        pid, uid, _ = peer_credentials(sock)
        if uid not in (os.geteuid(), 0):
            self._refuse(writer, "bad_peer", f"uid {uid} may not restart this process")
            log.warning("restart socket: refused pid %d of uid %d", pid, uid)
            return
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                line = await reader.readuntil(b"\n")
        except TimeoutError:
            self._refuse(writer, "bad_request", "no request line within 5 s")
            return
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            self._refuse(writer, "bad_request", "expected one JSON line")
            return
        request = _parse(line)
        if request is None:
            self._refuse(writer, "bad_request", 'expected {"op": "restart"}')
            log.info("restart socket: malformed request from pid %d", pid)
            return
        if self.refusal is not None or self._running:
            reason = self.refusal or "a restart is already in progress"
            self._refuse(writer, "busy", reason)
            return
        self._running = True
        log.info("restart requested by pid %d (uid %d)", pid, uid)
        try:
            successor = await self._restart(lambda text: _write(writer, {"progress": text}))
        except RestartRefused as e:
            self._refuse(writer, "busy", str(e))
        except Exception as e:
            self._on_request("failed")
            _write(writer, {"ok": False, "error": str(e)})
        else:
            self._on_request("ok")
            _write(writer, {"ok": True, "pid": successor})
        finally:
            self._running = False
        with contextlib.suppress(ConnectionError, OSError):
            await writer.drain()

    def _refuse(self, writer: asyncio.StreamWriter, outcome: str, error: str) -> None:
        self._on_request(outcome)
        _write(writer, {"ok": False, "error": error})


async def open_restart_server(
    path: Path,
    restart: RestartFn,
    on_request: Callable[[str], None],
    given: socket.socket | None,
    role: str,
) -> RestartServer | None:
    """The role's coordination socket at `path` (or the predecessor's `given` one); None,
    with a warning, when another live process already answers there."""
    if given is None and socket_in_use(path):
        log.warning(
            "%s answers for another %s sharing this data directory: `ramp %s restart` "
            "reaches that one, not this process",
            path,
            role,
            "edge" if role == "edge" else "tunnel",
        )
        return None
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    server = RestartServer(path, restart, on_request)
    await server.start(given)
    return server


def _parse(line: bytes) -> dict[str, Any] | None:
    if len(line) > MAX_REQUEST:
        return None
    try:
        request = json.loads(line)
    except ValueError:
        return None
    if not isinstance(request, dict) or request.get("op") != "restart":
        return None
    return request


def _write(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> None:
    if not writer.is_closing():
        writer.write(json.dumps(obj).encode() + b"\n")


def bind_unix(path: Path) -> socket.socket:
    """A listening Unix socket at `path`, mode 0600 from the start (umask, not chmod after)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with contextlib.suppress(FileNotFoundError):
        if path.is_socket():
            path.unlink()  # a dead process's; a live one's answers connect() (checked below)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    sock.listen(16)
    sock.setblocking(False)
    return sock


def socket_in_use(path: Path) -> bool:
    """Whether a process answers on `path` (two processes must not share one data dir)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def request_restart(path: Path, timeout: float, progress: Progress) -> dict[str, Any]:
    """Ask the process at `path` to restart; its final answer (raises OSError if none)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps({"op": "restart"}).encode() + b"\n")
        with sock.makefile("rb") as answers:
            for line in answers:
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                if not isinstance(obj, dict):
                    raise OSError(f"unexpected answer: {line[:100]!r}")
                if "progress" in obj:
                    progress(str(obj["progress"]))
                elif "ok" in obj:
                    return dict(obj)
    raise OSError("the process closed the restart socket without an answer")
