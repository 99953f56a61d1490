"""An edge and a connector in one process on loopback, for tests that need a real tunnel
without network namespaces: `async with tunnel(tmp_path) as t: ...`."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from ramp.config import ConnectorConfig, EdgeConfig
from ramp.connector import Connector
from ramp.edge import Edge
from ramp.net.sockopts import set_buffers
from ramp.store.db import Store
from ramp.testing.wait import until
from ramp.tunnel.token import Token

T = TypeVar("T")

RUN_DEADLINE = 60.0  # a whole test's coroutine; a hang fails instead of blocking the suite


@dataclass
class Tunnel:
    edge: Edge
    connector: Connector
    socks_port: int
    stop: asyncio.Event
    task: asyncio.Task[int]
    data_dir: Path


def make_token(data_dir: Path, name: str, edge_port: int) -> str:
    with Store(data_dir) as store:
        t = store.get_tunnel(name) or store.create_tunnel(name)
        fp = store.edge_identity().ca_fingerprint
        return Token(t.id, store.tunnel_secret(t.id), [f"127.0.0.1:{edge_port}"], fp).encode()


def loopback_edge_config(data_dir: Path, **overrides: Any) -> EdgeConfig:
    """An edge for in-process tests: tunnel and SOCKS5 on loopback with ports the system picks,
    no HTTP, MASQUE or metrics listener, the audit log in `data_dir`; `overrides` change any key."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "tunnel_listen": "127.0.0.1:0",
        "socks5_listen": "127.0.0.1:0",
        "http_listen": "off",
        "masque_listen": "off",
        "metrics_listen": "off",
        "audit_log": str(data_dir / "audit.log"),
    }
    values.update(overrides)
    return EdgeConfig(**values)


@asynccontextmanager
async def tunnel(
    tmp_path: Path,
    ha: int = 2,
    connector_kw: dict[str, object] | None = None,
    **edge_kw: object,
) -> AsyncIterator[Tunnel]:
    """Tunnel "corp" routing 127.0.0.0/8, with `ha` connector connections registered."""
    with Store(tmp_path) as store:
        if store.get_tunnel("corp") is None:
            store.create_tunnel("corp")
        store.add_route("127.0.0.0/8", "corp")
    edge = Edge(loopback_edge_config(tmp_path, **edge_kw))
    await edge.start()
    assert edge.tunnels is not None
    token = make_token(tmp_path, "corp", edge.tunnels.port)
    connector = Connector(
        ConnectorConfig(
            data_dir=tmp_path,
            token=token,
            ha_connections=ha,
            metrics_listen="off",
            **(connector_kw or {}),  # type: ignore[arg-type]
        ),
        Token.decode(token),
    )
    stop = asyncio.Event()
    task = asyncio.ensure_future(connector.run(stop))
    try:
        await until(
            lambda: edge.ready()[0] and len(connector.client.live) == ha,
            what=f"the connector to register {ha} connections",
        )
        yield Tunnel(edge, connector, edge.onramps[0].port, stop, task, tmp_path)
    finally:
        stop.set()
        connector.config.grace_period = 0
        await asyncio.wait_for(task, 10)
        await edge.close()


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, RUN_DEADLINE))


# Both event loops ramp runs on: tests of socket code run on each.
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop] | None] = {
    "asyncio": None,
    "uvloop": uvloop.new_event_loop,
}


def run_on_loop(fn: Callable[[], Awaitable[T]], loop: str = "asyncio") -> T:
    """`await fn()` on a fresh event loop of kind `loop` (a key of LOOPS)."""

    async def bounded() -> T:
        return await asyncio.wait_for(fn(), RUN_DEADLINE)

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(bounded())


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


async def udp_echo_origin() -> tuple[asyncio.DatagramTransport, int]:
    """A UDP echo origin on 127.0.0.1: (transport, port)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    set_buffers(sock, 4 * 1024 * 1024)  # a test's burst must not overflow the origin
    transport, _ = await loop.create_datagram_endpoint(_UdpEcho, sock=sock)
    return transport, transport.get_extra_info("sockname")[1]
