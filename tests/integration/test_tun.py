"""TUN devices (ramp.net.tun): made in a namespace, addressed and routed; the kernel's
packets come out of the descriptor and packets written into it reach the namespace's sockets."""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
from collections.abc import Iterator

import pytest

from ramp.net import tun
from ramp.net.netns import NetnsGroup
from ramp.net.ownns import OwnNetns

TUN_ADDR = "192.0.2.77/32"
TUN_ADDR6 = "2001:db8:77::1/128"
ROUTED = "198.51.100.0/24"
ROUTED6 = "2001:db8:198::/64"


@pytest.fixture
def group() -> Iterator[NetnsGroup]:
    with NetnsGroup() as g:
        yield g


def _read_packet(dev: tun.TunDevice, want_proto: int, timeout: float = 10.0) -> bytes:
    """The next packet of protocol `want_proto` (skips IPv6 router solicitations and such)."""
    while True:
        ready, _, _ = select.select([dev.fd], [], [], timeout)
        assert ready, "no packet came out of the TUN device"
        packet = dev.read()
        assert packet is not None
        version = packet[0] >> 4
        proto = packet[9] if version == 4 else packet[6]
        if proto == want_proto:
            return packet


def _udp4(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload  # checksum 0: none
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    total = sum(struct.unpack("!10H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    header = header[:10] + struct.pack("!H", ~total & 0xFFFF) + header[12:]
    return header + udp


def test_kernel_routes_a_packet_into_the_tun_device_in_a_namespace(group: NetnsGroup) -> None:
    ns = group.new("tun")
    dev = tun.open_tun("ramptest0", 1400, netns=ns)
    try:
        tun.set_addresses(dev.name, [TUN_ADDR, TUN_ADDR6], netns=ns)
        tun.set_routes(dev.name, [ROUTED, ROUTED6], netns=ns)
        shown = ns.ip("-o", "address", "show", "dev", dev.name)
        assert "192.0.2.77/32" in shown and "2001:db8:77::1/128" in shown
        assert "mtu 1400" in ns.ip("link", "show", dev.name)
        routes = ns.ip("route", "show", "dev", dev.name) + ns.ip("-6", "route", "show")
        assert ROUTED in routes and ROUTED6 in routes

        sock = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.sendto(b"hello tun", ("198.51.100.7", 5353))
        packet = _read_packet(dev, 17)
        assert packet[0] >> 4 == 4
        assert socket.inet_ntoa(packet[12:16]) == "192.0.2.77"  # the device's address
        assert socket.inet_ntoa(packet[16:20]) == "198.51.100.7"
        ihl = (packet[0] & 0x0F) * 4
        assert struct.unpack("!H", packet[ihl + 2 : ihl + 4])[0] == 5353
        assert packet[ihl + 8 :] == b"hello tun"

        sock6 = ns.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock6.sendto(b"hello tun6", ("2001:db8:198::7", 5353))
        packet6 = _read_packet(dev, 17)
        assert ipaddress.IPv6Address(packet6[8:24]) == ipaddress.IPv6Address("2001:db8:77::1")
        assert ipaddress.IPv6Address(packet6[24:40]) == ipaddress.IPv6Address("2001:db8:198::7")
        assert packet6[48:] == b"hello tun6"

        # The way back: a packet written into the device reaches the socket it is addressed to.
        port = sock.getsockname()[1]
        assert dev.write(_udp4("198.51.100.7", "192.0.2.77", 5353, port, b"answer"))
        sock.settimeout(10)
        data, peer = sock.recvfrom(100)
        assert (data, peer) == (b"answer", ("198.51.100.7", 5353))
        sock.close()
        sock6.close()
    finally:
        dev.close()
    assert dev.name not in ns.ip("link", "show")  # gone with its descriptor


def test_addresses_and_routes_follow_each_update(group: NetnsGroup) -> None:
    ns = group.new("tun")
    dev = tun.open_tun(None, 1280, netns=ns)
    try:
        assert dev.name.startswith("tun")
        tun.set_addresses(dev.name, [TUN_ADDR], netns=ns)
        tun.set_routes(dev.name, [ROUTED, "203.0.113.0/24"], netns=ns)
        tun.set_addresses(dev.name, ["192.0.2.78/32"], netns=ns)
        tun.set_routes(dev.name, ["203.0.113.0/24"], netns=ns)
        shown = ns.ip("-o", "address", "show", "dev", dev.name)
        assert "192.0.2.78/32" in shown and "192.0.2.77" not in shown
        routes = ns.ip("route", "show", "dev", dev.name)
        assert "203.0.113.0/24" in routes and ROUTED not in routes
        assert tun.remove(dev.name, netns=ns)
        assert not tun.remove(dev.name, netns=ns)
    finally:
        dev.close()


def test_own_namespace_holds_a_tun_device_the_host_never_sees() -> None:
    own = OwnNetns.create()
    try:
        dev = tun.open_tun("rampown0", 1500, netns=own)
        try:
            tun.set_addresses(dev.name, ["192.0.2.1/32"], netns=own)
            tun.set_routes(dev.name, ["0.0.0.0/0"], netns=own)
            with pytest.raises(OSError):  # the host's interfaces are not touched
                socket.if_nametoindex(dev.name)
            sock = own.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
            sock.sendto(b"x", ("198.51.100.1", 9))
            packet = _read_packet(dev, 17)
            assert socket.inet_ntoa(packet[16:20]) == "198.51.100.1"
            sock.close()
        finally:
            dev.close()
    finally:
        own.close()
