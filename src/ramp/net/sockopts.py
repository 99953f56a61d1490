"""Socket options the socket module lacks, and buffer sizing."""

from __future__ import annotations

import socket

# Linux values (include/uapi/asm-generic/socket.h); not exported by Python's socket module
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33


def set_buffers(sock: socket.socket, size: int) -> None:
    """Ask for `size`-byte send and receive buffers. The plain options are capped by
    net.core.{r,w}mem_max (208 KiB by default: about 256 small datagrams); with
    CAP_NET_ADMIN the FORCE variants lift that cap, so UDP bursts are not dropped."""
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, plain, size)
            except OSError:
                pass
