"""The client's TUN on-ramp (ramp.onramps.tun) on its own, in a namespace: the device gets the
addresses and routes it is given (and loses the old ones), every packet the kernel routes into
it reaches the sender, packets delivered to it reach the namespace's programs, and closing
takes the device with its routes. A reflector stands in for the edge: it answers each echo
request it is sent, so real `ping` runs through the on-ramp's relay both ways."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import Iterator

import pytest

from ramp.net.netns import Netns, NetnsGroup
from ramp.onramps.tun import TunOnRamp
from ramp.testing.wait import until
from ramp.wire import ip

NAME = "ramptun0"
ADDR = ipaddress.ip_network("100.96.0.9/32")
ADDR6 = ipaddress.ip_network("fd72:616d:7000::9/128")
ROUTED = ipaddress.ip_network("198.51.100.0/24")
ROUTED6 = ipaddress.ip_network("2001:db8:198::/64")
OTHER = ipaddress.ip_network("203.0.113.0/24")


@pytest.fixture
def ns() -> Iterator[Netns]:
    with NetnsGroup() as group:
        yield group.new("tunonramp")


def routes(ns: Netns) -> set[str]:
    out = set()
    for family in ("-4", "-6"):
        text = ns.run(["ip", "-j", family, "route", "show", "dev", NAME], check=False).stdout
        for r in json.loads(text or b"[]"):
            if r.get("protocol") != "kernel":
                dst = r["dst"]
                out.add(str(ipaddress.ip_network(dst)))
    return out


def reflect(onramp: list[TunOnRamp], counts: dict[str, int]) -> object:
    """A stand-in for the edge: echo requests come back as replies from their destination."""

    def send(packet: bytes) -> bool:
        counts["sent"] = counts.get("sent", 0) + 1
        try:
            p = ip.parse_packet(packet)
            icmp = ip.parse_icmp(p)
        except ip.PacketError:
            return True
        if icmp.type in (ip.ICMP_ECHO_REQUEST, ip.ICMPV6_ECHO_REQUEST):
            reply = ip.build_echo(p.dst, p.src, icmp.ident, icmp.seq, icmp.data, reply=True)
            onramp[0].deliver(reply)
        return True

    return send


def run_in(ns: Netns, coro_fn: object) -> None:
    ns.call(lambda: asyncio.run(coro_fn()))  # type: ignore[operator]


def test_ping_runs_through_the_device_both_ways_with_its_addresses_and_routes(ns: Netns) -> None:
    async def go() -> None:
        holder: list[TunOnRamp] = []
        counts: dict[str, int] = {}
        onramp = TunOnRamp(NAME, 1400, send=reflect(holder, counts))  # type: ignore[arg-type]
        holder.append(onramp)
        await onramp.open()
        try:
            onramp.set_addresses([ADDR, ADDR6])
            onramp.set_routes([ROUTED, ROUTED6])
            await onramp.settled()
            assert routes(ns) == {str(ROUTED), str(ROUTED6)}
            for args in (["ping"], ["ping", "-6"]):
                target = "198.51.100.10" if len(args) == 1 else "2001:db8:198::10"
                proc = await asyncio.create_subprocess_exec(
                    *args, "-n", "-c", "5", "-i", "0.2", "-W", "5", target,
                    stdout=asyncio.subprocess.PIPE,
                )  # fmt: skip
                out, _ = await proc.communicate()
                assert proc.returncode == 0, out
                assert b" 0% packet loss" in out, out
            assert onramp.packets_up >= 10 and onramp.packets_down >= 10
            # the edge re-advertises: the old route goes, the new one comes
            onramp.set_routes([OTHER])
            await onramp.settled()
            assert routes(ns) == {str(OTHER)}
        finally:
            await onramp.close()
        assert NAME not in ns.ip("link", "show")

    run_in(ns, go)


def test_a_burst_of_packets_all_reach_the_sender(ns: Netns) -> None:
    async def go() -> None:
        got: list[bytes] = []
        onramp = TunOnRamp(NAME, 1400, send=got.append)
        await onramp.open()
        try:
            onramp.set_addresses([ADDR])
            onramp.set_routes([ROUTED])
            await onramp.settled()
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            for i in range(2000):
                sock.sendto(i.to_bytes(4, "big") * 100, ("198.51.100.10", 9999))
                if i % 1000 == 999:  # a turn of the loop per 1,000: within the device's queue
                    await asyncio.sleep(0)
            sock.close()
            udp = lambda: [p for p in got if ip.parse_packet(p).proto == ip.PROTO_UDP]  # noqa: E731
            await until(lambda: len(udp()) >= 2000, what="2,000 datagrams out of the device")
            seen = sorted(
                int.from_bytes(ip.parse_udp(ip.parse_packet(p)).payload[:4], "big") for p in udp()
            )
            assert seen == list(range(2000))
        finally:
            await onramp.close()

    run_in(ns, go)


def test_a_delivered_packet_reaches_a_local_socket(ns: Netns) -> None:
    async def go() -> None:
        onramp = TunOnRamp(NAME, 1400, send=lambda p: None)
        await onramp.open()
        try:
            onramp.set_addresses([ADDR])
            onramp.set_routes([ROUTED])
            await onramp.settled()
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((str(ADDR.network_address), 5353))
            sock.setblocking(False)
            src = ipaddress.ip_address("198.51.100.10")
            onramp.deliver(ip.build_udp(src, ADDR.network_address, 53, 5353, b"answer"))
            data, peer = await asyncio.wait_for(
                asyncio.get_running_loop().sock_recvfrom(sock, 100), 10
            )
            assert data == b"answer" and peer == ("198.51.100.10", 53)
            assert onramp.packets_down == 1
            sock.close()
        finally:
            await onramp.close()

    run_in(ns, go)
