"""The QUIC adapter over qh3: a connection protocol that routes stream events to per-stream
handlers (no asyncio StreamReader in the data path), and a server that batches datagrams,
counts what it drops, and hands connections to the tunnel layer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol, TypeVar

from qh3.asyncio.protocol import QuicConnectionProtocol
from qh3.quic import events
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection, QuicConnectionError
from qh3.quic.packet import QuicPacketType, encode_quic_retry, encode_quic_version_negotiation

from ramp.net.inherit import inherited
from ramp.net.reuseport import UDP_BUFFER, SteeringGroup, udp_socket
from ramp.net.sockopts import set_buffers
from ramp.quic import qh3compat
from ramp.quic.admission import (
    DEFAULT_LIMITS,
    Drop,
    HandshakeLimits,
    Penalties,
    SendRetry,
    decide,
)
from ramp.quic.peer import QuicPeer
from ramp.quic.retry import InvalidToken, RetryTokens
from ramp.wire.tunnel import (
    MAX_STREAM_DATAGRAM,
    FrameDecoder,
    ProtocolError,
    StreamDatagram,
    encode_frame,
)

log = logging.getLogger("ramp.quic")

# qh3 logs every peer close at WARNING; for a tunnel that is routine.
logging.getLogger("qh3").setLevel(logging.ERROR)
logging.getLogger("quic").setLevel(logging.ERROR)

QUIC_MIN_INITIAL_SIZE = 1200
# qh3's own packet size, and the one it can answer a minimal (1,200-byte) Initial with
QH3_DATAGRAM_SIZE = 1280
# what a client whose first datagram held at least QH3_DATAGRAM_SIZE bytes gets: an IPv6
# packet on a 1,500-byte link less IP and UDP headers (where the path is smaller the kernel
# fragments, as it does for the client's own packets, which qh3 sizes the same way)
LARGE_DATAGRAM_SIZE = 1452
DEFAULT_MAX_STREAMS = qh3compat.QH3_MAX_STREAMS_BIDI  # what qh3 advertises by itself
MAX_DATAGRAM_STREAM_BUFFER = 4 * 1024 * 1024  # bytes of large datagrams waiting on their stream


class _DatagramStream:
    """Receives tunnel datagrams the peer sent on a unidirectional stream (too big for a
    QUIC DATAGRAM frame on the current path)."""

    def __init__(self, conn: TunnelConnection) -> None:
        self.conn = conn
        self.decoder = FrameDecoder(limit=2 * MAX_STREAM_DATAGRAM)

    def stream_data(self, data: bytes, fin: bool) -> None:
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as e:
            log.warning("datagram stream from %s: %s", self.conn.peer, e)
            self.conn.datagram_dropped("malformed")
            self.conn.close_with(0x1, "bad datagram stream")
            return
        for frame in frames:
            if isinstance(frame, StreamDatagram):
                self.conn.tunnel_datagram(frame.data)
            else:
                self.conn.datagram_dropped("malformed")

    def stream_reset(self, code: int) -> None:
        pass

    def stop_sending(self, code: int) -> None:
        pass

    def connection_lost(self) -> None:
        pass


class StreamHandler(Protocol):
    """Receives one QUIC stream's events."""

    def stream_data(self, data: bytes, fin: bool) -> None: ...

    def stream_reset(self, code: int) -> None: ...

    def stop_sending(self, code: int) -> None: ...

    def connection_lost(self) -> None: ...


class TunnelConnection(QuicPeer):
    """One QUIC connection carrying a control stream and many flow streams."""

    def __init__(self, quic: QuicConnection, stream_handler: Any = None) -> None:
        super().__init__(quic)
        self.handlers: dict[int, StreamHandler] = {}
        self._peer_uni_stream: int | None = None
        self._dgram_stream: int | None = None
        self._peer_seen: set[int] = set()
        self._peer_seen_order: deque[int] = deque()

    # -- hooks for subclasses -------------------------------------------------------------

    def peer_stream_opened(self, stream_id: int) -> StreamHandler | None:
        """A stream the peer opened has its first data. Return a handler or None to reset."""
        return None

    def tunnel_datagram(self, data: bytes) -> None:
        """One tunnel datagram from the peer (from a DATAGRAM frame or the datagram stream)."""

    # -- API --------------------------------------------------------------------------------

    def open_stream(self, handler: StreamHandler) -> int:
        stream_id = self.quic.get_next_available_stream_id(is_unidirectional=False)
        self.handlers[stream_id] = handler
        return stream_id

    def send(self, stream_id: int, data: bytes, fin: bool = False) -> None:
        if self.closed or qh3compat.is_closing(self.quic):
            return  # closing: nothing more goes out, the peer learns from CONNECTION_CLOSE
        try:
            self.quic.send_stream_data(stream_id, data, end_stream=fin)
        except (QuicConnectionError, ValueError) as e:
            # a stream qh3 refuses (reset, finished, over the peer's limit): the stream's
            # owner learns from the reset or from its own checks; nothing else to do here
            log.debug("send on stream %d dropped: %s", stream_id, e)
            return
        self.transmit_soon()

    def oversize_datagram(self, data: bytes) -> None:
        # too big for a DATAGRAM frame on this path: the tunnel's datagram stream carries it
        if self._dgram_stream is None:
            self._dgram_stream = self.quic.get_next_available_stream_id(is_unidirectional=True)
        elif self.quic.get_send_buffer_size(self._dgram_stream) > MAX_DATAGRAM_STREAM_BUFFER:
            self.datagram_dropped("queue_full")  # the stream drains slower than they come
            return
        try:
            self.quic.send_stream_data(self._dgram_stream, encode_frame(StreamDatagram(data)))
        except (QuicConnectionError, ValueError) as e:
            log.debug("datagram stream send failed: %s", e)
            self.datagram_dropped("send_error")

    def reset(self, stream_id: int, code: int) -> None:
        """Abort both directions of a stream."""
        self.handlers.pop(stream_id, None)
        reset_stream(self, stream_id, code)

    def forget(self, stream_id: int) -> None:
        self.handlers.pop(stream_id, None)

    # -- qh3 plumbing -------------------------------------------------------------------------

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.DatagramFrameReceived):
            self.tunnel_datagram(event.data)
        elif isinstance(event, events.StreamDataReceived):
            handler = self.handlers.get(event.stream_id)
            if handler is None:
                if not self._is_peer_stream(event.stream_id):
                    return  # late data for a stream we already finished with
                if event.stream_id & 2:  # unidirectional: the peer's datagram stream
                    if self._peer_uni_stream is not None:
                        # protocol v1 has one per direction; more would only cost memory
                        self.datagram_dropped("extra_datagram_stream")
                        try:
                            self.quic.stop_stream(event.stream_id, 0x102)
                        except Exception as e:
                            log.debug("stop_sending on stream %d: %s", event.stream_id, e)
                        return
                    self._peer_uni_stream = event.stream_id
                    handler = _DatagramStream(self)
                else:
                    handler = self.peer_stream_opened(event.stream_id)
                if handler is None:
                    self.reset(event.stream_id, 0x102)
                    return
                self.handlers[event.stream_id] = handler
            handler.stream_data(event.data, event.end_stream)
        elif isinstance(event, events.StreamReset):
            handler = self.handlers.pop(event.stream_id, None)
            if handler is not None:
                handler.stream_reset(event.error_code)
        elif isinstance(event, events.StopSendingReceived):
            handler = self.handlers.get(event.stream_id)
            if handler is not None:
                handler.stop_sending(event.error_code)
        elif isinstance(event, events.HandshakeCompleted):
            if self.on_established is not None:
                self.on_established(self)
            self.handshake_done(event.alpn_protocol)
        elif isinstance(event, events.ConnectionTerminated):
            self._on_terminated(event.error_code, event.reason_phrase)

    def _is_peer_stream(self, stream_id: int) -> bool:
        """A stream the peer opened and we have not seen before (bit 0 marks the server)."""
        if bool(stream_id & 1) != qh3compat.is_client(self.quic) or stream_id in self._peer_seen:
            return False
        # remember recent ids so data arriving after we finished a stream cannot reopen it
        self._peer_seen.add(stream_id)
        self._peer_seen_order.append(stream_id)
        if len(self._peer_seen_order) > 8192:
            self._peer_seen.discard(self._peer_seen_order.popleft())
        return True

    def lose_streams(self) -> None:
        handlers = list(self.handlers.values())
        self.handlers.clear()
        for h in handlers:
            try:
                h.connection_lost()
            except Exception:
                log.exception("stream handler failed on connection loss")


def reset_stream(conn: QuicPeer, stream_id: int, code: int) -> None:
    """Abort both directions of a stream (whatever is left of it)."""
    if conn.closed or qh3compat.is_closing(conn.quic):
        return
    try:
        if qh3compat.stream_can_send(conn.quic, stream_id):
            conn.quic.reset_stream(stream_id, code)
        conn.quic.stop_stream(stream_id, code)
    except Exception as e:  # a stream qh3 already forgot: nothing left to abort
        log.debug("reset of stream %d ignored: %s", stream_id, e)
    conn.transmit_soon()


P = TypeVar("P", bound=QuicPeer)
_SourceKey = tuple[str, bool]  # (source IP, whether a Retry token proved it)


def _source(addr: Any) -> str:
    return str(addr[0]).removeprefix("::ffff:")


class TunnelServer(qh3compat.Server):
    """qh3's server with datagram batching per connection, counters for dropped packets, and
    the handshake admission rules of ramp.quic.admission. With `steering` (a group and this
    server's slot in it), the connection ids it chooses (each connection's first one, and a
    Retry's) carry the slot, so the group keeps their packets on this server's socket."""

    def __init__(
        self,
        *,
        on_drop: Callable[[str], None],
        on_event: Callable[[str], None] = lambda event: None,
        limits: HandshakeLimits = DEFAULT_LIMITS,
        max_streams_bidi: int = qh3compat.QH3_MAX_STREAMS_BIDI,
        steering: tuple[SteeringGroup, int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.steering = steering
        if steering is not None:
            cid_length = self.configuration.connection_id_length
            if steering[0].cookies.cid_length != cid_length:
                raise ValueError(f"steering cookies must be {cid_length}-byte connection ids")
        self.max_streams_bidi = max_streams_bidi
        self.limits = limits
        self._on_drop = on_drop
        self._on_event = on_event
        self._tokens = RetryTokens(limits.token_lifetime)
        self._penalties = Penalties(limits.refusals_per_source, limits.refusal_penalty)
        # connection -> (its source share key, its half-open timer)
        self._handshaking: dict[QuicConnectionProtocol, tuple[_SourceKey, asyncio.TimerHandle]]
        self._handshaking = {}
        self._held: dict[_SourceKey, int] = {}

    @property
    def handshaking(self) -> int:
        return len(self._handshaking)

    def _new_cid(self) -> bytes | None:
        """A connection id for this server to choose: with a cookie when steered."""
        if self.steering is None:
            return None
        group, slot = self.steering
        return group.cookies.issue(slot)

    def datagrams_received(self, datagrams: list[bytes], addr: Any) -> None:
        # group consecutive datagrams for the same known connection: one qh3 call per batch
        batch: list[bytes] = []
        batch_proto: QuicConnectionProtocol | None = None
        cid_len = self.configuration.connection_id_length
        for data in datagrams:
            proto = None
            if data and data[0] & 0x80 == 0 and len(data) > cid_len:
                proto = self.lookup(bytes(data[1 : 1 + cid_len]))
            if proto is not None and (batch_proto is None or proto is batch_proto):
                batch.append(data)
                batch_proto = proto
                continue
            if batch_proto is not None:
                batch_proto.datagrams_received(batch, addr)
                batch, batch_proto = [], None
            if proto is not None:
                batch, batch_proto = [data], proto
            else:
                self.datagram_received(data, addr)
        if batch_proto is not None:
            batch_proto.datagrams_received(batch, addr)

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        assert isinstance(data, bytes)
        config = self.configuration
        try:
            hdr = qh3compat.pull_quic_header(data, config.connection_id_length)
        except ValueError:
            self._on_drop("malformed")
            return
        version, ptype, _plen, dcid, scid, token = hdr[:6]
        if version is not None and version not in config.supported_versions:
            self._on_drop("unsupported_version")
            if version == 0 or len(data) < QUIC_MIN_INITIAL_SIZE:
                # never answer a Version Negotiation (two servers would bounce them forever)
                # nor a short packet (the answer would amplify traffic to a forged source)
                return
            self.udp_transport.sendto(
                encode_quic_version_negotiation(
                    source_cid=dcid,
                    destination_cid=scid,
                    supported_versions=config.supported_versions,
                ),
                addr,
            )
            return
        protocol = self.lookup(dcid)
        if protocol is None:
            if len(data) < QUIC_MIN_INITIAL_SIZE or ptype != QuicPacketType.INITIAL:
                self._on_drop("unknown_connection")
                return
            protocol = self._admit(version, dcid, scid, bytes(token or b""), addr, len(data))
            if protocol is None:
                return
        protocol.datagram_received(data, addr)

    def _admit(
        self, version: int, dcid: bytes, scid: bytes, token: bytes, addr: Any, size: int
    ) -> QuicConnectionProtocol | None:
        ip = _source(addr)
        now = time.monotonic()
        if self._penalties.blocked(ip, now):
            self._on_drop("penalized")
            return None
        validated = None
        if token:
            try:
                validated = self._tokens.check(ip, token, now)
            except InvalidToken as e:
                self._on_event(f"token_invalid_{e.reason}")
        key = (ip, validated is not None)
        decision = decide(
            self.limits,
            dcid=dcid,
            token=token,
            validated=validated,
            handshaking=len(self._handshaking),
            source_held=self._held.get(key, 0),
        )
        if isinstance(decision, Drop):
            self._on_drop(decision.reason)
            return None
        if isinstance(decision, SendRetry):
            # the client's next Initial is addressed to it: a cookie brings it back here
            retry_scid = self._new_cid() or os.urandom(self.configuration.connection_id_length)
            self.udp_transport.sendto(
                encode_quic_retry(
                    version=version,
                    source_cid=retry_scid,
                    destination_cid=scid,
                    original_destination_cid=dcid,
                    retry_token=self._tokens.issue(ip, dcid, retry_scid, now),
                ),
                addr,
            )
            self._on_event("retry_sent")
            return None
        return self.new_protocol(
            dcid,
            partial(self._track_handshake, key),
            original_dcid=decision.original_dcid,
            retry_scid=decision.retry_scid,
            # fewer packets per byte; qh3 cannot build its first flight to a 1,200-byte
            # Initial with larger ones ("packet builder capacity exhausted")
            max_datagram_size=LARGE_DATAGRAM_SIZE if size >= QH3_DATAGRAM_SIZE else None,
            host_cid=self._new_cid(),
        )

    def registration_refused(self, addr: Any) -> None:
        """A peer at `addr` failed to register: enough of those and its source is shut out."""
        ip = _source(addr)
        if self._penalties.strike(ip, time.monotonic()):
            self._on_event("source_penalized")
            log.warning(
                "no new tunnel connections from %s for %.0f s: %d refused registrations",
                ip,
                self.limits.refusal_penalty,
                self.limits.refusals_per_source,
            )

    def _track_handshake(self, key: _SourceKey, protocol: QuicConnectionProtocol) -> None:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.limits.timeout, self._half_open, protocol)
        self._handshaking[protocol] = (key, timer)
        self._held[key] = self._held.get(key, 0) + 1
        if isinstance(protocol, QuicPeer):
            protocol.on_established = self._handshake_over

    def _handshake_over(self, protocol: QuicConnectionProtocol) -> None:
        entry = self._handshaking.pop(protocol, None)
        if entry is None:
            return
        key, timer = entry
        timer.cancel()
        n = self._held.get(key, 0) - 1
        if n > 0:
            self._held[key] = n
        else:
            self._held.pop(key, None)

    def _half_open(self, protocol: QuicConnectionProtocol) -> None:
        """A handshake that did not finish in time: gone without a CONNECTION_CLOSE, which
        would only be more traffic to a source that may be forged."""
        if protocol not in self._handshaking:
            return
        self._handshake_over(protocol)
        self._on_event("handshake_timeout")
        self.forget(protocol)
        if isinstance(protocol, QuicPeer):
            protocol.abandon("handshake timeout")

    def connection_terminated(self, protocol: QuicConnectionProtocol) -> None:
        self._handshake_over(protocol)


async def _datagram_endpoint(
    factory: Callable[[], asyncio.DatagramProtocol], sock: socket.socket
) -> tuple[asyncio.DatagramTransport, asyncio.DatagramProtocol]:
    loop = asyncio.get_running_loop()
    optimized = qh3compat.create_optimized_datagram_transport
    if optimized is not None and os.environ.get("RAMP_NO_GSO") != "1":
        return await optimized(loop, factory, sock=sock)
    return await loop.create_datagram_endpoint(factory, sock=sock)  # type: ignore[return-value]


async def serve(
    host: str,
    port: int,
    *,
    configuration: QuicConfiguration,
    create_protocol: Callable[..., QuicPeer],
    on_drop: Callable[[str], None],
    on_event: Callable[[str], None] = lambda event: None,
    limits: HandshakeLimits = DEFAULT_LIMITS,
    max_streams_bidi: int = qh3compat.QH3_MAX_STREAMS_BIDI,
    steering: tuple[SteeringGroup, int] | None = None,
    name: str = "tunnel",
) -> tuple[asyncio.DatagramTransport, TunnelServer]:
    """Listen for QUIC connections; each lets its peer open `max_streams_bidi` streams at
    once. With `steering` (group, slot) the socket is the group's at that slot and the
    connections' ids carry the slot (ramp.net.reuseport); `name` names the listener."""
    given = inherited().take(name, socket.SOCK_DGRAM, host, port)  # systemd's, by name
    if given is not None:
        set_buffers(given, UDP_BUFFER)
        if steering is not None and not given.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
            log.warning(
                "%s: the given socket has no SO_REUSEPORT (systemd: ReusePort=yes): no "
                "steering, so a restart cannot keep this listener's connections",
                name,
            )
            steering = None
    if steering is None:
        sock = given if given is not None else udp_socket(host, port)
    else:
        group, slot = steering
        if given is not None:
            group.adopt(given, slot)
            sock = given
        else:
            sock = group.socket(host, port, slot)
        log.info(
            "%s listener on %s:%d: slot %d of a %s steering group",
            name,
            host,
            sock.getsockname()[1],
            slot,
            group.mechanism,
        )
    transport, server = await _datagram_endpoint(
        lambda: TunnelServer(
            configuration=configuration,
            create_protocol=create_protocol,
            on_drop=on_drop,
            on_event=on_event,
            limits=limits,
            max_streams_bidi=max_streams_bidi,
            steering=steering,
        ),
        sock,
    )
    assert isinstance(server, TunnelServer)
    return transport, server


async def dial(
    host: str,
    port: int,
    *,
    configuration: QuicConfiguration,
    create_protocol: Callable[[QuicConnection], P],
    max_streams_bidi: int = qh3compat.QH3_MAX_STREAMS_BIDI,
    initial_cid: bytes | None = None,
) -> P:
    """Open a QUIC connection that lets the peer open `max_streams_bidi` streams at once;
    returns once the handshake completed (or raises). `initial_cid`: the destination id of
    its Initial packets (one the server handed out to steer the connection), else random."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, _, _, _, addr = infos[0]
    sock = udp_socket("::" if family == socket.AF_INET6 else "0.0.0.0", 0)
    connection = qh3compat.LimitedConnection(
        configuration=configuration, max_streams_bidi=max_streams_bidi
    )
    if initial_cid is not None:
        qh3compat.set_initial_destination(connection, initial_cid)
    transport, protocol = await _datagram_endpoint(lambda: create_protocol(connection), sock)
    assert isinstance(protocol, QuicPeer)
    protocol.connect(addr)
    try:
        await protocol.wait_connected()
    except BaseException:
        transport.close()
        raise
    protocol.udp_transport = transport  # type: ignore[attr-defined]
    return protocol
