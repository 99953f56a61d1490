"""The stream relay between a kernel TCP socket and a tunnel flow stream.

qh3 grants QUIC flow-control credit as soon as it hands data to us, so QUIC alone would let a
fast origin fill the edge's memory while a client reads slowly. The tunnel protocol therefore
has its own per-flow credit (WINDOW frames on the control stream): a side only sends what the
other side has granted, and grants more only once earlier bytes have left for the kernel. Each
direction of a flow holds at most `window` bytes in user space, whatever the peers do.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any, cast

from ramp.wire.tunnel import StreamError

log = logging.getLogger("ramp.relay")

FLOW_WINDOW = 1024 * 1024  # per-direction credit; bounds user-space bytes per flow
_WRITE_HIGH = 256 * 1024
_WRITE_LOW = 64 * 1024
_LINGER_RST = struct.pack("ii", 1, 0)


class StreamBridge(asyncio.Protocol):
    """Relays one TCP connection and one QUIC stream, both ways, with half-close and reset."""

    def __init__(
        self,
        conn: Any,
        stream_id: int,
        send_credit: int,
        grant: Callable[[int, int], None],
        window: int = FLOW_WINDOW,
    ) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self._grant = grant
        self._window = window
        self._credit = send_credit
        self._granted = window  # total the peer may send us
        self._received = 0
        self._pending_out = bytearray()  # TCP bytes waiting for credit
        self._pending_in: list[bytes] = []  # stream bytes that arrived before the TCP side
        self._transport: asyncio.Transport | None = None
        self._tcp_eof = False  # TCP side finished sending
        self._fin_sent = False
        self._fin_received = False
        self._finished = False
        self.bytes_tcp_to_quic = 0
        self.bytes_quic_to_tcp = 0
        self.reset_by: str | None = None  # "tcp" or "tunnel" if the flow ended by a reset
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = loop.create_future()
        # set once the TCP socket is really closed: after `done`, buffered bytes may still be
        # on their way to the client, and closing the socket earlier would drop them
        self.tcp_closed: asyncio.Future[None] = loop.create_future()

    # -- TCP side (asyncio.Protocol) -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        transport.set_write_buffer_limits(high=_WRITE_HIGH, low=_WRITE_LOW)
        if self._finished:  # the stream died before the socket was attached
            self._abort_tcp()
            return
        pending, self._pending_in = self._pending_in, []
        for chunk in pending:
            transport.write(chunk)
        if self._fin_received:
            self._tcp_write_eof()
        self._maybe_grant()

    def data_received(self, data: bytes) -> None:
        self.bytes_tcp_to_quic += len(data)
        if self._pending_out or len(data) > self._credit:
            self._pending_out += data
            self._flush_out()
        else:
            self._credit -= len(data)
            self.conn.send(self.stream_id, data)

    def eof_received(self) -> bool:
        self._tcp_eof = True
        self._flush_out()
        return True  # keep the socket open for the other direction

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self.tcp_closed.done():
            self.tcp_closed.set_result(None)
        if self._finished:
            return
        if exc is not None or not (self._fin_sent and self._fin_received):
            # the TCP peer reset, or the socket died mid-flow: cut the stream too
            self.reset_by = "tcp"
            self.conn.reset(self.stream_id, StreamError.FLOW_RESET)
        self._finish()

    def pause_writing(self) -> None:
        pass  # credit stops being granted while the write buffer is above its high mark

    def resume_writing(self) -> None:
        self._maybe_grant()

    # -- tunnel side ---------------------------------------------------------------------

    def feed_initial(self, data: bytes) -> None:
        """Bytes of the TCP side read before the bridge existed (past a proxy handshake)."""
        if data:
            self.data_received(data)

    def add_credit(self, increment: int) -> None:
        if self._finished:
            return  # a WINDOW that crossed our reset: nothing may be sent any more
        self._credit += increment
        self._flush_out()

    def stream_data(self, data: bytes, fin: bool) -> None:
        if self._finished:
            return
        if data:
            self._received += len(data)
            if self._received > self._granted:
                log.warning("flow stream %d: peer overran its window", self.stream_id)
                self._fail(StreamError.PROTOCOL)
                return
            self.bytes_quic_to_tcp += len(data)
            if self._transport is None:
                self._pending_in.append(data)
            else:
                self._transport.write(data)
                self._maybe_grant()
        if fin:
            self._fin_received = True
            if self._transport is not None:
                self._tcp_write_eof()
            self._check_done()

    def stream_reset(self, code: int) -> None:
        self.reset_by = "tunnel"
        self._abort_tcp()
        self._finish()

    def stop_sending(self, code: int) -> None:
        self.reset_by = "tunnel"
        self.conn.reset(self.stream_id, StreamError.FLOW_RESET)
        self._abort_tcp()
        self._finish()

    def connection_lost_tunnel(self) -> None:
        self.reset_by = "tunnel"
        self._abort_tcp()
        self._finish()

    def abort_tcp(self) -> None:
        """Reset the TCP side now (a client that stopped reading after the flow ended)."""
        self._abort_tcp()

    def abort(self, code: int = StreamError.FLOW_ABORT) -> None:
        """Cut the flow from outside (shutdown, grace period over)."""
        self._fail(code)

    # -- internals -----------------------------------------------------------------------

    def _flush_out(self) -> None:
        if self._finished:
            return
        if self._pending_out and self._credit > 0:
            n = min(self._credit, len(self._pending_out))
            chunk = bytes(self._pending_out[:n])
            del self._pending_out[:n]
            self._credit -= n
            self.conn.send(self.stream_id, chunk)
        t = self._transport
        if self._pending_out:
            if t is not None and not self._tcp_eof:
                t.pause_reading()
            return
        if self._tcp_eof:
            if not self._fin_sent:
                self._fin_sent = True
                self.conn.send(self.stream_id, b"", fin=True)
                self._check_done()
        elif t is not None and not t.is_reading():
            t.resume_reading()

    def _maybe_grant(self) -> None:
        if self._fin_received or self._finished:
            return
        t = self._transport
        buffered = t.get_write_buffer_size() if t is not None else self._received
        if buffered > _WRITE_HIGH:
            return
        increment = self._received - buffered + self._window - self._granted
        if increment >= self._window // 4:
            self._granted += increment
            self._grant(self.stream_id, increment)

    def _tcp_write_eof(self) -> None:
        t = self._transport
        if t is not None and t.can_write_eof() and not t.is_closing():
            try:
                t.write_eof()
            except OSError:
                pass

    def _check_done(self) -> None:
        if self._fin_sent and self._fin_received and not self._finished:
            self.conn.forget(self.stream_id)
            t = self._transport
            self._finish()
            if t is not None:
                t.close()  # flushes what is buffered, then closes

    def _fail(self, code: int) -> None:
        if self._finished:
            return
        self.conn.reset(self.stream_id, code)
        self._abort_tcp()
        self._finish()

    def _abort_tcp(self) -> None:
        t = self._transport
        if t is None:
            return
        sock = t.get_extra_info("socket")
        if sock is not None:
            try:  # RST, not FIN: the other side must see that the flow broke
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            except OSError:
                pass
        t.abort()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        self._pending_out.clear()
        self._pending_in.clear()
        if not self.done.done():
            self.done.set_result(None)


# The tunnel connection calls `connection_lost()` on stream handlers; the asyncio transport
# calls `connection_lost(exc)` on protocols. One object plays both roles, so the tunnel side
# gets its own entry point through this adapter.
class TunnelSide:
    """Stream-handler face of a StreamBridge."""

    __slots__ = ("bridge",)

    def __init__(self, bridge: StreamBridge) -> None:
        self.bridge = bridge

    def stream_data(self, data: bytes, fin: bool) -> None:
        self.bridge.stream_data(data, fin)

    def stream_reset(self, code: int) -> None:
        self.bridge.stream_reset(code)

    def stop_sending(self, code: int) -> None:
        self.bridge.stop_sending(code)

    def connection_lost(self) -> None:
        self.bridge.connection_lost_tunnel()
