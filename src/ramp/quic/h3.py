"""HTTP/3 over the QUIC adapter, for proxies: requests routed to per-stream handlers, HTTP
Datagrams routed by quarter stream id, and a request stream as an asyncio transport.

qh3's `H3Connection` parses frames and QPACK; this module adds what a proxy needs around it.
An `H3Peer` is one QUIC connection (client or server side). Each request stream has one
`Request` handler: the server makes one for each request a peer opens (`on_request`), a client
registers one with `open_request`. A CONNECT stream is a byte stream once answered:
`H3Stream` is its transport and `H3StreamEndpoint` lets any leg relay it like a socket, with
backpressure from qh3's send buffer (which only drains as the peer grants flow-control credit).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from qh3.h3 import events as h3e
from qh3.h3.connection import H3Connection
from qh3.h3.connection import ProtocolError as H3ProtocolError
from qh3.h3.exceptions import H3Error
from qh3.quic import events
from qh3.quic.connection import QuicConnection, QuicConnectionError

from ramp.flows.endpoint import ProtocolFactory
from ramp.quic import qh3compat
from ramp.quic.endpoint import reset_stream
from ramp.quic.peer import QuicPeer
from ramp.wire.varint import decode_varint, encode_varint

log = logging.getLogger("ramp.h3")

Headers = list[tuple[bytes, bytes]]

# RFC 9114 section 8.1 and RFC 9297 section 5.2
H3_NO_ERROR = 0x100
H3_GENERAL_PROTOCOL_ERROR = 0x101
H3_INTERNAL_ERROR = 0x102
H3_EXCESSIVE_LOAD = 0x107
H3_REQUEST_REJECTED = 0x10B
H3_REQUEST_CANCELLED = 0x10C
H3_MESSAGE_ERROR = 0x10E
H3_CONNECT_ERROR = 0x10F
H3_DATAGRAM_ERROR = 0x33
SETTINGS_H3_DATAGRAM = 0x33

WRITE_HIGH = 1024 * 1024  # bytes qh3 may hold for one stream before its writer is paused
WRITE_LOW = 256 * 1024
# What qh3 holds for a stream includes bytes in flight, as a kernel TCP socket's send buffer
# does; a writer sizing its own buffer by get_write_buffer_size() (the tunnel bridge grants
# credit by it) would otherwise cap the stream at one such window per round trip. This much of
# it is not reported, as a socket's kernel buffer is not.
IN_FLIGHT_ALLOWANCE = 2 * 1024 * 1024
# qh3 grants QUIC flow-control credit as soon as it hands received data over, so QUIC alone
# would let a peer fill our memory while a reader (a slow local client, a slow origin) lags.
# Past HOLD_HIGH unread bytes on a connection, its incoming packets are held unprocessed (no
# credit, no acknowledgements: the peer's congestion control slows down) until the readers
# drain to HOLD_LOW. Held packets are bounded; past HOLD_PACKETS they are dropped, as a full
# router queue would, and the peer retransmits them.
HOLD_HIGH = 4 * 1024 * 1024
HOLD_LOW = 1024 * 1024
HOLD_PACKETS = 2048
# Held packets are processed anyway after this long, so a reader that stopped (a paused
# download) does not stall the connection into its idle timeout; each such round lets at most
# the peer's congestion window in.
HOLD_MAX_SECONDS = 2.0
# Bytes one stream may have unread. Past it the stream is reset (H3_EXCESSIVE_LOAD): its reader
# has stopped for many hold rounds.
DELIVER_CHUNK = 256 * 1024  # most bytes joined into one data_received call
READ_LIMIT = 32 * 1024 * 1024


class Request(Protocol):
    """One request stream's events."""

    def headers(self, headers: Headers, ended: bool) -> None:
        """Response headers (client side) or trailers."""

    def data(self, data: bytes, ended: bool) -> None: ...

    def datagram(self, payload: bytes) -> None:
        """An HTTP Datagram for this stream (its payload after the quarter stream id)."""

    def oversize(self, payload: bytes) -> None:
        """A datagram this side queued turned out too big for a DATAGRAM frame."""

    def reset(self, code: int) -> None:
        """The peer reset its sending side: the stream is over."""

    def stop_sending(self, code: int) -> None:
        """The peer wants no more of what we send (after its full answer, with H3_NO_ERROR,
        that is all it means: RFC 9114 section 4.1.2)."""

    def connection_lost(self) -> None: ...


class H3Peer(QuicPeer):
    """A QUIC connection speaking HTTP/3 with extended CONNECT and HTTP Datagrams."""

    def __init__(self, quic: QuicConnection, stream_handler: Any = None) -> None:
        super().__init__(quic)
        self.h3: H3Connection | None = None
        self.requests: dict[int, Request] = {}
        # server side: makes the handler for a request the peer opened (None: answered)
        self.on_request: Callable[[H3Peer, int, Headers, bool], Request | None] | None = None
        self.on_bad_input: Callable[[str], None] = lambda reason: None
        self.on_lost: Callable[[H3Peer], None] | None = None
        self.on_drop: Callable[[str], None] = lambda reason: None
        self.on_stream_credit: Callable[[], None] = lambda: None
        self.paused: set[H3Stream] = set()  # writers waiting for qh3's send buffer to drain
        self.settings: asyncio.Future[dict[int, int]] = self.loop.create_future()
        self.unread = 0  # bytes received on request streams, not yet taken by their readers
        self.holding = False
        self._held: deque[tuple[bytes, Any]] = deque()
        self._hold_timer: asyncio.TimerHandle | None = None
        self.held_total = 0  # times packets were held (tests, metrics)

    # -- requests ---------------------------------------------------------------------------

    def open_request(self, headers: Headers, handler: Request, end_stream: bool = False) -> int:
        """Send a request's headers on a new stream; `handler` gets what comes back."""
        assert self.h3 is not None, "HTTP/3 is not up before the handshake"
        stream_id = self.quic.get_next_available_stream_id(is_unidirectional=False)
        self.requests[stream_id] = handler
        self.h3.send_headers(stream_id, headers, end_stream=end_stream)
        self.transmit_soon()
        return stream_id

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> bool:
        if self.h3 is None or self.closed or qh3compat.is_closing(self.quic):
            return False
        try:
            self.h3.send_headers(stream_id, headers, end_stream=end_stream)
        except (H3Error, H3ProtocolError, QuicConnectionError, ValueError, AssertionError) as e:
            log.debug("headers on stream %d dropped: %s", stream_id, e)
            return False
        if end_stream:
            self.requests.pop(stream_id, None)
        self.transmit_soon()
        return True

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> bool:
        if self.h3 is None or self.closed or qh3compat.is_closing(self.quic):
            return False
        try:
            self.h3.send_data(stream_id, data, end_stream)
        except (H3Error, H3ProtocolError, QuicConnectionError, ValueError, AssertionError) as e:
            # a stream qh3 refuses (reset, finished): its owner learns from the reset
            log.debug("data on stream %d dropped: %s", stream_id, e)
            return False
        self.transmit_soon()
        return True

    def send_http_datagram(self, stream_id: int, payload: bytes) -> bool:
        """Queue an HTTP Datagram for request stream `stream_id` (payload: context id and
        data). One too big for the path comes back to the request's `oversize`."""
        return self.send_datagram(encode_varint(stream_id >> 2) + payload)

    def takes_datagrams(self) -> bool:
        """Whether the peer's SETTINGS said it takes HTTP Datagrams (RFC 9297 section 2.1.1).
        Asked at each send: a request can arrive before the peer's control stream."""
        settings = self.h3.received_settings if self.h3 is not None else None
        return bool(settings) and settings.get(SETTINGS_H3_DATAGRAM) == 1  # type: ignore[union-attr]

    def reset_request(self, stream_id: int, code: int) -> None:
        self.requests.pop(stream_id, None)
        reset_stream(self, stream_id, code)

    def forget(self, stream_id: int) -> None:
        self.requests.pop(stream_id, None)

    def send_buffered(self, stream_id: int) -> int:
        try:
            return int(self.quic.get_send_buffer_size(stream_id))
        except Exception:  # a stream qh3 already dropped holds nothing
            return 0

    # -- receive backpressure -----------------------------------------------------------------

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if self.holding:
            self._hold(data, addr)  # type: ignore[arg-type]
            return
        super().datagram_received(data, addr)

    def datagrams_received(self, data: list[bytes], addr: Any) -> None:
        if self.holding:
            for d in data:
                self._hold(d, addr)
            return
        super().datagrams_received(data, addr)

    def _hold(self, data: bytes, addr: Any) -> None:
        if len(self._held) >= HOLD_PACKETS:
            self.datagram_dropped("receive_backlog")
            return
        self._held.append((bytes(data), addr))

    def read_more(self, n: int) -> None:
        """`n` more bytes wait for a stream's reader."""
        self.unread += n
        if not self.holding and self.unread > HOLD_HIGH:
            self.holding = True
            self.held_total += 1
            self._hold_timer = self.loop.call_later(HOLD_MAX_SECONDS, self._release)

    def read_done(self, n: int) -> None:
        """A reader took (or dropped) `n` bytes."""
        self.unread -= n
        if self.holding and self.unread <= HOLD_LOW:
            self.loop.call_soon(self._release)

    def _release(self) -> None:
        if not self.holding:
            return
        self.holding = False
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        held, self._held = self._held, deque()
        while held and not self.holding and not self.closed:
            data, addr = held.popleft()
            batch = [data]
            while held and held[0][1] == addr and len(batch) < 64:
                batch.append(held.popleft()[0])
            super().datagrams_received(batch, addr)
        if held:  # readers filled up again: back in the queue, in order
            held.extend(self._held)
            self._held = held
        if self.holding and self._hold_timer is None:
            self._hold_timer = self.loop.call_later(HOLD_MAX_SECONDS, self._release)

    # -- QuicPeer hooks ---------------------------------------------------------------------

    def datagram_dropped(self, reason: str) -> None:
        self.on_drop(reason)

    def stream_credit(self) -> None:
        self.on_stream_credit()

    def oversize_datagram(self, data: bytes) -> None:
        got = decode_varint(data)
        request = self.requests.get(got[0] << 2) if got is not None else None
        if request is None:
            self.datagram_dropped("too_big")
            return
        request.oversize(data[got[1] :] if got is not None else b"")

    def received(self) -> None:
        if self.paused:
            for stream in list(self.paused):
                stream.check_drained()

    def lose_streams(self) -> None:
        requests = list(self.requests.values())
        self.requests.clear()
        self.paused.clear()
        for request in requests:
            try:
                request.connection_lost()
            except Exception:
                log.exception("request handler failed on connection loss")
        if self.on_lost is not None:
            self.on_lost(self)

    # -- qh3 plumbing -------------------------------------------------------------------------

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self.h3 = qh3compat.ExtendedConnectH3(self.quic)
            if self.on_established is not None:
                self.on_established(self)
            self.handshake_done(event.alpn_protocol)
            return
        if isinstance(event, events.ConnectionTerminated):
            if not self.settings.done():
                self.settings.set_exception(ConnectionError(event.reason_phrase or "closed"))
            self._on_terminated(event.error_code, event.reason_phrase)
            return
        h3 = self.h3
        if h3 is None:
            return
        for ev in h3.handle_event(event):
            self._dispatch(ev)
        if not self.settings.done() and h3.received_settings is not None:
            self.settings.set_result(h3.received_settings)

    def _dispatch(self, ev: h3e.H3Event) -> None:
        if isinstance(ev, h3e.DataReceived):
            request = self.requests.get(ev.stream_id)
            if request is not None:
                request.data(ev.data, ev.stream_ended)
        elif isinstance(ev, h3e.DatagramReceived):
            request = self.requests.get(ev.flow_id << 2)
            if request is None:
                self.datagram_dropped("unknown_stream")
            else:
                request.datagram(ev.data)
        elif isinstance(ev, h3e.HeadersReceived):
            request = self.requests.get(ev.stream_id)
            if request is not None:
                request.headers(ev.headers, ev.stream_ended)
            elif self.on_request is not None and ev.push_id is None:
                made = self.on_request(self, ev.stream_id, ev.headers, ev.stream_ended)
                if made is not None:
                    self.requests[ev.stream_id] = made
        elif isinstance(ev, h3e.StreamReset):
            request = self.requests.pop(ev.stream_id, None)
            if request is not None:
                request.reset(ev.error_code)
        elif isinstance(ev, h3e.StopSending):
            request = self.requests.get(ev.stream_id)
            if request is not None:
                request.stop_sending(ev.error_code)


class H3Stream(asyncio.Transport):
    """A CONNECT request stream as an asyncio transport, and the stream's `Request` handler.

    Bytes the peer sends before a protocol is attached (or while it paused reading) wait here,
    up to READ_LIMIT. EOF is the stream's FIN; a reset either way is a connection_lost with
    an error, so a relay resets the other side too (RFC 9114 section 4.4: H3_CONNECT_ERROR
    stands for a TCP reset).
    """

    def __init__(self, peer: H3Peer, stream_id: int, *, read_limit: int = READ_LIMIT) -> None:
        super().__init__()
        self.peer = peer
        self.stream_id = stream_id
        self.protocol: Any = None
        self.read_limit = read_limit
        self._queue: deque[bytes | None] = deque()  # None marks the peer's FIN
        self._queued = 0
        self._reading = True
        self._scheduled = False
        self._closing = False
        self._eof_sent = False
        self._eof_received = False
        self._writer_paused = False
        self._high, self._low = WRITE_HIGH, WRITE_LOW
        self._lost = False
        self.reset_code: int | None = None  # set when the stream ended by a reset
        self.on_done: Callable[[H3Stream], None] | None = None

    # -- Request (events from the connection) --------------------------------------------

    def headers(self, headers: Headers, ended: bool) -> None:
        if ended:  # trailers: nothing in them matters for a byte stream
            self.data(b"", True)

    def data(self, data: bytes, ended: bool) -> None:
        if self._lost or self._eof_received:
            return
        if data:
            self._queue.append(data)
            self._queued += len(data)
            self.peer.read_more(len(data))
            if self._queued > self.read_limit:
                self.peer.on_bad_input("stream_overrun")
                log.info(
                    "stream %d from %s: %d bytes unread, over the limit: reset",
                    self.stream_id,
                    self.peer.peer,
                    self._queued,
                )
                self._fail(H3_EXCESSIVE_LOAD, ConnectionResetError("peer overran the stream"))
                return
        if ended:
            self._eof_received = True
            self._queue.append(None)
        self._schedule()

    def datagram(self, payload: bytes) -> None:
        self.peer.datagram_dropped("not_a_datagram_stream")

    def oversize(self, payload: bytes) -> None:
        self.peer.datagram_dropped("too_big")

    def reset(self, code: int) -> None:
        self.reset_code = code
        self._gone(ConnectionResetError(f"stream reset by peer (0x{code:x})"))

    def stop_sending(self, code: int) -> None:
        if code == H3_NO_ERROR:
            self._eof_sent = True  # nothing more to send; what the peer sends still comes
            self._maybe_done()
        else:
            self.reset(code)

    def connection_lost(self) -> None:
        self._gone(ConnectionResetError(f"connection lost: {self.peer.close_reason}"))

    # -- delivering to the protocol -------------------------------------------------------

    def attach(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.connection_made(self)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and self._reading and self.protocol is not None and self._queue:
            self._scheduled = True
            self.peer.loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        self._scheduled = False
        queue = self._queue
        while queue and self._reading and not self._lost and self.protocol is not None:
            item = queue.popleft()
            if item is None:
                self.protocol.eof_received()
                self._maybe_done()
                continue
            if queue and queue[0] is not None:
                # one write to a TCP socket per batch of QUIC packets, not one per packet
                parts, size = [item], len(item)
                while queue and queue[0] is not None and size < DELIVER_CHUNK:
                    part = queue.popleft()
                    parts.append(part)  # type: ignore[arg-type]
                    size += len(part)  # type: ignore[arg-type]
                item = b"".join(parts)
            self._queued -= len(item)
            self.peer.read_done(len(item))
            self.protocol.data_received(item)

    def pause_reading(self) -> None:
        self._reading = False

    def resume_reading(self) -> None:
        if not self._reading:
            self._reading = True
            self._schedule()

    def is_reading(self) -> bool:
        return self._reading

    # -- writing --------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._eof_sent or self._lost or not data:
            return
        peer = self.peer
        peer.send_data(self.stream_id, bytes(data))
        if not self._writer_paused and peer.send_buffered(self.stream_id) > self._high:
            self._writer_paused = True
            peer.paused.add(self)
            if self.protocol is not None:
                self.protocol.pause_writing()

    def check_drained(self) -> None:
        """Called as acknowledgements arrive while the writer is paused."""
        if self._lost:
            self.peer.paused.discard(self)
            return
        if self.peer.send_buffered(self.stream_id) <= self._low:
            self._writer_paused = False
            self.peer.paused.discard(self)
            if self.protocol is not None:
                self.protocol.resume_writing()

    def write_eof(self) -> None:
        if self._eof_sent or self._lost:
            return
        self._eof_sent = True
        self.peer.send_data(self.stream_id, b"", end_stream=True)
        self._maybe_done()

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        if self._lost:
            return 0
        return max(0, self.peer.send_buffered(self.stream_id) - IN_FLIGHT_ALLOWANCE)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is not None:
            self._high = high
            self._low = low if low is not None else high // 4

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    # -- ending ---------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        """Finish our side; what the peer still sends is not wanted (STOP_SENDING)."""
        if self._closing or self._lost:
            return
        self._closing = True
        self.write_eof()
        if not self._eof_received:
            try:
                self.peer.quic.stop_stream(self.stream_id, H3_NO_ERROR)
            except Exception as e:
                log.debug("stop_sending on stream %d: %s", self.stream_id, e)
        self._gone(None)

    def abort(self) -> None:
        self._fail(H3_CONNECT_ERROR, None)

    def _fail(self, code: int, exc: Exception | None) -> None:
        if self._lost:
            return
        self.peer.reset_request(self.stream_id, code)
        self._gone(exc)

    def _maybe_done(self) -> None:
        if self._eof_sent and self._eof_received and not self._queue:
            self.peer.forget(self.stream_id)

    def _gone(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._queue.clear()
        self.peer.read_done(self._queued)
        self._queued = 0
        self.peer.paused.discard(self)
        self.peer.forget(self.stream_id)
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            self.peer.loop.call_soon(protocol.connection_lost, exc)
        if self.on_done is not None:
            self.on_done(self)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.peer.peer_addr
        return default


class H3StreamEndpoint:
    """A CONNECT stream as a flow's byte-stream endpoint (flows.endpoint.StreamEndpoint)."""

    kind = "h3"

    def __init__(self, stream: H3Stream) -> None:
        self.stream = stream

    async def attach(self, factory: ProtocolFactory) -> asyncio.BaseTransport:
        self.stream.attach(factory())
        return self.stream

    def close(self) -> None:
        self.stream.abort()
