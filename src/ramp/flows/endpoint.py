"""Byte-stream endpoints: what a leg relays to, whatever carries the bytes.

A leg drives an endpoint with an asyncio `Protocol` (data_received, eof_received,
connection_lost; pause_writing/resume_writing for backpressure) and writes to the transport the
endpoint gives it. A kernel socket is one kind (and where both ends of a flow are kernel
sockets the leg can splice instead); an in-process pair, a QUIC stream or a TLS stream are
others. So an HTTP/3 CONNECT stream is a flow's client end like a SOCKS5 connection, with no
socketpair in between.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

ProtocolFactory = Callable[[], asyncio.BaseProtocol]
_HIGH = 1 << 20
_LOW = 256 * 1024


class StreamEndpoint(Protocol):
    kind: str

    async def attach(self, factory: ProtocolFactory) -> asyncio.BaseTransport:
        """Connect a protocol to this endpoint; the endpoint belongs to it from now on."""
        ...

    def close(self) -> None:
        """Drop the endpoint without attaching it (the flow failed before relaying)."""
        ...


class SocketEndpoint:
    """A connected kernel TCP (or Unix) socket."""

    kind = "socket"

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    async def attach(self, factory: ProtocolFactory) -> asyncio.BaseTransport:
        if self.sock.family in (socket.AF_INET, socket.AF_INET6):
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(factory, sock=self.sock)
        return transport

    def close(self) -> None:
        self.sock.close()


def as_endpoint(client: socket.socket | StreamEndpoint) -> StreamEndpoint:
    return SocketEndpoint(client) if isinstance(client, socket.socket) else client


class _MemoryTransport(asyncio.Transport):
    """One side of an in-process byte stream; writes land in the peer's protocol."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._loop = loop
        self.peer: _MemoryTransport | None = None
        self.protocol: Any = None
        self._queue: deque[bytes | None] = deque()  # None marks EOF
        self._queued = 0
        self._paused = False  # our protocol asked us not to deliver
        self._writer_paused = False  # we told the peer's protocol to stop writing
        self._eof_sent = False
        self._closing = False
        self._high, self._low = _HIGH, _LOW
        self._scheduled = False
        self._close_pending = False

    # -- the writing side (called by our protocol, data goes to the peer) --------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._eof_sent or not data:
            return
        assert self.peer is not None
        self.peer._enqueue(bytes(data))

    def write_eof(self) -> None:
        if self._eof_sent or self._closing:
            return
        self._eof_sent = True
        assert self.peer is not None
        self.peer._enqueue(None)

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return self.peer._queued if self.peer is not None else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is not None:
            self._high = high
            self._low = low if low is not None else high // 4
        if self.peer is not None:
            self.peer._high, self.peer._low = self._high, self._low

    # -- the reading side (data from the peer, for our protocol) -----------------------------

    def _enqueue(self, item: bytes | None) -> None:
        self._queue.append(item)
        if item is not None:
            self._queued += len(item)
            if self._queued > self._high and self.peer is not None and not self._writer_paused:
                self._writer_paused = True
                self.peer.protocol.pause_writing()
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and not self._paused and self.protocol is not None:
            self._scheduled = True
            self._loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        self._scheduled = False
        while self._queue and not self._paused and not self._closing:
            item = self._queue.popleft()
            if item is None:
                keep_open = self.protocol.eof_received()
                if not keep_open:
                    self.close()
                continue
            self._queued -= len(item)
            self.protocol.data_received(item)
        if self._close_pending and not self._queue:
            self.close()
            return
        if (
            self._writer_paused
            and self._queued <= self._low
            and self.peer is not None
            and not self.peer._closing
        ):
            self._writer_paused = False
            self.peer.protocol.resume_writing()

    def pause_reading(self) -> None:
        self._paused = True

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self._schedule()

    def is_reading(self) -> bool:
        return not self._paused

    # -- both --------------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.call_soon(self._lost, None)
        if self.peer is not None and not self.peer._closing:
            if not self._eof_sent:
                self._eof_sent = True
                self.peer._enqueue(None)
            self.peer._loop.call_soon(self.peer._close_after_drain)

    def _close_after_drain(self) -> None:
        # the peer closed: deliver what it wrote first (however long our protocol pauses)
        if self._queue:
            self._close_pending = True
            self._schedule()
            return
        self.close()

    def abort(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._queue.clear()
        self._loop.call_soon(self._lost, None)
        if self.peer is not None and not self.peer._closing:
            self.peer._closing = True
            self.peer._queue.clear()
            self._loop.call_soon(self.peer._lost, ConnectionResetError("peer aborted"))

    def _lost(self, exc: Exception | None) -> None:
        if self.protocol is not None:
            protocol, self.protocol = self.protocol, None
            protocol.connection_lost(exc)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("memory", 0), "sockname": ("memory", 0)}.get(name, default)


class MemoryEndpoint:
    """One end of `memory_pair()`: an in-process stream with backpressure, no descriptors."""

    kind = "memory"

    def __init__(self, transport: _MemoryTransport) -> None:
        self._transport = transport

    async def attach(self, factory: ProtocolFactory) -> asyncio.BaseTransport:
        t = self._transport
        t.protocol = factory()
        t.protocol.connection_made(t)
        t._schedule()
        return t

    def close(self) -> None:
        self._transport.close()


def memory_pair() -> tuple[MemoryEndpoint, MemoryEndpoint]:
    loop = asyncio.get_running_loop()
    a, b = _MemoryTransport(loop), _MemoryTransport(loop)
    a.peer, b.peer = b, a
    return MemoryEndpoint(a), MemoryEndpoint(b)


async def open_stream(
    endpoint: StreamEndpoint, limit: int = 1 << 16
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams over an endpoint, for in-process clients (DNS over TCP, tests)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport = await endpoint.attach(lambda: protocol)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)  # type: ignore[arg-type]
    return reader, writer
