"""The client's connect-ip session (ramp.offramps.masque_ip) against a real edge and connector
in one process on loopback, without a TUN device: the packets a device would carry go in and
out of `IpTunnel` directly. Addresses and routes arrive as capsules, UDP and ICMP come back
through the tunnel, a packet too big for a QUIC DATAGRAM rides a capsule both ways, an
ADDRESS_REQUEST is honoured, and a lost connection brings the session back."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from ramp.offramps.masque import EdgeTarget, MasqueLink
from ramp.offramps.masque_ip import IpTunnel
from ramp.policy.identities import bearer
from ramp.quic.h3 import H3_NO_ERROR
from ramp.store.db import Store
from ramp.testing.loopback import Tunnel, run, tunnel, udp_echo_origin
from ramp.testing.wait import until
from ramp.wire import ip

POOL4 = ipaddress.ip_network("100.96.0.0/12")
LOCALHOST = ipaddress.IPv4Address("127.0.0.1")


class Device:
    """What the TUN on-ramp would do with the session's callbacks: remember them."""

    def __init__(self) -> None:
        self.packets: list[bytes] = []
        self.addresses: list[Any] = []
        self.routes: list[Any] = []
        self.drops: list[str] = []

    def address4(self) -> ipaddress.IPv4Address:
        return next(p.network_address for p in self.addresses if p.version == 4)


@asynccontextmanager
async def session(
    tmp_path: Path, request: list[Any] | None = None, **edge_kw: object
) -> AsyncIterator[tuple[IpTunnel, Device, Tunnel]]:
    with Store(tmp_path) as store:
        store.create_client("alice")
        secret = store.client_secret("alice")
        fp = store.edge_identity().ca_fingerprint
    async with tunnel(tmp_path, ha=1, masque_listen="127.0.0.1:0", **edge_kw) as t:
        masque = next(o for o in t.edge.onramps if o.onramp == "masque")
        target = EdgeTarget((f"127.0.0.1:{masque.port}",), fp, bearer("alice", secret))
        link = MasqueLink(target)
        device = Device()
        ipt = IpTunnel(
            link,
            request=request,
            on_packet=device.packets.append,
            on_addresses=lambda p: setattr(device, "addresses", p),
            on_routes=lambda p: setattr(device, "routes", p),
            bad=device.drops.append,
            drop=device.drops.append,
        )
        link.start()
        ipt.start()
        try:
            await until(lambda: ipt.status == "open" and device.addresses, what="connect-ip")
            yield ipt, device, t
        finally:
            await ipt.close()
            await link.close()


def test_the_edge_assigns_an_address_advertises_the_route_and_udp_comes_back(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        echo, port = await udp_echo_origin()
        async with session(tmp_path) as (ipt, device, _):
            assert device.address4() in POOL4
            await until(lambda: device.routes, what="a route advertisement")
            assert ipaddress.ip_network("127.0.0.0/8") in device.routes
            me = device.address4()
            # the first opens the flow (the edge holds a few packets while it does), then a burst
            assert ipt.send(ip.build_udp(me, LOCALHOST, 40000, port, b"hello 0"))
            await until(lambda: device.packets, what="the first echoed datagram")
            for i in range(1, 20):
                assert ipt.send(ip.build_udp(me, LOCALHOST, 40000, port, b"hello %d" % i))
            await until(lambda: len(device.packets) >= 20, what="20 echoed datagrams")
            got = set()
            for raw in device.packets:
                packet = ip.parse_packet(raw)
                assert (packet.src, packet.dst) == (LOCALHOST, me)
                udp = ip.parse_udp(packet)  # checksums checked
                assert (udp.sport, udp.dport) == (port, 40000)
                got.add(udp.payload)
            assert got == {b"hello %d" % i for i in range(20)}
        echo.close()

    run(go())


def test_an_echo_request_gets_its_reply(tmp_path: Path) -> None:
    async def go() -> None:
        async with session(tmp_path) as (ipt, device, _):
            me = device.address4()
            assert ipt.send(ip.build_echo(me, LOCALHOST, 0x1234, 1, b"ping", False))
            await until(lambda: device.packets, what="an echo reply")
            icmp = ip.parse_icmp(ip.parse_packet(device.packets[0]))
            assert icmp.is_echo_reply and (icmp.ident, icmp.seq, icmp.data) == (0x1234, 1, b"ping")

    run(go())


def test_a_packet_too_big_for_a_datagram_frame_rides_a_capsule_both_ways(tmp_path: Path) -> None:
    async def go() -> None:
        echo, port = await udp_echo_origin()
        async with session(tmp_path, masque_ip_mtu=9000) as (ipt, device, _t):
            me = device.address4()
            payload = bytes(range(256)) * 12  # 3,072 bytes: more than one QUIC packet holds
            assert ipt.send(ip.build_udp(me, LOCALHOST, 40001, port, payload))
            await until(lambda: device.packets, what="the big datagram back")
            assert ip.parse_udp(ip.parse_packet(device.packets[0])).payload == payload
        echo.close()

    run(go())


def test_an_address_request_is_honoured(tmp_path: Path) -> None:
    async def go() -> None:
        wanted = ipaddress.ip_network("100.96.0.77/32")
        async with session(tmp_path, request=[wanted]) as (_, device, _t):
            assert wanted in device.addresses

    run(go())


def test_the_session_comes_back_after_the_connection_is_lost(tmp_path: Path) -> None:
    async def go() -> None:
        async with session(tmp_path) as (ipt, device, _):
            first = ipt.opens
            peer = ipt.link.peer
            assert peer is not None
            device.addresses = []
            peer.close_with(H3_NO_ERROR, "test: connection gone")
            await until(lambda: ipt.opens > first and ipt.status == "open", what="a new session")
            await until(lambda: device.addresses, what="the address assigned again")
            me = device.address4()
            assert ipt.send(ip.build_echo(me, LOCALHOST, 9, 9, b"again", False))
            await until(lambda: device.packets, what="an echo reply on the new session")

    run(go())


def test_an_edge_without_connect_ip_is_reported_and_retried(tmp_path: Path) -> None:
    async def go() -> None:
        with Store(tmp_path) as store:
            store.create_client("alice")
            secret = store.client_secret("alice")
            fp = store.edge_identity().ca_fingerprint
        async with tunnel(
            tmp_path, ha=1, masque_listen="127.0.0.1:0", masque_ip_template="off"
        ) as t:
            masque = next(o for o in t.edge.onramps if o.onramp == "masque")
            target = EdgeTarget((f"127.0.0.1:{masque.port}",), fp, bearer("alice", secret))
            link = MasqueLink(target)
            dropped: list[str] = []
            ipt = IpTunnel(
                link,
                on_packet=lambda p: None,
                on_addresses=lambda p: None,
                on_routes=lambda p: None,
                drop=dropped.append,
            )
            link.start()
            ipt.start()
            try:
                await until(lambda: "edge answered" in ipt.error, what="the refusal reported")
                assert ipt.status == "reconnecting" and ipt.opens == 0
                assert not ipt.send(b"\x45" + bytes(19))
                assert dropped == ["no_session"]
            finally:
                await ipt.close()
                await link.close()

    run(go())
