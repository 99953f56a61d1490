"""Helpers of the egress tests: free ports, a port range of one's own, UDP echo peers."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

from ramp.net.connectx import PortRange

LOCAL = "127.0.0.1"


def free_ports(count: int, family: int = socket.AF_INET, host: str = LOCAL) -> int:
    """The first of `count` consecutive ports nobody uses for UDP or TCP on `host` now."""
    for first in range(21000, 31000, count + 7):
        ok = True
        for port in range(first, first + count):
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                with socket.socket(family, kind) as s:
                    try:
                        s.bind((host, port))
                    except OSError:
                        ok = False
            if not ok:
                break
        if ok:
            return first
    raise RuntimeError("no free ports")


def port_range(tmp_path: Path, first: int, last: int) -> PortRange:
    """A PortRange that reads `first`-`last` from a file of its own, no reserved ports."""
    f = tmp_path / "ip_local_port_range"
    f.write_text(f"{first}\t{last}\n")
    return PortRange(range_file=f, reserved_file=tmp_path / "none")


@contextlib.contextmanager
def echo_servers(
    count: int, family: int = socket.AF_INET, host: str = LOCAL
) -> Iterator[list[socket.socket]]:
    """`count` UDP sockets on `host` (ports the system picks) that `echo_once` answers with."""
    servers = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.bind((host, 0))
            s.settimeout(5)
            servers.append(s)
        yield servers
    finally:
        for s in servers:
            s.close()


def echo_once(server: socket.socket) -> None:
    """Send the next datagram `server` receives back to its sender."""
    data, peer = server.recvfrom(100)
    server.sendto(data, peer)


def round_trip(sock: socket.socket, server: socket.socket, token: bytes) -> bytes:
    """`token` from the connected `sock` to `server` and back: what `sock` received."""
    sock.send(token)
    echo_once(server)
    sock.settimeout(5)
    return sock.recv(100)
