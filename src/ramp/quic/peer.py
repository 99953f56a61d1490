"""What every QUIC connection of ramp does, whatever it carries (the tunnel protocol or
HTTP/3): a bounded datagram queue handed to qh3 only as the congestion window allows, a
keepalive, the peer's address, stream-credit watching, and one end-of-connection path.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from qh3.quic.connection import QuicConnection, QuicConnectionError

from ramp.quic import qh3compat

log = logging.getLogger("ramp.quic")

DATAGRAM_QUEUE_LIMIT = 4096  # datagrams waiting for congestion window, per connection
DATAGRAM_OVERHEAD = 48  # QUIC short header, DATAGRAM frame header, AEAD tag (upper bound)


class QuicPeer(qh3compat.ConnectionProtocol):
    """One QUIC connection; subclasses say what its streams and datagrams mean."""

    def __init__(self, quic: QuicConnection, stream_handler: Any = None) -> None:
        super().__init__(quic)
        self.last_rx = self.loop.time()
        self.closed = False
        self.close_reason = ""
        self.peer_addr: Any = None
        self.on_established: Callable[[QuicPeer], None] | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._keepalive_interval = 0.0
        self._dgram_queue: deque[bytes] = deque()
        # set when someone waits for stream slots: each received batch then checks whether
        # the peer's MAX_STREAMS rose (qh3 emits no event for it)
        self.watch_stream_credit = False
        self._bidi_limit = 0

    # -- hooks for subclasses -------------------------------------------------------------

    def handshake_done(self, alpn: str | None) -> None:
        pass

    def terminated(self, error_code: int, reason: str) -> None:
        pass

    def datagram_dropped(self, reason: str) -> None:
        """A datagram was dropped on this connection (for counters)."""

    def stream_credit(self) -> None:
        """The peer raised its limit on our bidirectional streams (with watch_stream_credit)."""

    def received(self) -> None:
        """A batch of packets was processed (acknowledgements may have freed send buffers)."""

    def oversize_datagram(self, data: bytes) -> None:
        """A queued datagram too big for a DATAGRAM frame on the current path."""
        self.datagram_dropped("too_big")

    def lose_streams(self) -> None:
        """The connection ended: tell every stream's owner."""

    # -- streams --------------------------------------------------------------------------

    def can_open_stream(self) -> bool:
        """Whether the peer's MAX_STREAMS leaves room for another bidirectional stream."""
        return not self.closed and qh3compat.can_open_bidi_stream(self.quic)

    def free_streams(self) -> int:
        """Bidirectional streams the peer's MAX_STREAMS lets us open now."""
        return 0 if self.closed else qh3compat.free_bidi_streams(self.quic)

    def _check_stream_credit(self) -> None:
        limit = qh3compat.bidi_stream_limit(self.quic)
        if limit > self._bidi_limit:
            self._bidi_limit = limit
            self.stream_credit()

    # -- datagrams --------------------------------------------------------------------------

    def send_datagram(self, data: bytes) -> bool:
        """Queue one datagram. Drop-tail when the queue is full (returns False)."""
        if self.closed:
            self.datagram_dropped("connection_closed")
            return False
        if len(self._dgram_queue) >= DATAGRAM_QUEUE_LIMIT:
            self.datagram_dropped("queue_full")
            return False
        self._dgram_queue.append(data)
        self.transmit_soon()
        return True

    def datagram_limit(self) -> int:
        """The largest DATAGRAM frame body that fits one packet on the current path now."""
        room = qh3compat.datagram_room(self.quic)
        if room is None:
            return 0
        _, path_max, remote = room
        limit = path_max - DATAGRAM_OVERHEAD
        return limit if remote is None else min(limit, remote - 4)

    def _flush_datagrams(self) -> None:
        room = qh3compat.datagram_room(self.quic)
        if room is None:
            return
        # hand qh3 only what the congestion window can take now, so the bounded queue above
        # is the only place datagrams wait (qh3's own queue has no limit)
        budget, path_max, remote = room
        # what fits in one QUIC packet on the current path (qh3 only notices at packing time)
        limit = path_max - DATAGRAM_OVERHEAD
        if remote is not None:
            limit = min(limit, remote - 4)
        queue = self._dgram_queue
        while queue and budget > 0:
            data = queue.popleft()
            if len(data) > limit:
                budget -= len(data)
                self.oversize_datagram(data)
                continue
            budget -= len(data) + DATAGRAM_OVERHEAD
            try:
                self.quic.send_datagram_frame(data)
            except (QuicConnectionError, ValueError) as e:
                log.debug("datagram dropped: %s", e)
                self.datagram_dropped("send_error")

    def transmit(self) -> None:
        if self._dgram_queue:
            self._flush_datagrams()
        super().transmit()

    # -- the connection ---------------------------------------------------------------------

    def close_with(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.quic.close(error_code=code, reason_phrase=reason)
        self.transmit()

    def start_keepalive(self, interval: float) -> None:
        """Send a PING when nothing was received for `interval`, so NATs and idle timers
        see traffic and a dead peer is noticed within the idle timeout."""
        self._keepalive_interval = interval
        self._schedule_keepalive()

    def _schedule_keepalive(self) -> None:
        if self.closed or self._keepalive_interval <= 0:
            return
        self._keepalive = self.loop.call_later(self._keepalive_interval, self._keepalive_tick)

    def _keepalive_tick(self) -> None:
        if self.closed:
            return
        if self.loop.time() - self.last_rx >= self._keepalive_interval * 0.9:
            self.quic.send_ping(0)
            self.transmit()
        self._schedule_keepalive()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        self.last_rx = self.loop_time()
        self.peer_addr = addr
        super().datagram_received(data, addr)
        if self.watch_stream_credit:
            self._check_stream_credit()
        self.received()

    def datagrams_received(self, data: list[bytes], addr: Any) -> None:
        self.last_rx = self.loop_time()
        self.peer_addr = addr
        super().datagrams_received(data, addr)
        if self.watch_stream_credit:
            self._check_stream_credit()
        self.received()

    @property
    def peer(self) -> str:
        addr = self.peer_addr
        if not addr:
            return "?"
        host = str(addr[0]).removeprefix("::ffff:")
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"

    def _on_terminated(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason or f"code {code}"
        if self._keepalive is not None:
            self._keepalive.cancel()
        self.lose_streams()
        self.terminated(code, reason)

    def connection_lost(self, exc: Exception | None) -> None:
        # the UDP transport went away (client side): the QUIC connection is gone with it
        self.abandon("transport closed")

    def abandon(self, reason: str) -> None:
        """The connection is gone without a close from either end."""
        self._on_terminated(0, reason)
        self.mark_closed()
