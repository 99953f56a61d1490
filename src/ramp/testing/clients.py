"""Minimal proxy clients for tests: SOCKS5 CONNECT and UDP ASSOCIATE, HTTP CONNECT and
absolute-form GET.

Written from the RFCs independently of ramp's own codecs, so tests check the edge against a
second reading of the protocol. They return the exact reply code a user's client would see.
Sockets are passed in (made in the right namespace by the caller) and already connected.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct

SOCKS_VERSION = 5
REP_SUCCEEDED = 0x00
REP_GENERAL_FAILURE = 0x01
REP_NOT_ALLOWED = 0x02
REP_NETWORK_UNREACHABLE = 0x03
REP_HOST_UNREACHABLE = 0x04
REP_REFUSED = 0x05
REP_TTL_EXPIRED = 0x06


class ProxyError(Exception):
    """The proxy did not answer with a well-formed reply (closed, or sent garbage)."""


def socks5_request(host: str, port: int) -> bytes:
    """CONNECT request bytes; IP literals go as addresses, anything else as a domain name."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("idna")
        dst = bytes([0x03, len(name)]) + name
    else:
        dst = bytes([0x01 if addr.version == 4 else 0x04]) + addr.packed
    return bytes([SOCKS_VERSION, 0x01, 0x00]) + dst + struct.pack("!H", port)


def socks5_greeting(user: str | None) -> bytes:
    return bytes([SOCKS_VERSION, 1, 0x02 if user is not None else 0x00])


def socks5_auth(user: str, password: str) -> bytes:
    u, p = user.encode(), password.encode()
    return bytes([1, len(u)]) + u + bytes([len(p)]) + p


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProxyError(f"proxy closed the connection after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def _bound_len(atyp: int, first: int) -> int:
    if atyp == 0x01:
        return 4 + 2
    if atyp == 0x04:
        return 16 + 2
    if atyp == 0x03:
        return first + 2
    raise ProxyError(f"bad ATYP {atyp:#x} in SOCKS5 reply")


def socks5_connect(
    sock: socket.socket,
    host: str,
    port: int,
    *,
    user: str | None = None,
    password: str = "",
) -> int:
    """Ask for a CONNECT to host:port on a connected socket; return the REP byte."""
    sock.sendall(socks5_greeting(user))
    ver, method = _recv_exact(sock, 2)
    if ver != SOCKS_VERSION:
        raise ProxyError(f"bad SOCKS version {ver} in method reply")
    if method == 0xFF:
        raise ProxyError("proxy accepts none of our authentication methods")
    if method == 0x02:
        if user is None:
            raise ProxyError("proxy wants a password")
        sock.sendall(socks5_auth(user, password))
        _, status = _recv_exact(sock, 2)
        if status != 0:
            raise ProxyError(f"proxy rejected the credentials (status {status})")
    sock.sendall(socks5_request(host, port))
    ver, rep, _rsv, atyp = _recv_exact(sock, 4)
    if ver != SOCKS_VERSION:
        raise ProxyError(f"bad SOCKS version {ver} in reply")
    first = _recv_exact(sock, 1)[0] if atyp == 0x03 else 0
    _recv_exact(sock, _bound_len(atyp, first))
    return rep


def _socks5_address(host: str, port: int) -> bytes:
    """ATYP, DST.ADDR, DST.PORT: IP literals as addresses, anything else as a domain name."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("idna")
        return bytes([0x03, len(name)]) + name + struct.pack("!H", port)
    return bytes([0x01 if addr.version == 4 else 0x04]) + addr.packed + struct.pack("!H", port)


def socks5_udp_associate(
    sock: socket.socket,
    host: str = "0.0.0.0",
    port: int = 0,
    *,
    user: str | None = None,
    password: str = "",
) -> tuple[str, int]:
    """UDP ASSOCIATE on a connected socket; returns the relay's (host, port).

    `host`/`port` is where our datagrams will come from (RFC 1928: zeros when not known yet).
    Keep `sock` open: the association ends when it closes. A refusal raises ProxyError.
    """
    sock.sendall(socks5_greeting(user))
    ver, method = _recv_exact(sock, 2)
    if ver != SOCKS_VERSION or method == 0xFF:
        raise ProxyError(f"method selection failed ({ver}/{method:#x})")
    if method == 0x02:
        if user is None:
            raise ProxyError("proxy wants a password")
        sock.sendall(socks5_auth(user, password))
        if _recv_exact(sock, 2)[1] != 0:
            raise ProxyError("proxy rejected the credentials")
    sock.sendall(bytes([SOCKS_VERSION, 0x03, 0x00]) + _socks5_address(host, port))
    ver, rep, _rsv, atyp = _recv_exact(sock, 4)
    if ver != SOCKS_VERSION:
        raise ProxyError(f"bad SOCKS version {ver} in reply")
    if rep != REP_SUCCEEDED:
        raise ProxyError(f"UDP ASSOCIATE refused with REP {rep:#x}")
    if atyp == 0x01:
        relay_host = str(ipaddress.IPv4Address(_recv_exact(sock, 4)))
    elif atyp == 0x04:
        relay_host = str(ipaddress.IPv6Address(_recv_exact(sock, 16)))
    elif atyp == 0x03:
        relay_host = _recv_exact(sock, _recv_exact(sock, 1)[0]).decode("ascii")
    else:
        raise ProxyError(f"bad ATYP {atyp:#x} in SOCKS5 reply")
    (relay_port,) = struct.unpack("!H", _recv_exact(sock, 2))
    if relay_host in ("0.0.0.0", "::"):
        # Servers may answer "the address you are talking to"
        relay_host = sock.getpeername()[0]
    return relay_host, relay_port


def udp_wrap(host: str, port: int, data: bytes, *, frag: int = 0) -> bytes:
    """A SOCKS5 UDP request datagram: RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA."""
    return bytes([0, 0, frag]) + _socks5_address(host, port) + data


def udp_unwrap(packet: bytes) -> tuple[str, int, bytes]:
    """(host, port, data) of a datagram from the relay; a domain name comes back as the name."""
    if len(packet) < 4 or packet[:2] != b"\0\0":
        raise ProxyError(f"bad SOCKS5 UDP header: {packet[:8]!r}")
    if packet[2] != 0:
        raise ProxyError(f"fragment from the relay (FRAG {packet[2]})")
    atyp = packet[3]
    if atyp == 0x01:
        end = 8
        host = str(ipaddress.IPv4Address(packet[4:end])) if len(packet) >= end else ""
    elif atyp == 0x04:
        end = 20
        host = str(ipaddress.IPv6Address(packet[4:end])) if len(packet) >= end else ""
    elif atyp == 0x03 and len(packet) > 4:
        end = 5 + packet[4]
        host = packet[5:end].decode("ascii", "replace")
    else:
        raise ProxyError(f"bad ATYP in SOCKS5 UDP header: {packet[:8]!r}")
    if len(packet) < end + 2:
        raise ProxyError(f"truncated SOCKS5 UDP header: {packet!r}")
    (port,) = struct.unpack_from("!H", packet, end)
    return host, port, packet[end + 2 :]


async def _aread_exact(reader: asyncio.StreamReader, n: int) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as e:
        raise ProxyError(f"proxy closed the connection after {len(e.partial)} of {n} bytes") from e


async def socks5_connect_async(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    host: str,
    port: int,
) -> int:
    """`socks5_connect` for asyncio streams (no authentication)."""
    writer.write(socks5_greeting(None))
    await writer.drain()
    ver, method = await _aread_exact(reader, 2)
    if ver != SOCKS_VERSION or method != 0x00:
        raise ProxyError(f"unexpected method reply {ver}/{method:#x}")
    writer.write(socks5_request(host, port))
    await writer.drain()
    ver, rep, _rsv, atyp = await _aread_exact(reader, 4)
    if ver != SOCKS_VERSION:
        raise ProxyError(f"bad SOCKS version {ver} in reply")
    first = (await _aread_exact(reader, 1))[0] if atyp == 0x03 else 0
    await _aread_exact(reader, _bound_len(atyp, first))
    return rep


def _read_head(sock: socket.socket, limit: int = 65536) -> bytes:
    """Read an HTTP response head byte by byte, so no tunnelled byte after it is consumed."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        b = sock.recv(1)
        if not b:
            if head:
                raise ProxyError(f"proxy closed the connection mid-head: {head!r}")
            raise ProxyError("proxy closed the connection without an answer")
        head += b
        if len(head) > limit:
            raise ProxyError("response head too long")
    return head


def parse_status(head: bytes) -> int:
    line = head.split(b"\r\n", 1)[0].split(b" ")
    if len(line) < 2 or not line[0].startswith(b"HTTP/1.") or not line[1].isdigit():
        raise ProxyError(f"bad status line: {head[:80]!r}")
    return int(line[1])


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def http_connect(
    sock: socket.socket, host: str, port: int, *, auth: str | None = None
) -> tuple[int, bytes]:
    """Send `CONNECT host:port`; return (status, response head)."""
    authority = _authority(host, port)
    req = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
    if auth:
        req += f"Proxy-Authorization: {auth}\r\n"
    sock.sendall((req + "\r\n").encode())
    head = _read_head(sock)
    return parse_status(head), head


def http_forward_get(
    sock: socket.socket, host: str, port: int, path: str = "/"
) -> tuple[int, bytes]:
    """Send an absolute-form `GET http://host:port/path`; return (status, response head)."""
    authority = _authority(host, port)
    req = f"GET http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    sock.sendall(req.encode())
    head = _read_head(sock)
    return parse_status(head), head


def recv_until_eof(sock: socket.socket, limit: int = 512 * 2**20) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while data := sock.recv(65536):
        chunks.append(data)
        total += len(data)
        if total > limit:
            raise ProxyError("more data than expected")
    return b"".join(chunks)
