"""The edge's DNS listener (UDP and TCP on the same port).

Names under a zone routed to a tunnel are answered by that tunnel's connector (the opener's
`dns_query`); other names go to the configured upstream resolver, or get REFUSED when there is
none, so the edge is never an open resolver by accident. The client's query id is kept on
every answer.

UDP runs on a `PktinfoEndpoint`, so a listener on a wildcard address answers from the address
each client asked (clients drop answers from any other). Answers larger than the client can
take over UDP (its EDNS payload size, else 512 bytes) are truncated with TC set, and the
client retries over TCP. TCP follows RFC 7766: two-byte length framing, several queries per
connection answered as they complete, an idle timeout.

Everything is bounded: queries in flight (past the limit: REFUSED), TCP connections, queries
in flight per connection (reading pauses), and every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode
from pydantic import Field, field_validator

from ramp.config import EdgeConfig, parse_hostport
from ramp.flows.flow import FlowError
from ramp.flows.opener import FlowOpener
from ramp.flows.shares import POOL_FULL, Pool
from ramp.net.listen import AcceptErrors, accept_loop, tcp_listen_socket
from ramp.net.pktinfo import Address, PktinfoEndpoint
from ramp.onramps.registry import OnRampContext, OnRampOptions, register
from ramp.wire.dns import (
    HEADER_SIZE,
    QueryRejected,
    answer_for,
    describe,
    frame_length,
    header_reply,
    rcode_of,
    rcode_reply,
    read_query,
    tcp_frame,
    truncate,
    udp_limit,
)

log = logging.getLogger(__name__)

MAX_INFLIGHT = 1024  # queries being answered at once, UDP and TCP together
MAX_TCP_CONNECTIONS = 512
# once half the connections are taken, one address may hold only this many: a client that
# keeps refreshing idle connections cannot hold the listener for everyone
TCP_CONNECTIONS_PER_SOURCE = 32
MAX_PIPELINE = 32  # queries in flight on one TCP connection before reading pauses
TCP_IDLE_TIMEOUT = 10.0  # RFC 7766 6.2.3: seconds, not minutes
UDP_BUFFER = 1 << 20
PORT_RETRIES = 8  # port 0: tries to find a port free for both UDP and TCP


def _peer(addr: Any) -> tuple[str, int]:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return str(addr[0]), int(addr[1])
    return str(addr), 0


class DnsServer:
    """`DnsServer(config, opener)`, `await start(host, port)`, `port`, `await close()`."""

    onramp = "dns"

    def _count(self, outcome: str) -> None:
        self.stats[outcome] += 1
        if self._on_outcome is not None:
            self._on_outcome(outcome)

    def __init__(
        self,
        config: EdgeConfig,
        opener: FlowOpener,
        *,
        max_inflight: int = MAX_INFLIGHT,
        max_tcp_connections: int = MAX_TCP_CONNECTIONS,
        tcp_connections_per_source: int = TCP_CONNECTIONS_PER_SOURCE,
        tcp_idle_timeout: float = TCP_IDLE_TIMEOUT,
        on_outcome: Callable[[str], None] | None = None,
        accept_error: Callable[[str, str], None] | None = None,
    ) -> None:
        self.config = config
        self.accept_errors = AcceptErrors(
            "dns on-ramp (tcp)",
            (lambda what: accept_error(self.onramp, what)) if accept_error is not None else None,
        )
        self._on_outcome = on_outcome
        self.opener = opener
        self.max_inflight = max_inflight
        self.tcp_slots: Pool[str] = Pool(max_tcp_connections, tcp_connections_per_source)
        self.tcp_idle_timeout = tcp_idle_timeout
        self.upstream: tuple[str, int] | None = (
            parse_hostport(config.dns_upstream, default_port=53) if config.dns_upstream else None
        )
        # Outcomes by name: tunnel, upstream, refused, servfail, formerr, notimp, truncated ...
        self.stats: collections.Counter[str] = collections.Counter()
        self.inflight = 0
        self._udp: PktinfoEndpoint | None = None
        self._tcp: asyncio.Task[None] | None = None  # the TCP accept loop
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port over UDP and TCP (port 0 picks one free for both: see `port`)."""
        for attempt in range(PORT_RETRIES if port == 0 else 1):
            udp = PktinfoEndpoint(name="dns", buffer_size=UDP_BUFFER, on_error=self._endpoint_error)
            await udp.open(host, port, self._on_datagram)
            try:
                self._tcp = await self._listen_tcp(host, udp.port)
            except OSError as e:
                udp.close()
                if port == 0 and e.errno == errno.EADDRINUSE and attempt < PORT_RETRIES - 1:
                    continue
                raise
            self._udp = udp
            break
        log.info("dns on-ramp listening on %s:%d (udp, tcp)", *self.address)

    async def _listen_tcp(self, host: str, port: int) -> asyncio.Task[None]:
        sock = await tcp_listen_socket(host, port, name="dns")

        async def serve() -> None:
            try:
                await accept_loop(sock, self._accepted_tcp, self.accept_errors)
            finally:
                sock.close()

        return asyncio.create_task(serve())

    def _accepted_tcp(self, conn: socket.socket, addr: object) -> None:
        async def serve() -> None:
            try:
                reader, writer = await asyncio.open_connection(sock=conn)
            except OSError:
                conn.close()
                return
            await self._serve_tcp(reader, writer)

        task = asyncio.create_task(serve())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def address(self) -> tuple[str, int]:
        if self._udp is None:
            raise RuntimeError("not listening")
        return self._udp.address

    @property
    def tcp_connections(self) -> int:
        return self.tcp_slots.used

    @property
    def port(self) -> int:
        return self.address[1]

    async def stop_accepting(self) -> None:
        """Stop taking queries (a successor reads the socket); answers in flight still go."""
        if self._udp is not None:
            self._udp.pause()
        if self._tcp is not None:
            self._tcp.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tcp
            self._tcp = None

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tcp
            self._tcp = None
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _endpoint_error(self, reason: str) -> None:
        self._count(f"udp_{reason}")

    def _start_answer(self, coro: Any) -> asyncio.Task[None]:
        """Run the answer to an admitted query. Its in-flight slot is released when the task
        ends, also when it is cancelled before it ever ran."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._answer_done)
        return task

    def _answer_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.inflight -= 1

    # -- one query ----------------------------------------------------------------------------

    def _admit(
        self, wire: bytes, peer: tuple[str, int]
    ) -> tuple[dns.message.Message | None, bytes | None]:
        """Parse a query. Returns (query, None) to answer it, counting it as in flight (the
        caller must then `_start_answer`); or (None, reply) to send `reply` at once; or
        (None, None) to drop it."""
        try:
            query = read_query(wire)
        except QueryRejected as e:
            if e.outcome is not None:
                self._count(e.outcome)
            if e.reason is not None:
                self.opener.bad_input(self.onramp, e.reason, peer)
            log.debug("dns %s:%d: %s", *peer, e)
            return None, e.reply
        if self.inflight >= self.max_inflight:
            self._count("refused")
            self.opener.bad_input(self.onramp, "too_many_queries", peer)
            return None, rcode_reply(query, dns.rcode.REFUSED)
        self.inflight += 1
        return query, None

    async def _answer(
        self, query: dns.message.Message, wire: bytes, transport: str, peer: tuple[str, int]
    ) -> bytes:
        """The answer to an admitted query: from the tunnel, the upstream, or an error."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.dns_timeout
        source = "tunnel"
        try:
            async with asyncio.timeout_at(deadline):
                answer = await self.opener.dns_query(wire)
            if answer is None:
                if self.upstream is None:
                    source, answer = "refused", rcode_reply(query, dns.rcode.REFUSED)
                else:
                    source = "upstream"
                    answer = await self._forward(query, deadline)
        except (FlowError, TimeoutError, OSError, dns.exception.DNSException) as e:
            log.debug("dns %s:%d: %s via %s failed: %s", *peer, describe(query), source, e)
            source, answer = "servfail", rcode_reply(query, dns.rcode.SERVFAIL)
        except Exception:
            log.exception("dns %s:%d: answering %s failed", *peer, describe(query))
            source, answer = "servfail", rcode_reply(query, dns.rcode.SERVFAIL)
        if len(answer) < HEADER_SIZE:
            source, answer = "servfail", rcode_reply(query, dns.rcode.SERVFAIL)
        answer = answer_for(answer, wire)
        if transport == "udp":
            limit = udp_limit(query)
            if len(answer) > limit:
                self._count("truncated")
                answer = truncate(answer, query, limit)
        self._count(source)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "dns %s %s:%d %s -> %s via %s (%d bytes)",
                transport,
                *peer,
                describe(query),
                dns.rcode.to_text(rcode_of(answer)),
                source,
                len(answer),
            )
        return answer

    async def _forward(self, query: dns.message.Message, deadline: float) -> bytes:
        """Ask the upstream resolver: UDP, then TCP when the answer comes back truncated."""
        assert self.upstream is not None
        host, port = self.upstream
        loop = asyncio.get_running_loop()
        r = await dns.asyncquery.udp(
            query,
            host,
            timeout=max(0.01, deadline - loop.time()),
            port=port,
            ignore_unexpected=True,
        )
        if r.flags & dns.flags.TC:
            r = await dns.asyncquery.tcp(
                query, host, timeout=max(0.01, deadline - loop.time()), port=port
            )
        return r.to_wire(max_size=65535)

    # -- UDP ----------------------------------------------------------------------------------

    def _on_datagram(self, data: bytes, addr: Address, local_ip: str) -> None:
        peer = _peer(addr)
        query, reply = self._admit(data, peer)
        if reply is not None and self._udp is not None:
            self._udp.sendto(reply, addr, local_ip)
        if query is not None:
            self._start_answer(self._answer_udp(query, data, addr, local_ip))

    async def _answer_udp(
        self, query: dns.message.Message, wire: bytes, addr: Address, local_ip: str
    ) -> None:
        answer = await self._answer(query, wire, "udp", _peer(addr))
        if self._udp is not None:
            self._udp.sendto(answer, addr, local_ip)

    # -- TCP ----------------------------------------------------------------------------------

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer.get_extra_info("peername"))
        why = self.tcp_slots.try_take(peer[0]) if self._tcp is not None else POOL_FULL
        if why is not None:
            self.opener.bad_input(
                self.onramp,
                "too_many_connections" if why == POOL_FULL else "too_many_connections_from_source",
                peer,
            )
            writer.transport.abort()
            return
        slots = asyncio.Semaphore(MAX_PIPELINE)
        lock = asyncio.Lock()
        pending: set[asyncio.Task[None]] = set()
        try:
            while await self._read_tcp_query(reader, writer, peer, slots, lock, pending):
                pass
            # The client may half-close after its last query: answer what is in flight first.
            if pending:
                await asyncio.wait(pending, timeout=self.config.dns_timeout + 1)
        except (ConnectionError, OSError) as e:
            log.debug("dns tcp %s:%d: %s", *peer, e)
        finally:
            for t in pending:
                t.cancel()
            self.tcp_slots.release(peer[0])
            writer.close()

    async def _read_tcp_query(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: tuple[str, int],
        slots: asyncio.Semaphore,
        lock: asyncio.Lock,
        pending: set[asyncio.Task[None]],
    ) -> bool:
        """Read one framed query and start answering it; False when the connection is done."""
        try:
            async with asyncio.timeout(self.tcp_idle_timeout):
                head = await reader.readexactly(2)
        except asyncio.IncompleteReadError as e:
            if e.partial:
                self.opener.bad_input(self.onramp, "truncated_length", peer)
            return False
        except TimeoutError:
            log.debug("dns tcp %s:%d: idle, closing", *peer)
            return False
        size = frame_length(head)
        try:
            async with asyncio.timeout(self.config.handshake_timeout):
                wire = await reader.readexactly(size)
        except (asyncio.IncompleteReadError, TimeoutError):
            self.opener.bad_input(self.onramp, "truncated_message", peer)
            return False
        await slots.acquire()  # before admitting, so a cancel here leaks no in-flight slot
        query, reply = self._admit(wire, peer)
        if query is None:
            slots.release()
            if reply is not None:
                await self._write_tcp(writer, lock, reply)
            return True
        t = self._start_answer(self._answer_tcp(query, wire, peer, writer, lock))
        pending.add(t)
        t.add_done_callback(lambda t: (pending.discard(t), slots.release()))
        return True

    async def _answer_tcp(
        self,
        query: dns.message.Message,
        wire: bytes,
        peer: tuple[str, int],
        writer: asyncio.StreamWriter,
        lock: asyncio.Lock,
    ) -> None:
        answer = await self._answer(query, wire, "tcp", peer)
        try:
            await self._write_tcp(writer, lock, answer)
        except (ConnectionError, OSError) as e:
            log.debug("dns tcp %s:%d: %s", *peer, e)

    async def _write_tcp(
        self, writer: asyncio.StreamWriter, lock: asyncio.Lock, msg: bytes
    ) -> None:
        async with lock:
            writer.write(tcp_frame(msg))
            try:
                async with asyncio.timeout(self.tcp_idle_timeout):
                    await writer.drain()
            except TimeoutError:
                # The client does not read its answers: stop buffering for it.
                writer.transport.abort()
                raise ConnectionError("client not reading") from None


__all__ = ["DnsServer", "header_reply", "truncate", "udp_limit"]


class DnsOptions(OnRampOptions):
    takes_proxy_protocol = False

    tcp_connections_per_source: int = Field(
        TCP_CONNECTIONS_PER_SOURCE,
        ge=0,
        description="DNS-over-TCP connections one client address may hold once half of the "
        f"listener's {MAX_TCP_CONNECTIONS} are taken; 0 = no share.",
    )

    @field_validator("vnet")
    @classmethod
    def _default_vnet_only(cls, v: str | None) -> str | None:
        # DNS zone routes belong to the default virtual network (see policy.router)
        if v not in (None, "default"):
            raise ValueError("the DNS listener answers for the default virtual network only")
        return v


def _build(ctx: OnRampContext, options: DnsOptions) -> DnsServer:
    return DnsServer(
        ctx.config,
        ctx.opener,
        tcp_connections_per_source=options.tcp_connections_per_source,
        on_outcome=ctx.dns_outcome,
        accept_error=ctx.accept_error,
    )


register(
    "dns",
    DnsOptions,
    _build,
    "DNS listener (UDP and TCP): routed zones through tunnels, others upstream",
)
