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

from ramp.net import tun

log = logging.getLogger("ramp.client")

Prefix = ipaddress.IPv4Network | ipaddress.IPv6Network

READ_BATCH = 256  # packets read per wake-up before the loop serves the other direction
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
    ) -> None:
        self.name = name
        self.mtu = mtu
        self._send = send
        self._count = count
        self._drop = drop
        self.device: tun.TunDevice | None = None
        self.fd = -1
        self.addresses: list[Prefix] = []
        self.routes: list[Prefix] = []
        self.packets_up = self.packets_down = 0
        self.bytes_up = self.bytes_down = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def open(self) -> None:
        try:
            self.device = tun.open_tun(self.name, self.mtu)
        except OSError as e:
            if e.errno == errno.EBUSY or not _exists(self.name):
                raise TunUnavailable(e.errno, explain(e, self.name)) from e
            # a leftover of the same name that is not ours to attach to: replace it
            log.warning("removing a leftover device %s", self.name)
            try:
                tun.remove(self.name)
                self.device = tun.open_tun(self.name, self.mtu)
            except OSError as e2:
                raise TunUnavailable(e2.errno, explain(e2, self.name)) from e2
        self.name = self.device.name
        self.fd = self.device.fd
        os.set_blocking(self.fd, False)  # open_tun's already is: the reader relies on it
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.fd, self._readable)
        log.info("TUN device %s up (MTU %d)", self.name, self.mtu)

    def close(self) -> None:
        """Give the device back: routes and addresses go with it."""
        if self.fd < 0:
            return
        if self._loop is not None:
            self._loop.remove_reader(self.fd)
        self.fd = -1
        try:
            tun.remove(self.name)
        except OSError as e:
            log.debug("removing %s: %s", self.name, e)
        if self.device is not None:
            self.device.close()
        log.info("TUN device %s removed", self.name)

    # -- the edge's view of this device ---------------------------------------------------

    def set_addresses(self, prefixes: list[Prefix]) -> None:
        if self.fd < 0:
            return
        tun.set_addresses(self.name, prefixes)
        self.addresses = list(prefixes)
        log.info("%s addresses: %s", self.name, ", ".join(map(str, prefixes)) or "none")

    def set_routes(self, prefixes: list[Prefix]) -> None:
        if self.fd < 0:
            return
        tun.set_routes(self.name, prefixes)
        self.routes = list(prefixes)
        log.info("%s routes: %s", self.name, ", ".join(map(str, prefixes)) or "none")

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


def _exists(name: str) -> bool:
    return os.path.exists(f"/sys/class/net/{name}")


__all__ = ["TunOnRamp", "TunUnavailable", "explain"]
