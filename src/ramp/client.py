"""The client role (`ramp client run`): the edge's own SOCKS5 and HTTP on-ramps on loopback,
with the MASQUE off-ramp: every TCP flow one HTTP/3 CONNECT stream, every UDP flow one
connect-udp request, all on one QUIC connection to the edge (proxy mode). With `--tun`, a TUN
device too, whose packets ride one connect-ip request on the same connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from typing import Any

from ramp.config import ClientConfig, parse_hostport
from ramp.flows.flow import Flow
from ramp.flows.single_route import SingleRoute
from ramp.flows.table import FlowTable
from ramp.observe.audit import AuditLog, flow_record
from ramp.observe.metrics import ClientMetrics
from ramp.observe.status import start_status_server
from ramp.offramps.masque import EdgeTarget, MasqueLink, MasqueOffRamp
from ramp.offramps.masque_ip import IpTunnel
from ramp.offramps.nested import nested_dialer
from ramp.onramps.registry import OnRampContext
from ramp.onramps.registry import lookup as lookup_onramp
from ramp.onramps.socks5_udp import AssociationLimits
from ramp.onramps.tun import TunOnRamp, TunUnavailable

log = logging.getLogger("ramp.client")


class Client:
    def __init__(
        self,
        config: ClientConfig,
        target: EdgeTarget,
        hops: list[EdgeTarget] | None = None,
        *,
        metrics: ClientMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = m = metrics or ClientMetrics()
        self.audit = AuditLog(
            config.audit_log, config.audit_log_max_bytes, config.audit_log_backups
        )
        self.table = FlowTable(
            config.max_flows,
            reporters=[self._report],
            on_reject=lambda reason: m.flows_rejected.labels(reason).inc(),
            on_count=m.flows_active.set,
        )
        # the edge the flows exit at is the last hop; the ones before carry its packets
        self.hops = [*(hops or []), target]
        dialer, self.hop_links = nested_dialer(
            self.hops[:-1],
            idle_timeout=config.idle_timeout,
            keepalive=config.keepalive_interval,
            connect_timeout=config.connect_timeout,
        )
        self.link = MasqueLink(
            self.hops[-1],
            idle_timeout=config.idle_timeout,
            keepalive=config.keepalive_interval,
            dialer=dialer,
            on_state=self._state,
            on_drop=lambda reason: m.udp_drops.labels(reason).inc(),
        )
        self.offramp = MasqueOffRamp(self.link, config.connect_timeout, self.table.end)
        self.opener = SingleRoute(self.table, self.offramp, bad_input=self._bad_input)
        self.onramps: list[Any] = []
        self.status: Any = None
        m.edge_rtt.set_function(lambda: self.link.rtt or 0.0)
        self.tun: TunOnRamp | None = None
        self.ip: IpTunnel | None = None
        if config.tun:
            self._wire_tun()

    def _wire_tun(self) -> None:
        m, config = self.metrics, self.config
        self.tun = device = TunOnRamp(
            config.tun_name,
            config.tun_mtu,
            send=lambda packet: self.ip is not None and self.ip.send(packet),
            count=self._count_packet,
            drop=lambda reason: m.tun_drops.labels(reason).inc(),
            changed=self._tun_changed,
        )
        self.ip = IpTunnel(
            self.link,
            template=config.masque_ip_template,
            request=[ipaddress.ip_network(a, strict=False) for a in config.tun_address],
            timeout=config.connect_timeout,
            on_packet=device.deliver,
            on_addresses=device.set_addresses,
            on_routes=device.set_routes,
            bad=lambda reason: m.tun_drops.labels(reason).inc(),
            drop=lambda reason: m.tun_drops.labels(reason).inc(),
            on_open=m.connect_ip_opens.inc,
        )

    def _count_packet(self, direction: str, size: int) -> None:
        self.metrics.tun_packets.labels(direction).inc()
        self.metrics.tun_bytes.labels(direction).inc(size)

    def _tun_changed(self, what: str, prefixes: list[Any]) -> None:
        gauge = self.metrics.tun_addresses if what == "addresses" else self.metrics.tun_routes
        gauge.set(len(prefixes))

    async def start(self) -> None:
        if self.tun is not None:
            await self.tun.open()  # first: a user without the rights hears it at once
        for hop in self.hop_links:
            hop.start()
        self.link.start()
        if self.ip is not None:
            self.ip.start()
        ctx = OnRampContext(
            self.config,
            self.opener,
            accept_error=lambda onramp, what: self.metrics.accept_errors.labels(onramp, what).inc(),
            udp_associations=AssociationLimits.for_role(self.config, self.metrics),
        )
        for options in self.config.effective_onramps():
            server = lookup_onramp(options.type).build(ctx, options)
            host, port = parse_hostport(options.listen)
            await server.start(host, port)
            self.onramps.append(server)
        self.status = await start_status_server(
            self.config.metrics_listen, self.metrics.registry, self.ready
        )

    async def close(self) -> None:
        for server in self.onramps:
            await server.close()
        if self.ip is not None:
            await self.ip.close()
        if self.tun is not None:
            await self.tun.close()
        await self.link.close()
        for hop in reversed(self.hop_links):
            await hop.close()
        if self.status is not None:
            await self.status.close()
        self.audit.close()

    def ready(self) -> tuple[bool, dict[str, Any]]:
        link = self.link
        up = link.state == "connected"
        connected_at = link.connected_at
        info: dict[str, Any] = {
            "status": link.state,
            "edge": link.peer.peer if link.peer is not None else None,
            "hops": len(self.hops),
            "rtt_ms": round(link.rtt * 1000, 2) if link.rtt is not None else None,
            "connected_for": round(time.monotonic() - connected_at, 1) if connected_at else None,
            "last_error": link.error or None,
            "flows": len(self.table),
            "listeners": {s.onramp: s.port for s in self.onramps},
        }
        if self.tun is not None and self.ip is not None:
            tun, ip = self.tun, self.ip
            # ready once packets can flow: the session is open and the device has an address
            up = up and ip.status == "open" and bool(tun.addresses)
            info["tun"] = {
                "device": tun.name,
                "session": ip.status,
                "session_error": ip.error or None,
                "addresses": [str(p) for p in tun.addresses],
                "routes": [str(p) for p in tun.routes],
                "mtu": tun.mtu,
                "packets_up": tun.packets_up,
                "packets_down": tun.packets_down,
                "bytes_up": tun.bytes_up,
                "bytes_down": tun.bytes_down,
            }
        return up, info

    def _state(self, state: str) -> None:
        up = state == "connected"
        self.metrics.edge_connected.set(1 if up else 0)
        if up:
            self.metrics.edge_connects.inc()

    def _bad_input(self, onramp: str, reason: str, peer: tuple[str, int] | None) -> None:
        self.metrics.bad_input.labels(onramp, reason).inc()

    def _report(self, flow: Flow) -> None:
        m = self.metrics
        assert flow.result is not None
        m.flows.labels(flow.onramp, flow.result.value).inc()
        if flow.bytes_up:
            m.flow_bytes.labels("up").inc(flow.bytes_up)
        if flow.bytes_down:
            m.flow_bytes.labels("down").inc(flow.bytes_down)
        self.audit.write_record(flow_record(flow))


async def serve_client(
    config: ClientConfig, target: EdgeTarget, hops: list[EdgeTarget], stop: asyncio.Event
) -> int:
    client = Client(config, target, hops)
    try:
        await client.start()
    except TunUnavailable as e:
        log.error("cannot start the client: %s", e.strerror)
        await client.close()
        return 1
    except OSError as e:
        log.error("cannot start the client: %s", e)
        await client.close()
        return 1
    listeners = ", ".join(f"{s.onramp} {config_listen(s)}" for s in client.onramps)
    if client.tun is not None:
        listeners = ", ".join(filter(None, [listeners, f"TUN {client.tun.name}"]))
    log.info("client ready: %s -> MASQUE %s", listeners, ", ".join(target.addresses))
    try:
        await stop.wait()
    finally:
        await client.close()
    return 0


def config_listen(server: Any) -> str:
    host, port = server.address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run_client(config: ClientConfig, target: EdgeTarget, hops: list[EdgeTarget]) -> int:
    """`ramp client run`: until SIGINT/SIGTERM."""
    from ramp.runtime import run_until_signal

    async def main(stop: asyncio.Event) -> int:
        return await serve_client(config, target, hops, stop)

    return run_until_signal(main, None)


__all__ = ["Client", "run_client", "serve_client"]
