"""UDP off-ramp: one connected UDP socket per session, so the kernel matches replies to the
session and drops stray traffic from anyone else."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable

from ramp.flows.flow import FlowError, FlowResult
from ramp.net.gso import GsoSender
from ramp.net.sockopts import set_buffers
from ramp.offramps.egress import DEFAULT_EGRESS, Egress

MAX_UDP_READ = 65535


class UdpOrigin(asyncio.DatagramProtocol):
    def __init__(
        self,
        sock: socket.socket,
        on_datagram: Callable[[bytes], None],
        on_error: Callable[[str], None],
    ):
        self._on_datagram = on_datagram
        self._on_error = on_error
        self.transport: asyncio.DatagramTransport | None = None
        # sends skip the transport: batched with GSO on the raw (connected) socket
        self._sender = GsoSender(sock, on_error)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: object) -> None:
        self._on_datagram(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable, ...) on a connected socket: the session stays, as
        # the origin may come back; the caller counts them
        self._on_error(type(exc).__name__)

    def send(self, data: bytes) -> bool:
        t = self.transport
        if t is None or t.is_closing():
            return False
        self._sender.send(data)
        return True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_udp_origin(
    ip: str,
    port: int,
    on_datagram: Callable[[bytes], None],
    on_error: Callable[[str], None],
    egress: Egress | None = None,
) -> UdpOrigin:
    """A UDP socket connected to ip:port, from a source `egress` chooses (its port shared with
    other destinations unless egress says not to); raises FlowError when that is impossible
    (SourcePortsExhausted when no source port is left)."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    destination: tuple = (ip, port) if family == socket.AF_INET else (ip, port, 0, 0)
    if family == socket.AF_INET6 and "%" in ip:
        addr, _, scope = ip.partition("%")
        try:
            index = int(scope) if scope.isdigit() else socket.if_nametoindex(scope)
        except OSError:
            raise FlowError(FlowResult.BAD_DESTINATION, f"no interface {scope!r}") from None
        destination = (addr, port, 0, index)
    try:
        sock = (egress or DEFAULT_EGRESS).udp_socket(family, destination)
    except OSError as e:
        if e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            raise FlowError(FlowResult.NET_UNREACHABLE, f"udp {ip}:{port}: {e.strerror}") from e
        if e.errno in (errno.EACCES, errno.EPERM):
            raise FlowError(FlowResult.NOT_PERMITTED, f"udp {ip}:{port}: {e.strerror}") from e
        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            raise FlowError(FlowResult.ERROR, f"cannot create a UDP socket: {e.strerror}") from e
        raise FlowError(FlowResult.ERROR, f"udp {ip}:{port}: {e.strerror}") from e
    try:
        # large datagrams (up to 64 KiB) may arrive in bursts
        set_buffers(sock, 2 * 1024 * 1024)
        _, proto = await loop.create_datagram_endpoint(
            lambda: UdpOrigin(sock, on_datagram, on_error), sock=sock
        )
    except BaseException:
        sock.close()
        raise
    assert isinstance(proto, UdpOrigin)
    return proto
