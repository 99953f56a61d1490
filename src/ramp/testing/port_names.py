"""Origins on many ports at once that say which address and port they are.

The any-port tests dial hundreds of random ports and must see that each connection reached the
service it is mapped to: every socket here answers with its own "ADDRESS:PORT\\n" (TCP: on
accept, then echoes what it reads; UDP: "ADDRESS:PORT " followed by the datagram). One thread
serves them all with `selectors`; the sockets are made inside a namespace (`Netns.call`).

    with PortNames(lab.private, [(ORIGIN, 20001), ...], udp=True) as names:
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Iterable, Sequence

from ramp.net.netns import Netns


def _sockets(addrs: list[tuple[str, int]], udp: bool) -> list[socket.socket]:
    out = []
    try:
        for addr in addrs:
            sock = socket.socket(_family(addr), socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            if not udp:
                sock.listen(128)
            sock.setblocking(False)
    except BaseException:
        for sock in out:
            sock.close()
        raise
    return out


def _family(addr: tuple[str, int]) -> int:
    return socket.AF_INET6 if ":" in addr[0] else socket.AF_INET


def name_of(addr: tuple[str, int]) -> bytes:
    """ADDRESS:PORT (an IPv6 address as it is, without brackets: the port is after the
    last colon)."""
    return f"{addr[0]}:{addr[1]}".encode()


class PortNames:
    """TCP or UDP sockets on `addrs` in `ns` that answer with their own address."""

    def __init__(self, ns: Netns, addrs: Iterable[tuple[str, int]], *, udp: bool = False) -> None:
        self.addrs = list(addrs)
        self.udp = udp
        self._listeners = ns.call(_sockets, self.addrs, udp)
        self._sel = selectors.DefaultSelector()
        self._stop_r, self._stop_w = socket.socketpair()
        self._sel.register(self._stop_r, selectors.EVENT_READ, None)
        for sock in self._listeners:
            self._sel.register(sock, selectors.EVENT_READ, ("listen", sock))
        self._thread = threading.Thread(target=self._run, name="port-names", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            for key, _ in self._sel.select():
                if key.data is None:
                    return
                kind, sock = key.data
                with contextlib.suppress(OSError):
                    if kind == "listen" and self.udp:
                        self._datagram(sock)
                    elif kind == "listen":
                        self._accept(sock)
                    else:
                        self._echo(sock)

    def _datagram(self, sock: socket.socket) -> None:
        for _ in range(64):
            try:
                data, peer = sock.recvfrom(65535)
            except BlockingIOError:
                return
            sock.sendto(name_of(sock.getsockname()) + b" " + data, peer)

    def _accept(self, sock: socket.socket) -> None:
        conn, _ = sock.accept()
        conn.setblocking(True)
        conn.sendall(name_of(conn.getsockname()) + b"\n")
        conn.setblocking(False)
        self._sel.register(conn, selectors.EVENT_READ, ("conn", conn))

    def _echo(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._sel.unregister(conn)
            conn.close()
            return
        conn.setblocking(True)
        conn.sendall(data)
        conn.setblocking(False)

    def close(self) -> None:
        self._stop_w.send(b"x")
        self._thread.join(10)
        for key in list(self._sel.get_map().values()):
            if key.data is not None:
                key.fileobj.close()  # type: ignore[union-attr]
        self._sel.close()
        self._stop_r.close()
        self._stop_w.close()

    def __enter__(self) -> PortNames:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the client side -------------------------------------------------------------------------

Target = tuple[str, int]


async def _ask_tcp(sock: socket.socket, target: Target, timeout: float) -> bytes:
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, target)
            got = b""
            while not got.endswith(b"\n"):
                chunk = await loop.sock_recv(sock, 256)
                if not chunk:
                    raise ConnectionError(f"{target}: closed after {got!r}")
                got += chunk
            # and the stream goes on both ways past the greeting
            await loop.sock_sendall(sock, b"ping")
            echo = b""
            while len(echo) < 4:
                chunk = await loop.sock_recv(sock, 4 - len(echo))
                if not chunk:
                    raise ConnectionError(f"{target}: no echo")
                echo += chunk
            if echo != b"ping":
                raise ConnectionError(f"{target}: echo {echo!r}")
            return got.rstrip(b"\n")
    finally:
        sock.close()


def ask_tcp(
    ns: Netns, targets: Sequence[Target], *, concurrency: int = 32, timeout: float = 30.0
) -> dict[Target, bytes | Exception]:
    """Connect from `ns` to each target, read its greeting (the name of the origin it
    reached) and check the echo; the greeting or the error, by target."""

    async def main() -> dict[Target, bytes | Exception]:
        gate = asyncio.Semaphore(concurrency)
        out: dict[Target, bytes | Exception] = {}
        family = _family(targets[0]) if targets else socket.AF_INET
        made = iter(ns.sockets(len(targets), family))  # one thread switch for all of them

        async def one(target: Target) -> None:
            async with gate:
                sock = next(made)
                try:
                    out[target] = await _ask_tcp(sock, target, timeout)
                except Exception as e:
                    out[target] = e

        await asyncio.gather(*(one(t) for t in targets))
        return out

    return asyncio.run(main())


def ask_udp(
    ns: Netns, targets: Sequence[Target], *, timeout: float = 30.0, resend: float = 1.0
) -> dict[Target, tuple[bytes, Target]]:
    """Send a datagram from one socket in `ns` to each target until each has answered (UDP
    may drop; a target that stays silent is sent to again every `resend` seconds, up to
    `timeout`): by target, the answer and the address it came from. The payload names the
    target, so an answer is matched to its question whatever its source says."""
    sock = ns.socket(_family(targets[0]) if targets else socket.AF_INET, socket.SOCK_DGRAM)
    answers: dict[Target, tuple[bytes, Target]] = {}
    try:
        sock.settimeout(resend)
        deadline = time.monotonic() + timeout
        while len(answers) < len(targets) and time.monotonic() < deadline:
            for target in targets:
                if target not in answers:
                    sock.sendto(b"q " + name_of(target), target)
            resend_at = time.monotonic() + resend
            while time.monotonic() < resend_at and len(answers) < len(targets):
                try:
                    data, source = sock.recvfrom(65535)
                except TimeoutError:
                    break
                name, _, question = data.rpartition(b" q ")
                host, _, port = question.decode(errors="replace").rpartition(":")
                if port.isdigit():
                    answers[(host, int(port))] = (name, (source[0], int(source[1])))
    finally:
        sock.close()
    return answers
