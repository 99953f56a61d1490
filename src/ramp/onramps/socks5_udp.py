"""SOCKS5 UDP ASSOCIATE (RFC 1928 section 7): the UDP relay behind one control connection.

The relay socket is bound to the local address of the control connection, so the client talks
to (and hears from) the address it already reached, and replies never leave from another
address of a multi-homed edge. Only the client's IP may use the relay: the control connection's
peer, and a single source port (the one the client announced, else the first one it uses).

Each destination, kept exactly as the client wrote it, is one UDP session from the flow opener;
replies carry that same address back, so a client that asked for a name sees the name.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections import deque
from collections.abc import Callable, Set
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ramp.flows.client_shares import ClientShares
from ramp.flows.flow import Destination, Flow, FlowError, Identity
from ramp.flows.opener import FlowOpener, UdpSession
from ramp.net.gso import GsoSender
from ramp.net.sockopts import set_buffers
from ramp.wire import socks5
from ramp.wire.socks5 import AddressType, Socks5Error

log = logging.getLogger(__name__)

ONRAMP = "socks5-udp"
MAX_DATAGRAM = 65535
READ_BATCH = 64  # datagrams read per wake-up before other work gets a turn
SOCKET_BUFFER = 4 << 20  # bursts of datagrams, up to 64 KiB each, must fit

# A client that vanishes without FIN or RST would otherwise hold its association forever.
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 5

Key = tuple[AddressType, str, int]

DEFAULT_IDLE_TIMEOUT = 60.0


class IdleWatch:
    """Whether an association carried a datagram within its idle time. The datagram path
    only sets `active` (no clock read per datagram); `expired(now)`, called every `interval`,
    does the rest, so an idle association ends at most one interval after its time."""

    def __init__(self, timeout: float, now: float) -> None:
        self.timeout = timeout
        self.interval = timeout / 4
        self.active = False
        self._seen = now

    def expired(self, now: float) -> bool:
        if self.active:
            self.active = False
            self._seen = now
            return False
        return now - self._seen >= self.timeout


class AssociationLimits:
    """What all SOCKS5 UDP associations of an edge share: each client's share of them, their
    idle timeout, and their counters. Each association holds two descriptors (its control
    connection and its relay socket), so idle ones must not pile up."""

    def __init__(
        self,
        per_source: int = 0,
        per_identity: int = 0,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        on_refused: Callable[[str], None] = lambda reason: None,
        on_expired: Callable[[], None] = lambda: None,
        on_active: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.shares: ClientShares[str] = ClientShares(per_source, per_identity)
        self.idle_timeout = idle_timeout
        self.on_refused = on_refused
        self.on_expired = on_expired
        self._on_active = on_active
        self.active = 0
        self._live: dict[str, set[UdpAssociation]] = {}  # by identity, for revocation

    @classmethod
    def for_role(cls, config: Any, metrics: Any) -> AssociationLimits:
        """The limits a role's config sets, counted in its metrics (ProxyMetrics)."""
        return cls(
            config.max_udp_associations_per_source,
            config.max_udp_associations_per_identity,
            config.udp_association_idle_timeout,
            on_refused=lambda reason: metrics.udp_associations_refused.labels(reason).inc(),
            on_expired=metrics.udp_associations_expired.inc,
            on_active=metrics.udp_associations_active.set,
        )

    def admit(self, source: str, identity: str | None) -> str | None:
        """Take a unit of the client's shares; None when taken, else the reason it is not."""
        refused = self.shares.try_take(source, identity)
        if refused is not None:
            self.on_refused(refused)
            return refused
        self.active += 1
        self._on_active(self.active)
        return None

    def release(self, source: str, identity: str | None) -> None:
        self.shares.release(source, identity)
        self.active -= 1
        self._on_active(self.active)

    def track(self, assoc: UdpAssociation) -> None:
        if assoc.identity is not None:
            self._live.setdefault(assoc.identity, set()).add(assoc)

    def untrack(self, assoc: UdpAssociation) -> None:
        live = self._live.get(assoc.identity) if assoc.identity is not None else None
        if live is not None:
            live.discard(assoc)
            if not live:
                del self._live[assoc.identity]  # type: ignore[arg-type]

    def revoke(self, identities: Set[str]) -> int:
        """End the associations of revoked identities, control connections included: their
        sessions are flows the edge ends itself, but a live control connection would still
        hold the relay socket and the client's share. Returns how many were ended."""
        ended = 0
        for name in identities:
            for assoc in list(self._live.pop(name, ())):
                assoc.stop()
                ended += 1
        return ended


@dataclass(eq=False, slots=True)
class _Destination:
    key: Key
    header: bytes  # the SOCKS UDP header that goes in front of every reply
    queue: deque[bytes] | None = field(default_factory=deque)  # while the session opens
    session: UdpSession | None = None
    flow: Flow | None = None


def enable_keepalive(sock: socket.socket) -> None:
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


def announced_port(client_ip: str, host: str, port: int) -> int | None:
    """The source port to insist on, from the DST.ADDR/DST.PORT of the request.

    Only when the client named its own address (or none): a client behind NAT announces an
    address we never see, and its port is most likely rewritten as well, so then the relay
    locks onto the first port that datagrams really come from. The IP is never taken from the
    request: a client must not open the relay for another host.
    """
    if port == 0:
        return None
    try:
        ip = ipaddress.ip_address(host)
        same = ip.is_unspecified or ip == ipaddress.ip_address(client_ip)
    except ValueError:
        return None
    return port if same else None


class UdpAssociation:
    """The relay socket and the sessions of one association. `start()`, then `close()`."""

    # Limits (class attributes so that tests can lower them).
    max_sessions = 256  # destinations per association (max_udp_destinations_per_association)
    open_queue = 64  # datagrams held per destination while its session opens
    retry_interval = 1.0  # seconds before a destination whose open failed is tried again
    holdoff_limit = 1024  # failed destinations remembered for `retry_interval`

    def __init__(
        self,
        opener: FlowOpener,
        control: socket.socket,
        identity: str | None,
        announced: tuple[str, int] = ("0.0.0.0", 0),
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        self.opener = opener
        self.identity = identity
        self.vnet: str | None = None  # the on-ramp's virtual network, set by the on-ramp
        peer = control.getpeername()
        self.client_ip: str = peer[0]
        self.client_port = announced_port(self.client_ip, *announced)
        self.client_addr: Any = None  # the client's full sockaddr, once it has sent
        local = control.getsockname()
        sock = socket.socket(control.family, socket.SOCK_DGRAM)
        try:
            set_buffers(sock, SOCKET_BUFFER)
            # Same IP (and IPv6 scope) as the control connection, any port.
            sock.bind((local[0], 0, *local[2:]))
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._sender = GsoSender(sock, self._reply_dropped)
        self.dests: dict[Key, _Destination] = {}
        self._holdoff: dict[Key, float] = {}
        self._opening: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()
        self.watch = IdleWatch(idle_timeout, self._loop.time())
        self._reading = False
        self.closed = False
        self.stopped: asyncio.Future[None] = self._loop.create_future()

    @property
    def address(self) -> tuple[str, int]:
        """BND.ADDR and BND.PORT for the reply."""
        host, port = self.sock.getsockname()[:2]
        return str(host).split("%", 1)[0], int(port)

    def start(self) -> None:
        self._loop.add_reader(self.sock.fileno(), self._readable)
        self._reading = True

    def stop(self) -> None:
        """End the association from outside (its identity was revoked)."""
        if not self.stopped.done():
            self.stopped.set_result(None)

    def close(self) -> None:
        """End the association: the relay socket and every session (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self._reading:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        dests, self.dests = list(self.dests.values()), {}
        for dest in dests:
            dest.queue = None
            if dest.session is not None:
                try:
                    dest.session.close()
                except Exception:
                    log.exception("%s: closing a session failed", ONRAMP)
        # Sessions still opening are closed by `_open` when they arrive: cancelling the open
        # could leave a half-registered session behind in the opener.

    # -- client -> origin -----------------------------------------------------------------

    def _readable(self) -> None:
        for _ in range(READ_BATCH):
            if self.closed:
                return
            try:
                data, addr = self.sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.debug("%s: relay socket error: %s", ONRAMP, e)
                continue
            try:
                self._datagram(data, addr)
            except Exception:
                log.exception("%s: unexpected error on a datagram from %s", ONRAMP, addr)

    def _datagram(self, data: bytes, addr: Any) -> None:
        src = (str(addr[0]), int(addr[1]))
        if src[0] != self.client_ip or (
            self.client_port is not None and src[1] != self.client_port
        ):
            self._bad("foreign_source", src)
            return
        try:
            dg = socks5.parse_udp_datagram(data)
        except Socks5Error as e:
            self._bad(e.reason, src)
            return
        if dg.frag != 0:
            # Reassembly is optional in RFC 1928 and nobody sends fragments in practice.
            self._bad("fragment", src)
            return
        self.watch.active = True
        if self.client_addr is None:
            self.client_port = src[1]
            self.client_addr = addr
        key: Key = (dg.address_type, dg.host, dg.port)
        dest = self.dests.get(key)
        if dest is not None:
            if dest.session is not None:
                dest.session.send(dg.data)
            elif dest.queue is not None and len(dest.queue) < self.open_queue:
                dest.queue.append(dg.data)
            else:
                self._bad("queue_full", src)
            return
        until = self._holdoff.get(key)
        if until is not None:
            if self._loop.time() < until:
                self._bad("open_failed", src)
                return
            del self._holdoff[key]
        if len(self.dests) >= self.max_sessions:
            self._bad("too_many_sessions", src)
            return
        header = socks5.build_udp_header(dg.host, dg.port, dg.address_type)
        dest = _Destination(key, header)
        assert dest.queue is not None
        dest.queue.append(dg.data)
        self.dests[key] = dest
        task = self._loop.create_task(self._open(dest))
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)

    async def _open(self, dest: _Destination) -> None:
        _, host, port = dest.key
        assert self.client_port is not None
        flow = Flow(
            onramp=ONRAMP,
            protocol="udp",
            source=(self.client_ip, self.client_port),
            destination=Destination(host, port),
            identity=Identity(self.identity) if self.identity is not None else None,
            vnet=self.vnet,
        )
        dest.flow = flow
        try:
            session = await self.opener.open_udp(
                flow, partial(self._reply, dest), partial(self._session_closed, dest)
            )
        except Exception as e:
            if isinstance(e, FlowError):
                log.debug("%s flow %d to %s: %s", ONRAMP, flow.id, flow.destination, e.reason)
            else:
                log.exception("%s flow %d: opening failed", ONRAMP, flow.id)
            self._open_failed(dest)
            return
        if self.closed or self.dests.get(dest.key) is not dest:
            session.close()
            return
        dest.session = session
        queued, dest.queue = dest.queue, None
        for payload in queued or ():
            session.send(payload)

    def _open_failed(self, dest: _Destination) -> None:
        queued, dest.queue = dest.queue, None
        if self.closed or self.dests.get(dest.key) is not dest:
            return
        del self.dests[dest.key]
        holdoff = self._holdoff
        holdoff[dest.key] = self._loop.time() + self.retry_interval
        if len(holdoff) > self.holdoff_limit:
            now = self._loop.time()
            for key in [k for k, t in holdoff.items() if t <= now]:
                del holdoff[key]
            while len(holdoff) > self.holdoff_limit:
                del holdoff[next(iter(holdoff))]
        src = (self.client_ip, self.client_port or 0)
        for _ in queued or ():
            self._bad("open_failed", src)

    # -- origin -> client -----------------------------------------------------------------

    def _reply(self, dest: _Destination, payload: bytes) -> None:
        addr = self.client_addr
        if self.closed or addr is None:
            return
        self.watch.active = True
        # batched per loop turn with GSO; a full send buffer drops (drop-tail, as UDP does)
        self._sender.send(dest.header + payload, addr)

    def _reply_dropped(self, reason: str) -> None:
        # which flow it belonged to is gone by now (the send was batched); count it at the edge
        self.opener.bad_input(ONRAMP, f"reply_{reason}", (self.client_ip, self.client_port or 0))

    def _session_closed(self, dest: _Destination, reason: str) -> None:
        if self.dests.get(dest.key) is dest:
            del self.dests[dest.key]
        log.debug("%s session to %s closed: %s", ONRAMP, dest.key[1:], reason)

    def _bad(self, reason: str, src: tuple[str, int]) -> None:
        self.opener.bad_input(ONRAMP, reason, src)


async def _drain(control: socket.socket) -> None:
    """RFC 1928 gives the control connection no further use: read and ignore until it ends."""
    loop = asyncio.get_running_loop()
    try:
        while await loop.sock_recv(control, 4096):
            pass
    except OSError as e:
        log.debug("%s: control connection ended: %s", ONRAMP, e)


async def run_association(assoc: UdpAssociation, control: socket.socket) -> str:
    """Relay until the control connection ends (EOF, error, or cancellation), the association
    idles past its timeout, or it is stopped (revoked), then close it. Returns which: "ended",
    "idle" or "stopped" (for the last two the caller closes the control connection)."""
    loop = asyncio.get_running_loop()
    enable_keepalive(control)
    drain = loop.create_task(_drain(control))
    try:
        assoc.start()
        while True:
            done, _ = await asyncio.wait(
                {drain, assoc.stopped},
                timeout=assoc.watch.interval,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if drain in done:
                return "ended"
            if done:
                why = "stopped"
                break
            if assoc.watch.expired(loop.time()):
                why = "idle"
                break
        # let the read on the control socket go before its owner closes it
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain
        return why
    finally:
        drain.cancel()
        assoc.close()
