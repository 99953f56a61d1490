"""`ramp up`: an edge, a connector and a demo origin in one process, on loopback.

It shows the whole path working on one machine in one command, and prints what to type to run
the roles on separate machines.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from ramp.config import ConnectorConfig, EdgeConfig
from ramp.connector import Connector
from ramp.edge import Edge
from ramp.store.db import DEFAULT_VNET, Store
from ramp.tunnel.token import Token

log = logging.getLogger("ramp.up")

TUNNEL_NAME = "local"
DEMO_ROUTE = "127.0.0.1/32"
DEMO_PORT = 8000


def _ensure_tunnel(data_dir: Path, edge_addr: str) -> str:
    """Create the `local` tunnel and its route on first use; return its connector token."""
    with Store(data_dir) as store:
        tunnel = store.get_tunnel(TUNNEL_NAME) or store.create_tunnel(TUNNEL_NAME)
        if not any(r.cidr == DEMO_ROUTE for r in store.list_routes(DEFAULT_VNET)):
            store.add_route(DEMO_ROUTE, TUNNEL_NAME)
        ident = store.edge_identity()
        token = Token(tunnel.id, store.tunnel_secret(tunnel.id), [edge_addr], ident.ca_fingerprint)
    return token.encode()


class _DemoOrigin(asyncio.Protocol):
    """Answers any HTTP request with a short page saying which path it took."""

    def __init__(self) -> None:
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" in self.buf or len(self.buf) > 65536:
            body = (
                b"Hello from the private side: this page came to you through the ramp "
                b"tunnel 'local' (edge -> QUIC -> connector -> origin).\n"
            )
            self.transport.write(  # type: ignore[attr-defined]
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            self.transport.close()  # type: ignore[attr-defined]


async def serve_up(data_dir: Path, log_level: str, stop: asyncio.Event) -> int:
    edge_cfg = EdgeConfig(
        data_dir=data_dir,
        log_level=log_level,  # type: ignore[arg-type]
        tunnel_listen="127.0.0.1:7844",
        masque_listen="127.0.0.1:4433",
    )
    token = _ensure_tunnel(data_dir, edge_cfg.tunnel_listen)
    conn_cfg = ConnectorConfig(
        data_dir=data_dir,
        log_level=log_level,  # type: ignore[arg-type]
        token=token,
        ha_connections=2,
    )
    loop = asyncio.get_running_loop()
    try:
        origin = await loop.create_server(_DemoOrigin, "127.0.0.1", DEMO_PORT)
    except OSError as e:
        print(
            f"ramp: cannot start the demo origin on 127.0.0.1:{DEMO_PORT}: {e.strerror}",
            file=sys.stderr,
        )
        return 1
    edge = Edge(edge_cfg)
    try:
        await edge.start()
    except OSError as e:
        print(f"ramp: cannot start the edge: {e}", file=sys.stderr)
        origin.close()
        await edge.close()
        return 1
    connector = Connector(conn_cfg, Token.decode(token))
    task = asyncio.ensure_future(connector.run(stop))
    for _ in range(100):
        ready, _info = edge.ready()
        if ready or task.done():
            break
        await asyncio.sleep(0.05)
    print(
        f"""
ramp is up: an edge, a connector (tunnel '{TUNNEL_NAME}') and a demo origin on this machine.

Try it (the origin answers only through the tunnel's route {DEMO_ROUTE}):

    curl --socks5-hostname 127.0.0.1:1080 http://127.0.0.1:{DEMO_PORT}/
    curl -x http://127.0.0.1:8080 http://127.0.0.1:{DEMO_PORT}/

Metrics: http://127.0.0.1:20241/metrics (edge), http://127.0.0.1:20242/metrics (connector)

To run the roles on separate machines:

  on the public machine E (UDP 7844 reachable from the private network):
    ramp edge --socks5-listen 127.0.0.1:1080
    ramp tunnel create corp
    ramp tunnel route ip add 10.0.0.0/8 corp
    ramp tunnel token corp --edge E_ADDRESS:7844

  on a machine inside the private network (no inbound ports needed):
    ramp tunnel run --token TOKEN

  then from E:  curl --socks5-hostname 127.0.0.1:1080 http://10.1.2.3/

Stop with Ctrl-C.
""",
        flush=True,
    )
    try:
        code = await task
    finally:
        origin.close()
        await edge.close()
    return code


def run_up(data_dir: Path, log_level: str) -> int:
    from ramp.runtime import run_until_signal

    return run_until_signal(lambda stop: serve_up(data_dir, log_level, stop))
