"""The connector role (`ramp tunnel run`): dials out to the edge and serves its flows."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from prometheus_client import generate_latest

from ramp.config import ConnectorConfig, parse_hostport
from ramp.fdbudget import apply_budget, limits_in_force
from ramp.flows.echo_nat import EchoFlow
from ramp.flows.flow import (
    Destination,
    Flow,
    FlowKind,
    FlowResult,
    Identity,
    Route,
    number_flows,
)
from ramp.flows.table import FlowTable
from ramp.net.inherit import SocketSet, inherited, install, published
from ramp.observe.audit import AuditLog
from ramp.observe.metrics import ConnectorMetrics
from ramp.observe.sdnotify import Notifier
from ramp.observe.status import start_status_server
from ramp.offramps.egress import Egress
from ramp.offramps.icmp import ConnectorIcmp
from ramp.restart.channel import ChannelError
from ramp.restart.coordinator import (
    CONNECTOR_SOCKET_NAME,
    RestartRefused,
    RestartServer,
    open_restart_server,
)
from ramp.restart.successor import (
    Handoff,
    Predecessor,
    Successor,
    hand_over,
    successor_command,
    take_over,
)
from ramp.runtime import stop_when
from ramp.tunnel.connector_side import FlowEnd, PinError, RegistrationRefused, TunnelClient
from ramp.tunnel.resolver import Resolver
from ramp.tunnel.sessions_connector import ConnectorSessions, SessionEnd
from ramp.tunnel.token import Token, TokenError, token_text
from ramp.wire.tunnel import RegisterError
from ramp.workers.link import WORKER_ENV, WorkerLink
from ramp.workers.shares import worker_share

log = logging.getLogger("ramp.connector")

EXIT_BAD_TOKEN = 2
EXIT_REFUSED = 3
SUCCESSOR_CONNECT_TIMEOUT = 30.0  # a successor's connections must register within this

_REFUSAL_HINTS = {
    RegisterError.UNKNOWN_TUNNEL: "the edge knows no such tunnel: wrong token for this edge?",
    RegisterError.TUNNEL_DELETED: "the tunnel was deleted on the edge: create a new one "
    "and use its token",
    RegisterError.BAD_PROOF: "the edge rejected the tunnel secret: the token's secret is wrong",
    RegisterError.UNSUPPORTED_VERSION: "the edge does not speak this connector's protocol "
    "version: upgrade one of them",
    RegisterError.BAD_REQUEST: "the edge could not read the registration",
}


class Connector:
    def __init__(self, config: ConnectorConfig, token: Token) -> None:
        self.config = config
        self.token = token
        self.metrics = ConnectorMetrics()
        for key, value in limits_in_force(config).items():
            self.metrics.limits.labels(key).set(value)
        edges = config.edge or token.edges
        self.edges = [parse_hostport(e) for e in edges]
        self.client = TunnelClient(
            tunnel_id=token.tunnel_id,
            secret=token.secret,
            ca_fingerprint=token.ca_fingerprint,
            edges=self.edges,
            ha_connections=config.ha_connections,
            connect_timeout=config.connect_timeout,
            idle_timeout=config.quic_idle_timeout,
            keepalive=config.keepalive_interval,
            on_flow_end=self._flow_end,
            on_connections=self.metrics.tunnel_connections.set,
            on_refused=self._refused,
            on_dial_failure=lambda reason: self.metrics.dial_failures.labels(reason).inc(),
            metrics_bad_input=lambda where, reason: self.metrics.bad_input.labels(
                where, reason
            ).inc(),
            max_streams_bidi=config.max_streams_per_connection,
            budget=self.metrics.flow_budget(config.flow_memory_budget),
        )
        self.resolver = Resolver(
            config.dns_resolver,
            config.resolve_timeout,
            config.resolve_max_concurrent,
            on_busy=self.metrics.flows_rejected.labels("resolver_busy").inc,
        )
        self.client.resolver = self.resolver
        self.egress = Egress(
            config.egress_source,
            config.egress_share_ports,
            on_exhausted=lambda protocol: self.metrics.egress_ports_exhausted.labels(
                protocol
            ).inc(),
        )
        self.client.egress = self.egress
        m = self.metrics
        self.icmp = ConnectorIcmp(
            idle_timeout=config.icmp_idle_timeout,
            limit=config.icmp_flow_limit,
            metrics_packet=lambda what: m.icmp_packets.labels(what).inc(),
            metrics_drop=lambda reason: m.icmp_drops.labels(reason).inc(),
            metrics_active=m.icmp_flows_active.set,
            metrics_mode=lambda family, mode: m.icmp_mode.labels(family, mode).set(1),
            bad_input=self._bad_datagram,
            on_end=self._icmp_end,
        )
        self.status: Any = None
        # restarts: what starts a successor (`ramp tunnel run` sets it), the process this one
        # takes over from, the coordination socket, and the successor once it connected
        self.command: list[str] = []
        self.predecessor: Predecessor | None = None
        self.restart_server: RestartServer | None = None
        self.handed_over = asyncio.Event()
        self._restarting = False
        self._successor: Successor | None = None
        self.worker: WorkerLink | None = None  # with --workers: the channel to the supervisor
        self.audit = AuditLog(
            config.audit_log, config.audit_log_max_bytes, config.audit_log_backups
        )
        # admission happens at the edge; the connector's table is where its flows end
        self.table = FlowTable(limit=1 << 62, reporters=[self._report])

    def ready(self) -> tuple[bool, dict[str, Any]]:
        n = len(self.client.live)
        return n > 0 and not self.client.draining, {
            "status": "draining" if self.client.draining else ("ready" if n else "connecting"),
            "connections": n,
            "flows": self.client.active_flows,
            "icmp": self.icmp.status(),
        }

    def _refused(self, e: RegistrationRefused) -> None:
        self.metrics.registration_failures.labels(e.code.name.lower()).inc()
        log.error("edge refused registration: %s (%s)", e.code.name.lower(), e.message)

    def _flow_end(self, end: FlowEnd) -> None:
        flow = connector_flow(
            end.source,
            end.destination,
            FlowKind.STREAM,
            end.duration,
            end.metadata,
        )
        flow.result, flow.reason = end.result, end.reason
        flow.bytes_up, flow.bytes_down = end.bytes_up, end.bytes_down
        self.table.end(flow)

    def _report(self, flow: Flow) -> None:
        """The connector's side of a flow: same record as the edge's audit line."""
        m = self.metrics
        assert flow.result is not None
        if flow.kind is FlowKind.DATAGRAM:
            m.udp_sessions.labels(flow.result.value).inc()
        elif flow.kind is FlowKind.PACKET:
            m.icmp_flows.labels(flow.result.value).inc()
        else:
            m.flows.labels("tunnel", flow.result.value).inc()
            if flow.bytes_up:
                m.flow_bytes.labels("up").inc(flow.bytes_up)
            if flow.bytes_down:
                m.flow_bytes.labels("down").inc(flow.bytes_down)
            m.flows_active.set(self.client.active_flows)
        self.audit.write(flow)

    def _bad_datagram(self, reason: str) -> None:
        self.metrics.bad_input.labels("tunnel", "malformed_datagram").inc()
        log.warning("bad tunnel datagram: %s", reason)

    def _icmp_end(self, flow: EchoFlow, now: float, reason: str) -> None:
        meta = {"vnet": flow.vnet} if flow.vnet != "default" else {}
        # the client's echo id stands where a port would: it tells its flows apart
        source = f"[{flow.source}]:{flow.client_ident}"
        record = connector_flow(
            source, f"[{flow.destination}]:0", FlowKind.PACKET, now - flow.started, meta
        )
        record.result, record.reason = FlowResult.OK, reason
        record.packets_up, record.packets_down = flow.packets_up, flow.packets_down
        self.table.end(record)

    def _session_end(self, end: SessionEnd) -> None:
        flow = connector_flow(
            end.source,
            end.destination,
            FlowKind.DATAGRAM,
            end.duration,
            end.metadata,
        )
        flow.result, flow.reason = end.result, end.reason
        flow.bytes_up, flow.bytes_down = end.bytes_up, end.bytes_down
        flow.packets_up, flow.packets_down = end.packets_up, end.packets_down
        self.table.end(flow)

    async def _start_serving(self) -> None:
        """The status listener and the restart socket (a successor takes them last)."""
        self.status = await start_status_server(
            self.config.metrics_listen, self.metrics.registry, self.ready
        )
        self.restart_server = await open_restart_server(
            self.config.data_dir.expanduser() / CONNECTOR_SOCKET_NAME,
            self.restart,
            lambda outcome: self.metrics.restart_requests.labels(outcome).inc(),
            inherited().take("restart", socket.SOCK_STREAM, "", 0),
            "connector",
        )

    @property
    def wanted_connections(self) -> int:
        return self.config.ha_connections * len(self.edges)

    async def restart(self, progress: Callable[[str], None] = lambda text: None) -> int:
        """Start a successor connector with this command line; once its connections are
        registered, this one unregisters its own, lets open flows finish and exits: the
        tunnel never has fewer connections than configured."""
        if self.handed_over.is_set():
            raise RestartRefused("this connector has handed over to its successor and drains")
        if self._restarting:
            raise RestartRefused("a restart is already in progress")
        if not self.command:
            raise RestartRefused("not started by `ramp tunnel run`: no command to rerun")
        self._restarting = True
        sockets = published()
        if self.restart_server is not None and self.restart_server.sock is not None:
            sockets.append(("restart", self.restart_server.sock))
        try:
            progress("starting the successor")
            successor = await Successor.spawn(self.command, Handoff(sockets))

            def listening(body: dict[str, Any]) -> dict[str, Any]:
                progress(f"successor pid {body.get('pid')} dials its tunnel connections")
                return {"connections": self.wanted_connections}

            try:
                await hand_over(
                    successor, on_listening=listening, on_serving=lambda b: None, progress=progress
                )
            except BaseException:
                await successor.kill()
                raise
            successor.release()
            self._successor = successor
        finally:
            self._restarting = False
        log.info("successor pid %d holds the tunnel: draining and exiting", successor.pid)
        self.handed_over.set()
        return successor.pid

    async def _until_connected(self, expect: dict[str, Any]) -> None:
        want = int(expect.get("connections", self.wanted_connections))
        try:
            async with asyncio.timeout(SUCCESSOR_CONNECT_TIMEOUT):
                while len(self.client.live) < want:
                    if self.client.fatal.done():
                        raise RuntimeError(f"cannot register: {self.client.fatal.result()}")
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise RuntimeError(
                f"only {len(self.client.live)} of {want} tunnel connections registered within "
                f"{SUCCESSOR_CONNECT_TIMEOUT:.0f} s"
            ) from None

    async def run(self, stop: asyncio.Event) -> int:
        predecessor = self.predecessor
        worker = self.worker
        if worker is not None:  # the supervisor serves status for all workers
            self.client.first_index = worker.index * MAX_CONNECTIONS_PER_WORKER
            worker.scrape = self.scrape
            worker.start()
            worker.listening()
            stop_on_gone = asyncio.ensure_future(stop_when(worker.stop, stop))
        elif predecessor is None:
            await self._start_serving()
        edges = ", ".join(f"{h}:{p}" for h, p in self.edges)
        log.info(
            "connector %s for tunnel %s: %d connection(s) to each of %s",
            str(self.client.connector_id)[:8],
            self.token.tunnel_id,
            self.config.ha_connections,
            edges,
        )
        m = self.metrics
        self.client.sessions = ConnectorSessions(
            resolver=self.resolver,
            limit=self.config.max_udp_sessions,
            idle_timeout=self.config.udp_idle_timeout,
            on_end=self._session_end,
            metrics_datagram=m.count_datagram,
            metrics_drop=lambda reason: m.udp_drops.labels(reason).inc(),
            metrics_active=m.udp_sessions_active.set,
            bad_input=self._bad_datagram,
            unreplied_timeout=self.config.udp_unreplied_timeout,
            per_source=self.config.max_udp_sessions_per_source,
            per_identity=self.config.max_udp_sessions_per_identity,
            metrics_refused=m.udp_session_refused,
            metrics_expired=m.udp_session_expired,
            egress=self.egress,
        )
        if self.resolver.address is None:
            log.warning("no DNS resolver (no --dns-resolver, none in /etc/resolv.conf)")
        self.icmp.start()
        self.client.packets = self.icmp
        self.client.start()
        notify = Notifier()
        if predecessor is not None:
            try:
                await take_over(
                    predecessor, {}, until_ready=self._until_connected, serve=self._start_serving
                )
            except (ChannelError, RuntimeError, OSError) as e:
                log.error("cannot take over from the previous connector: %s", e)
                predecessor.failed(str(e))
                await self.client.close()
                return 1
            inherited().close_untaken()
            tasks_gone = asyncio.ensure_future(predecessor.gone(lambda: None))
            notify.main_pid(os.getpid())
        notify.ready(f"connecting to {edges}")
        notify.start_watchdog()
        stop_wait = asyncio.ensure_future(stop.wait())
        handed = asyncio.ensure_future(self.handed_over.wait())
        try:
            await asyncio.wait(
                {stop_wait, self.client.fatal, handed}, return_when=asyncio.FIRST_COMPLETED
            )
            if self.client.fatal.done():
                return self._fatal(self.client.fatal.result())
            if handed.done():
                notify.status(f"handed over; draining {self.client.active_flows} flows")
                if self.status is not None:
                    self.status.stop_accepting()
                if self.restart_server is not None:
                    self.restart_server.stop_accepting()
            else:
                notify.stopping(f"draining: {self.client.active_flows} open flows")
            log.info(
                "draining: %d open flow(s), grace period %gs",
                self.client.active_flows,
                self.config.grace_period,
            )
            await self.client.drain(self.config.grace_period)
            return 0
        finally:
            stop_wait.cancel()
            handed.cancel()
            if predecessor is not None:
                tasks_gone.cancel()
            if worker is not None:
                stop_on_gone.cancel()
                worker.close()
            if self.restart_server is not None:
                await self.restart_server.close(unlink=not self.handed_over.is_set())
            if self.client.sessions is not None:
                self.client.sessions.close()
            self.icmp.close()
            await self.client.close()
            if self.status is not None:
                await self.status.close()
            self.audit.close()
            await notify.close()

    def scrape(self) -> tuple[str, bool, dict[str, Any]]:
        """This worker's metrics and readiness, for the supervisor's one view."""
        ok, info = self.ready()
        return generate_latest(self.metrics.registry).decode(), ok, info

    def _fatal(self, e: Exception) -> int:
        if isinstance(e, RegistrationRefused):
            hint = _REFUSAL_HINTS.get(e.code, "")
            print(
                f"ramp: registration refused by the edge: {e.code.name.lower()}: {e.message}"
                + (f"\n  {hint}" if hint else ""),
                file=sys.stderr,
            )
            return EXIT_REFUSED
        if isinstance(e, PinError):
            print(f"ramp: refusing the edge: {e}", file=sys.stderr)
            return EXIT_REFUSED
        print(f"ramp: {e}", file=sys.stderr)
        return 1


def _split_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return text, 0
    return host.strip("[]"), int(port)


_PROTOCOLS = {FlowKind.STREAM: "tcp", FlowKind.DATAGRAM: "udp", FlowKind.PACKET: "icmp"}


def connector_flow(
    source: str, destination: str, kind: FlowKind, duration: float, meta: dict[str, str]
) -> Flow:
    """A finished flow as the connector saw it, rebuilt for the common record: who and which
    on-ramp come from the metadata the edge sent with the flow."""
    now = time.monotonic()
    user = meta.get("identity")
    edge_flow = meta.get("flow", "")
    flow = Flow(
        onramp=meta.get("onramp", "tunnel"),
        source=_split_addr(source),
        destination=Destination(*_split_addr(destination)),
        identity=Identity(user) if user else None,
        protocol=_PROTOCOLS[kind],
        kind=kind,
        started=now - duration,
        started_wall=time.time() - duration,
        vnet=meta.get("vnet"),
    )
    if edge_flow.isdigit():
        flow.id = int(edge_flow)  # the edge's id: both records of a flow join on it
    flow.ended = now
    flow.route = Route("origin", meta.get("vnet") or "default")
    return flow


def load_token(config: ConnectorConfig) -> Token:
    text = token_text(config.token, config.token_file)
    if not text:
        raise TokenError("no token: pass --token-file FILE or set RAMP_TUNNEL_TOKEN")
    token = Token.decode(text)
    try:
        uuid.UUID(token.tunnel_id)
    except ValueError:
        raise TokenError(f"tunnel id {token.tunnel_id!r} is not a UUID: not a ramp token") from None
    if not (config.edge or token.edges):
        raise TokenError("the token names no edge address: pass --edge HOST:PORT")
    return token


MAX_CONNECTIONS_PER_WORKER = 64  # a worker's connection indexes start at index * this


def run_connector(config: ConnectorConfig) -> int:
    """`ramp tunnel run`: returns the process exit code."""
    from ramp.runtime import run_until_signal

    try:
        token = load_token(config)
    except TokenError as e:
        print(f"ramp: invalid token: {e}", file=sys.stderr)
        return EXIT_BAD_TOKEN

    apply_budget(config)
    if config.workers > 1 and WORKER_ENV not in os.environ:
        if config.workers > config.ha_connections:
            print(
                f"ramp: --workers {config.workers} needs at least as many --ha-connections "
                f"(now {config.ha_connections}): each worker holds its share",
                file=sys.stderr,
            )
            return 2
        from ramp.workers.supervisor import supervise

        return supervise(
            "connector",
            successor_command(),
            config.workers,
            config.metrics_listen,
            restart_socket=config.data_dir.expanduser() / CONNECTOR_SOCKET_NAME,
        )
    running: list[Connector] = []

    async def main(stop: asyncio.Event) -> int:
        try:
            worker = await WorkerLink.from_environment()
            predecessor = await Predecessor.from_environment()
        except ChannelError as e:
            log.error("cannot take over from the previous connector: %s", e)
            return 1
        own = config
        if worker is not None:  # this worker's share of the connections to each edge
            share, extra = divmod(config.ha_connections, worker.workers)
            own = worker_share(config, worker.workers).model_copy(
                update={"ha_connections": share + (1 if worker.index < extra else 0)}
            )
            number_flows(worker.index + 1, worker.workers)
        connector = Connector(own, token)
        connector.worker = worker
        connector.command = successor_command()
        connector.predecessor = predecessor
        if predecessor is not None:
            install(SocketSet(predecessor.sockets, strict=True))
        running.append(connector)
        return await connector.run(stop)

    def reopen_audit() -> None:
        # SIGHUP re-reads no config here (yet); it lets logrotate move the audit log.
        for connector in running:
            connector.audit.reopen()
        log.info("audit log reopened; the connector's configuration is read at start only")

    return run_until_signal(main, reopen_audit)
