"""A network namespace a process makes for itself: unnamed, held by a file descriptor.

The edge's TCP upgrade path puts a TUN device and a listener into such a namespace, so the
kernel's TCP stack there serves packet flows without touching the host's addresses, routes or
firewall (the Oxy design: reference oxy-ip-packets-to-http). Nothing is mounted under
/run/netns; the namespace goes away when the descriptor is closed and its sockets are gone.

`call` runs a function in a short-lived thread that has joined the namespace (setns(2) only
changes the calling thread); a socket made there keeps the namespace for its whole life.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

CLONE_NEWNET = 0x40000000

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _in_thread(fn: Callable[[], T]) -> T:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=target, name="in-ownns", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


class OwnNetns:
    """A fresh network namespace (only `lo`, down) held open by `fd`. Needs CAP_SYS_ADMIN."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def create(cls) -> OwnNetns:
        def make() -> int:
            # The thread leaves for the new namespace and dies there; the process stays put.
            _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
            return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

        return cls(_in_thread(make))

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(*args, **kwargs)` in a thread inside this namespace and return its result."""
        if self.fd < 0:
            raise OSError("namespace closed")

        def run() -> T:
            _check(_libc.setns(self.fd, CLONE_NEWNET), "setns")
            return fn(*args, **kwargs)

        return _in_thread(run)

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


__all__ = ["OwnNetns"]
