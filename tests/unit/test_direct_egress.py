"""Direct egress: flows outside every route leave the edge itself, relayed with splice(2)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
from pathlib import Path

import pytest

from ramp.edge import Edge
from ramp.net.splice import splice_relay
from ramp.policy.router import RouteEntry, RouteTable
from ramp.policy.rules import Rule
from ramp.store.db import Store
from ramp.testing.loopback import loopback_edge_config, run


async def start_edge(tmp_path: Path, direct: bool) -> Edge:
    # the origins are on loopback: direct egress reaches them only when a rule says so
    with Store(tmp_path) as store:
        store.add_rule(Rule("loopback-origins", "allow", to="127.0.0.0/8"), 1)
    edge = Edge(loopback_edge_config(tmp_path, allow_direct_egress=direct))
    await edge.start()
    return edge


async def socks(port: int, dport: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"\x05\x01\x00")
    await r.readexactly(2)
    w.write(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", dport))
    return r, w, (await r.readexactly(10))[1]


def test_direct_egress_relays_with_half_close(tmp_path: Path) -> None:
    payload = os.urandom(16 * 1024 * 1024)

    async def main() -> None:
        async def origin(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            data = await r.read()
            w.write(hashlib.sha256(data).digest() + payload)
            await w.drain()
            w.close()

        srv = await asyncio.start_server(origin, "127.0.0.1", 0)
        oport = srv.sockets[0].getsockname()[1]
        edge = await start_edge(tmp_path, direct=True)
        try:
            r, w, rep = await socks(edge.onramps[0].port, oport)
            assert rep == 0
            up = os.urandom(1024 * 1024)
            w.write(up)
            w.write_eof()
            assert await r.readexactly(32) == hashlib.sha256(up).digest()
            assert await r.read() == payload
            w.close()
        finally:
            await edge.close()
            srv.close()
        line = (tmp_path / "audit.log").read_text().strip().splitlines()[-1]
        assert '"tunnel":"direct"' in line
        assert f'"bytes_down":{len(payload) + 32}' in line

    run(main())


def test_direct_egress_off_refuses(tmp_path: Path) -> None:
    async def main() -> None:
        edge = await start_edge(tmp_path, direct=False)
        try:
            _, w, rep = await socks(edge.onramps[0].port, 9)
            assert rep == 0x02
            w.close()
        finally:
            await edge.close()

    run(main())


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    lsock = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(lsock.getsockname())
    s, _ = lsock.accept()
    lsock.close()
    return c, s


def test_splice_relay_propagates_reset() -> None:
    """An RST on one side of a spliced flow becomes an RST on the other side."""

    async def main() -> None:
        client, a = tcp_pair()
        b, origin = tcp_pair()
        task = asyncio.ensure_future(splice_relay(a, b))
        loop = asyncio.get_running_loop()
        client.setblocking(False)
        origin.setblocking(False)
        await loop.sock_sendall(client, b"hello")
        assert await loop.sock_recv(origin, 5) == b"hello"
        origin.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        origin.close()
        result = await asyncio.wait_for(task, 5)
        assert result.reset
        assert result.a_to_b == 5
        with pytest.raises(ConnectionResetError):
            await loop.sock_recv(client, 1)
        client.close()

    run(main())


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("10.1.2.3", "narrow"),
        ("10.1.9.9", "wide"),
        ("10.200.0.1", "wide"),
        ("11.0.0.1", None),
        ("2001:db8::1", "v6"),
        ("::ffff:10.1.2.3", "narrow"),
    ],
)
def test_longest_prefix_match(ip: str, expected: str | None) -> None:
    import ipaddress

    table = RouteTable(
        [
            RouteEntry(ipaddress.ip_network("10.0.0.0/8"), "w", "wide"),
            RouteEntry(ipaddress.ip_network("10.1.2.0/24"), "n", "narrow"),
            RouteEntry(ipaddress.ip_network("2001:db8::/32"), "v", "v6"),
        ]
    )
    hit = table.lookup(ip)
    assert (hit.tunnel_name if hit else None) == expected


def test_log_limiter_caps_lines_per_key() -> None:
    from ramp.observe.loglimit import LogLimiter

    lim = LogLimiter(burst=3, period=60)
    assert [lim.allow("a") for _ in range(5)] == [True, True, True, False, False]
    assert lim.allow("b")
    assert lim.suppressed == 2


def test_splice_relay_sleeps_under_backpressure() -> None:
    """A sink that stops reading must not make the relay spin on a readable source."""
    from ramp.net import splice

    wakeups = 0
    original = splice._Direction._wait

    async def counted(self, **kw):  # type: ignore[no-untyped-def]
        nonlocal wakeups
        wakeups += 1
        await original(self, **kw)

    async def main() -> None:
        client, a = tcp_pair()
        b, origin = tcp_pair()
        origin.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # origin never reads
        client.setblocking(False)
        task = asyncio.ensure_future(splice_relay(a, b))
        # fill everything with small segments: the pipe fills by segment count, not bytes
        for _ in range(20000):
            try:
                client.send(b"x" * 100)
            except BlockingIOError:
                await asyncio.sleep(0.001)
        await asyncio.sleep(0.2)
        before = wakeups
        await asyncio.sleep(1.0)
        assert wakeups - before < 50, f"{wakeups - before} wakeups while stalled"
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        client.close()
        origin.close()

    splice._Direction._wait = counted  # type: ignore[method-assign]
    try:
        run(main())
    finally:
        splice._Direction._wait = original  # type: ignore[method-assign]
