"""The audit log: one JSON line per finished flow.

Lines are self-contained so they can be shipped and queried with ordinary tools (jq, Loki,
a SIEM). A failing disk must not stop traffic: write errors are logged once and dropped.
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


class AuditLog:
    """`AuditLog("-")` writes to stderr; a path is opened for appending, line-buffered."""

    def __init__(self, path_or_dash: str | Path) -> None:
        self.target = str(path_or_dash)
        self._file: TextIO | None = None
        self._failed = False
        self._closed = False
        if self.target != "-":
            # Audit lines name users and destinations: keep a new file private.
            fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._file = open(fd, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def write(self, flow: Flow) -> None:
        self.write_record(flow_record(flow))

    def write_record(self, record: dict[str, Any]) -> None:
        if self._closed:
            return
        line = _ENCODE(record)
        # stderr is looked up at each write so redirection (and test capture) is honoured.
        out = self._file if self._file is not None else sys.stderr
        try:
            out.write(line + "\n")
            if self._file is None:
                out.flush()
        except (OSError, ValueError) as e:
            if not self._failed:
                log.error(
                    "audit log %s: cannot write (%s); dropping lines until it works", self.target, e
                )
            self._failed = True
        else:
            self._failed = False

    def close(self) -> None:
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None
