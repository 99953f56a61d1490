"""The audit log: one JSON line per finished flow.

Lines are self-contained so they can be shipped and queried with ordinary tools (jq, Loki,
a SIEM). A failing disk must not stop traffic: write errors are logged once and dropped.
The file rotates itself by size, and is reopened on SIGHUP for outside rotation.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from ramp.flows.flow import Flow

log = logging.getLogger(__name__)


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@functools.lru_cache(maxsize=8)
def _second(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch))


def _timestamp(wall: float) -> str:
    """RFC 3339 UTC with milliseconds; the per-second part is shared by the flows of a second
    (this is on the path of every flow's end)."""
    ms = int(wall * 1000)
    return f"{_second(ms // 1000)}.{ms % 1000:03d}Z"


def flow_record(flow: Flow) -> dict[str, Any]:
    """The audit fields of a finished flow, in a stable order. Absent values are JSON null,
    never a placeholder string; edge and connector write the same record."""
    route = flow.route
    decision = flow.decision
    record: dict[str, Any] = {
        "time": _timestamp(flow.started_wall),
        "flow": flow.id,
        "kind": flow.kind.value,
        "protocol": flow.protocol,
        "identity": flow.user,
        "onramp": flow.onramp,
        "source": _addr(*flow.source),
        "destination": str(flow.destination),
        "resolved": flow.resolved,
        "vnet": route.vnet if route is not None else flow.vnet,
        "offramp": route.offramp if route is not None else None,
        "tunnel": str(route) if route is not None else None,
        "rule": decision.rule if decision is not None else None,
        "bytes_up": flow.bytes_up,
        "bytes_down": flow.bytes_down,
        "duration": round(flow.duration, 3),
        "result": flow.result.value if flow.result is not None else None,
        "reason": flow.reason,
    }
    if flow.kind.value != "stream":
        record["packets_up"] = flow.packets_up
        record["packets_down"] = flow.packets_down
        record["drops"] = flow.drops
    if flow.annotations:
        record["annotations"] = dict(flow.annotations)
    return record


DEFAULT_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_BACKUPS = 5
_RETRY_OPEN_S = 1.0  # a file that cannot be opened is tried again at most this often


class AuditLog:
    """`AuditLog("-")` writes to stderr; a path is opened for appending, line-buffered, and
    rotated when a line would take it past `max_bytes` (0: never): FILE becomes FILE.1, FILE.1
    FILE.2 and so on, `backups` of them kept. `reopen()` (SIGHUP) follows an outside rotation
    such as logrotate's."""

    def __init__(
        self,
        path_or_dash: str | Path,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
    ) -> None:
        self.target = str(path_or_dash)
        self.max_bytes = max_bytes
        self.backups = backups
        self._file: TextIO | None = None
        self._size = 0
        self._failing: set[str] = set()  # what fails ("cannot write", ...): said once each
        self._closed = False
        self._next_open = 0.0
        self._next_rotate = 0.0
        if self.target != "-":
            self._file, self._size = self._open()  # at start, a path that cannot be opened is fatal

    def _open(self) -> tuple[TextIO, int]:
        # Audit lines name users and destinations: keep a new file private.
        fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            return open(fd, "a", buffering=1, encoding="utf-8"), size
        except BaseException:
            os.close(fd)
            raise

    def _error(self, what: str, e: Exception) -> None:
        if what not in self._failing:
            log.error("audit log %s: %s (%s); dropping lines until it works", self.target, what, e)
            self._failing.add(what)

    def _drop_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except (OSError, ValueError):
                pass  # its lines are as lost as they would be on a failed write
            self._file = None
        self._size = 0  # nothing to rotate until a file is open again

    def _reopen_now(self) -> None:
        self._drop_file()
        try:
            self._file, self._size = self._open()
        except OSError as e:
            self._next_open = time.monotonic() + _RETRY_OPEN_S
            self._error("cannot open", e)
        else:
            self._failing.discard("cannot open")

    def reopen(self) -> None:
        """Close and open the file again: after logrotate moved it, lines go to a new one."""
        if self.target == "-" or self._closed:
            return
        self._reopen_now()

    def _rotate(self) -> None:
        try:
            if self.backups > 0:
                for i in range(self.backups - 1, 0, -1):
                    older = f"{self.target}.{i}"
                    if os.path.lexists(older):
                        os.replace(older, f"{self.target}.{i + 1}")
                os.replace(self.target, f"{self.target}.1")
            else:
                os.unlink(self.target)
        except FileNotFoundError:
            pass  # someone removed the file: a new one is all it takes
        except OSError as e:
            # Keep writing to the file we have rather than lose lines; try again in a while.
            self._next_rotate = time.monotonic() + _RETRY_OPEN_S
            self._error("cannot rotate", e)
            return
        self._failing.discard("cannot rotate")
        self._reopen_now()

    def write(self, flow: Flow) -> None:
        self.write_record(flow_record(flow))

    def write_record(self, record: dict[str, Any]) -> None:
        if self._closed:
            return
        line = _ENCODE(record) + "\n"
        if self.target == "-":
            # stderr is looked up at each write so redirection (and test capture) is honoured.
            try:
                sys.stderr.write(line)
                sys.stderr.flush()
            except (OSError, ValueError) as e:
                self._error("cannot write", e)
            else:
                self._failing.discard("cannot write")
            return
        # Bytes, not characters: names and hostnames may be UTF-8.
        size = len(line) if line.isascii() else len(line.encode("utf-8"))
        if (
            self.max_bytes
            and self._size
            and self._size + size > self.max_bytes
            and time.monotonic() >= self._next_rotate
        ):
            self._rotate()
        if self._file is None:
            if time.monotonic() < self._next_open:
                return
            self._reopen_now()
            if self._file is None:
                return
        try:
            self._file.write(line)
        except (OSError, ValueError) as e:
            self._error("cannot write", e)
        else:
            self._size += size
            self._failing.discard("cannot write")

    def close(self) -> None:
        self._closed = True
        self._drop_file()
