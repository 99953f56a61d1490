"""The stream relay between a kernel TCP socket and a tunnel flow stream.

qh3 grants QUIC flow-control credit as soon as it hands data to us, so QUIC alone would let a
fast origin fill the edge's memory while a client reads slowly. The tunnel protocol therefore
has its own per-flow credit (WINDOW frames on the control stream): a side only sends what the
other side has granted, and grants more only once earlier bytes have left for the kernel. Each
direction of a flow holds at most `window` bytes in user space, whatever the peers do.
The rules live in the sans-I/O BridgeState (bridge_state.py); this module is its asyncio face.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any, cast

from ramp.tunnel import bridge_state as bs
from ramp.tunnel.bridge_state import FLOW_WINDOW, BridgeState
from ramp.wire.tunnel import StreamError

log = logging.getLogger("ramp.relay")

_LINGER_RST = struct.pack("ii", 1, 0)

__all__ = ["FLOW_WINDOW", "StreamBridge", "TunnelSide"]


class StreamBridge(asyncio.Protocol):
    """Relays one TCP connection and one QUIC stream, both ways, with half-close and reset.

    The decisions (credit, FIN, reset) are BridgeState's; this class feeds it the asyncio
    and tunnel events and carries out the actions it returns.
    """

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
        self.state = BridgeState(send_credit, window)
        self._transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = loop.create_future()
        # set once the TCP socket is really closed: after `done`, buffered bytes may still be
        # on their way to the client, and closing the socket earlier would drop them
        self.tcp_closed: asyncio.Future[None] = loop.create_future()

    @property
    def bytes_tcp_to_quic(self) -> int:
        return self.state.bytes_tcp_to_quic

    @property
    def bytes_quic_to_tcp(self) -> int:
        return self.state.bytes_quic_to_tcp

    @property
    def reset_by(self) -> str | None:
        """ "tcp" or "tunnel" if the flow ended by a reset."""
        return self.state.reset_by

    # -- TCP side (asyncio.Protocol) -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        transport.set_write_buffer_limits(high=self.state.write_high, low=self.state.write_low)
        self._run(self.state.tcp_attached_event())
        if not self.state.finished:
            self._report_buffer()

    def data_received(self, data: bytes) -> None:
        self._run(self.state.tcp_data(data))

    def eof_received(self) -> bool:
        self._run(self.state.tcp_eof_event())
        return True  # keep the socket open for the other direction

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self.tcp_closed.done():
            self.tcp_closed.set_result(None)
        self._run(self.state.tcp_closed(exc is not None))

    def pause_writing(self) -> None:
        pass  # credit stops being granted while the write buffer is above its high mark

    def resume_writing(self) -> None:
        self._report_buffer()

    # -- tunnel side ---------------------------------------------------------------------

    def feed_initial(self, data: bytes) -> None:
        """Bytes of the TCP side read before the bridge existed (past a proxy handshake)."""
        if data:
            self.data_received(data)

    def add_credit(self, increment: int) -> None:
        self._run(self.state.add_credit(increment))

    def stream_data(self, data: bytes, fin: bool) -> None:
        if data:
            self._run(self.state.stream_bytes(data))
            if self._transport is not None:
                self._report_buffer()
        if fin:
            self._run(self.state.stream_fin())

    def stream_reset(self, code: int) -> None:
        self._run(self.state.stream_reset(code))

    def stop_sending(self, code: int) -> None:
        self._run(self.state.stop_sending(code))

    def connection_lost_tunnel(self) -> None:
        self._run(self.state.tunnel_lost())

    def abort_tcp(self) -> None:
        """Reset the TCP side now (a client that stopped reading after the flow ended)."""
        self._abort_tcp()

    def abort(self, code: int = StreamError.FLOW_ABORT) -> None:
        """Cut the flow from outside (shutdown, grace period over)."""
        self._run(self.state.abort(code))

    # -- carrying out actions ------------------------------------------------------------

    def _report_buffer(self) -> None:
        t = self._transport
        buffered = t.get_write_buffer_size() if t is not None else self.state.received
        self._run(self.state.tcp_buffer(buffered))

    def _run(self, actions: list[bs.BridgeAction]) -> None:
        for action in actions:
            t = self._transport
            if isinstance(action, bs.SendStream):
                self.conn.send(self.stream_id, action.data, fin=action.fin)
            elif isinstance(action, bs.WriteTcp):
                if t is not None:
                    t.write(action.data)
            elif isinstance(action, bs.Grant):
                self._grant(self.stream_id, action.increment)
            elif isinstance(action, bs.PauseTcpReading):
                if t is not None:
                    t.pause_reading()
            elif isinstance(action, bs.ResumeTcpReading):
                if t is not None and not t.is_reading():
                    t.resume_reading()
            elif isinstance(action, bs.WriteTcpEof):
                self._tcp_write_eof()
            elif isinstance(action, bs.ResetStream):
                if action.code == StreamError.PROTOCOL:
                    log.warning("flow stream %d: peer overran its window", self.stream_id)
                self.conn.reset(self.stream_id, action.code)
            elif isinstance(action, bs.ForgetStream):
                self.conn.forget(self.stream_id)
            elif isinstance(action, bs.AbortTcp):
                self._abort_tcp()
            elif isinstance(action, bs.CloseTcp):
                if t is not None:
                    t.close()
            elif isinstance(action, bs.Finished) and not self.done.done():
                self.done.set_result(None)

    def _tcp_write_eof(self) -> None:
        t = self._transport
        if t is not None and t.can_write_eof() and not t.is_closing():
            try:
                t.write_eof()
            except OSError:
                pass

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
