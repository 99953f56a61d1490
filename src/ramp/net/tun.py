"""TUN devices: open one, give it addresses and routes, delete it.

A TUN device carries whole IP packets between the kernel and a file descriptor: each read()
returns one packet the kernel routed into the device, each write() injects one packet as if it
had arrived on it. Opened with IFF_NO_PI, so a packet starts at its IP header (no 4-byte
packet-information prefix). Addresses and routes are set over netlink with pyroute2.

Where a device lives: TUNSETIFF creates it in the network namespace of the calling thread, and a
netlink socket acts on the namespace it was created in. Every function takes `netns`: anything
with a `call(fn, *args)` that runs `fn` inside a namespace (`ramp.net.netns.Netns`, or
`ramp.net.ownns.OwnNetns`, the unnamed namespace a process makes for itself); None is the
namespace of the caller. Each call runs in a short-lived thread, so asyncio code may call them.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

# Linux values (include/uapi/linux/if_tun.h, if.h, if_addr.h); not in Python's modules
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
IFA_F_NODAD = 0x02
TUN_PATH = "/dev/net/tun"
EEXIST = 17
ENOENT = 2
ESRCH = 3

T = TypeVar("T")

Prefix = ipaddress.IPv4Network | ipaddress.IPv6Network
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class InNamespace(Protocol):
    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...


class TunError(OSError):
    """Opening or configuring a TUN device failed; the message says which step."""


@dataclass
class TunDevice:
    """An open TUN device: `fd` is non-blocking, one packet per read/write."""

    fd: int
    name: str
    mtu: int

    def fileno(self) -> int:
        return self.fd

    def read(self) -> bytes | None:
        """One packet, or None when none is waiting."""
        try:
            return os.read(self.fd, self.mtu + 64)
        except BlockingIOError:
            return None

    def write(self, packet: bytes) -> bool:
        """Inject one packet; False when the kernel refused it (queue full, bad packet)."""
        try:
            os.write(self.fd, packet)
        except OSError:
            return False
        return True

    def close(self) -> None:
        """Close the descriptor: a non-persistent device disappears with it."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def _in(netns: InNamespace | None, fn: Callable[..., T], *args: Any) -> T:
    # Always in a thread of its own: pyroute2 runs an event loop of its own, which cannot
    # start in a thread whose loop is running (an asyncio program calling these).
    return _in_thread(fn, *args) if netns is None else netns.call(fn, *args)


def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=target, name="netlink", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def open_tun(
    name: str | None, mtu: int, *, netns: InNamespace | None = None, up: bool = True
) -> TunDevice:
    """Create a TUN device (the kernel picks `tunN` when `name` is None), set its MTU and
    bring it up. It lives as long as the returned descriptor."""
    return _in(netns, _open_tun, name, mtu, up)


def _open_tun(name: str | None, mtu: int, up: bool) -> TunDevice:
    wanted = (name or "").encode()
    if len(wanted) >= IFNAMSIZ:
        raise TunError(f"TUN name {name!r} is longer than {IFNAMSIZ - 1} bytes")
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise TunError(e.errno, f"open {TUN_PATH}: {e.strerror} (needs the tun module)") from e
    try:
        ifr = struct.pack(f"{IFNAMSIZ}sH22x", wanted, IFF_TUN | IFF_NO_PI)
        try:
            res = fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as e:
            raise TunError(e.errno, f"TUNSETIFF {name or '(any)'}: {e.strerror}") from e
        actual = res[:IFNAMSIZ].rstrip(b"\0").decode()
        with IPRoute() as ipr:
            index = _index(ipr, actual)
            ipr.link("set", index=index, mtu=mtu)
            if up:
                ipr.link("set", index=index, state="up")
    except BaseException:
        os.close(fd)
        raise
    return TunDevice(fd=fd, name=actual, mtu=mtu)


def _index(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise TunError(ENOENT, f"no interface {name!r}")
    return int(found[0])


def set_addresses(
    name: str, prefixes: Iterable[str | Interface], *, netns: InNamespace | None = None
) -> None:
    """Make the device's addresses exactly `prefixes` (`100.96.0.5/32`, `fd00::5/128`):
    missing ones are added (IPv6 without duplicate detection, so usable at once), others
    removed. Link-local IPv6 addresses the kernel adds itself are kept."""
    wanted = {ipaddress.ip_interface(p) for p in prefixes}
    _in(netns, _set_addresses, name, wanted)


def _set_addresses(name: str, wanted: set[Interface]) -> None:
    with IPRoute() as ipr:
        index = _index(ipr, name)
        have: set[Interface] = set()
        for msg in ipr.get_addr(index=index):
            iface = ipaddress.ip_interface(f"{msg.get_attr('IFA_ADDRESS')}/{msg['prefixlen']}")
            if iface.version == 6 and iface.ip.is_link_local:
                continue
            have.add(iface)
        for iface in have - wanted:
            ipr.addr("del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        for iface in sorted(wanted - have, key=lambda i: (i.version, int(i.ip))):
            extra: dict[str, Any] = {}
            if iface.version == 6:
                extra["IFA_FLAGS"] = IFA_F_NODAD
            try:
                ipr.addr(
                    "add",
                    index=index,
                    address=str(iface.ip),
                    prefixlen=iface.network.prefixlen,
                    **extra,
                )
            except NetlinkError as e:
                if e.code != EEXIST:
                    raise TunError(e.code, f"add address {iface} to {name}: {e}") from e


def set_routes(
    name: str, prefixes: Iterable[str | Prefix], *, netns: InNamespace | None = None
) -> None:
    """Make the routes through the device exactly `prefixes` (main table): new ones added,
    ones no longer listed removed. Routes the kernel made for the device's own addresses
    (proto kernel) are left alone."""
    wanted = {ipaddress.ip_network(p, strict=False) for p in prefixes}
    _in(netns, _set_routes, name, wanted)


RTPROT_KERNEL = 2
RTPROT_STATIC = 4
RT_TABLE_MAIN = 254


def _set_routes(name: str, wanted: set[Prefix]) -> None:
    with IPRoute() as ipr:
        index = _index(ipr, name)
        have: set[Prefix] = set()
        for family in (2, 10):  # AF_INET, AF_INET6
            for msg in ipr.get_routes(family=family, oif=index, table=RT_TABLE_MAIN):
                if msg["proto"] == RTPROT_KERNEL:
                    continue
                dst = msg.get_attr("RTA_DST")
                if dst is None:
                    dst = "0.0.0.0" if family == 2 else "::"
                have.add(ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False))
        for net in have - wanted:
            with contextlib.suppress(NetlinkError):
                ipr.route("del", dst=str(net), oif=index)
        for net in sorted(wanted - have, key=lambda n: (n.version, int(n.network_address))):
            try:
                ipr.route("add", dst=str(net), oif=index, proto=RTPROT_STATIC)
            except NetlinkError as e:
                if e.code != EEXIST:
                    raise TunError(e.code, f"add route {net} dev {name}: {e}") from e


def remove(name: str, *, netns: InNamespace | None = None) -> bool:
    """Delete the device (and with it its addresses and routes). False when it was gone."""
    return _in(netns, _remove, name)


def _remove(name: str) -> bool:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as e:
            if e.code in (ENOENT, ESRCH):
                return False
            raise
    return True


__all__ = [
    "IFF_NO_PI",
    "IFF_TUN",
    "TUNSETIFF",
    "InNamespace",
    "TunDevice",
    "TunError",
    "open_tun",
    "remove",
    "set_addresses",
    "set_routes",
]
