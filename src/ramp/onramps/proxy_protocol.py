"""PROXY protocol in: a TCP on-ramp behind a load balancer learns the real client address.

`proxy_protocol: {mode: required|optional, trusted: [CIDR, ...]}` on a TCP on-ramp. A header
is read only from a peer in `trusted`; the flow's source is then the header's address, for
policy, hooks, shares, audit and what goes onward. `required`: every connection must come
from a trusted peer and start with a header. `optional`: a trusted peer may send one, any other
peer is served as itself; either way the edge waits for the client's first bytes, so optional
mode suits protocols where the client speaks first (SOCKS5, HTTP).

The header is read with MSG_PEEK and consumed to its last byte only, so what follows stays in
the socket for the on-ramp's own handshake (and for splice). Anything wrong closes the
connection, counted as `ramp_bad_input{reason=proxy_header_*}`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ramp.wire import proxy_protocol as pp

PEEK_SIZE = pp.V2_HEADER + pp.DEFAULT_MAX_V2_LENGTH
SHORT_PREFIX_POLL = 0.005


class ProxyProtocolOptions(BaseModel):
    """PROXY protocol (v1 and v2) from load balancers in front of this on-ramp."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["required", "optional"] = Field(
        description="required: only trusted peers may connect, each starting with a PROXY "
        "header; optional: trusted peers may send one, other peers connect as themselves "
        "(the edge then waits for the client's first bytes: for client-speaks-first "
        "protocols).",
    )
    trusted: list[str] = Field(
        min_length=1,
        description="CIDRs of the load balancers whose PROXY headers are believed; a header "
        "from any other address closes the connection (reason proxy_header_untrusted).",
    )
    timeout: float = Field(
        5.0,
        gt=0,
        description="Seconds a trusted peer has to send its whole header (reason "
        "proxy_header_timeout).",
    )

    @field_validator("trusted")
    @classmethod
    def _check_cidrs(cls, v: list[str]) -> list[str]:
        for cidr in v:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"bad CIDR {cidr!r}") from None
        return v


class ProxyRefused(Exception):
    """The connection must be closed; `reason` is the bad-input counter's label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class PeerClosed(Exception):
    """The peer closed before sending anything (a health check's connect-and-close)."""


@dataclass(frozen=True, slots=True)
class Admitted:
    """What the gate decided: the flow's source, and the header if one came."""

    source: tuple[str, int]
    header: pp.ProxyHeader | None = None


class ProxyGate:
    """The `proxy_protocol` option of one listener, compiled."""

    def __init__(self, options: ProxyProtocolOptions) -> None:
        self.options = options
        self.required = options.mode == "required"
        self.timeout = options.timeout
        nets = [ipaddress.ip_network(c, strict=False) for c in options.trusted]
        self._v4 = [n for n in nets if n.version == 4]
        self._v6 = [n for n in nets if n.version == 6]

    def trusts(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        nets = self._v4 if ip.version == 4 else self._v6
        return any(ip in n for n in nets)  # type: ignore[operator]

    async def admit(self, sock: socket.socket, peer: tuple[str, int]) -> Admitted:
        """Read the header if this peer may (and must) send one; raises ProxyRefused or
        PeerClosed. Call under `timeout`."""
        trusted = self.trusts(peer[0])
        if self.required and not trusted:
            raise ProxyRefused("proxy_source_untrusted", f"{peer[0]} is not a trusted proxy")
        loop = asyncio.get_running_loop()
        first = await _peek(loop, sock)
        starts = pp.signature_state(first)
        while starts is None and first:
            # a few bytes that may begin a signature or a request ("P", "\r\n"): they cannot
            # be taken before that is clear, so look again shortly (rare: a first segment
            # is rarely this short)
            await asyncio.sleep(SHORT_PREFIX_POLL)
            more = await _peek(loop, sock)
            if len(more) == len(first):
                continue
            first = more
            starts = pp.signature_state(first)
        if not first:
            raise PeerClosed()
        if starts is False:
            if self.required:
                raise ProxyRefused("proxy_header_missing", "no PROXY header")
            return Admitted(peer)
        if not trusted:
            raise ProxyRefused("proxy_header_untrusted", f"PROXY header from {peer[0]}")
        header = await self._read(loop, sock, first)
        client = header.client
        return Admitted(client if client is not None else peer, header)

    async def _read(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes
    ) -> pp.ProxyHeader:
        taken = b""  # consumed already: all of it header
        while True:
            try:
                got = pp.parse(taken + data)
            except pp.ProxyProtocolError as e:
                raise ProxyRefused("proxy_header_malformed", f"{e} ({e.reason})") from None
            if got is pp.NEED_DATA:
                # every byte seen is header: take them, so the next peek shows new ones
                taken += _take(sock, len(data))
                data = await _peek(loop, sock)
                if not data:
                    raise ProxyRefused("proxy_header_truncated", "closed within the header")
                continue
            assert isinstance(got, tuple)
            header, used = got
            _take(sock, used - len(taken))
            return header


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


def _take(sock: socket.socket, n: int) -> bytes:
    """Consume `n` bytes already seen with MSG_PEEK (they are in the socket: no waiting)."""
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ProxyRefused("proxy_header_truncated", "closed within the header")
        out += chunk
    return out


async def _peek(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """Bytes waiting in the socket, without taking them; waits until there are some (or
    EOF: b"")."""
    while True:
        try:
            return sock.recv(PEEK_SIZE, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            pass
        ready = loop.create_future()
        fd = sock.fileno()
        loop.add_reader(fd, _wake, ready)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
