"""UDP send batching with generic segmentation offload (UDP_SEGMENT).

Datagrams sent to the same address in one event-loop iteration leave in one sendmsg() call
carrying a UDP_SEGMENT control message: the kernel splits the buffer into datagrams of that
size (the last may be shorter). On a busy UDP path the per-datagram syscall is the largest
cost, so this is where batching pays (see udp-transmission-gso-sendmmsg in the references).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

log = logging.getLogger("ramp.net.gso")

SOL_UDP = 17
UDP_SEGMENT = 103  # include/uapi/linux/udp.h
MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS in the kernel
MAX_GSO_BYTES = 65000  # one GSO buffer must fit in one (64 KiB) IP packet's worth of skb
_GSO_UNSUPPORTED = {errno.EIO, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOPROTOOPT}
# a segment larger than the path MTU allows (GSO never fragments, plain sends may)
_SEGMENT_TOO_BIG = {errno.EMSGSIZE, errno.EINVAL}
_SEG = struct.Struct("=H")


class GsoSender:
    """Queues datagrams for one socket and sends them, batched, at the end of the loop turn."""

    def __init__(
        self,
        sock: socket.socket,
        on_drop: Callable[[str], None] | None = None,
        *,
        gso: bool = True,
    ) -> None:
        self.sock = sock
        self._on_drop = on_drop
        self.gso = gso
        self.max_segment = MAX_GSO_BYTES  # learnt downwards when the kernel refuses a size
        self._queue: list[tuple[bytes, Any]] = []
        self._scheduled = False
        self._loop = asyncio.get_running_loop()
        self.syscalls = 0
        self.sent = 0

    def send(self, data: bytes, addr: Any = None) -> None:
        """Queue one datagram (`addr` None for a connected socket)."""
        self._queue.append((data, addr))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        queue, self._queue = self._queue, []
        n = len(queue)
        i = 0
        while i < n:
            data, addr = queue[i]
            size = len(data)
            j = i + 1
            total = size
            if self.gso and 0 < size <= self.max_segment:
                # same address and size; a shorter datagram may close the batch
                while j < n and j - i < MAX_SEGMENTS:
                    nxt, nxt_addr = queue[j]
                    if (
                        nxt_addr != addr
                        or not nxt  # an empty datagram cannot be a segment: send it alone
                        or len(nxt) > size
                        or total + len(nxt) > MAX_GSO_BYTES
                    ):
                        break
                    total += len(nxt)
                    j += 1
                    if len(nxt) < size:
                        break
            if j - i == 1:
                self._sendto(data, addr)
            else:
                self._send_gso([queue[k][0] for k in range(i, j)], size, addr)
            i = j

    def _sendto(self, data: bytes, addr: Any) -> None:
        self.syscalls += 1
        try:
            if addr is None:
                self.sock.send(data)
            else:
                self.sock.sendto(data, addr)
            self.sent += 1
        except (BlockingIOError, InterruptedError):
            self._drop("send_buffer_full")
        except OSError as e:
            log.debug("udp send of %d bytes failed: %s", len(data), e)
            self._drop("send_error")

    def _send_gso(self, batch: list[bytes], segment: int, addr: Any) -> None:
        self.syscalls += 1
        ancillary = [(SOL_UDP, UDP_SEGMENT, _SEG.pack(segment))]
        try:
            if addr is None:
                self.sock.sendmsg([b"".join(batch)], ancillary)
            else:
                self.sock.sendmsg([b"".join(batch)], ancillary, 0, addr)
            self.sent += len(batch)
        except (BlockingIOError, InterruptedError):
            for _ in batch:
                self._drop("send_buffer_full")
        except OSError as e:
            if e.errno in _SEGMENT_TOO_BIG:
                # remember the limit; these go one by one (the kernel may fragment them)
                self.max_segment = min(self.max_segment, segment - 1)
                for data in batch:
                    self._sendto(data, addr)
            elif e.errno in _GSO_UNSUPPORTED:
                log.info("UDP GSO unavailable on this socket (%s): sending one by one", e)
                self.gso = False
                for data in batch:
                    self._sendto(data, addr)
            else:
                log.debug("udp gso send failed: %s", e)
                for _ in batch:
                    self._drop("send_error")

    def _drop(self, reason: str) -> None:
        if self._on_drop is not None:
            self._on_drop(reason)
