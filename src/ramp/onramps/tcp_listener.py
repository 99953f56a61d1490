"""What the TCP proxy on-ramps (SOCKS5, HTTP CONNECT) share.

Each on-ramp works on raw non-blocking sockets with `loop.sock_*` rather than asyncio streams,
because the relay takes the client socket afterwards and moves bytes with `os.splice`. An on-ramp
subclass only implements `_handshake`: read the request, answer protocol-level errors, and return
a `FlowPlan`. This class owns listening, limits, opening the flow, the reply, the relay hand-off
and the one `flow_finished` call per flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ramp.flows.endpoint import StreamEndpoint
from ramp.flows.flow import Destination, Flow, FlowError, FlowResult, FlowState, Identity
from ramp.flows.moved import FlowMoved
from ramp.flows.opener import FlowOpener, TcpLeg
from ramp.flows.shares import POOL_FULL, Pool
from ramp.net.listen import AcceptErrors, accept_loop, tcp_listen_socket
from ramp.onramps.proxy_protocol import PeerClosed, ProxyGate, ProxyRefused

if TYPE_CHECKING:
    from ramp.config import EdgeConfig
    from ramp.onramps.registry import OnRampOptions
    from ramp.policy.identities import ClientCredentials

log = logging.getLogger(__name__)

RECV_SIZE = 16384
# After an error reply, read (and drop) what the client still sends for this long, so that
# closing with unread data does not turn into an RST that destroys the reply in flight.
LINGER_SECONDS = 1.0
LINGER_BYTES = 65536
CLIENT_GONE = "client went away while opening"


class HandshakeEOF(Exception):
    """The client closed before finishing its request; `got_bytes` says if it sent anything."""

    def __init__(self, got_bytes: bool) -> None:
        super().__init__("client closed during handshake")
        self.got_bytes = got_bytes


@dataclass(slots=True)
class FlowPlan:
    """A parsed request, ready to become a flow."""

    destination: Destination
    identity: str | None  # the authenticated user name, None without credentials
    ok_reply: bytes  # sent once the leg is open (may be empty)
    error_reply: Callable[[FlowResult], bytes]  # sent when opening fails
    busy_reply: bytes  # sent when max_flows is reached
    initial: bytes = b""  # bytes for the origin before the client's stream
    # Set when the relay must not see the raw client stream (an absolute-form HTTP request:
    # only that request's body goes to the origin): wraps the client socket for it.
    client: Callable[[socket.socket], StreamEndpoint] | None = None
    # Whether an EOF from the client while the flow opens means it went away. Not for a
    # request that is complete already (absolute-form HTTP): an HTTP/1.0 client may half-close
    # after it and still wait for the answer; a reset still counts.
    eof_is_gone: bool = True
    # Set when the connection is not one TCP flow (a SOCKS5 UDP association): it counts
    # against max_flows like one, and the on-ramp serves it itself until it ends.
    serve: Callable[[socket.socket], Awaitable[None]] | None = None
    # The proxy request for `connect_request` hooks (policy.hooks.ProxyRequest), and how to
    # send a hook's own answer (policy.hooks.Reply) in this on-ramp's protocol.
    request: object | None = None
    answer: Callable[[Any], bytes] | None = None
    # How another worker rebuilds `client` (a moved flow): a kind in CLIENT_REBUILDERS and
    # the raw bytes the on-ramp read.
    resume: tuple[str, bytes] | None = None


# an on-ramp's way back from FlowPlan.resume to FlowPlan.client; raises ValueError
ClientRebuilder = Callable[[bytes], Callable[[socket.socket], StreamEndpoint]]
CLIENT_REBUILDERS: dict[str, ClientRebuilder] = {}


def plan_to_dict(plan: FlowPlan) -> dict[str, Any] | None:
    """What another worker needs to answer and relay for this plan (ramp.flows.moved), or
    None for a plan that cannot move (its client is wrapped, or served by the on-ramp)."""
    if plan.serve is not None or (plan.client is not None and plan.resume is None):
        return None
    resume = None if plan.resume is None else [plan.resume[0], plan.resume[1].hex()]
    return {
        "resume": resume,
        "ok": plan.ok_reply.hex(),
        "errors": {r.value: plan.error_reply(r).hex() for r in FlowResult},
        "busy": plan.busy_reply.hex(),
        "initial": plan.initial.hex(),
        "eof_is_gone": plan.eof_is_gone,
    }


def plan_from_dict(d: dict[str, Any], destination: Destination) -> FlowPlan:
    """The plan `plan_to_dict` described; raises KeyError or ValueError when malformed."""
    errors = {FlowResult(k): bytes.fromhex(v) for k, v in d["errors"].items()}
    client = None
    if d.get("resume"):
        kind, raw = d["resume"]
        rebuild = CLIENT_REBUILDERS.get(str(kind))
        if rebuild is None:
            raise ValueError(f"no on-ramp rebuilds a {kind!r} client")
        client = rebuild(bytes.fromhex(raw))
    return FlowPlan(
        destination=destination,
        identity=None,
        ok_reply=bytes.fromhex(d["ok"]),
        error_reply=lambda result: errors.get(result, b""),
        busy_reply=bytes.fromhex(d["busy"]),
        initial=bytes.fromhex(d["initial"]),
        eof_is_gone=bool(d["eof_is_gone"]),
        client=client,
    )


# hands a client socket, its flow and plan to worker N; False when that cannot be done
FlowMover = Callable[[socket.socket, Flow, FlowPlan, int], Awaitable[bool]]


def peer_of(addr: object) -> tuple[str, int]:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return str(addr[0]), int(addr[1])
    return str(addr), 0


def check_user(users: dict[str, str], username: bytes, password: bytes) -> str | None:
    """The user name if the credentials match a configured user, else None."""
    try:
        name = username.decode("utf-8")
    except UnicodeDecodeError:
        return None
    expected = users.get(name)
    # Compare against something even for unknown users so timing does not reveal names.
    ok = hmac.compare_digest(password, (expected if expected is not None else "\0").encode())
    return name if ok and expected is not None else None


class TcpOnRamp:
    """Listener, limits and flow lifecycle for one TCP proxy on-ramp."""

    onramp = "tcp"
    # The role's client identities (set by the builder), accepted besides the config's users;
    # None: config users only.
    credentials: ClientCredentials | None = None
    # (on-ramp, version, kind) of each PROXY header accepted (set by the builder): counted
    proxy_header_seen: Callable[[str, str, str], None] | None = None
    # with workers: hands a flow whose tunnel another worker holds to it (set by the role)
    mover: FlowMover | None = None

    def __init__(
        self,
        config: EdgeConfig,
        opener: FlowOpener,
        options: OnRampOptions | None = None,
        *,
        accept_error: Callable[[str, str], None] | None = None,
    ) -> None:
        self.config = config
        self.opener = opener
        self.options = options
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.accept_errors = AcceptErrors(
            f"{self.onramp} on-ramp",
            (lambda what: accept_error(self.onramp, what)) if accept_error is not None else None,
        )
        # connections still in their handshake; a slow-handshake flood from one address must
        # not hold every slot
        self.handshake_slots: Pool[str] = Pool(
            config.max_handshakes, config.max_handshakes_per_source
        )
        self.flows = 0  # connections holding a flow
        pp_options = options.proxy_protocol if options is not None else None
        self.proxy_gate = ProxyGate(pp_options) if pp_options is not None else None

    # -- credentials ----------------------------------------------------------------------

    def auth_required(self) -> bool:
        """Whether a client must give credentials: once there is any configured user or any
        active client identity, anonymous access would bypass them."""
        return bool(self.config.users) or (self.credentials is not None and self.credentials.active)

    def authenticate(self, username: bytes, password: bytes) -> str | None:
        """The identity a username/password pair proves (a config user, or a client identity
        with its secret as the password), else None."""
        user = check_user(self.config.users, username, password)
        if user is None and self.credentials is not None:
            user = self.credentials.check_password(username, password)
        return user

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port (port 0 picks one: see `port`) and start accepting."""
        sock = await tcp_listen_socket(host, port, name=self.onramp)
        self._sock = sock
        loop = accept_loop(sock, self._accepted, self.accept_errors)
        self._accept_task = asyncio.create_task(loop)
        log.info("%s on-ramp listening on %s", self.onramp, self.address)

    @property
    def handshakes(self) -> int:
        """Connections still in their handshake."""
        return self.handshake_slots.used

    @property
    def address(self) -> tuple[str, int]:
        if self._sock is None:
            raise RuntimeError("not listening")
        return peer_of(self._sock.getsockname())

    @property
    def port(self) -> int:
        return self.address[1]

    async def stop_accepting(self) -> None:
        """Close the listener; connections already accepted go on (a drain)."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
            self._accept_task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def take(self, work: Awaitable[None]) -> None:
        """Run `work` (a moved flow: `adopt`) as one of this on-ramp's connections."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def open_connections(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Stop listening and end every connection (handshakes and relays)."""
        await self.stop_accepting()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _accepted(self, conn: socket.socket, addr: object) -> None:
        peer = peer_of(addr)
        why = self.handshake_slots.try_take(peer[0])
        if why is not None:
            conn.close()
            self.opener.bad_input(
                self.onramp,
                "too_many_handshakes" if why == POOL_FULL else "too_many_handshakes_from_source",
                peer,
            )
            return
        task = asyncio.create_task(self._serve_conn(conn, peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- one connection -------------------------------------------------------------------

    async def _handshake(self, sock: socket.socket, peer: tuple[str, int]) -> FlowPlan | None:
        """Read the request and return a plan, or answer the client and return None."""
        raise NotImplementedError

    def _timeout_reply(self) -> bytes:
        """What to tell a client that took too long (empty: just close)."""
        return b""

    async def _proxy_source(
        self, sock: socket.socket, peer: tuple[str, int]
    ) -> tuple[str, int] | None:
        """The flow's source by the PROXY header (the peer itself without one), or None when
        the connection must close (counted here)."""
        gate = self.proxy_gate
        assert gate is not None
        try:
            async with asyncio.timeout(gate.timeout):
                admitted = await gate.admit(sock, peer)
        except TimeoutError:
            self.opener.bad_input(self.onramp, "proxy_header_timeout", peer)
            await self.send_final(sock, b"")
            return None
        except ProxyRefused as e:
            log.debug("%s %s: PROXY protocol: %s", self.onramp, peer, e)
            self.opener.bad_input(self.onramp, e.reason, peer)
            # closed like any refused handshake: unread bytes must not turn into an RST
            await self.send_final(sock, b"")
            return None
        except PeerClosed:
            return None  # a bare connect-and-close (a load balancer's health check)
        except OSError as e:
            log.debug("%s %s: connection error before the PROXY header: %s", self.onramp, peer, e)
            return None
        header = admitted.header
        if header is not None and self.proxy_header_seen is not None:
            kind = "client" if header.client is not None else "local"
            self.proxy_header_seen(self.onramp, f"v{header.version}", kind)
        return admitted.source

    async def _serve_conn(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """Serve one connection; it holds a handshake slot (taken by `_accepted`) until its
        request is read."""
        slot: str | None = peer[0]
        via: tuple[str, int] | None = None  # the load balancer that sent a PROXY header
        try:
            if self.proxy_gate is not None:
                source = await self._proxy_source(sock, peer)
                if source is None:
                    return
                if source != peer:
                    # the slot moves to the real client: behind a load balancer every
                    # connection has the balancer's address, and its share is not theirs
                    self.handshake_slots.release(peer[0])
                    slot = None
                    why = self.handshake_slots.try_take(source[0])
                    if why is not None:
                        self.opener.bad_input(
                            self.onramp,
                            "too_many_handshakes"
                            if why == POOL_FULL
                            else "too_many_handshakes_from_source",
                            source,
                        )
                        return
                    slot = source[0]
                    via, peer = peer, source
            try:
                async with asyncio.timeout(self.config.handshake_timeout):
                    plan = await self._handshake(sock, peer)
            except TimeoutError:
                self.opener.bad_input(self.onramp, "handshake_timeout", peer)
                await self.send_final(sock, self._timeout_reply())
                return
            except HandshakeEOF as e:
                # A bare connect-and-close (health checks, port probes) is not bad input.
                if e.got_bytes:
                    self.opener.bad_input(self.onramp, "incomplete_handshake", peer)
                return
            except OSError as e:
                log.debug("%s %s: connection error during handshake: %s", self.onramp, peer, e)
                return
            finally:
                if slot is not None:
                    self.handshake_slots.release(slot)
                    slot = None
            if plan is None:
                return
            if self.flows >= self.config.max_flows:
                self.opener.bad_input(self.onramp, "too_many_flows", peer)
                await self.send_final(sock, plan.busy_reply)
                return
            if plan.serve is not None:
                self.flows += 1
                try:
                    await plan.serve(sock)
                finally:
                    self.flows -= 1
                return
            flow = Flow(
                onramp=self.onramp,
                source=peer,
                destination=plan.destination,
                identity=Identity(plan.identity) if plan.identity is not None else None,
                vnet=self.options.vnet if self.options is not None else None,
                request=plan.request,
            )
            if via is not None:  # the audit keeps who relayed it
                flow.annotations["proxy_peer"] = f"{via[0]}:{via[1]}"
            await self._run_flow(sock, flow, plan)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s %s: unexpected error", self.onramp, peer)
        finally:
            if slot is not None:  # left before the handshake (a refused PROXY header)
                self.handshake_slots.release(slot)
            # The relay closes the socket itself; closing again is a no-op then.
            sock.close()

    async def adopt(self, sock: socket.socket, flow: Flow, plan: FlowPlan) -> None:
        """Go on with a flow another worker accepted, decided and routed (ramp.flows.moved):
        open its stream here, answer the client, relay."""
        try:
            await self._run_flow(sock, flow, plan, moved=True)
        finally:
            sock.close()

    async def _run_flow(
        self, sock: socket.socket, flow: Flow, plan: FlowPlan, *, moved: bool = False
    ) -> None:
        loop = asyncio.get_running_loop()
        self.flows += 1
        try:
            try:
                leg = await self._open_watching(sock, flow, plan.eof_is_gone, moved)
            except FlowMoved as e:
                if (
                    not moved
                    and self.mover is not None
                    and await self.mover(sock, flow, plan, e.worker)
                ):
                    flow.result, flow.reason = FlowResult.OK, f"moved to worker {e.worker}"
                    flow.annotations["moved_to"] = str(e.worker)
                    return
                flow.result, flow.reason = e.result, e.reason
                await self.send_final(sock, plan.error_reply(e.result))
                return
            except FlowError as e:
                flow.result, flow.reason = e.result, e.reason
                if e.reason == CLIENT_GONE:
                    return  # nobody to answer
                if e.reply is not None and plan.answer is not None:
                    await self.send_final(sock, plan.answer(e.reply))
                else:
                    await self.send_final(sock, plan.error_reply(e.result))
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("%s flow %d: opening failed", self.onramp, flow.id)
                flow.result, flow.reason = FlowResult.ERROR, f"internal error: {e!r}"
                await self.send_final(sock, plan.error_reply(FlowResult.ERROR))
                return
            try:
                if plan.ok_reply:
                    async with asyncio.timeout(self.config.handshake_timeout):
                        await loop.sock_sendall(sock, plan.ok_reply)
            except (OSError, TimeoutError) as e:
                leg.abort()
                flow.result, flow.reason = FlowResult.ERROR, f"client gone before reply: {e}"
                return
            except asyncio.CancelledError:
                leg.abort()
                raise
            task = asyncio.current_task()

            def stop(result: FlowResult, reason: str) -> None:
                flow.fail(result, reason)
                if task is not None:
                    task.cancel()

            flow.stop = stop
            flow.advance(FlowState.ESTABLISHED)
            try:
                client = plan.client(sock) if plan.client is not None else sock
                await leg.relay(client, initial=plan.initial)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("%s flow %d: relay failed", self.onramp, flow.id)
                if flow.result is None:
                    flow.result, flow.reason = FlowResult.ERROR, f"relay error: {e!r}"
            else:
                if flow.result is None:
                    flow.result = FlowResult.OK
        finally:
            self.flows -= 1
            if flow.result is None:
                flow.result, flow.reason = FlowResult.ERROR, flow.reason or "cancelled"
            if flow.ended is None:
                flow.ended = time.monotonic()
            try:
                self.opener.flow_finished(flow)
            except Exception:
                log.exception("%s flow %d: flow_finished failed", self.onramp, flow.id)

    async def _open_watching(
        self, sock: socket.socket, flow: Flow, eof_is_gone: bool = True, moved: bool = False
    ) -> TcpLeg:
        """Open the flow's outbound leg, given up as soon as the client closes or resets.

        Otherwise a client that leaves while its flow waits (a tunnel stream slot, a connector
        dialling a blackholed origin) would hold the stream until the connect timeout; now
        cancelling the open resets the stream and the slot comes back at once.
        """
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        fd = sock.fileno()
        gone = False

        def readable() -> None:
            nonlocal gone
            reset = False
            try:
                data = sock.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, reset = b"", True  # reset by the client: gone as well
            # early bytes (the client speaks first) stay queued for the relay: a client that
            # sends is alive, and the socket cannot be watched for EOF without reading them
            loop.remove_reader(fd)
            if not data and (reset or eof_is_gone) and task is not None:
                gone = True
                task.cancel()

        loop.add_reader(fd, readable)
        try:
            if moved:
                return await self.opener.open_moved(flow)
            return await self.opener.open_tcp(flow)
        except asyncio.CancelledError:
            if gone and task is not None and task.uncancel() == 0:
                raise FlowError(FlowResult.ERROR, CLIENT_GONE) from None
            raise
        finally:
            loop.remove_reader(fd)

    # -- socket helpers -------------------------------------------------------------------

    @staticmethod
    async def recv(sock: socket.socket, got_bytes: bool) -> bytes:
        """Read some bytes; EOF raises HandshakeEOF."""
        data = await asyncio.get_running_loop().sock_recv(sock, RECV_SIZE)
        if not data:
            raise HandshakeEOF(got_bytes)
        return data

    @staticmethod
    async def send(sock: socket.socket, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(sock, data)

    async def send_final(self, sock: socket.socket, data: bytes) -> None:
        """Best effort: send a last reply, half-close, drain briefly. Never raises OSError."""
        loop = asyncio.get_running_loop()
        linger = min(LINGER_SECONDS, self.config.handshake_timeout)
        try:
            async with asyncio.timeout(linger):
                if data:
                    await loop.sock_sendall(sock, data)
                sock.shutdown(socket.SHUT_WR)
                drained = 0
                while drained < LINGER_BYTES:
                    chunk = await loop.sock_recv(sock, RECV_SIZE)
                    if not chunk:
                        break
                    drained += len(chunk)
        except (OSError, TimeoutError):
            pass
