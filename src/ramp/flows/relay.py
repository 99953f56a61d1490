"""The stream relay for legs whose ends are not both kernel sockets (those are spliced).

Two protocols, one per endpoint, copy what they receive to the other side; backpressure is the
transports' own (a full write buffer pauses reading on the other side), half-close is carried
as EOF, and a reset on either side aborts the other.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, cast

from ramp.flows.endpoint import StreamEndpoint


@dataclass(slots=True)
class RelayResult:
    a_to_b: int = 0
    b_to_a: int = 0
    reset: bool = False


class _Side(asyncio.Protocol):
    def __init__(self, relay: _Relay, name: str) -> None:
        self.relay = relay
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.pending: list[bytes] = []  # data before the peer is attached
        self.eof = False
        self.eof_passed = False  # the EOF went on to the peer
        self.lost = False
        self.count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.count += len(data)
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)
            if self.transport is not None:
                self.transport.pause_reading()
            return
        if not peer.lost:
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        t = peer.transport if peer is not None and not peer.lost else None
        if t is not None and t.can_write_eof():
            t.write_eof()
            self.eof_passed = True
        self.relay.check()
        return True  # keep the other direction open

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.lost:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.lost:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if exc is not None:
            self.relay.result.reset = True
            if self.peer is not None and self.peer.transport is not None:
                self.peer.transport.abort()
        self.relay.check(force=exc is not None or not self.eof)


class _Relay:
    def __init__(self) -> None:
        self.result = RelayResult()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.a = _Side(self, "a")
        self.b = _Side(self, "b")
        self.a.peer, self.b.peer = self.b, self.a

    def check(self, force: bool = False) -> None:
        if self.done.done():
            return
        if force or (self.a.eof and self.b.eof):
            self.done.set_result(None)


async def relay_streams(a: StreamEndpoint, b: StreamEndpoint, initial: bytes = b"") -> RelayResult:
    """Copy both ways between `a` and `b` until both directions end; `initial` goes to b
    first (bytes the on-ramp read past its handshake)."""
    relay = _Relay()
    ta = await a.attach(lambda: relay.a)
    try:
        tb = await b.attach(lambda: relay.b)
    except BaseException:
        ta.close()
        raise
    transport_b = cast(Any, tb)
    if initial:
        relay.result.a_to_b += len(initial)
        transport_b.write(initial)
    for chunk in relay.a.pending:
        transport_b.write(chunk)
    relay.a.pending.clear()
    # An EOF that came before the other side was attached had nowhere to go yet.
    if relay.a.eof and not relay.a.eof_passed and transport_b.can_write_eof():
        transport_b.write_eof()
    cast(Any, ta).resume_reading()
    for chunk in relay.b.pending:
        cast(Any, ta).write(chunk)
    relay.b.pending.clear()
    if relay.b.eof and not relay.b.eof_passed and cast(Any, ta).can_write_eof():
        cast(Any, ta).write_eof()
    transport_b.resume_reading()
    try:
        await relay.done
    except asyncio.CancelledError:
        ta.abort() if hasattr(ta, "abort") else ta.close()
        tb.abort() if hasattr(tb, "abort") else tb.close()
        raise
    finally:
        relay.result.a_to_b += relay.a.count
        relay.result.b_to_a += relay.b.count
    ta.close()
    tb.close()
    return relay.result
