"""Tunnel stream slots: the per-connection stream limit is a setting, flows that find every
connection at its limit wait in a first-come queue woken by MAX_STREAMS, and a flow whose
client goes away frees its slot at once."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import socket
import struct
from pathlib import Path

import pytest

from ramp.config import ConnectorConfig, EdgeConfig
from ramp.flows.flow import FlowError, FlowResult
from ramp.offramps import tunnel as tunnel_offramp
from ramp.offramps.tunnel import TunnelOffRamp
from ramp.quic import qh3compat
from ramp.testing.loopback import run, tunnel
from ramp.testing.wait import until
from ramp.tunnel.connector_side import TunnelClient
from ramp.tunnel.edge_side import EdgeConnection
from ramp.tunnel.slots import QueueFull, SlotQueue


def edge_conns(t: object) -> list[EdgeConnection]:
    tunnels = t.edge.tunnels  # type: ignore[attr-defined]
    return [c for entry in tunnels.tunnels.values() for c in entry.conns]


def test_stream_limits_default_to_at_least_ten_thousand() -> None:
    assert ConnectorConfig().max_streams_per_connection >= 10_000
    assert EdgeConfig().max_streams_per_connection >= 10_000


def test_each_side_advertises_its_setting(tmp_path: Path) -> None:
    async def main() -> None:
        async with tunnel(
            tmp_path,
            ha=1,
            connector_kw={"max_streams_per_connection": 3},
            max_streams_per_connection=7,
        ) as t:
            (econn,) = edge_conns(t)
            (cconn,) = t.connector.client.live
            # what the edge may open is what the connector advertised, and the other way round
            assert qh3compat.bidi_stream_limit(econn.quic) == 3
            assert qh3compat.bidi_stream_limit(cconn.quic) == 7

    run(main())


def test_the_default_lifts_qh3s_hundred(tmp_path: Path) -> None:
    async def main() -> None:
        async with tunnel(tmp_path, ha=1) as t:
            (econn,) = edge_conns(t)
            assert qh3compat.bidi_stream_limit(econn.quic) == 10_000

    run(main())


# -- waiting for a slot ---------------------------------------------------------------------


class Blackhole:
    """The connector's dial, patched: flows to `port` get no answer until `release()`, then
    are refused; every other dial goes through, in the order recorded in `served`."""

    def __init__(self, client: TunnelClient, port: int) -> None:
        self.port = port
        self.gate = asyncio.Event()
        self.held = 0
        self.cancelled = 0  # dials the connector dropped (the edge reset their streams)
        self.served: list[int] = []
        real = client._dial

        async def dial(host: str, dport: int) -> socket.socket:
            if dport != self.port:
                self.served.append(dport)
                return await real(host, dport)
            self.held += 1
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            raise FlowError(FlowResult.REFUSED, "blackhole released")

        client._dial = dial  # type: ignore[method-assign]

    def release(self) -> None:
        self.gate.set()


async def socks_open(port: int, dport: int) -> tuple[socket.socket, asyncio.Task[int]]:
    """Send a SOCKS5 CONNECT to 127.0.0.1:dport; the task yields the reply code."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, b"\x05\x01\x00")
    assert await loop.sock_recv(sock, 2) == b"\x05\x00"
    await loop.sock_sendall(
        sock, b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", dport)
    )

    async def reply() -> int:
        rep = await loop.sock_recv(sock, 10)
        return rep[1] if len(rep) > 1 else -1

    return sock, asyncio.ensure_future(reply())


async def hang_up(client: tuple[socket.socket, asyncio.Task[int]]) -> None:
    """Close a client socket whose reply has not come (its pending read goes first: a closed
    fd still registered with the loop's selector would break whatever reuses the number)."""
    sock, task = client
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    sock.close()


def hole_port() -> int:
    """A port nothing listens on (the blackhole never dials it anyway)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def echo_origin() -> tuple[list[asyncio.Server], list[int]]:
    """Echo origins on three ports (one per flow, so the order of dials is visible)."""

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        w.close()

    servers = [await asyncio.start_server(echo, "127.0.0.1", 0) for _ in range(3)]
    return servers, [s.sockets[0].getsockname()[1] for s in servers]


def close_all(servers: list[asyncio.Server]) -> None:
    for s in servers:
        s.close()


def offramp(t: object) -> TunnelOffRamp:
    ramp = t.edge.offramps["tunnel"]  # type: ignore[attr-defined]
    assert isinstance(ramp, TunnelOffRamp)
    return ramp


def waiting(t: object) -> int:
    return sum(len(q) for q in offramp(t).waiting.values())


def test_waiting_flows_are_served_in_order_when_slots_free(tmp_path: Path) -> None:
    async def main() -> None:
        srv, ports = await echo_origin()
        async with tunnel(
            tmp_path, ha=1, connector_kw={"max_streams_per_connection": 2}, connect_timeout=30.0
        ) as t:
            hole = Blackhole(t.connector.client, hole_port())
            held = [await socks_open(t.socks_port, hole.port) for _ in range(2)]
            await until(lambda: hole.held == 2, what="both slots held by the blackhole")
            flows = []
            for i, port in enumerate(ports):
                flows.append(await socks_open(t.socks_port, port))
                await until(lambda i=i: waiting(t) == i + 1, what=f"flow {i} to wait")
            (queue,) = offramp(t).waiting.values()
            assert queue.waits == 3
            assert hole.served == []
            hole.release()  # refused: the connector closes the streams and raises MAX_STREAMS
            for _, task in held:
                assert await task != 0
            loop = asyncio.get_running_loop()

            async def served(sock: socket.socket, task: asyncio.Task[int]) -> None:
                assert await task == 0
                await loop.sock_sendall(sock, b"ping")
                assert await loop.sock_recv(sock, 4) == b"ping"

            # the two freed slots go to the first two; the third waits for one of them to end
            await served(*flows[0])
            await served(*flows[1])
            assert hole.served == ports[:2]
            assert waiting(t) == 1
            flows[0][0].close()
            await served(*flows[2])
            assert hole.served == ports  # first come, first served
            assert queue.waits == 3  # each waited once: woken, never polled
            assert not offramp(t).waiting
            for sock, _ in held + flows:
                sock.close()
        close_all(srv)

    run(main())


def test_the_wait_is_bounded_and_each_waiter_keeps_its_deadline(tmp_path: Path) -> None:
    async def main() -> None:
        srv, ports = await echo_origin()
        async with tunnel(
            tmp_path,
            ha=1,
            connector_kw={"max_streams_per_connection": 1},
            connect_timeout=1.0,
            max_waiting_flows=1,
        ) as t:
            held = await socks_open(t.socks_port, ports[0])
            assert await held[1] == 0  # an open flow holds the only slot
            waiter = await socks_open(t.socks_port, ports[1])
            await until(lambda: waiting(t) == 1, what="a flow to wait")
            extra = await socks_open(t.socks_port, ports[2])
            assert await extra[1] == 1  # general failure at once: the queue is full
            registry = t.edge.metrics.registry
            rejected = registry.get_sample_value(
                "ramp_flows_rejected_total", {"reason": "stream_queue_full"}
            )
            assert rejected == 1
            assert await waiter[1] == 4  # host unreachable: no slot within connect_timeout
            await until(
                lambda: any("no tunnel stream slot came free" in r for r in audit_reasons(t)),
                what="the waiter reported as timed out in the queue",
            )
            assert not offramp(t).waiting
            for sock, _ in (held, waiter, extra):
                sock.close()
        close_all(srv)

    run(main())


def test_open_stream_never_sleeps() -> None:
    # waiting flows are woken by MAX_STREAMS, not by polling
    source = inspect.getsource(tunnel_offramp)
    assert "asyncio.sleep" not in source


# -- clients that go away -------------------------------------------------------------------


def audit_reasons(t: object) -> list[str]:
    path = t.data_dir / "audit.log"  # type: ignore[attr-defined]
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line).get("reason") or "" for line in lines]


def test_a_waiting_flow_whose_client_leaves_gives_up_its_place(tmp_path: Path) -> None:
    async def main() -> None:
        srv, ports = await echo_origin()
        async with tunnel(
            tmp_path, ha=1, connector_kw={"max_streams_per_connection": 1}, connect_timeout=30.0
        ) as t:
            held = await socks_open(t.socks_port, ports[0])
            assert await held[1] == 0
            leaver = await socks_open(t.socks_port, ports[1])
            await until(lambda: waiting(t) == 1, what="a flow to wait")
            stayer = await socks_open(t.socks_port, ports[2])
            await until(lambda: waiting(t) == 2, what="a second flow to wait")
            await hang_up(leaver)
            await until(lambda: waiting(t) == 1, what="the leaver to leave the queue")
            await until(
                lambda: "client went away while opening" in audit_reasons(t),
                what="the flow reported as gone",
            )
            held[0].close()  # its slot goes to the one still waiting
            assert await stayer[1] == 0
            loop = asyncio.get_running_loop()
            await loop.sock_sendall(stayer[0], b"ping")
            assert await loop.sock_recv(stayer[0], 4) == b"ping"
            stayer[0].close()
        close_all(srv)

    run(main())


def test_an_opening_flow_whose_client_leaves_frees_its_slot_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        srv, ports = await echo_origin()
        async with tunnel(
            tmp_path, ha=1, connector_kw={"max_streams_per_connection": 1}, connect_timeout=30.0
        ) as t:
            hole = Blackhole(t.connector.client, hole_port())
            gone = await socks_open(t.socks_port, hole.port)
            await until(lambda: hole.held == 1, what="the slot held by the blackhole")
            waiter = await socks_open(t.socks_port, ports[0])
            await until(lambda: waiting(t) == 1, what="a flow to wait")
            loop = asyncio.get_running_loop()
            await hang_up(gone)  # RESET_STREAM: the connector drops the dial and raises MAX_STREAMS
            assert await waiter[1] == 0
            # the blackhole never answered: the slot came back because its dial was dropped
            assert hole.cancelled == 1 and not hole.gate.is_set()
            await loop.sock_sendall(waiter[0], b"ping")
            assert await loop.sock_recv(waiter[0], 4) == b"ping"
            await until(
                lambda: "client went away while opening" in audit_reasons(t),
                what="the flow reported as gone",
            )
            waiter[0].close()
        close_all(srv)

    run(main())


# -- the queue itself ------------------------------------------------------------------------


def test_slot_queue_is_first_come_and_passes_on_a_wake_its_waiter_cannot_use() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue = SlotQueue(limit=3)
        order: list[str] = []

        async def waiter(name: str, front: bool = False) -> None:
            await queue.wait(loop.time() + 30, front=front)
            order.append(name)

        tasks = {n: asyncio.ensure_future(waiter(n)) for n in "abc"}
        await asyncio.sleep(0)
        assert len(queue) == 3
        with pytest.raises(QueueFull):
            await queue.wait(loop.time() + 30)
        assert queue.wake(1) == 1
        tasks["a"].cancel()  # woken, then cancelled before it ran: b gets the slot instead
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert order == ["b"]
        assert queue.woken == 0 and len(queue) == 1
        late = asyncio.ensure_future(waiter("d", front=True))  # put back ahead of c
        await asyncio.sleep(0)
        queue.wake_all()
        await asyncio.gather(tasks["c"], late)
        assert order == ["b", "d", "c"]
        assert not queue.busy

    run(main())


def test_slot_queue_waiter_times_out_at_its_deadline() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue = SlotQueue(limit=1)
        with pytest.raises(TimeoutError):
            await queue.wait(loop.time() + 0.05)
        assert len(queue) == 0 and not queue.busy

    run(main())
