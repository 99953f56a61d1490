"""Outgoing sockets that share source ports across destinations (the "connectx" of
reference/ephemeral-ports-connectx.txt).

A TCP or UDP connection is one 4-tuple; only the whole tuple must be unique. But bind()
before connect() reserves a port for the socket alone, and a plain connected UDP socket gets a
port no other socket uses: either way the ephemeral range (28,232 ports by default, often far
fewer) caps the connections of the whole host, however many destinations they go to.

- TCP: `IP_BIND_ADDRESS_NO_PORT` makes bind() keep only the address; connect() picks the port
  knowing the destination, so one port serves every destination.
- UDP: the kernel has no such option, and with SO_REUSEADDR two connected sockets may even
  share a whole 4-tuple (the newer one silently takes the other's replies). So the port is
  chosen here: bind (address, port) with SO_REUSEADDR, clear SO_REUSEADDR (no other socket
  can join the port now: a lock), ask the kernel (sock_diag) whether a datagram from the
  destination would reach this socket, i.e. whether no other socket is connected to the
  same destination from this address and port, connect, and set SO_REUSEADDR again so later
  sockets may share the port. A port that is taken is retried with the next one.
"""

from __future__ import annotations

import errno
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from ramp.net import netlink

# Linux value (include/uapi/linux/in.h); the socket module names it only on some builds
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

# errors that mean "no source port left" for the call that failed
EXHAUSTED_ERRNOS = frozenset({errno.EADDRNOTAVAIL, errno.EADDRINUSE, errno.EAGAIN})
# ports one UDP connectx tries before it gives up; bounds the work of one session when the
# range towards a destination is (nearly) full
MAX_UDP_PORT_TRIES = 1024

_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_RESERVED = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")


class PortsExhausted(OSError):
    """No source port is left for this source address and destination."""

    def __init__(self, detail: str) -> None:
        super().__init__(errno.EADDRNOTAVAIL, detail)


class LookupUnavailable(OSError):
    """The kernel answers no sock_diag question about UDP sockets (no udp_diag module): the
    4-tuple check of UDP connectx cannot be made here."""

    def __init__(self) -> None:
        super().__init__(errno.ENOENT, "sock_diag cannot look up UDP sockets (udp_diag module)")


class PortRange:
    """The ephemeral port range and the reserved ports (per network namespace), read again at
    most every `refresh_after` seconds: UDP connectx picks ports from it as the kernel would."""

    def __init__(
        self,
        refresh_after: float = 5.0,
        range_file: Path = _RANGE,
        reserved_file: Path = _RESERVED,
    ) -> None:
        self.refresh_after = refresh_after
        self.range_file = range_file
        self.reserved_file = reserved_file
        self._next = 0.0
        self._ports: tuple[int, int] = (32768, 60999)
        self._reserved: frozenset[int] = frozenset()

    def get(self) -> tuple[tuple[int, int], frozenset[int]]:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.refresh_after
            self._ports, self._reserved = read_port_range(self.range_file, self.reserved_file)
        return self._ports, self._reserved

    def candidates(self, tries: int = MAX_UDP_PORT_TRIES) -> Iterator[int]:
        """Up to `tries` ports of the range from a random start on, reserved ones left out
        (made as they are asked for: most sessions take the first)."""
        (low, high), reserved = self.get()
        size = high - low + 1
        start = random.randrange(size)
        given = 0
        for i in range(size):
            port = low + (start + i) % size
            if port in reserved:
                continue
            yield port
            given += 1
            if given >= tries:
                return


def read_port_range(
    range_file: Path = _RANGE, reserved_file: Path = _RESERVED
) -> tuple[tuple[int, int], frozenset[int]]:
    """(low, high) of net.ipv4.ip_local_port_range and net.ipv4.ip_local_reserved_ports."""
    try:
        low, high = (int(x) for x in range_file.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    reserved: set[int] = set()
    try:
        text = reserved_file.read_text().strip()
    except OSError:
        text = ""
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        try:
            reserved.update(range(int(first), int(last or first) + 1))
        except ValueError:
            continue
    if not 1 <= low <= high <= 65535:
        low, high = 32768, 60999
    return (low, high), frozenset(reserved)


def tcp_socket(family: int, source: str | None, share_port: bool) -> socket.socket:
    """A non-blocking TCP socket, bound to `source` when given: with `share_port` the bind
    takes the address only (IP_BIND_ADDRESS_NO_PORT) and connect() picks a port that is free
    towards the destination; without it the bind reserves a port of its own."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source is not None:
            if share_port:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def udp_connectx(
    family: int,
    source: str,
    destination: tuple,
    ports: PortRange,
    tries: int = MAX_UDP_PORT_TRIES,
) -> socket.socket:
    """A UDP socket bound to (`source`, a port others may share) and connected to
    `destination`, whose 4-tuple no other socket has. PortsExhausted when none of `tries`
    ports of the range is free towards `destination`; LookupUnavailable when the kernel cannot
    say who holds a 4-tuple; OSError for other failures (an address that is not local:
    EADDRNOTAVAIL on the first bind)."""
    remote = (destination[0], destination[1])
    for port in ports.candidates(tries):
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((source, port))
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                sock.close()  # someone holds the port alone, or is inside this dance
                continue
            # the lock: from here no new socket can bind this port until we set it again
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
            receiver = netlink.udp_receiver(family, (source, port), remote)
            if receiver is None:
                raise LookupUnavailable()  # not even this socket, bound there, was found
            if receiver != netlink.socket_cookie(sock):
                sock.close()  # another socket is connected to the destination from this port
                continue
            sock.connect(destination)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setblocking(False)
            return sock
        except BaseException:
            sock.close()
            raise
    raise PortsExhausted(f"no free UDP port from {source} to {remote[0]}:{remote[1]}")


def udp_plain(family: int, source: str | None, destination: tuple) -> socket.socket:
    """A connected UDP socket the classic way: the kernel gives it a port of its own (bound
    to `source` first when given), so the range caps how many exist at once."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if source is not None:
            sock.bind((source, 0))
        sock.connect(destination)
    except BaseException:
        sock.close()
        raise
    return sock
