"""connect-ip capsules (RFC 9484 section 4.7), sans-I/O.

    ADDRESS_ASSIGN (0x01)      Assigned Address { Request ID (i), IP Version (8),
                               IP Address (32/128), IP Prefix Length (8) } ...
    ADDRESS_REQUEST (0x02)     Requested Address, the same fields; at least one, Request ID != 0
    ROUTE_ADVERTISEMENT (0x03) IP Address Range { IP Version (8), Start IP Address (32/128),
                               End IP Address (32/128), IP Protocol (8) } ...

The ranges of a ROUTE_ADVERTISEMENT are ordered (IPv4 before IPv6, then by IP protocol, then by
start) and ranges of the same version and protocol do not overlap; a receiver that sees
otherwise aborts the request stream (section 4.7.3). Anything malformed raises
`ConnectIpError`. Capsules travel in the framing of `ramp.wire.masque`.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ramp.wire.masque import encode_capsule as _frame
from ramp.wire.varint import decode_varint, encode_varint

CAPSULE_ADDRESS_ASSIGN = 0x01
CAPSULE_ADDRESS_REQUEST = 0x02
CAPSULE_ROUTE_ADVERTISEMENT = 0x03
CONTEXT_IP = 0  # RFC 9484 section 6: context id 0 carries whole IP packets
IP_PROTOCOL_ANY = 0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_ADDRESS_BYTES = {4: 4, 6: 16}


class ConnectIpError(ValueError):
    """A malformed connect-ip capsule: the request stream is to be aborted."""


class AddressEntry(NamedTuple):
    """One address of an ADDRESS_ASSIGN or ADDRESS_REQUEST: request id 0 in an assignment
    means unsolicited; `prefix` is a network (host bits zero)."""

    request_id: int
    ip_version: int
    prefix: IPNetwork


class IpRange(NamedTuple):
    ip_version: int
    start: IPAddress
    end: IPAddress
    ip_protocol: int  # 0: every protocol


@dataclass(frozen=True, slots=True)
class AddressAssign:
    addresses: tuple[AddressEntry, ...]

    def __init__(self, addresses: Iterable[tuple[int, int, IPNetwork]]) -> None:
        object.__setattr__(self, "addresses", tuple(AddressEntry(*a) for a in addresses))


@dataclass(frozen=True, slots=True)
class AddressRequest:
    addresses: tuple[AddressEntry, ...]

    def __init__(self, addresses: Iterable[tuple[int, int, IPNetwork]]) -> None:
        object.__setattr__(self, "addresses", tuple(AddressEntry(*a) for a in addresses))


@dataclass(frozen=True, slots=True)
class RouteAdvertisement:
    ranges: tuple[IpRange, ...]

    def __init__(self, ranges: Iterable[tuple[int, IPAddress, IPAddress, int]]) -> None:
        object.__setattr__(self, "ranges", tuple(IpRange(*r) for r in ranges))

    def networks(self) -> list[IPNetwork]:
        """The advertised ranges as networks (a range may take several), protocol ignored."""
        out: list[IPNetwork] = []
        for r in self.ranges:
            out += ipaddress.summarize_address_range(r.start, r.end)  # type: ignore[arg-type]
        return out


ConnectIpCapsule = AddressAssign | AddressRequest | RouteAdvertisement


# --- encoding --------------------------------------------------------------------------------


def _entry(entry: AddressEntry) -> bytes:
    request_id, version, prefix = entry
    if version not in _ADDRESS_BYTES or prefix.version != version:
        raise ConnectIpError(f"IP version {version} with prefix {prefix}")
    return (
        encode_varint(request_id)
        + bytes((version,))
        + prefix.network_address.packed
        + bytes((prefix.prefixlen,))
    )


def encode_value(capsule: ConnectIpCapsule) -> bytes:
    """The capsule's value (no type and length): what `ramp.wire.masque.encode_capsule` wraps."""
    if isinstance(capsule, RouteAdvertisement):
        check_ranges(capsule.ranges)
        return b"".join(
            bytes((r.ip_version,)) + r.start.packed + r.end.packed + bytes((r.ip_protocol,))
            for r in capsule.ranges
        )
    if isinstance(capsule, AddressRequest):
        _check_request(capsule.addresses)
    return b"".join(_entry(a) for a in capsule.addresses)


def capsule_type(capsule: ConnectIpCapsule) -> int:
    if isinstance(capsule, AddressAssign):
        return CAPSULE_ADDRESS_ASSIGN
    if isinstance(capsule, AddressRequest):
        return CAPSULE_ADDRESS_REQUEST
    return CAPSULE_ROUTE_ADVERTISEMENT


def encode_capsule(capsule: ConnectIpCapsule) -> bytes:
    """The whole capsule: type, length, value."""
    return _frame(capsule_type(capsule), encode_value(capsule))


# --- parsing ---------------------------------------------------------------------------------


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    @property
    def done(self) -> bool:
        return self.pos >= len(self.buf)

    def varint(self, what: str) -> int:
        got = decode_varint(self.buf, self.pos)
        if got is None:
            raise ConnectIpError(f"truncated {what}")
        value, self.pos = got
        return value

    def byte(self, what: str) -> int:
        if self.pos >= len(self.buf):
            raise ConnectIpError(f"truncated {what}")
        self.pos += 1
        return self.buf[self.pos - 1]

    def version(self) -> int:
        version = self.byte("IP version")
        if version not in _ADDRESS_BYTES:
            raise ConnectIpError(f"IP version {version}")
        return version

    def address(self, version: int) -> IPAddress:
        n = _ADDRESS_BYTES[version]
        if self.pos + n > len(self.buf):
            raise ConnectIpError("truncated IP address")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return ipaddress.ip_address(raw)


def _parse_entries(value: bytes) -> list[AddressEntry]:
    reader = _Reader(value)
    out = []
    while not reader.done:
        request_id = reader.varint("request id")
        version = reader.version()
        address = reader.address(version)
        length = reader.byte("prefix length")
        if length > _ADDRESS_BYTES[version] * 8:
            raise ConnectIpError(f"prefix length {length} for IPv{version}")
        try:
            prefix = ipaddress.ip_network((address, length), strict=True)
        except ValueError as e:
            raise ConnectIpError(f"{address}/{length} has bits set past its prefix") from e
        out.append(AddressEntry(request_id, version, prefix))
    return out


def _check_request(entries: Sequence[AddressEntry]) -> None:
    if not entries:
        raise ConnectIpError("ADDRESS_REQUEST without an address")
    if any(e.request_id == 0 for e in entries):
        raise ConnectIpError("ADDRESS_REQUEST with request id 0")


def parse_address_assign(value: bytes) -> AddressAssign:
    return AddressAssign(_parse_entries(value))


def parse_address_request(value: bytes) -> AddressRequest:
    entries = _parse_entries(value)
    _check_request(entries)
    return AddressRequest(entries)


def check_ranges(ranges: Sequence[IpRange]) -> None:
    """Raise `ConnectIpError` unless `ranges` are valid and in the order section 4.7.3 asks."""
    for r in ranges:
        if r.ip_version not in _ADDRESS_BYTES or r.start.version != r.ip_version:
            raise ConnectIpError(f"range {r.start}-{r.end} is not IPv{r.ip_version}")
        if r.end.version != r.ip_version or r.start > r.end:  # type: ignore[operator]
            raise ConnectIpError(f"range {r.start}-{r.end} ends before it starts")
        if not 0 <= r.ip_protocol <= 255:
            raise ConnectIpError(f"IP protocol {r.ip_protocol}")
    for a, b in itertools.pairwise(ranges):
        if (a.ip_version, a.ip_protocol) > (b.ip_version, b.ip_protocol):
            raise ConnectIpError("ranges out of order")
        if (a.ip_version, a.ip_protocol) == (b.ip_version, b.ip_protocol) and b.start <= a.end:  # type: ignore[operator]
            raise ConnectIpError(f"range {b.start}-{b.end} overlaps or precedes {a.start}-{a.end}")


def parse_route_advertisement(value: bytes) -> RouteAdvertisement:
    reader = _Reader(value)
    ranges = []
    while not reader.done:
        version = reader.version()
        start = reader.address(version)
        end = reader.address(version)
        ranges.append(IpRange(version, start, end, reader.byte("IP protocol")))
    check_ranges(ranges)
    return RouteAdvertisement(ranges)


_PARSERS = {
    CAPSULE_ADDRESS_ASSIGN: parse_address_assign,
    CAPSULE_ADDRESS_REQUEST: parse_address_request,
    CAPSULE_ROUTE_ADVERTISEMENT: parse_route_advertisement,
}


def parse_capsule(capsule_type: int, value: bytes) -> ConnectIpCapsule | None:
    """The connect-ip capsule of that type, or None for a type that is not one (the caller
    handles DATAGRAM capsules and skips unknown ones, RFC 9297 section 3.2)."""
    parser = _PARSERS.get(capsule_type)
    return parser(value) if parser is not None else None


def advertise(
    prefixes: Iterable[IPNetwork], ip_protocol: int = IP_PROTOCOL_ANY
) -> RouteAdvertisement:
    """A valid ROUTE_ADVERTISEMENT for `prefixes`: merged, ordered, non-overlapping."""
    prefixes = list(prefixes)
    out: list[IpRange] = []
    for version in (4, 6):
        nets = [p for p in prefixes if p.version == version]
        for net in ipaddress.collapse_addresses(nets):  # type: ignore[type-var]
            start, end = net.network_address, net.broadcast_address
            last = out[-1] if out and out[-1].ip_version == version else None
            if last is not None and int(last.end) + 1 == int(start):
                out[-1] = IpRange(version, last.start, end, ip_protocol)
            else:
                out.append(IpRange(version, start, end, ip_protocol))
    return RouteAdvertisement(out)
