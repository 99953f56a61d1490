"""The edge role: on-ramps in, routing to tunnels (or direct egress) out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import dns.exception
import dns.message

from ramp.config import EdgeConfig, parse_hostport
from ramp.flows.flow import Flow, FlowError, FlowResult
from ramp.flows.opener import TcpLeg, UdpSession
from ramp.observe.audit import AuditLog
from ramp.observe.loglimit import LogLimiter
from ramp.observe.metrics import EdgeMetrics
from ramp.observe.status import start_status_server
from ramp.offramps.tcp import DirectLeg, dial_tcp, is_ip_literal, resolve
from ramp.offramps.tunnel import ConnectionGone, open_tunnel_flow
from ramp.onramps.dns import DnsServer
from ramp.onramps.http_connect import HttpConnectServer
from ramp.onramps.socks5 import Socks5Server
from ramp.policy.router import RouteEntry, RouteTable
from ramp.store.db import Store
from ramp.tunnel.dns_edge import DnsZoneRoute, DnsZones, TunnelDnsClient
from ramp.tunnel.edge_side import TunnelEdge, Verdict, server_configuration
from ramp.tunnel.resolver import RESOLVER_HOST
from ramp.tunnel.sessions_edge import EdgeSessions
from ramp.wire.tunnel import PROTOCOL_VERSION, CloseCode, Register, RegisterError

log = logging.getLogger("ramp.edge")


class Edge:
    """One edge process: implements `FlowOpener` for its on-ramps."""

    def __init__(self, config: EdgeConfig, *, metrics: EdgeMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or EdgeMetrics()
        self.store = Store(config.data_dir)
        self.audit = AuditLog(config.audit_log)
        self.routes = RouteTable()
        self.dns_zones = DnsZones([])
        self._dns_clients: dict[str, TunnelDnsClient] = {}
        self.sessions: EdgeSessions | None = None
        self._bad_input_log = LogLimiter()
        self.active: set[int] = set()
        self._store_version = -1
        self._tunnel_names: dict[str, str] = {}
        self.tunnels: TunnelEdge | None = None
        self.onramps: list[Any] = []
        self.status: Any = None
        self._poller: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        ident = self.store.edge_identity()
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
        )
        host, port = parse_hostport(self.config.tunnel_listen)
        await self.tunnels.start(host, port)
        m = self.metrics
        self.sessions = EdgeSessions(
            self.tunnels,
            idle_timeout=self.config.udp_idle_timeout,
            limit=self.config.max_udp_sessions,
            on_finished=self.flow_finished,
            metrics_datagram=m.count_datagram,
            metrics_drop=lambda reason: m.udp_drops.labels(reason).inc(),
            on_bad_input=lambda reason: self.bad_input("tunnel", "malformed_datagram"),
        )
        self.tunnels.sessions = self.sessions
        log.info("tunnel listener on %s:%d/udp (QUIC, ALPN ramp-tunnel/1)", host, self.tunnels.port)
        for listen, cls in (
            (self.config.socks5_listen, Socks5Server),
            (self.config.http_listen, HttpConnectServer),
            (self.config.dns_listen, DnsServer),
        ):
            if listen == "off":
                continue
            if cls is DnsServer:
                server = DnsServer(self.config, self, on_outcome=self._dns_outcome)
            else:
                server = cls(self.config, self)
            h, p = parse_hostport(listen)
            await server.start(h, p)
            self.onramps.append(server)
        self.status = await start_status_server(
            self.config.metrics_listen, self.metrics.registry, self.ready
        )
        self._poller = asyncio.ensure_future(self._poll_store())

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
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
        self.store.close()
        self.audit.close()

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
            "flows": len(self.active),
        }

    # -- store -----------------------------------------------------------------------------------

    def reload_store(self) -> None:
        version = self.store.data_version()
        if version == self._store_version:
            return
        self._store_version = version
        tunnels = {t.id: t.name for t in self.store.list_tunnels()}
        self.routes = RouteTable(
            RouteEntry(r.network, r.tunnel_id, r.tunnel_name) for r in self.store.list_routes()
        )
        self.metrics.routes.set(len(self.routes))
        self.dns_zones = DnsZones(
            [DnsZoneRoute(r.zone, r.tunnel_id, r.tunnel_name) for r in self.store.list_dns_routes()]
        )
        for tid in [t for t in self._dns_clients if t not in tunnels]:
            self._dns_clients.pop(tid).close()
        gone = set(self._tunnel_names) - set(tunnels)
        self._tunnel_names = tunnels
        if self.tunnels is not None:
            for tid in list(self.tunnels.tunnels):
                if tid in gone or tid not in tunnels:
                    log.info("tunnel %s was deleted: closing its connections", tid)
                    self.tunnels.drop_tunnel(tid, CloseCode.TUNNEL_DELETED, "tunnel deleted")
        log.debug("store loaded: %d tunnels, %d routes", len(tunnels), len(self.routes))

    async def _poll_store(self) -> None:
        while True:
            await asyncio.sleep(self.config.store_poll_interval)
            try:
                self.reload_store()
            except Exception:
                log.exception("reloading the store failed; keeping the last good state")

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

    # -- FlowOpener ------------------------------------------------------------------------------

    async def open_tcp(self, flow: Flow) -> TcpLeg:
        self.active.add(flow.id)
        self.metrics.flows_active.set(len(self.active))
        started = time.monotonic()
        if len(self.active) > self.config.max_flows:
            raise FlowError(FlowResult.ERROR, f"edge at its limit of {self.config.max_flows} flows")
        route = await self._route(flow)
        if route is not None:
            leg: TcpLeg = await self._open_via_tunnel(flow, route)
        elif self.config.allow_direct_egress:
            flow.route = "direct"
            assert flow.resolved is not None
            sock = await dial_tcp(flow.resolved, flow.destination.port, self.config.connect_timeout)
            leg = DirectLeg(flow, sock)
        else:
            raise FlowError(
                FlowResult.NOT_PERMITTED,
                f"no route to {flow.resolved} and direct egress is off",
            )
        self.metrics.flow_setup.observe(time.monotonic() - started)
        return leg

    async def _route(self, flow: Flow) -> RouteEntry | None:
        """The tunnel route for a flow, or None. A hostname under a routed DNS zone goes to
        that zone's tunnel unresolved (its connector resolves it privately); other names are
        resolved here and routed by address."""
        dest = flow.destination
        if not is_ip_literal(dest.host):
            zone = self.dns_zones.lookup(dest.host)
            if zone is not None:
                flow.route = zone.tunnel_name
                return RouteEntry(None, zone.tunnel_id, zone.tunnel_name)  # type: ignore[arg-type]
        addrs = await resolve(dest.host, dest.port)
        flow.resolved = addrs[0][1][0]
        route = self.routes.lookup(flow.resolved)
        if route is not None:
            flow.route = route.tunnel_name
        return route

    @contextlib.contextmanager
    def _finish_on_failure(self, flow: Flow) -> Iterator[None]:
        """A UDP flow that fails (or is cancelled) while opening is reported once, here: the
        on-ramp only sees the exception."""
        try:
            yield
        except FlowError as e:
            flow.result, flow.reason = e.result, e.reason
            self.flow_finished(flow)
            raise
        except asyncio.CancelledError:
            flow.result, flow.reason = FlowResult.ERROR, "cancelled while opening"
            self.flow_finished(flow)
            raise

    async def open_udp(
        self, flow: Flow, receive: Callable[[bytes], None], closed: Callable[[str], None]
    ) -> UdpSession:
        flow.protocol = "udp"
        with self._finish_on_failure(flow):
            route = await self._route(flow)
        if route is None:
            if self.config.allow_direct_egress and flow.resolved is not None:
                return await self._open_direct_udp(flow, flow.resolved, receive, closed)
            flow.result = FlowResult.NOT_PERMITTED
            flow.reason = f"no route to {flow.resolved} and direct egress is off"
            self.flow_finished(flow)
            raise FlowError(flow.result, flow.reason)
        host = flow.resolved or flow.destination.host
        return await self._open_session(flow, route, host, receive, closed)

    async def _open_direct_udp(
        self,
        flow: Flow,
        ip: str,
        receive: Callable[[bytes], None],
        closed: Callable[[str], None],
    ) -> UdpSession:
        assert self.sessions is not None
        flow.route = "direct"
        with self._finish_on_failure(flow):
            session = await self.sessions.open_direct(flow, ip, receive, closed)
        self.metrics.udp_sessions_active.set(len(self.sessions.sessions))
        return session

    async def _open_session(
        self,
        flow: Flow,
        route: RouteEntry,
        host: str,
        receive: Callable[[bytes], None],
        closed: Callable[[str], None],
    ) -> UdpSession:
        assert self.sessions is not None
        flow.protocol = "udp"
        flow.route = route.tunnel_name
        with self._finish_on_failure(flow):
            session = await self.sessions.open(
                flow, route.tunnel_id, host, receive, closed, self.config.connect_timeout
            )
        self.metrics.udp_sessions_active.set(len(self.sessions.sessions))
        return session

    async def dns_query(self, query: bytes) -> bytes | None:
        try:
            msg = dns.message.from_wire(query)
        except dns.exception.DNSException as e:
            raise FlowError(FlowResult.ERROR, f"malformed DNS query: {e}") from e
        if not msg.question:
            return None
        zone = self.dns_zones.lookup(msg.question[0].name.to_text(omit_final_dot=True))
        if zone is None:
            return None
        client = self._dns_clients.get(zone.tunnel_id)
        if client is None:
            route = RouteEntry(None, zone.tunnel_id, zone.tunnel_name)  # type: ignore[arg-type]

            async def open_tcp(flow: Flow) -> TcpLeg:
                flow.route = zone.tunnel_name
                return await self._open_via_tunnel(flow, route)

            async def open_udp(
                flow: Flow, receive: Callable[[bytes], None], closed: Callable[[str], None]
            ) -> UdpSession:
                return await self._open_session(flow, route, RESOLVER_HOST, receive, closed)

            client = TunnelDnsClient(
                zone, open_udp, open_tcp, self.flow_finished, self.config.dns_timeout
            )
            self._dns_clients[zone.tunnel_id] = client
        return await client.query(query)

    async def _open_via_tunnel(self, flow: Flow, route: RouteEntry) -> TcpLeg:
        assert self.tunnels is not None
        candidates = self.tunnels.candidates(route.tunnel_id)
        if not candidates:
            raise FlowError(
                FlowResult.NET_UNREACHABLE,
                f"tunnel {route.tunnel_name} has no connected connector",
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.connect_timeout
        wait = 0.005
        while loop.time() < deadline:
            usable = [c for c in candidates if c.can_open_stream()]
            if not usable:
                if all(c.closed for c in candidates):
                    break
                # every connection is at the connector's stream limit: slots come back as
                # flows end (MAX_STREAMS), so wait for one instead of failing at once, backing
                # off so that many waiting flows do not starve the relays that free slots
                await asyncio.sleep(wait)
                wait = min(wait * 2, 0.1)
                candidates = self.tunnels.candidates(route.tunnel_id)
                continue
            for conn in usable:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    return await open_tunnel_flow(conn, flow, remaining)
                except ConnectionGone:
                    continue  # that connection died under us: the next one may be alive
            candidates = self.tunnels.candidates(route.tunnel_id)
            if not candidates:
                break
        if loop.time() >= deadline:
            raise FlowError(FlowResult.TIMEOUT, "no tunnel connection answered in time")
        raise FlowError(
            FlowResult.NET_UNREACHABLE,
            f"tunnel {route.tunnel_name} lost its connections while opening the flow",
        )

    def flow_finished(self, flow: Flow) -> None:
        self.active.discard(flow.id)
        if flow.ended is None:
            flow.ended = time.monotonic()
        if flow.result is None:
            flow.result = FlowResult.OK
        m = self.metrics
        if flow.protocol == "udp":
            m.udp_sessions.labels(flow.result.value).inc()
            if self.sessions is not None:
                m.udp_sessions_active.set(len(self.sessions.sessions))
            self.audit.write(flow)
            return
        m.flows_active.set(len(self.active))
        m.flows.labels(flow.onramp, flow.result.value).inc()
        if flow.bytes_up:
            m.flow_bytes.labels("up").inc(flow.bytes_up)
        if flow.bytes_down:
            m.flow_bytes.labels("down").inc(flow.bytes_down)
        self.audit.write(flow)

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


async def serve_edge(config: EdgeConfig, stop: asyncio.Event) -> int:
    edge = Edge(config)
    try:
        await edge.start()
    except OSError as e:
        log.error("cannot start the edge: %s", e)
        await edge.close()
        return 1
    log.info("edge %s ready", uuid.uuid4().hex[:8])
    try:
        await stop.wait()
    finally:
        await edge.close()
    return 0


def run_edge(config: EdgeConfig) -> int:
    """`ramp edge`: run until SIGINT/SIGTERM."""
    from ramp.runtime import run_until_signal

    return run_until_signal(lambda stop: serve_edge(config, stop))


__all__ = ["Edge", "run_edge", "serve_edge"]
