"""The edge role: on-ramps in, routing to tunnels (or direct egress) out."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import uuid
from collections.abc import Callable, Set
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
from prometheus_client import generate_latest

from ramp.config import ConfigError, EdgeConfig, parse_hostport
from ramp.fdbudget import apply_budget, limits_in_force
from ramp.flows.flow import (
    Flow,
    FlowError,
    FlowKind,
    FlowResult,
    Route,
    number_flows,
    parse_ip,
)
from ramp.flows.moved import flow_from_dict, flow_to_dict
from ramp.flows.opener import TcpLeg, UdpSession
from ramp.flows.table import FlowTable
from ramp.net.egress import EgressGuard
from ramp.net.inherit import SocketSet, inherited, install, published
from ramp.net.listen import share_ports
from ramp.net.resolve import AsyncResolver, set_default_resolver
from ramp.net.reuseport import SteeringGroup
from ramp.observe.audit import AuditLog, flow_record
from ramp.observe.loglimit import LogLimiter
from ramp.observe.metrics import EdgeMetrics
from ramp.observe.sdnotify import Notifier
from ramp.observe.status import start_status_server
from ramp.offramps.base import OffRamp
from ramp.offramps.direct import DirectOffRamp
from ramp.offramps.egress import Egress
from ramp.offramps.tunnel import TunnelOffRamp
from ramp.onramps.registry import OnRampContext
from ramp.onramps.registry import lookup as lookup_onramp
from ramp.onramps.socks5_udp import AssociationLimits
from ramp.onramps.tcp_listener import FlowMover, FlowPlan, TcpOnRamp, plan_from_dict, plan_to_dict
from ramp.policy.engine import PolicyHook
from ramp.policy.hooks import HookLoadError, Hooks, HookSpec, LoadedHook, load_hooks
from ramp.policy.identities import ClientCredentials
from ramp.policy.pipeline import FlowPipeline
from ramp.policy.router import RouteEntry, Router, RouteTable, VnetRoutes
from ramp.policy.rules import Policy
from ramp.quic.admission import HandshakeLimits
from ramp.restart.channel import ChannelError
from ramp.restart.coordinator import (
    SOCKET_NAME,
    RestartRefused,
    RestartServer,
    open_restart_server,
)
from ramp.restart.successor import (
    Handoff,
    Predecessor,
    Successor,
    SuccessorFailed,
    hand_over,
    take_over,
)
from ramp.runtime import stop_when
from ramp.store.db import Store
from ramp.tunnel.dns_edge import DnsZoneRoute, DnsZones, TunnelDnsClient
from ramp.tunnel.edge_side import TunnelEdge, Verdict, server_configuration
from ramp.tunnel.packets_edge import EdgePackets
from ramp.tunnel.resolver import RESOLVER_HOST
from ramp.tunnel.sessions_edge import EdgeSessions
from ramp.wire.tunnel import PROTOCOL_VERSION, CloseCode, Register, RegisterError
from ramp.workers.link import WORKER_ENV, WorkerLink

log = logging.getLogger("ramp.edge")


class Edge:
    """One edge process: composes the store, on-ramps, the flow path and the off-ramps."""

    def __init__(self, config: EdgeConfig, *, metrics: EdgeMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or EdgeMetrics()
        self.store = Store(config.data_dir)
        self.audit = AuditLog(
            config.audit_log, config.audit_log_max_bytes, config.audit_log_backups
        )
        self.dns_zones = DnsZones([])
        self._dns_clients: dict[str, TunnelDnsClient] = {}
        self.sessions: EdgeSessions | None = None
        self.packets: EdgePackets | None = None  # IP packets to and from connectors
        self._bad_input_log = LogLimiter()
        self._store_version = -1
        self._loaded_once = False
        self._tunnel_names: dict[str, str] = {}
        self._vnet_assignments: dict[str, str] = {}
        # Client identities: their credentials (the store answers for every check, so a
        # revoked client is refused at once; `active` follows the store's polls), every name
        # the store knows (the bounded label set of ramp_client_flows), and the revoked ones,
        # None until the first load (revocations older than this process end nothing).
        self.credentials = ClientCredentials(self.store.verify_client)
        self._client_names: frozenset[str] = frozenset()
        self._revoked_clients: frozenset[str] | None = None
        self._on_revoked: list[Callable[[Set[str]], None]] = []
        self.tunnels: TunnelEdge | None = None
        self.onramps: list[Any] = []
        self.status: Any = None
        self._poller: asyncio.Task[None] | None = None
        # restarts: the QUIC listeners' steering groups (name: group, our slot), the process
        # this one takes over from, the coordination socket, and the successor once it serves
        self.steering: dict[str, tuple[SteeringGroup, int]] = {}
        self.predecessor: Predecessor | None = None
        self.restart_server: RestartServer | None = None
        self.handed_over = asyncio.Event()
        self.command: list[str] = []  # what starts a successor (`ramp edge` sets it)
        self._restarting = False
        self._successor: Successor | None = None
        self.worker: WorkerLink | None = None  # with --workers: the channel to the supervisor
        m = self.metrics
        for key, value in limits_in_force(config).items():
            m.limits.labels(key).set(value)
        self.table = FlowTable(
            config.max_flows,
            reporters=[self._report],
            on_reject=lambda reason: m.flows_rejected.labels(reason).inc(),
            on_count=m.flows_active.set,
            per_source=config.max_flows_per_source,
            per_identity=config.max_flows_per_identity,
        )
        self.policy = PolicyHook()
        self.hooks = self._make_hooks(load_hooks(hook_specs(config)))
        self.resolver = AsyncResolver(
            config.resolve_timeout,
            config.resolve_max_concurrent,
            on_busy=m.flows_rejected.labels("resolver_busy").inc,
        )
        # dial_tcp's lookups (names the edge dials itself) share the limit and the counter
        set_default_resolver(self.resolver)
        self.router = Router(
            self._resolve_first,
            allow_direct=config.allow_direct_egress,
            zone_lookup=self._zone_lookup,
            replicas=self._replicas,
        )
        self._set_direct_proxy(config)
        self.offramps: dict[str, OffRamp] = {}
        # labels() costs a lock and a dict lookup: bind the two children once, not per flow
        allowed, denied = m.policy_decisions.labels("allow"), m.policy_decisions.labels("deny")
        self.pipeline = FlowPipeline(
            self.table,
            self.hooks,
            self.policy,
            self.router,
            self.offramps,
            groups=self._groups_of,
            vnet_of=self._vnet_assignments.get,
            dns=self.dns_query,
            bad_input=self.bad_input,
            on_decision=lambda ok: (allowed if ok else denied).inc(),
            on_setup=m.flow_setup.observe,
            on_revoked=m.flows_revoked.inc,
            on_open=self._opened,
            on_reject=lambda reason: m.flows_rejected.labels(reason).inc(),
            opening_per_source=config.max_opening_flows_per_source,
            opening_per_identity=config.max_opening_flows_per_identity,
        )
        self._groups = _invert_groups(config.groups)

    def _set_direct_proxy(self, config: EdgeConfig) -> None:
        """Which direct egress destinations get a PROXY header (longest prefix wins)."""
        if not config.direct_egress_proxy_protocol:
            self.router.direct_proxy = None
            return
        table = RouteTable(
            RouteEntry(ipaddress.ip_network(cidr, strict=False), "", "direct", "", version)
            for cidr, version in config.direct_egress_proxy_protocol.items()
        )

        def lookup(address: str) -> str | None:
            hit = table.lookup(address) if parse_ip(address) is not None else None
            return hit.proxy_protocol if hit is not None else None

        self.router.direct_proxy = lookup

    def _rule_to(self, rule_id: str) -> str | None:
        # only asked for a flow to a denied address: a scan of the rules is cheap enough
        return next((r.to for r in self.policy.policy.rules if r.id == rule_id), None)

    async def _resolve_first(self, host: str, port: int) -> str:
        return (await self.resolver.resolve(host))[0]

    def _make_hooks(self, user: list[LoadedHook]) -> Hooks:
        m = self.metrics
        return Hooks(
            [self.policy.as_hook(), *user],
            self.config.hook_timeout,
            on_error=lambda hook, point, kind: m.hook_errors.labels(hook, point, kind).inc(),
            on_slow=lambda hook, point: m.hook_slow.labels(hook, point).inc(),
        )

    @property
    def active(self) -> int:
        return len(self.table)

    # -- lifecycle -------------------------------------------------------------------------------

    def _steering(self, name: str) -> tuple[SteeringGroup, int]:
        """The group a QUIC listener's socket joins: the predecessor's, at the next slot, or
        a new one (so that a later restart can join it). A worker joins the supervisor's
        group at its own slot."""
        if self.worker is not None:
            given = self.worker.steering(name)
            if given is not None:
                self.steering[name] = given
                return given
        if self.predecessor is not None:
            given = self.predecessor.steering(name)
            if given is not None:
                self.steering[name] = given
                return given
        self.steering[name] = (SteeringGroup.create(), 0)
        return self.steering[name]

    async def start(self, *, listeners: bool = True) -> None:
        """Start the tunnel listener and (unless a restart's successor waits for its turn)
        the on-ramps and the status listener."""
        ident = self.store.edge_identity()
        self._ident = ident
        self.reload_store()
        self.tunnels = TunnelEdge(
            configuration=server_configuration(
                ident.leaf_cert_pem + ident.ca_cert_pem,
                ident.leaf_key_pem,
                self.config.quic_idle_timeout,
            ),
            check=self.check_registration,
            on_drop=lambda reason: self.metrics.tunnel_bad_packets.labels(reason).inc(),
            on_refused=self._registration_refused,
            on_change=self._connections_changed,
            on_handshake_event=lambda event: self.metrics.tunnel_handshakes.labels(event).inc(),
            limits=HandshakeLimits(
                max_handshakes=self.config.quic_max_handshakes,
                retry_threshold=self.config.quic_retry_threshold,
                per_source=self.config.quic_max_handshakes_per_source,
                timeout=self.config.quic_handshake_timeout,
                token_lifetime=self.config.quic_retry_token_lifetime,
                refusals_per_source=self.config.quic_refusals_per_source,
                refusal_penalty=self.config.quic_refusal_penalty,
            ),
            max_streams_bidi=self.config.max_streams_per_connection,
        )
        host, port = parse_hostport(self.config.tunnel_listen)
        await self.tunnels.start(host, port, self._steering("tunnel"))
        listener = self.tunnels.server
        assert listener is not None
        self.metrics.tunnel_handshaking.set_function(lambda: listener.handshaking)
        m = self.metrics
        self.sessions = EdgeSessions(
            self.tunnels,
            idle_timeout=self.config.udp_idle_timeout,
            limit=self.config.max_udp_sessions,
            on_finished=self.flow_finished,
            metrics_datagram=m.count_datagram,
            metrics_drop=lambda reason: m.udp_drops.labels(reason).inc(),
            on_bad_input=lambda reason: self.bad_input("tunnel", "malformed_datagram"),
            unreplied_timeout=self.config.udp_unreplied_timeout,
            per_source=self.config.max_udp_sessions_per_source,
            per_identity=self.config.max_udp_sessions_per_identity,
            metrics_refused=m.udp_session_refused,
            metrics_expired=m.udp_session_expired,
            metrics_moved=m.udp_sessions_moved.inc,
        )
        self.tunnels.sessions = self.sessions
        self.packets = EdgePackets(
            self.tunnels,
            metrics_packet=lambda direction: m.tunnel_packets.labels(direction).inc(),
            metrics_drop=lambda reason: m.tunnel_packet_drops.labels(reason).inc(),
            metrics_legacy=lambda tunnel: m.connectors_without_packets.labels(tunnel).inc(),
            on_bad_input=lambda reason: self.bad_input("tunnel", "malformed_packet"),
        )
        self.tunnels.packets = self.packets
        timeout = self.config.connect_timeout
        self.offramps["tunnel"] = TunnelOffRamp(
            self.tunnels,
            self.sessions,
            timeout,
            max_waiting=self.config.max_waiting_flows,
            on_reject=lambda reason: m.flows_rejected.labels(reason).inc(),
            budget=m.flow_budget(self.config.flow_memory_budget),
        )
        if self.worker is not None:
            self.offramps["tunnel"].elsewhere = self.worker.elsewhere  # type: ignore[attr-defined]
        self.offramps["direct"] = DirectOffRamp(
            self.sessions,
            timeout,
            EgressGuard() if self.config.allow_direct_egress else EgressGuard(frozenset()),
            self._rule_to,
            self.metrics.flows_rejected.labels("direct_egress_denied").inc,
            Egress(
                self.config.egress_source,
                self.config.egress_share_ports,
                on_exhausted=lambda protocol: m.egress_ports_exhausted.labels(protocol).inc(),
            ),
        )
        log.info("tunnel listener on %s:%d/udp (QUIC, ALPN ramp-tunnel/1)", host, self.tunnels.port)
        if listeners:
            await self.start_listeners()

    async def start_listeners(self) -> None:
        """The on-ramps, the status listener, the restart socket and the store's poller."""
        m = self.metrics
        ident = self._ident
        associations = AssociationLimits.for_role(self.config, m)
        self.on_revoked(associations.revoke)
        ctx = OnRampContext(
            self.config,
            self.pipeline,
            self._dns_outcome,
            accept_error=lambda onramp, what: self.metrics.accept_errors.labels(onramp, what).inc(),
            udp_associations=associations,
            tls=(ident.leaf_cert_pem + ident.ca_cert_pem, ident.leaf_key_pem),
            datagram_dropped=lambda reason: m.udp_drops.labels(reason).inc(),
            credentials=self.credentials,
            registry=m.registry,
            packets=self.packets,
            proxy_header=lambda onramp, version, kind: m.proxy_headers.labels(
                onramp, version, kind
            ).inc(),
            steering=self._steering,
        )
        self.packets.on_packet = self._packet_from_tunnel
        for options in self.config.effective_onramps():
            server = lookup_onramp(options.type).build(ctx, options)
            h, p = parse_hostport(options.listen)
            await server.start(h, p)
            self.onramps.append(server)
            if self.worker is not None and isinstance(server, TcpOnRamp):
                server.mover = self._mover(options.listen)
            if mechanism := getattr(server, "mechanism", ""):
                m.onramp_steering.labels(options.type, options.listen, mechanism).inc()
        if self.worker is None:  # a worker's supervisor serves these for all workers
            self.status = await start_status_server(
                self.config.metrics_listen, self.metrics.registry, self.ready
            )
            await self._start_restart_server()
        self._poller = asyncio.ensure_future(self._poll_store())

    async def _start_restart_server(self) -> None:
        self.restart_server = await open_restart_server(
            self.store.data_dir / SOCKET_NAME,
            self.restart,
            lambda outcome: self.metrics.restart_requests.labels(outcome).inc(),
            inherited().take("restart", socket.SOCK_STREAM, "", 0),
            "edge",
        )

    # -- restarts --------------------------------------------------------------------------------

    async def restart(self, progress: Callable[[str], None] = lambda text: None) -> int:
        """Start a successor with this process's command line (re-reading the config), hand
        it the listeners and steering, and return its pid once it serves; this process then
        only drains. Raises SuccessorFailed (this process serving on) if it does not."""
        if self.handed_over.is_set():
            raise RestartRefused("this process has handed over to its successor and drains")
        if self._restarting:
            raise RestartRefused("a restart is already in progress")
        if not self.command:
            raise RestartRefused("this edge was not started by `ramp edge`: no command to rerun")
        assert self.tunnels is not None
        self._restarting = True
        sockets = published()
        if self.restart_server is not None and self.restart_server.sock is not None:
            sockets.append(("restart", self.restart_server.sock))
        handoff = Handoff(sockets, dict(self.steering), {"flows": len(self.table)})
        try:
            progress("starting the successor")
            successor = await Successor.spawn(self.command, handoff)
            try:
                await hand_over(
                    successor,
                    on_listening=lambda body: self._successor_listens(body, progress),
                    on_serving=lambda body: self._successor_joined(body.get("slots", {})),
                    progress=progress,
                )
            except BaseException:
                for group, slot in self.steering.values():
                    with contextlib.suppress(OSError, ValueError):
                        group.set_working([slot])
                await successor.kill()
                raise
            successor.release()
            self._successor = successor  # its channel closes when this process exits
        finally:
            self._restarting = False
        log.info("successor pid %d serves: draining and exiting", successor.pid)
        self.handed_over.set()
        return successor.pid

    def _successor_listens(
        self, body: dict[str, Any], progress: Callable[[str], None]
    ) -> dict[str, Any]:
        """The successor's tunnel socket is in the group: new connections go to it, and the
        connectors are told to follow; it waits for as many connections as were told."""
        assert self.tunnels is not None
        self._successor_joined(body.get("slots", {}))
        told = self.tunnels.announce_successor(str(body.get("edge_id", "")))
        progress(
            f"successor pid {body.get('pid')} listens; {sum(told.values())} tunnel "
            "connection(s) told to follow it"
        )
        return {"tunnels": told}

    def _successor_joined(self, slots: dict[str, Any]) -> None:
        """New connections of these listeners go to the successor's sockets from now on."""
        for name, slot in slots.items():
            if name in self.steering:
                group, _ = self.steering[name]
                group.joined(int(slot))
                group.set_working([int(slot)])

    async def stop_accepting(self) -> None:
        """Accept nothing new (a drain); flows already open go on."""
        for server in self.onramps:
            stop = getattr(server, "stop_accepting", None)
            if stop is not None:
                await stop()
        if self.status is not None:
            self.status.stop_accepting()
        if self.restart_server is not None:
            self.restart_server.stop_accepting()
            self.restart_server.refusal = "this process is draining"

    def open_streams(self) -> int:
        """Stream flows and on-ramp connections still open (a SOCKS5 UDP association lives
        as long as its TCP connection: it finishes here too)."""
        flows = sum(1 for f in self.table if f.kind is not FlowKind.DATAGRAM)
        return flows + sum(getattr(s, "open_connections", 0) for s in self.onramps)

    async def drain(self, timeout: float) -> None:
        """Wait until the open stream flows have finished, up to `timeout` seconds. UDP
        sessions get no new datagrams once the listeners are closed (a successor reads the
        sockets), so they are not waited for beyond the first second."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while loop.time() - start < min(1.0, timeout) or (
            self.open_streams() and loop.time() - start < timeout
        ):
            await asyncio.sleep(0.05)
        if self.open_streams():
            log.warning("drain timeout: cutting %d open flows", self.open_streams())

    async def wait_tunnels(self, expected: dict[str, int], timeout: float) -> bool:
        """Wait until as many connections as the predecessor told to follow are registered."""
        assert self.tunnels is not None
        tunnels = self.tunnels
        try:
            async with asyncio.timeout(timeout):
                while any(tunnels.count(tid) < int(n) for tid, n in expected.items()):
                    await asyncio.sleep(0.02)
        except TimeoutError:
            return False
        return True

    def _final_counts(self) -> str:
        """Datagram drops of this process, for its last log line (after a restart its
        counters leave with it: the successor's /metrics start from zero)."""
        drops = []
        for metric in (self.metrics.udp_drops, self.metrics.tunnel_bad_packets):
            for family in metric.collect():
                for sample in family.samples:
                    if sample.name.endswith("_total") and sample.value:
                        drops.append(f"{sample.labels.get('reason', '?')}={sample.value:.0f}")
        return ", ".join(drops) or "none"

    async def close(self) -> None:
        log.info("closing: datagrams dropped: %s", self._final_counts())
        if self._poller is not None:
            self._poller.cancel()
        if self.restart_server is not None:
            await self.restart_server.close(unlink=not self.handed_over.is_set())
        for server in self.onramps:
            await server.close()
        for client in self._dns_clients.values():
            client.close()
        if self.sessions is not None:
            self.sessions.close()
        if self.tunnels is not None:
            self.tunnels.close()
        if self.status is not None:
            await self.status.close()
        for group, slot in self.steering.values():
            with contextlib.suppress(OSError, ValueError):
                group.release(slot)
            group.close()
        self.store.close()
        self.audit.close()

    def _packet_from_tunnel(self, tunnel_id: str, packet: bytes) -> None:
        """A connector's IP packet (an echo reply, an ICMP error) for a connect-ip client."""
        for server in self.onramps:
            take = getattr(server, "packet_from_tunnel", None)
            if take is not None and take(tunnel_id, packet):
                return
        self.metrics.tunnel_packet_drops.labels("no_client").inc()

    def ready(self) -> tuple[bool, dict[str, Any]]:
        assert self.tunnels is not None
        by_tunnel = {
            self._tunnel_names.get(tid, tid): len(entry.conns)
            for tid, entry in self.tunnels.tunnels.items()
        }
        n = sum(by_tunnel.values())
        return n > 0, {
            "status": "ready" if n else "waiting for a connector",
            "connections": by_tunnel,
            "flows": len(self.table),
        }

    # -- configuration reload (SIGHUP) -----------------------------------------------------------

    def reload_config(self, config: EdgeConfig) -> None:
        """Take a new config's hooks, groups and policy settings; raises (and keeps the old
        state) if its hooks do not load. Listeners and limits stay as they are until a
        restart."""
        # First: logrotate's SIGHUP must move the audit log even when the new hooks are bad.
        self.audit.reopen()
        user = load_hooks(hook_specs(config))  # raises HookLoadError: nothing changed yet
        restart_keys = (
            "tunnel_listen",
            "metrics_listen",
            "data_dir",
            "audit_log",
            "audit_log_max_bytes",
            "audit_log_backups",
            "max_flows",
        )
        if config.effective_onramps() != self.config.effective_onramps() or any(
            getattr(config, k) != getattr(self.config, k) for k in restart_keys
        ):
            log.warning("listener, store, audit and limit changes take effect at the next restart")
        self.hooks = self._make_hooks(user)
        self.pipeline.hooks = self.hooks
        self._groups = _invert_groups(config.groups)
        self.pipeline.revoke_denied()  # open flows of users whose groups changed
        self.router.allow_direct = config.allow_direct_egress
        self._set_direct_proxy(config)
        for server in self.onramps:  # credentials and timeouts apply to the next connection
            if hasattr(server, "config"):
                server.config = config
        self.config = config
        self._store_version = -1
        self.reload_store()

    # -- store -----------------------------------------------------------------------------------

    def reload_store(self, *, told: bool = False) -> None:
        """Read the store again if it changed (`told`: another worker saw it change)."""
        version = self.store.data_version()
        if version == self._store_version:
            return
        self._store_version = version
        if self.worker is not None and not told and self._loaded_once:
            self.worker.store_changed()
        self._loaded_once = True
        tunnels = {t.id: t.name for t in self.store.list_tunnels()}
        routes = VnetRoutes(self.store.list_routes())
        self.router.tables = routes.tables
        self.metrics.routes.set(len(routes))
        self._vnet_assignments.clear()
        self._vnet_assignments.update(self.store.vnet_assignments())
        self.dns_zones = DnsZones(
            [DnsZoneRoute(r.zone, r.tunnel_id, r.tunnel_name) for r in self.store.list_dns_routes()]
        )
        rules = self.store.list_rules()
        self.policy.replace(Policy(rules))
        self.metrics.policy_rules.set(len(rules))
        for tid in [t for t in self._dns_clients if t not in tunnels]:
            self._dns_clients.pop(tid).close()
        gone = set(self._tunnel_names) - set(tunnels)
        self._tunnel_names = tunnels
        if self.tunnels is not None:
            for tid in list(self.tunnels.tunnels):
                if tid in gone or tid not in tunnels:
                    log.info("tunnel %s was deleted: closing its connections", tid)
                    self.tunnels.drop_tunnel(tid, CloseCode.TUNNEL_DELETED, "tunnel deleted")
        self._reload_clients()
        revoked = self.pipeline.revoke_denied()
        log.debug(
            "store loaded: %d tunnels, %d rules, %d flows ended by policy",
            len(tunnels),
            len(rules),
            revoked,
        )

    # -- client identities -----------------------------------------------------------------------

    @property
    def revoked_clients(self) -> frozenset[str]:
        """Names of the revoked client identities, as of the last store poll."""
        return self._revoked_clients or frozenset()

    def on_revoked(self, callback: Callable[[Set[str]], None]) -> None:
        """Call `callback(names)` whenever client identities are revoked, after the edge
        ended their flows: an on-ramp with connections of its own (MASQUE) closes them."""
        self._on_revoked.append(callback)

    def _reload_clients(self) -> None:
        clients = self.store.list_clients()
        self._client_names = frozenset(c.name for c in clients)
        self.credentials.active = any(c.revoked_at is None for c in clients)
        revoked = frozenset(c.name for c in clients if c.revoked_at is not None)
        before, self._revoked_clients = self._revoked_clients, revoked
        self.pipeline.revoked |= revoked
        if before is None or not revoked - before:
            return
        newly = revoked - before
        ended = self.pipeline.end_identity(newly)
        self.metrics.client_flows_revoked.inc(ended)
        log.info(
            "client%s %s revoked: %d open flow%s ended",
            "s" if len(newly) > 1 else "",
            ", ".join(sorted(newly)),
            ended,
            "" if ended == 1 else "s",
        )
        for callback in list(self._on_revoked):
            try:
                callback(newly)
            except Exception:
                log.exception("a client revocation callback failed")

    async def _poll_store(self) -> None:
        while True:
            await asyncio.sleep(self.config.store_poll_interval)
            try:
                self.reload_store()
            except Exception:
                log.exception("reloading the store failed; keeping the last good state")

    def _zone_lookup(self, host: str) -> tuple[str, str, str] | None:
        zone = self.dns_zones.lookup(host)
        return None if zone is None else (zone.tunnel_id, zone.tunnel_name, zone.zone)

    def _replicas(self, tunnel_id: str) -> list[str]:
        if self.tunnels is None:
            return []
        return sorted({c.connector_id for c in self.tunnels.candidates(tunnel_id)})

    def _groups_of(self, user: str) -> frozenset[str]:
        return self._groups.get(user, frozenset())

    # -- tunnel registrations --------------------------------------------------------------------

    def check_registration(self, frame: Register) -> Verdict:
        if frame.version != PROTOCOL_VERSION:
            return Verdict(
                False,
                error=RegisterError.UNSUPPORTED_VERSION,
                message=f"edge speaks version {PROTOCOL_VERSION}, not {frame.version}",
            )
        tid = str(frame.tunnel_id)
        status = self.store.tunnel_status(tid)
        if status == "unknown":
            return Verdict(
                False, error=RegisterError.UNKNOWN_TUNNEL, message=f"no tunnel {tid} on this edge"
            )
        if status == "deleted":
            return Verdict(
                False, error=RegisterError.TUNNEL_DELETED, message=f"tunnel {tid} was deleted"
            )
        if not self.store.verify_secret(tid, frame.secret):
            return Verdict(
                False, error=RegisterError.BAD_PROOF, message="the tunnel secret does not match"
            )
        tunnel = self.store.get_tunnel(tid)
        self._tunnel_names[tid] = tunnel.name if tunnel else tid
        return Verdict(True, tunnel_name=self._tunnel_names[tid])

    def _registration_refused(self, reason: str, peer: str, message: str) -> None:
        self.metrics.registration_failures.labels(reason).inc()

    def _connections_changed(self) -> None:
        assert self.tunnels is not None
        self.metrics.tunnel_connections.clear()
        for tid, entry in self.tunnels.tunnels.items():
            self.metrics.tunnel_connections.labels(self._tunnel_names.get(tid, tid)).set(
                len(entry.conns)
            )
        if self.worker is not None:  # the connections other workers may send flows to
            self.worker.tunnels(self.tunnels.serving_counts())

    def _rebalance(self, tunnel_id: str, slot: int) -> bool:
        """The supervisor asks to move one of this worker's connections of the tunnel to the
        worker at `slot`: its connector redials with an Initial id carrying that slot."""
        given = self.steering.get("tunnel")
        if self.tunnels is None or given is None:
            return False
        group, _ = given
        return self.tunnels.redial(tunnel_id, group.cookies.issue(slot))

    # -- workers (ramp.workers, ramp.flows.moved) ------------------------------------------------

    def _mover(self, listen: str) -> FlowMover:
        """How an on-ramp on `listen` hands a flow to the worker holding its tunnel."""

        async def move(sock: socket.socket, flow: Flow, plan: FlowPlan, worker: int) -> bool:
            described = plan_to_dict(plan)
            if self.worker is None or described is None:
                return False
            body = {"listen": listen, "flow": flow_to_dict(flow), "plan": described}
            if not self.worker.move(sock, worker, body):
                return False
            self.metrics.flows_moved.labels("out").inc()
            return True

        return move

    def _adopt(self, sock: socket.socket, body: dict[str, Any]) -> None:
        """A flow another worker moved here: go on with it on the on-ramp it came in on."""
        try:
            flow = flow_from_dict({**body["flow"], "from": body.get("from")})
            plan = plan_from_dict(body["plan"], flow.destination)
            listen = str(body["listen"])
        except (KeyError, TypeError, ValueError) as e:
            log.warning("a moved flow with a malformed description: %r; closed", e)
            self.bad_input("workers", "malformed_moved_flow")
            sock.close()
            return
        for server in self.onramps:
            options = getattr(server, "options", None)
            if isinstance(server, TcpOnRamp) and options is not None and options.listen == listen:
                self.metrics.flows_moved.labels("in").inc()
                server.take(server.adopt(sock, flow, plan))
                return
        log.warning("a moved flow for on-ramp %s, which this worker lacks: closed", listen)
        self.bad_input("workers", "moved_flow_without_onramp")
        sock.close()

    def scrape(self) -> tuple[str, bool, dict[str, Any]]:
        """This worker's metrics and readiness, for the supervisor's one view."""
        ok, info = self.ready()
        return generate_latest(self.metrics.registry).decode(), ok, info

    # -- the flow path (delegated) ---------------------------------------------------------------

    async def open_tcp(self, flow: Flow) -> TcpLeg:
        return await self.pipeline.open_tcp(flow)

    async def open_udp(
        self, flow: Flow, receive: Callable[[bytes], None], closed: Callable[[str], None]
    ) -> UdpSession:
        return await self.pipeline.open_udp(flow, receive, closed)

    def flow_finished(self, flow: Flow) -> None:
        self.table.end(flow)

    def _opened(self, flow: Flow) -> None:
        if flow.kind is FlowKind.DATAGRAM and self.sessions is not None:
            self.metrics.udp_sessions_active.set(len(self.sessions.sessions))

    def _report(self, flow: Flow) -> None:
        m = self.metrics
        assert flow.result is not None
        if "moved_to" in flow.annotations:
            return  # the worker it moved to reports it
        if flow.kind is FlowKind.DATAGRAM:
            m.udp_sessions.labels(flow.result.value).inc()
            if self.sessions is not None:
                m.udp_sessions_active.set(len(self.sessions.sessions))
        else:
            m.flows.labels(flow.onramp, flow.result.value).inc()
            if flow.bytes_up:
                m.flow_bytes.labels("up").inc(flow.bytes_up)
            if flow.bytes_down:
                m.flow_bytes.labels("down").inc(flow.bytes_down)
        if flow.user is not None and flow.user in self._client_names:
            m.client_flows.labels(flow.user, flow.result.value).inc()
        record = flow_record(flow)
        self.audit.write_record(record)
        self.hooks.flow_end(record)

    # -- DNS through tunnels (internal flows of the edge itself) ---------------------------------

    def _dns_elsewhere(self, tunnel_id: str) -> int | None:
        """The worker to ask when this one holds no connection of the zone's tunnel."""
        if self.worker is None or self.tunnels is None or self.tunnels.serving(tunnel_id, None):
            return None
        return self.worker.elsewhere(tunnel_id)

    async def _answer_dns(self, body: dict[str, Any]) -> dict[str, Any]:
        """Another worker's DNS query for a tunnel this worker holds."""
        answer = await self.dns_query(bytes.fromhex(str(body["query"])), local_only=True)
        return {"answer": answer.hex() if answer is not None else None}

    async def dns_query(self, query: bytes, *, local_only: bool = False) -> bytes | None:
        try:
            msg = dns.message.from_wire(query)
        except dns.exception.DNSException as e:
            raise FlowError(FlowResult.ERROR, f"malformed DNS query: {e}") from e
        if not msg.question:
            return None
        zone = self.dns_zones.lookup(msg.question[0].name.to_text(omit_final_dot=True))
        if zone is None:
            return None
        holder = self._dns_elsewhere(zone.tunnel_id) if not local_only else None
        if holder is not None:  # only another worker holds the tunnel: it asks for us
            assert self.worker is not None
            answer = await self.worker.ask(
                holder, "dns", {"query": query.hex()}, self.config.dns_timeout + 1
            )
            if answer.get("error"):
                raise FlowError(FlowResult.ERROR, f"worker {holder}: {answer['error']}")
            return bytes.fromhex(answer["answer"]) if answer.get("answer") else None
        client = self._dns_clients.get(zone.tunnel_id)
        if client is None:
            route = Route("tunnel", "default", zone.tunnel_id, zone.tunnel_name, zone.zone)
            tunnel = self.offramps["tunnel"]

            async def open_tcp(flow: Flow) -> TcpLeg:
                self.table.admit(flow)
                flow.route = route
                return await tunnel.open_stream(flow, route)

            async def open_udp(
                flow: Flow, receive: Callable[[bytes], None], closed: Callable[[str], None]
            ) -> UdpSession:
                flow.route = route
                flow.resolved = RESOLVER_HOST
                try:
                    self.table.admit(flow)
                    session = await tunnel.open_datagram(flow, route, receive, closed)
                except BaseException as e:
                    if isinstance(e, FlowError):
                        flow.fail(e.result, e.reason)
                    flow.fail(FlowResult.ERROR, "cancelled while opening")
                    self.table.end(flow)
                    raise
                self._opened(flow)
                return session

            client = TunnelDnsClient(
                zone, open_udp, open_tcp, self.flow_finished, self.config.dns_timeout
            )
            self._dns_clients[zone.tunnel_id] = client
        return await client.query(query)

    def _dns_outcome(self, outcome: str) -> None:
        self.metrics.dns_queries.labels(outcome).inc()

    def bad_input(self, onramp: str, reason: str, peer: tuple[str, int] | None = None) -> None:
        self.metrics.bad_input.labels(onramp, reason).inc()
        if self._bad_input_log.allow((onramp, reason)):
            log.info(
                "bad input on %s from %s: %s",
                onramp,
                f"{peer[0]}:{peer[1]}" if peer else "-",
                reason,
            )


def hook_specs(config: EdgeConfig) -> list[HookSpec]:
    return [
        HookSpec(h, {}) if isinstance(h, str) else HookSpec(h.source, dict(h.options))
        for h in config.hooks
    ]


def _invert_groups(groups: dict[str, list[str]]) -> dict[str, frozenset[str]]:
    by_user: dict[str, set[str]] = {}
    for group, users in groups.items():
        for user in users:
            by_user.setdefault(user, set()).add(group)
    return {user: frozenset(gs) for user, gs in by_user.items()}


async def serve_edge(
    config: EdgeConfig,
    stop: asyncio.Event,
    reloaded: asyncio.Queue[Callable[[], EdgeConfig]] | None = None,
    *,
    command: list[str] | None = None,
    upgrade: asyncio.Queue[None] | None = None,
    load: Callable[[], EdgeConfig] | None = None,
) -> int:
    """Run an edge until `stop` (then drain) or until a successor serves (then drain and
    return). `command` is what a restart runs; `upgrade` takes SIGQUIT's restarts."""
    try:
        worker = await WorkerLink.from_environment()
        predecessor = await Predecessor.from_environment()
    except ChannelError as e:
        log.error("cannot take over from the previous edge process: %s", e)
        return 1
    if worker is not None:
        share_ports()  # the other workers bind the same ports
        number_flows(worker.index + 1, worker.workers)
    try:
        edge = Edge(config)
    except HookLoadError as e:
        log.error("cannot start the edge: %s", e)
        if predecessor is not None:
            predecessor.failed(str(e))
        return 2
    edge.command = command or []
    edge.predecessor = predecessor
    edge.worker = worker
    install(
        SocketSet.from_systemd()
        if predecessor is None
        else SocketSet(predecessor.sockets, strict=True)
    )
    try:
        if predecessor is None:
            await edge.start()
        else:
            await _take_over(edge, predecessor)
    except (OSError, ChannelError, TimeoutError, ValueError) as e:
        log.error("cannot start the edge: %s", e)
        if predecessor is not None:
            predecessor.failed(f"cannot start the edge: {e}")
        await edge.close()
        return 1
    inherited().close_untaken()
    if worker is not None:
        worker.scrape = edge.scrape
        worker.adopt = edge._adopt
        worker.answerers["dns"] = edge._answer_dns
        worker.on_store = lambda: edge.reload_store(told=True)
        worker.on_rebalance = edge._rebalance
        worker.start()
        worker.listening()
        log.info("edge worker %d of %d ready", worker.index, worker.workers)
    log.info("edge %s ready", uuid.uuid4().hex[:8])
    notify = Notifier()
    if predecessor is not None:
        notify.main_pid(os.getpid())
    notify.ready(_status_line(edge))
    notify.start_watchdog()
    tasks = []
    if reloaded is not None:
        tasks.append(asyncio.ensure_future(_reloads(edge, reloaded, notify)))
    if upgrade is not None:
        tasks.append(asyncio.ensure_future(_upgrades(edge, upgrade)))
    if predecessor is not None:
        tasks.append(asyncio.ensure_future(predecessor.gone(_predecessor_gone)))
    stopping = asyncio.ensure_future(stop.wait())
    handed = asyncio.ensure_future(edge.handed_over.wait())
    if worker is not None:  # told to stop, or its supervisor is gone: it drains and exits
        tasks.append(asyncio.ensure_future(stop_when(worker.stop, stop)))
        if reloaded is not None and load is not None:
            worker.on_reload = lambda: reloaded.put_nowait(load)
    try:
        await asyncio.wait({stopping, handed}, return_when=asyncio.FIRST_COMPLETED)
        if handed.done():  # the successor is the service now: not a stop
            notify.status(f"handed over; draining {len(edge.table)} flows")
        else:
            notify.stopping(f"stopping: {len(edge.table)} flows open")
        await edge.stop_accepting()
        drain = asyncio.ensure_future(edge.drain(config.drain_timeout))
        # a second SIGTERM (run_until_signal) exits at once; `stop` set during a handover's
        # drain ends it early too
        await asyncio.wait(
            {drain, stopping} if handed.done() else {drain}, return_when=asyncio.FIRST_COMPLETED
        )
        drain.cancel()
    finally:
        stopping.cancel()
        handed.cancel()
        for task in tasks:
            task.cancel()
        await edge.close()
        await notify.close()
        if worker is not None:
            worker.close()
    return 0


async def _take_over(edge: Edge, predecessor: Predecessor) -> None:
    """Start as a restart's successor: join the tunnel port, wait for the connectors the
    predecessor told to follow, then take the listeners when it says so."""
    assert edge.tunnels is None
    await edge.start(listeners=False)
    assert edge.tunnels is not None

    async def until_ready(expect: dict[str, Any]) -> None:
        tunnels = {str(k): int(v) for k, v in dict(expect.get("tunnels", {})).items()}
        if not await edge.wait_tunnels(tunnels, CONNECTOR_FOLLOW_TIMEOUT):
            log.warning(
                "not every connector followed within %.0f s: taking over all the same",
                CONNECTOR_FOLLOW_TIMEOUT,
            )

    await take_over(
        predecessor,
        {"edge_id": edge.tunnels.edge_id},
        until_ready=until_ready,
        serve=edge.start_listeners,
    )


CONNECTOR_FOLLOW_TIMEOUT = 10.0  # a successor waits this long for the connectors told to follow


def _predecessor_gone() -> None:
    log.info("the previous edge process has exited")


async def _upgrades(edge: Edge, upgrade: asyncio.Queue[None]) -> None:
    while True:
        await upgrade.get()
        try:
            pid = await edge.restart(lambda text: log.info("restart: %s", text))
        except (RestartRefused, SuccessorFailed) as e:
            log.error("SIGQUIT restart failed, serving on: %s", e)
        else:
            log.info("SIGQUIT restart: successor pid %d serves", pid)


def _status_line(edge: Edge) -> str:
    _, detail = edge.ready()
    return f"{detail['status']}: {sum(detail['connections'].values())} tunnel connections"


async def _reloads(
    edge: Edge, reloaded: asyncio.Queue[Callable[[], EdgeConfig]], notify: Notifier
) -> None:
    while True:
        load = await reloaded.get()
        notify.reloading()
        try:
            try:
                config = load()
            except Exception:
                edge.audit.reopen()  # a bad config file still lets logrotate's SIGHUP work
                raise
            edge.reload_config(config)
        except (ConfigError, HookLoadError) as e:
            edge.metrics.config_reloads.labels("failed").inc()
            # every worker reads the same file: one line per reload, from the first worker
            speaks = edge.worker is None or edge.worker.index == 0
            log.log(
                logging.ERROR if speaks else logging.DEBUG,
                "reload failed, keeping the running configuration: %s",
                e,
            )
        except Exception:
            edge.metrics.config_reloads.labels("failed").inc()
            log.exception("reload failed, keeping the running configuration")
        else:
            edge.metrics.config_reloads.labels("ok").inc()
            log.info("configuration reloaded: %d hook(s)", len(edge.hooks.hooks) - 1)
        notify.ready(_status_line(edge))  # also after a failed reload: the old config serves


def run_edge(config: EdgeConfig, load: Callable[[], EdgeConfig] | None = None) -> int:
    """`ramp edge`: run until SIGINT/SIGTERM (then drain); SIGHUP re-reads the config with
    `load`; SIGQUIT starts a successor (`ramp edge restart` does the same)."""
    from ramp.restart.successor import successor_command
    from ramp.runtime import run_until_signal

    queue: asyncio.Queue[Callable[[], EdgeConfig]] | None = None
    upgrades: asyncio.Queue[None] | None = None

    worker = WORKER_ENV in os.environ  # read here: the worker's link takes it out
    if config.workers > 1 and not worker:
        apply_budget(config)
        return _supervise(config, successor_command())
    if worker:  # limits are for the whole edge: this worker enforces its share
        from ramp.workers.shares import worker_share

        workers = config.workers
        config = worker_share(config, workers)
        if load is not None:
            whole = load
            load = lambda: worker_share(whole(), workers)  # noqa: E731
    apply_budget(config)

    async def main(stop: asyncio.Event) -> int:
        nonlocal queue, upgrades
        queue = asyncio.Queue()
        upgrades = asyncio.Queue()
        return await serve_edge(
            config, stop, queue, command=successor_command(), upgrade=upgrades, load=load
        )

    def reload() -> None:
        if worker:
            return  # a worker reloads when its supervisor says (ramp.workers.link)
        if queue is not None and load is not None:
            queue.put_nowait(load)

    def upgrade() -> None:
        if worker or upgrades is None:
            # a worker's restarts are its supervisor's (Ctrl-\ reaches the whole group)
            log.warning("SIGQUIT ignored: this is a worker; its supervisor decides restarts")
            return
        upgrades.put_nowait(None)

    return run_until_signal(main, reload if load is not None else None, upgrade)


# on-ramps that own an address (any-port, TUN, TCP upgrade): one process binds it
_ONE_PROCESS_ONRAMPS = frozenset({"anyport", "tun", "tcp_upgrade", "connect_ip"})


def _supervise(config: EdgeConfig, command: list[str]) -> int:
    """`ramp edge --workers N`: the supervisor (ramp.workers.supervisor)."""
    from ramp.workers.supervisor import supervise

    kinds = sorted({o.type for o in config.effective_onramps()} & _ONE_PROCESS_ONRAMPS)
    if kinds:
        log.error("--workers: the %s on-ramp(s) run in one process only", ", ".join(kinds))
        return 2
    for listen in [config.tunnel_listen, *(o.listen for o in config.effective_onramps())]:
        if parse_hostport(listen)[1] == 0:
            log.error("--workers: listener %s has port 0; each worker would get its own", listen)
            return 2

    def groups() -> dict[str, SteeringGroup]:
        made = {"tunnel": SteeringGroup.create(), "masque": SteeringGroup.create()}
        if any(g.mechanism != "ebpf" for g in made.values()):
            # classic BPF steers only by the join order one process knows, and without
            # steering QUIC packets reach any worker: connections would break
            for group in made.values():
                group.close()
            raise SystemExit(
                "ramp: --workers needs the eBPF reuseport program (see the warning above); "
                "run one process instead"
            )
        return made

    restart_socket = Path(config.data_dir).expanduser() / SOCKET_NAME
    return supervise("edge", command, config.workers, config.metrics_listen, groups, restart_socket)


__all__ = ["Edge", "run_edge", "serve_edge"]
