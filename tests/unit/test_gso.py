"""UDP GSO batching: what is sent in one loop turn leaves in few syscalls and arrives as the
same datagrams, in order."""

from __future__ import annotations

import asyncio
import errno
import os
import socket

from ramp.net.gso import GsoSender
from ramp.testing.wait import until


def pair() -> tuple[socket.socket, socket.socket]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setblocking(False)
    return tx, rx


def receive_all(rx: socket.socket, n: int) -> list[bytes]:
    rx.settimeout(30)  # they were sent: waiting long only matters when the test fails
    return [rx.recv(70000) for _ in range(n)]


def test_batches_keep_every_datagram_in_order() -> None:
    sizes = [1200] * 100 + [1200, 1200, 700] + [5, 0, 5] + [1472] * 3 + [9000, 9000]
    payloads = [os.urandom(n) for n in sizes]

    async def main() -> GsoSender:
        tx, rx = pair()
        sender = GsoSender(tx)
        for p in payloads:
            sender.send(p, rx.getsockname())
        await until(lambda: sender.sent == len(payloads), what="the batch to be sent")
        got = await asyncio.to_thread(receive_all, rx, len(payloads))
        assert got == payloads
        tx.close()
        rx.close()
        return sender

    sender = asyncio.run(main())
    assert sender.sent == len(payloads)
    assert sender.syscalls < len(payloads) / 4  # batched, not one call per datagram


def test_connected_socket_and_fallback_without_gso() -> None:
    class NoGso(socket.socket):
        def sendmsg(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
            raise OSError(errno.EIO, "no GSO here")

    async def main() -> None:
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("127.0.0.1", 0))
        tx = NoGso(socket.AF_INET, socket.SOCK_DGRAM)
        tx.setblocking(False)
        tx.connect(rx.getsockname())
        sender = GsoSender(tx)
        payloads = [os.urandom(100) for _ in range(10)]
        for p in payloads:
            sender.send(p)
        await until(lambda: sender.sent == len(payloads), what="the datagrams to be sent")
        assert await asyncio.to_thread(receive_all, rx, 10) == payloads
        assert not sender.gso  # learnt once, then one datagram per call
        tx.close()
        rx.close()

    asyncio.run(main())


def test_segment_too_big_for_the_path_is_learnt() -> None:
    class SmallMtu(socket.socket):
        def sendmsg(self, buffers, ancdata=(), flags=0, address=None):  # type: ignore[no-untyped-def, override]
            raise OSError(errno.EMSGSIZE, "segment above the MTU")

    async def main() -> None:
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("127.0.0.1", 0))
        tx = SmallMtu(socket.AF_INET, socket.SOCK_DGRAM)
        tx.setblocking(False)
        sender = GsoSender(tx)
        payloads = [os.urandom(1482) for _ in range(4)]
        for p in payloads:
            sender.send(p, rx.getsockname())
        await until(lambda: sender.sent == len(payloads), what="the datagrams to be sent")
        assert await asyncio.to_thread(receive_all, rx, 4) == payloads
        assert sender.gso and sender.max_segment == 1481
        tx.close()
        rx.close()

    asyncio.run(main())
