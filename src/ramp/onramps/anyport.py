"""The any-port on-ramp: every port of every address of a prefix on one socket (Spectrum).

    {type: anyport, prefix: 203.0.113.0/24, ports: 1-65535, to: {host: 198.51.100.10}}

One TCP listening socket (or one UDP socket) gets all of it, by one of two mechanisms
(`mechanism`, logged at start; see `ramp.net.sk_lookup` and `ramp.net.tproxy`):

- sk_lookup: a BPF program attached to the network namespace hands the kernel's socket lookup
  for the prefix and ports to this socket (cloudflare/tubular's design);
- TPROXY: an nftables tproxy rule delivers them to the socket, made IP_TRANSPARENT.

Either way a TCP connection's `getsockname()` is the address and port the client dialled, and a
datagram's IP_ORIGDSTADDR control message says the same for UDP. The mapping (`anyport_map`)
turns that into the flow's destination, and the flow takes the normal path: policy, hooks,
router, tunnel or direct egress, audit and metrics (on-ramp label `anyport`).

UDP replies leave from exactly the address and port the client sent to. IP_PKTINFO can fix a
reply's source address but not its port (in_pktinfo has no port field: udp-sockets-basics.txt),
and the one socket is bound elsewhere; so each dialled (address, port) gets a send-only socket
bound to it, IP_TRANSPARENT (the address need not be local for TPROXY) and SO_REUSEADDR.
Unconnected, it never takes the incoming datagrams away: sk_lookup's choice, and TPROXY's
listener lookup, win over unconnected bound sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ramp.flows.flow import Destination, Flow, FlowError
from ramp.flows.opener import FlowOpener, UdpSession
from ramp.net.gso import GsoSender
from ramp.net.sk_lookup import SkLookup
from ramp.net.sockopts import set_buffers
from ramp.net.tproxy import (
    IP_ORIGDSTADDR,
    IP_RECVORIGDSTADDR,
    IP_TRANSPARENT,
    IPV6_ORIGDSTADDR,
    IPV6_RECVORIGDSTADDR,
    IPV6_TRANSPARENT,
    Installed,
    StateDir,
    SteeringError,
    install_local_prefix,
    install_tproxy,
)
from ramp.onramps.anyport_map import AnyportOptions, PortMap
from ramp.onramps.registry import OnRampContext, register
from ramp.onramps.tcp_listener import FlowPlan, TcpOnRamp, peer_of

log = logging.getLogger(__name__)

ONRAMP = "anyport"
# the flow's annotation (in its audit line, seen by hooks) holding the address and port the
# client dialled: the destination is where the mapping sent it
DIALLED = "dialled"
MAX_DATAGRAM = 65535
READ_BATCH = 64
SOCKET_BUFFER = 4 << 20
_SOCKADDR_IN = struct.Struct("!2xH4s")  # struct sockaddr_in: family (skipped), port, address
_SOCKADDR_IN6 = struct.Struct("!2xH4x16s")  # sockaddr_in6: family, port, flowinfo, address
_ANCBUF = socket.CMSG_SPACE(28) + 64


def set_transparent(sock: socket.socket) -> None:
    """IP_TRANSPARENT (IPV6_TRANSPARENT): accept TPROXY's packets, bind and send from
    addresses that are not local."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)


class Steered:
    """How traffic reaches one socket, and undoing it."""

    def __init__(self) -> None:
        self.mechanism = ""
        self.sk_lookup: SkLookup | None = None
        self.installed: Installed | None = None

    def close(self) -> None:
        if self.sk_lookup is not None:
            self.sk_lookup.close()  # closing the link detaches the program
            self.sk_lookup = None
        if self.installed is not None:
            try:
                self.installed.remove()
            except Exception:
                log.exception("anyport: removing the steering rules failed")
            self.installed = None


def _hostport(addr: tuple[str, int]) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def state_dir(config: Any) -> StateDir:
    return StateDir(Path(config.data_dir) / "anyport")


def steer(sock: socket.socket, options: AnyportOptions, states: StateDir) -> Steered:
    """Bring the prefix's traffic to `sock` with sk_lookup or TPROXY (as `options.mechanism`
    says; auto: sk_lookup unless it does not load) and log which one."""
    network, ports = options.network, options.port_range
    address = str(network.network_address).replace(":", "_")
    name = f"{options.protocol}-{address}-{network.prefixlen}-{ports[0]}-{ports[1]}"
    states.reap()
    out = Steered()
    listen = peer_of(sock.getsockname())
    where = _hostport(listen)
    what = f"anyport {options.protocol} {network} ports {ports[0]}-{ports[1]}"
    try:
        if options.mechanism in ("auto", "sk_lookup"):
            try:
                out.sk_lookup = SkLookup(sock, [network], ports)
            except OSError as e:  # BpfError, or no bpf(2) here
                if options.mechanism == "sk_lookup":
                    raise SteeringError(f"{what}: the sk_lookup program did not load: {e}") from e
                log.warning("%s: sk_lookup unavailable (%s); falling back to TPROXY", what, e)
            else:
                out.installed = install_local_prefix(states, name, network)
                out.mechanism = "sk_lookup"
                log.info(
                    "%s: sk_lookup steers to %s (BPF program id %d, link id %d)",
                    what,
                    where,
                    out.sk_lookup.prog_id,
                    out.sk_lookup.link_id,
                )
                return out
        set_transparent(sock)
        out.installed = install_tproxy(states, name, options.protocol, network, ports, listen)
        out.mechanism = "tproxy"
        assert out.installed.state.nft_table is not None
        log.info(
            "%s: TPROXY steers to %s (nftables table %s %s, fwmark and routing table %s)",
            what,
            where,
            out.installed.state.nft_family,
            out.installed.state.nft_table,
            out.installed.state.rules[0][1],
        )
        return out
    except BaseException:
        out.close()
        raise


# --- TCP -------------------------------------------------------------------------------------


class AnyportTcp(TcpOnRamp):
    onramp = ONRAMP

    def __init__(
        self,
        config: Any,
        opener: Any,
        options: AnyportOptions,
        accept_error: Callable[[str, str], None] | None = None,
    ) -> None:
        super().__init__(config, opener, options, accept_error=accept_error)
        self.map = PortMap.from_options(options)
        self.anyport = options
        self.steered: Steered | None = None

    @property
    def mechanism(self) -> str:
        return self.steered.mechanism if self.steered is not None else ""

    async def start(self, host: str, port: int) -> None:
        await super().start(host, port)
        assert self._sock is not None
        try:
            self.steered = steer(self._sock, self.anyport, state_dir(self.config))
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self.steered is not None:
            self.steered.close()
            self.steered = None
        await super().close()

    async def _run_flow(self, sock: socket.socket, flow: Flow, plan: FlowPlan) -> None:
        flow.annotations[DIALLED] = _hostport(peer_of(sock.getsockname()))
        await super()._run_flow(sock, flow, plan)

    async def _handshake(self, sock: socket.socket, peer: tuple[str, int]) -> FlowPlan | None:
        local = peer_of(sock.getsockname())  # the address and port the client dialled
        destination = self.map.lookup(*local)
        if destination is None:
            reason = "no_rule" if self.map.claims(*local) else "not_in_prefix"
            self.opener.bad_input(ONRAMP, reason, peer)
            return None
        return FlowPlan(
            destination=destination,
            identity=None,
            ok_reply=b"",
            error_reply=lambda result: b"",
            busy_reply=b"",
        )


# --- UDP -------------------------------------------------------------------------------------

Key = tuple[tuple[str, int], tuple[str, int]]  # (client, dialled)


@dataclass(eq=False, slots=True)
class _Reply:
    """The send-only socket of one dialled (address, port)."""

    sock: socket.socket
    sender: GsoSender
    users: int = 0


@dataclass(eq=False, slots=True)
class _UdpFlow:
    key: Key
    queue: list[bytes] | None = field(default_factory=list)  # while the session opens
    session: UdpSession | None = None
    reply: _Reply | None = None


def parse_origdst(ancdata: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    """The (address, port) a datagram was sent to, from its IP_ORIGDSTADDR message."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_ORIGDSTADDR and len(data) >= 8:
            port, addr = _SOCKADDR_IN.unpack_from(data)
            return socket.inet_ntoa(addr), port
        if level == socket.IPPROTO_IPV6 and kind == IPV6_ORIGDSTADDR and len(data) >= 24:
            port, addr = _SOCKADDR_IN6.unpack_from(data)
            return socket.inet_ntop(socket.AF_INET6, addr), port
    return None


class AnyportUdp:
    """One UDP socket for the prefix; one flow (UDP session) per client and dialled
    address and port."""

    onramp = ONRAMP
    open_queue = 64  # datagrams held per flow while its session opens
    retry_interval = 1.0  # seconds a flow whose open failed drops datagrams before a retry
    holdoff_limit = 4096  # failed flows remembered for `retry_interval`

    def __init__(
        self,
        config: Any,
        opener: FlowOpener,
        options: AnyportOptions,
        dropped: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.opener = opener
        self.options = options
        self.map = PortMap.from_options(options)
        self._dropped = dropped
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.flows: dict[Key, _UdpFlow] = {}
        self.replies: dict[tuple[str, int], _Reply] = {}
        self._holdoff: dict[Key, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.steered: Steered | None = None

    @property
    def mechanism(self) -> str:
        return self.steered.mechanism if self.steered is not None else ""

    @property
    def port(self) -> int:
        if self._sock is None:
            raise RuntimeError("not listening")
        return int(self._sock.getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, 1)
            set_buffers(sock, SOCKET_BUFFER)
            sock.bind((host, port))
            sock.setblocking(False)
            self.steered = steer(sock, self.options, state_dir(self.config))
        except BaseException:
            sock.close()
            raise
        self._sock, self._loop = sock, loop
        loop.add_reader(sock.fileno(), self._readable)
        log.info("%s on-ramp (udp) on %s:%d", ONRAMP, host, self.port)

    async def close(self) -> None:
        if self.steered is not None:
            self.steered.close()
            self.steered = None
        if self._sock is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        flows, self.flows = list(self.flows.values()), {}
        for flow in flows:
            flow.queue = None
            if flow.session is not None:
                with contextlib.suppress(Exception):
                    flow.session.close()
        # Sessions still opening are closed by `_open` when they arrive (the flow is gone from
        # `flows`): cancelling the open could leave a half-registered session in the opener.
        for reply in self.replies.values():
            reply.sock.close()
        self.replies.clear()

    # -- client -> origin -----------------------------------------------------------------

    def _readable(self) -> None:
        for _ in range(READ_BATCH):
            sock = self._sock
            if sock is None:
                return
            try:
                data, ancdata, flags, addr = sock.recvmsg(MAX_DATAGRAM, _ANCBUF)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.debug("%s: receive error: %s", ONRAMP, e)
                continue
            peer = peer_of(addr)
            if flags & socket.MSG_TRUNC:
                self._bad("truncated", peer)
                continue
            dialled = parse_origdst(ancdata)
            if dialled is None:
                self._bad("no_origdst", peer)
                continue
            try:
                self._datagram(data, peer, dialled)
            except Exception:
                log.exception("%s: unexpected error on a datagram from %s", ONRAMP, peer)

    def _datagram(self, data: bytes, peer: tuple[str, int], dialled: tuple[str, int]) -> None:
        key: Key = (peer, dialled)
        flow = self.flows.get(key)
        if flow is not None:
            if flow.session is not None:
                flow.session.send(data)
            elif flow.queue is not None and len(flow.queue) < self.open_queue:
                flow.queue.append(data)
            else:
                self._bad("queue_full", peer)
            return
        assert self._loop is not None
        until = self._holdoff.get(key)
        if until is not None:
            if self._loop.time() < until:
                self._bad("open_failed", peer)
                return
            del self._holdoff[key]
        destination = self.map.lookup(*dialled)
        if destination is None:
            self._bad("no_rule" if self.map.claims(*dialled) else "not_in_prefix", peer)
            return
        if len(self.flows) >= self.config.max_flows:
            self._bad("too_many_flows", peer)
            return
        flow = _UdpFlow(key, [data])
        self.flows[key] = flow
        task = self._loop.create_task(self._open(flow, destination))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self, flow: _UdpFlow, destination: Destination) -> None:
        peer, dialled = flow.key
        try:
            reply = self._reply_socket(dialled)
        except OSError as e:
            log.warning("%s: cannot send from %s:%d: %s", ONRAMP, *dialled, e)
            self._open_failed(flow)
            return
        reply.users += 1
        flow.reply = reply
        record = Flow(
            onramp=ONRAMP,
            protocol="udp",
            source=peer,
            destination=destination,
            vnet=self.options.vnet,
            annotations={DIALLED: _hostport(dialled)},
        )
        try:
            session = await self.opener.open_udp(
                record, partial(self._reply, flow), partial(self._session_closed, flow)
            )
        except Exception as e:
            if isinstance(e, FlowError):
                log.debug("%s flow %d to %s: %s", ONRAMP, record.id, destination, e.reason)
            else:
                log.exception("%s flow %d: opening failed", ONRAMP, record.id)
            self._open_failed(flow)
            return
        if self.flows.get(flow.key) is not flow:
            session.close()
            self._release(flow)
            return
        flow.session = session
        queued, flow.queue = flow.queue, None
        for payload in queued or ():
            session.send(payload)

    def _open_failed(self, flow: _UdpFlow) -> None:
        queued, flow.queue = flow.queue, None
        self._release(flow)
        if self.flows.get(flow.key) is not flow:
            return
        del self.flows[flow.key]
        assert self._loop is not None
        self._holdoff[flow.key] = self._loop.time() + self.retry_interval
        if len(self._holdoff) > self.holdoff_limit:
            now = self._loop.time()
            self._holdoff = {k: t for k, t in self._holdoff.items() if t > now}
            while len(self._holdoff) > self.holdoff_limit:  # the oldest go first
                del self._holdoff[next(iter(self._holdoff))]
        for _ in queued or ():
            self._bad("open_failed", flow.key[0])

    # -- origin -> client -----------------------------------------------------------------

    def _reply_socket(self, dialled: tuple[str, int]) -> _Reply:
        reply = self.replies.get(dialled)
        if reply is not None:
            return reply
        family = socket.AF_INET6 if ":" in dialled[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            set_transparent(sock)
            sock.bind(dialled)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        reply = _Reply(sock, GsoSender(sock, self._reply_dropped))
        self.replies[dialled] = reply
        return reply

    def _reply(self, flow: _UdpFlow, payload: bytes) -> None:
        if flow.reply is not None and self.flows.get(flow.key) is flow:
            flow.reply.sender.send(payload, flow.key[0])

    def _reply_dropped(self, reason: str) -> None:
        if self._dropped is not None:
            self._dropped(f"anyport_reply_{reason}")

    def _release(self, flow: _UdpFlow) -> None:
        reply, flow.reply = flow.reply, None
        if reply is None:
            return
        reply.users -= 1
        if reply.users <= 0:
            reply.sender.flush()
            for dialled, r in list(self.replies.items()):
                if r is reply:
                    del self.replies[dialled]
            reply.sock.close()

    def _session_closed(self, flow: _UdpFlow, reason: str) -> None:
        if self.flows.get(flow.key) is flow:
            del self.flows[flow.key]
        self._release(flow)
        log.debug("%s session %s -> %s closed: %s", ONRAMP, *flow.key, reason)

    def _bad(self, reason: str, peer: tuple[str, int]) -> None:
        self.opener.bad_input(ONRAMP, reason, peer)


def _build(ctx: OnRampContext, options: AnyportOptions) -> AnyportTcp | AnyportUdp:
    if options.protocol == "udp":
        return AnyportUdp(ctx.config, ctx.opener, options, ctx.datagram_dropped)
    return AnyportTcp(ctx.config, ctx.opener, options, accept_error=ctx.accept_error)


register(
    "anyport",
    AnyportOptions,
    _build,
    "every port of every address of a prefix, on one socket (sk_lookup or TPROXY)",
)
