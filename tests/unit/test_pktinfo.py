"""The wildcard UDP endpoint answers from the address the client sent to (loopback only:
127.0.0.1 and 127.0.0.2 are both local on lo)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from ramp.net.pktinfo import PktinfoEndpoint
from ramp.testing.loopback import run_on_loop as run
from ramp.testing.wait import until


class Echo:
    """Echoes every datagram back, prefixed with the local address it was sent to."""

    def __init__(self, *, reply_from_local: bool = True) -> None:
        self.ep = PktinfoEndpoint(name="test")
        self.reply_from_local = reply_from_local
        self.seen: list[tuple[bytes, str]] = []

    def on_datagram(self, data: bytes, peer: tuple[Any, ...], local_ip: str) -> None:
        self.seen.append((data, local_ip))
        reply = local_ip.encode() + b" " + data
        self.ep.sendto(reply, peer, local_ip if self.reply_from_local else None)


async def exchange(
    family: int, server: tuple[str, int], payload: bytes, timeout: float = 1.0
) -> bytes | None:
    """Send from a *connected* UDP socket: the kernel drops replies from any other source."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.connect(server)
        await loop.sock_sendall(sock, payload)
        try:
            async with asyncio.timeout(timeout):
                return await loop.sock_recv(sock, 65535)
        except (TimeoutError, ConnectionRefusedError):
            return None  # nothing came back (or nothing listens there)
    finally:
        sock.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_wildcard_v4_replies_from_each_address_asked(loop: str) -> None:
    async def main() -> None:
        echo = Echo()
        await echo.ep.open("0.0.0.0", 0, echo.on_datagram)
        try:
            assert echo.ep.uses_pktinfo
            for dst in ("127.0.0.2", "127.0.0.1", "127.0.0.2"):
                got = await exchange(socket.AF_INET, (dst, echo.ep.port), b"hi " + dst.encode())
                assert got == f"{dst} hi {dst}".encode()
            assert [ip for _, ip in echo.seen] == ["127.0.0.2", "127.0.0.1", "127.0.0.2"]
            assert not echo.ep.errors
        finally:
            echo.ep.close()

    run(main, loop)


def test_without_pktinfo_the_connected_client_drops_the_reply() -> None:
    """The control for the test above: a plain sendto from the wildcard socket leaves with the
    route's source (127.0.0.1), and a client that asked 127.0.0.2 never sees it."""

    async def main() -> None:
        echo = Echo(reply_from_local=False)
        await echo.ep.open("0.0.0.0", 0, echo.on_datagram)
        try:
            assert await exchange(socket.AF_INET, ("127.0.0.2", echo.ep.port), b"x", 0.3) is None
            assert echo.seen == [(b"x", "127.0.0.2")]
        finally:
            echo.ep.close()

    run(main)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_wildcard_v6(loop: str) -> None:
    async def main() -> None:
        echo = Echo()
        await echo.ep.open("::", 0, echo.on_datagram)
        try:
            assert echo.ep.uses_pktinfo
            got = await exchange(socket.AF_INET6, ("::1", echo.ep.port), b"six")
            assert got == b"::1 six"
            # "::" is IPv6 only: nothing answers on IPv4.
            assert await exchange(socket.AF_INET, ("127.0.0.1", echo.ep.port), b"4", 0.3) is None
        finally:
            echo.ep.close()

    run(main, loop)


def test_specific_address_needs_no_pktinfo() -> None:
    async def main() -> None:
        echo = Echo()
        await echo.ep.open("127.0.0.2", 0, echo.on_datagram)
        try:
            assert not echo.ep.uses_pktinfo
            assert echo.ep.address[0] == "127.0.0.2"
            got = await exchange(socket.AF_INET, ("127.0.0.2", echo.ep.port), b"a")
            assert got == b"127.0.0.2 a"
        finally:
            echo.ep.close()

    run(main)


def test_many_datagrams_in_one_burst_all_arrive() -> None:
    """More datagrams than one wakeup drains: the reader comes back for the rest."""

    async def main() -> None:
        got: list[bytes] = []
        done = asyncio.Event()

        def on_datagram(data: bytes, peer: tuple[Any, ...], local_ip: str) -> None:
            got.append(data)
            if len(got) == 500:
                done.set()

        ep = PktinfoEndpoint(buffer_size=1 << 20)
        await ep.open("0.0.0.0", 0, on_datagram)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for i in range(500):
                client.sendto(str(i).encode(), ("127.0.0.2", ep.port))
            await asyncio.wait_for(done.wait(), 5)
            assert sorted(int(d) for d in got) == list(range(500))
        finally:
            client.close()
            ep.close()

    run(main)


def test_oversized_datagram_is_counted_not_delivered() -> None:
    async def main() -> None:
        got: list[bytes] = []
        ep = PktinfoEndpoint()
        await ep.open("127.0.0.1", 0, lambda d, p, ip: got.append(d), max_size=100)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            client.sendto(b"x" * 101, ("127.0.0.1", ep.port))
            client.sendto(b"y" * 100, ("127.0.0.1", ep.port))
            await until(lambda: got, what="the datagram that fits")
            assert got == [b"y" * 100]
            assert ep.errors["truncated"] == 1
        finally:
            client.close()
            ep.close()

    run(main)


def test_callback_errors_and_send_errors_are_counted() -> None:
    async def main() -> None:
        errors: list[str] = []
        ep = PktinfoEndpoint(on_error=errors.append)
        calls = 0

        def on_datagram(data: bytes, peer: tuple[Any, ...], local_ip: str) -> None:
            nonlocal calls
            calls += 1
            if data == b"boom":
                raise RuntimeError("handler bug")
            # Not a local address: the kernel refuses to send from it.
            assert not ep.sendto(b"r", peer, "192.0.2.1")

        await ep.open("0.0.0.0", 0, on_datagram)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            client.sendto(b"boom", ("127.0.0.1", ep.port))
            client.sendto(b"ok", ("127.0.0.1", ep.port))
            await until(lambda: calls == 2, what="both datagrams handled")
            assert ep.errors["callback_error"] == 1
            assert ep.errors["send_error"] == 1 and errors == ["send_error"]
        finally:
            client.close()
            ep.close()
        assert not ep.sendto(b"late", ("127.0.0.1", 9), "127.0.0.1")
        assert ep.errors["send_closed"] == 1

    run(main)
