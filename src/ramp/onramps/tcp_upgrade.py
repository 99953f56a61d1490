"""TCP in packets, upgraded to kernel TCP sockets: no user-space TCP stack.

A connect-ip client's TCP segments are handed to a real TCP stack, the kernel's, in a network
namespace the edge makes for itself (reference oxy-ip-packets-to-http: "upgrading"). In there
a TUN device holds the listener's address and one NAT slot address per flow; a listener
accepts the connections those segments open. Each flow's segments are rewritten on the way in
(client address and port -> slot address, same port; origin address and port -> the listener)
and back on the way out, checksums recomputed, so the kernel sees an ordinary connection from
the slot and the client an ordinary one from the origin. The accepted socket then takes the
edge's normal stream path to the tunnel, spliced like any other TCP flow.

The namespace has no other interface: nothing in it can reach the host's networks, and the
host's addresses, routes and firewall are not touched.

Order of events for one flow: the client's SYN arrives; the caller opens the flow (policy,
route, the origin's answer through the tunnel) and only then `admit`s it, which injects the
SYN; the kernel answers, the handshake completes through the NAT, and `on_accept(key,
socket)` hands over the accepted connection. A refused flow never reaches the kernel: the
caller answers the client with an ICMP error instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ramp.flows.ip_pool import AddressPool, PoolExhausted
from ramp.flows.packet_flows import PacketKey
from ramp.net import tun
from ramp.net.ownns import OwnNetns
from ramp.wire.ip import Packet, PacketError, parse_packet, rewrite
from ramp.wire.nat import NatError, nat
from ramp.wire.tcp_mss import SYN, clamp_mss

log = logging.getLogger("ramp.edge.upgrade")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Inside the edge's own namespace only: never seen outside it, so any prefix would do.
SLOT_PREFIXES = ("10.77.0.0/16", "fd00:77::/112")
LISTEN_PORT = 7
TUN_NAME = "rampup0"
BACKLOG = 4096
READ_BATCH = 256  # packets read from the TUN device per wake-up
SO_LINGER_RESET = struct.pack("ii", 1, 0)  # close() sends RST
IPPROTO_TCP = 6
IPV6_HEADER = 40


@dataclass(slots=True)
class Slot:
    key: PacketKey
    address: IPAddress
    mss: int  # the largest segment that fits one DATAGRAM frame of the client's connection
    # packed addresses, for the per-packet NAT
    packed: bytes = b""
    peer: bytes = b""
    client: bytes = b""

    def __post_init__(self) -> None:
        self.packed = self.address.packed
        self.peer = self.key.peer.packed
        self.client = self.key.client.packed


class TcpUpgrade:
    """The namespace, its TUN device and listeners, and the NAT slots.

    `to_client(key, packet)` takes each rewritten packet for the client of flow `key`;
    `on_accept(key, sock)` each accepted connection (a non-blocking socket).
    """

    def __init__(
        self,
        mtu: int,
        to_client: Callable[[PacketKey, bytes], None],
        on_accept: Callable[[PacketKey, socket.socket], None],
        *,
        bad: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.mtu = mtu
        self._to_client = to_client
        self._on_accept = on_accept
        self._bad = bad
        self.pool = AddressPool(SLOT_PREFIXES)
        self.listen_addr = {v: self.pool.gateway(v) for v in (4, 6)}
        self.by_key: dict[PacketKey, Slot] = {}
        self.by_address: dict[IPAddress, Slot] = {}
        self.by_packed: dict[bytes, Slot] = {}  # the same, by packed address
        self.ns: OwnNetns | None = None
        self.dev: tun.TunDevice | None = None
        self.listeners: list[socket.socket] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.ns = OwnNetns.create()
        try:
            self.dev = tun.open_tun(TUN_NAME, self.mtu, netns=self.ns)
            prefixes = [f"{self.listen_addr[4]}/16", f"{self.listen_addr[6]}/112"]
            tun.set_addresses(self.dev.name, prefixes, netns=self.ns)
            for version in (4, 6):
                self.listeners.append(self.ns.call(self._listener, version))
        except BaseException:
            self.close()
            raise
        self._loop = loop
        loop.add_reader(self.dev.fd, self._read_tun)
        for sock in self.listeners:
            loop.add_reader(sock.fileno(), self._accept, sock)
        log.info("TCP upgrade namespace ready (TUN %s, MTU %d)", self.dev.name, self.mtu)

    def _listener(self, version: int) -> socket.socket:
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if version == 6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((str(self.listen_addr[version]), LISTEN_PORT))
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        loop = self._loop
        if self.dev is not None and loop is not None:
            with contextlib.suppress(Exception):
                loop.remove_reader(self.dev.fd)
        for sock in self.listeners:
            if loop is not None:
                with contextlib.suppress(Exception):
                    loop.remove_reader(sock.fileno())
            sock.close()
        self.listeners.clear()
        if self.dev is not None:
            self.dev.close()
            self.dev = None
        if self.ns is not None:
            self.ns.close()
            self.ns = None
        self.by_key.clear()
        self.by_address.clear()
        self.by_packed.clear()

    # -- slots --------------------------------------------------------------------------

    def admit(self, key: PacketKey, syn: Packet, mss: int) -> bool:
        """Give flow `key` a NAT slot and inject its SYN; False when no slot is free. Both
        SYNs announce at most `mss`, so neither side sends a segment the client's datagrams
        cannot carry."""
        if key in self.by_key:
            return self.from_client(key, syn)
        try:
            address = self.pool.take(key.client.version)
        except (PoolExhausted, KeyError):
            self._bad("upgrade_slots_full")
            return False
        slot = Slot(key, address, mss)
        self.by_key[key] = slot
        self.by_address[address] = slot
        self.by_packed[slot.packed] = slot
        return self.from_client(key, syn)

    def release(self, key: PacketKey) -> None:
        slot = self.by_key.pop(key, None)
        if slot is not None:
            self.by_address.pop(slot.address, None)
            self.by_packed.pop(slot.packed, None)
            self.pool.give_back(slot.address)

    def has(self, key: PacketKey) -> bool:
        return key in self.by_key

    # -- packets ------------------------------------------------------------------------

    def from_client(self, key: PacketKey, packet: Packet) -> bool:
        """A TCP segment of an admitted flow, into the kernel; False when it has no slot."""
        slot = self.by_key.get(key)
        if slot is None or self.dev is None:
            return False
        listen = self.listen_addr[packet.version]
        assert listen is not None
        syn = len(packet.payload) > 13 and packet.payload[13] & SYN
        if syn or (packet.version == 6 and len(packet.header) != IPV6_HEADER):
            # a SYN gets its MSS clamped; IPv6 extension headers need the full rewrite
            if syn:
                packet = dataclasses.replace(packet, payload=clamp_mss(packet.payload, slot.mss))
            out = rewrite(packet, src=slot.address, dst=listen, dport=LISTEN_PORT)
        else:  # the common case: checksums updated, not summed again
            out = nat(packet.raw, slot.packed, listen.packed, dport=LISTEN_PORT)
        return self.dev.write(out)

    def _read_tun(self) -> None:
        dev = self.dev
        if dev is None:
            return
        by_packed = self.by_packed
        for _ in range(READ_BATCH):
            data = dev.read()
            if data is None:
                return
            version = data[0] >> 4 if data else 0
            if version == 4 and len(data) >= 40 and data[9] == IPPROTO_TCP:
                slot = by_packed.get(data[16:20])
                flags_at = (data[0] & 0x0F) * 4 + 13
            elif version == 6 and len(data) >= 60 and data[6] == IPPROTO_TCP:
                slot = by_packed.get(data[24:40])
                flags_at = 53
            else:
                continue  # router solicitations and such of the namespace's own
            if slot is None:
                continue  # a slot released while the kernel still had something to say
            key = slot.key
            try:
                if flags_at < len(data) and data[flags_at] & SYN:
                    packet = parse_packet(data)
                    packet = dataclasses.replace(
                        packet, payload=clamp_mss(packet.payload, slot.mss)
                    )
                    out = rewrite(
                        packet, src=key.peer, sport=key.dport, dst=key.client, dport=key.sport
                    )
                else:
                    out = nat(data, slot.peer, slot.client, key.dport, key.sport)
            except (PacketError, NatError) as e:  # the kernel's own packets: never expected
                self._bad("upgrade_" + getattr(e, "reason", "malformed"))
                continue
            self._to_client(key, out)

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(64):
            try:
                conn, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("upgrade listener accept failed: %s", e)
                return
            slot = self.by_address.get(ipaddress.ip_address(addr[0]))
            if slot is None or slot.key.sport != addr[1]:
                reset(conn)
                continue
            conn.setblocking(False)
            self._on_accept(slot.key, conn)


def reset(sock: socket.socket) -> None:
    """Close `sock` with an RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, SO_LINGER_RESET)
    sock.close()


__all__ = ["LISTEN_PORT", "TcpUpgrade", "reset"]
