"""Listening sockets a process is given instead of binding them itself: by systemd's socket
activation (sd_listen_fds(3): LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES), matched to the
listeners by name.

A listener asks for its socket by name (the on-ramp type: `socks5`, `http`, `forward`, `dns`,
...; the name is systemd's `FileDescriptorName=`, which cannot hold ':') and gets it if one
was given, else it binds its own.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable, MutableMapping

log = logging.getLogger("ramp.inherit")

SD_LISTEN_FDS_START = 3  # the first descriptor systemd passes
UNNAMED = "unknown"  # systemd's name for a descriptor without FileDescriptorName=


class SocketSet:
    """Sockets given to this process, by name; each can be taken once."""

    def __init__(
        self, entries: Iterable[tuple[str, socket.socket]] = (), *, strict: bool = False
    ) -> None:
        self._entries = list(entries)
        # a predecessor's sockets (strict) go only to a listener of the same address: a
        # restart with a changed config binds the new address itself
        self.strict = strict

    @classmethod
    def from_systemd(
        cls, environ: MutableMapping[str, str] | None = None, *, start: int = SD_LISTEN_FDS_START
    ) -> SocketSet:
        """The sockets systemd passed, if they are for this process; the variables are
        removed either way, so a child process does not take them for its own."""
        env = os.environ if environ is None else environ
        pid = env.pop("LISTEN_PID", "")
        count = env.pop("LISTEN_FDS", "")
        names = env.pop("LISTEN_FDNAMES", "")
        if not pid or not count:
            return cls()
        if pid != str(os.getpid()) or not count.isdigit():
            log.warning("LISTEN_PID/LISTEN_FDS are not for this process: ignoring them")
            return cls()
        labels = names.split(":") if names else []
        entries = []
        for i in range(int(count)):
            fd = start + i
            try:
                sock = socket.socket(fileno=fd)
            except OSError as e:
                log.warning("inherited descriptor %d is not a socket: %s", fd, e)
                continue
            os.set_inheritable(fd, False)
            entries.append((labels[i] if i < len(labels) and labels[i] else UNNAMED, sock))
        log.info(
            "socket activation: %s",
            ", ".join(f"{n}={_describe(s)}" for n, s in entries) or "no sockets",
        )
        return cls(entries)

    def take(self, name: str, type: int, host: str, port: int) -> socket.socket | None:
        """The socket for the listener `name` of this type: among several of that name the
        one bound to host:port; an unnamed one only if bound exactly to host:port."""
        named = [e for e in self._entries if e[0] == name and e[1].type == type]
        exact = [e for e in self._entries if e[1].type == type and _bound_to(e[1], host, port)]
        if self.strict and port != 0:
            named = [e for e in named if e in exact]
        pick = None
        if len(named) == 1:
            pick = named[0]
        elif named:
            pick = next((e for e in named if e in exact), None)
        else:
            pick = next((e for e in exact if e[0] == UNNAMED), None)
        if pick is None:
            return None
        self._entries.remove(pick)
        sock = pick[1]
        sock.setblocking(False)
        log.info("%s: using the inherited socket %s", name, _describe(sock))
        return sock

    def add(self, name: str, sock: socket.socket) -> None:
        self._entries.append((name, sock))

    def untaken(self) -> list[tuple[str, socket.socket]]:
        return list(self._entries)

    def close_untaken(self) -> None:
        """Sockets no listener asked for: said and closed (a unit that passes a socket the
        config does not use is a mistake worth a line in the log)."""
        for name, sock in self._entries:
            log.warning(
                "inherited socket %s=%s matches no listener: closing it", name, _describe(sock)
            )
            sock.close()
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _bound_to(sock: socket.socket, host: str, port: int) -> bool:
    try:
        addr = sock.getsockname()
    except OSError:
        return False
    return isinstance(addr, tuple) and addr[1] == port and port != 0 and addr[0] == host


def _describe(sock: socket.socket) -> str:
    try:
        addr = sock.getsockname()
    except OSError:
        return "?"
    kind = "udp" if sock.type == socket.SOCK_DGRAM else "tcp"
    if isinstance(addr, tuple):
        return f"{addr[0]}:{addr[1]}/{kind}"
    return f"{addr!r}/{kind}"


_inherited = SocketSet()
_published: list[tuple[str, socket.socket]] = []


def inherited() -> SocketSet:
    """The process-wide set of given sockets (empty unless a role installed some)."""
    return _inherited


def install(sockets: SocketSet) -> None:
    global _inherited
    _inherited = sockets


def publish(name: str, sock: socket.socket) -> None:
    """A listener's socket, by name, for a restart to hand on to the successor."""
    _published.append((name, sock))


def published() -> list[tuple[str, socket.socket]]:
    """The listeners' sockets still open."""
    _published[:] = [(n, s) for n, s in _published if s.fileno() != -1]
    return list(_published)
