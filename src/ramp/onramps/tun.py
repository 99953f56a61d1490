"""The TUN on-ramp of `ramp client run --tun`: a TUN device whose packets ride connect-ip.

The device gets the addresses the edge assigned and a route for each prefix it advertised,
both replaced as the edge re-advertises, so the kernel sends exactly the traffic this identity
may reach into the tunnel and nothing else. The device's fd is non-blocking on the event loop:
one wake-up reads every packet the kernel has queued (up to a batch), and each becomes an HTTP
Datagram, which the QUIC connection packs and sends together once the batch is read.

The device is not persistent: the kernel deletes it, with its addresses and routes, when the
process that opened it exits, even by SIGKILL. A device of the same name that is still there
at start (one created persistent by hand, or by an older client) is removed first.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
from collections.abc import Callable

from pyroute2 import IPRoute

from ramp.net import tun

log = logging.getLogger("ramp.client")

Prefix = ipaddress.IPv4Network | ipaddress.IPv6Network

READ_BATCH = 256  # packets read per wake-up before the loop serves the other direction
# The kernel queues this many packets for the reader before it drops (TUN's default is 500):
# room for a burst while the loop is busy with the edge's packets.
TX_QUEUE_LEN = 4000
TUN_DEVICE = "/dev/net/tun"


class TunUnavailable(OSError):
    """The device cannot be made; the message says what the user can do about it."""


def explain(e: OSError, name: str) -> str:
    if e.errno in (errno.EPERM, errno.EACCES):
        return (
            f"creating the TUN device {name} needs root or CAP_NET_ADMIN "
            f"(run as root, or give the program cap_net_admin): {e.strerror}"
        )
    if e.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
        return (
            f"no {TUN_DEVICE}: load the tun module (modprobe tun), or in a container pass the "
            f"device in (docker run --device {TUN_DEVICE} --cap-add NET_ADMIN)"
        )
    if e.errno == errno.EBUSY:
        return f"the TUN device {name} is in use by another process (another ramp client?)"
    return f"cannot create the TUN device {name}: {e}"


class TunOnRamp:
    """The device, and its packets to `send` (the connect-ip session) and back (`deliver`)."""

    onramp = "tun"

    def __init__(
        self,
        name: str,
        mtu: int,
        *,
        send: Callable[[bytes], object],
        count: Callable[[str, int], None] = lambda direction, size: None,
        drop: Callable[[str], None] = lambda reason: None,
        changed: Callable[[str, list[Prefix]], None] = lambda what, prefixes: None,
    ) -> None:
        self.name = name
        self.mtu = mtu
        self._send = send
        self._count = count
        self._drop = drop
        self._changed = changed
        self._want_addresses: list[Prefix] | None = None
        self._want_routes: list[Prefix] | None = None
        self._updating: asyncio.Future[None] | None = None
        self.device: tun.TunDevice | None = None
        self.fd = -1
        self.addresses: list[Prefix] = []
        self.routes: list[Prefix] = []
        self.packets_up = self.packets_down = 0
        self.bytes_up = self.bytes_down = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    async def open(self) -> None:
        # pyroute2's netlink calls run their own event loop: off this one, in a worker thread
        # (which shares the process's network namespace)
        try:
            self.device = await asyncio.to_thread(tun.open_tun, self.name, self.mtu)
        except OSError as e:
            if e.errno == errno.EBUSY or not _exists(self.name):
                raise TunUnavailable(e.errno, explain(e, self.name)) from e
            # a leftover of the same name that is not ours to attach to: replace it
            log.warning("removing a leftover device %s", self.name)
            try:
                await asyncio.to_thread(tun.remove, self.name)
                self.device = await asyncio.to_thread(tun.open_tun, self.name, self.mtu)
            except OSError as e2:
                raise TunUnavailable(e2.errno, explain(e2, self.name)) from e2
        self.name = self.device.name
        await asyncio.to_thread(_set_queue_len, self.name, TX_QUEUE_LEN)
        self.fd = self.device.fd
        os.set_blocking(self.fd, False)  # open_tun's already is: the reader relies on it
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.fd, self._readable)
        log.info("TUN device %s up (MTU %d)", self.name, self.mtu)

    async def close(self) -> None:
        """Give the device back: routes and addresses go with it."""
        if self._updating is not None:
            self._updating.cancel()
        if self.fd < 0:
            return
        if self._loop is not None:
            self._loop.remove_reader(self.fd)
        self.fd = -1
        try:
            await asyncio.to_thread(tun.remove, self.name)
        except OSError as e:
            log.debug("removing %s: %s", self.name, e)
        if self.device is not None:
            self.device.close()
        log.info("TUN device %s removed", self.name)

    # -- the edge's view of this device ---------------------------------------------------

    def set_addresses(self, prefixes: list[Prefix]) -> None:
        """Make the device's addresses exactly these, soon (the newest call wins)."""
        self._want_addresses = list(prefixes)
        self._update()

    def set_routes(self, prefixes: list[Prefix]) -> None:
        """Make the routes through the device exactly these, soon (the newest call wins)."""
        self._want_routes = list(prefixes)
        self._update()

    async def settled(self) -> None:
        """Until the device has the addresses and routes asked for last."""
        while self._updating is not None and not self._updating.done():
            await asyncio.shield(self._updating)

    def _update(self) -> None:
        if self._updating is None or self._updating.done():
            self._updating = asyncio.ensure_future(self._apply())

    async def _apply(self) -> None:
        # one netlink round at a time, in order; what was asked meanwhile is applied next
        while self.fd >= 0:
            if self._want_addresses is not None:
                wanted, self._want_addresses = self._want_addresses, None
                if await self._netlink(tun.set_addresses, wanted, "addresses"):
                    self.addresses = wanted
                    self._changed("addresses", wanted)
            elif self._want_routes is not None:
                wanted, self._want_routes = self._want_routes, None
                if await self._netlink(tun.set_routes, wanted, "routes"):
                    self.routes = wanted
                    self._changed("routes", wanted)
            else:
                return

    async def _netlink(self, fn: Callable[..., None], prefixes: list[Prefix], what: str) -> bool:
        try:
            await asyncio.to_thread(fn, self.name, [str(p) for p in prefixes])
        except (OSError, ValueError) as e:
            log.error("cannot set the %s %s on %s: %s", what, _text(prefixes), self.name, e)
            return False
        log.info("%s %s: %s", self.name, what, _text(prefixes))
        return True

    # -- packets --------------------------------------------------------------------------

    def _readable(self) -> None:
        fd, size = self.fd, self.mtu + 64
        for _ in range(READ_BATCH):
            try:
                packet = os.read(fd, size)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                log.warning("reading %s: %s", self.name, e)
                return
            if not packet:
                return
            if _link_local(packet):
                self._drop("link_local")
                continue
            self.packets_up += 1
            self.bytes_up += len(packet)
            self._count("up", len(packet))
            self._send(packet)

    def deliver(self, packet: bytes) -> None:
        """A packet from the edge, into the kernel."""
        if self.fd < 0:
            self._drop("no_device")
            return
        try:
            os.write(self.fd, packet)
        except BlockingIOError:
            self._drop("tun_full")
            return
        except OSError as e:  # the kernel refuses a malformed packet (EINVAL)
            self._drop("tun_refused")
            log.debug("%s refused a packet of %d bytes: %s", self.name, len(packet), e)
            return
        self.packets_down += 1
        self.bytes_down += len(packet)
        self._count("down", len(packet))


def _link_local(packet: bytes) -> bool:
    """An IPv6 packet the kernel sends on any link by itself (router solicitations, MLD
    reports: from fe80::/10 or ::, or to multicast): it has no business at the edge."""
    if len(packet) < 40 or packet[0] >> 4 != 6:
        return False
    return (
        packet[24] == 0xFF
        or (packet[8] == 0xFE and packet[9] & 0xC0 == 0x80)
        or not any(packet[8:24])
    )


def _set_queue_len(name: str, length: int) -> None:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if found:
            ipr.link("set", index=found[0], txqlen=length)


def _text(prefixes: list[Prefix]) -> str:
    return ", ".join(map(str, prefixes)) or "none"


def _exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


__all__ = ["TunOnRamp", "TunUnavailable", "explain"]
