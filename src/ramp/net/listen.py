"""Listening TCP sockets, made the same way for every on-ramp."""

from __future__ import annotations

import asyncio
import socket


async def tcp_listen_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """A non-blocking listening socket on host:port (port 0 picks one). `::` means IPv6
    only: a dual-stack listener is a separate, explicit choice."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
