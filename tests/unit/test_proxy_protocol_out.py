"""PROXY protocol out: routes whose origins get a header (store, router), and the header an
origin gets through a tunnel and through direct egress, in one process on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import struct
from pathlib import Path
from typing import Any

import pytest

import ramp.tunnel.connector_side as connector_side
from ramp.edge import Edge
from ramp.flows.flow import Destination, Flow
from ramp.policy.router import Router, VnetRoutes
from ramp.policy.rules import Rule
from ramp.store.db import Store, StoreError
from ramp.testing.loopback import loopback_edge_config, run, tunnel
from ramp.testing.wait import until
from ramp.wire import proxy_protocol as pp

CLIENT = ("203.0.113.7", 40123)


def test_store_keeps_the_version_and_refuses_others(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        store.create_tunnel("corp")
        store.add_route("10.0.0.0/8", "corp", proxy_protocol="v2")
        store.add_route("10.1.0.0/16", "corp")
        with pytest.raises(StoreError, match="v1 or v2"):
            store.add_route("10.2.0.0/16", "corp", proxy_protocol="v3")
        by_cidr = {r.cidr: r.proxy_protocol for r in store.list_routes()}
    assert by_cidr == {"10.0.0.0/8": "v2", "10.1.0.0/16": None}


def test_a_store_from_before_the_column_gets_it_on_open(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        store.create_tunnel("corp")
        store.add_route("10.0.0.0/8", "corp")
    # what an older ramp left: the routes table without the column
    db = sqlite3.connect(tmp_path / "ramp.db")
    db.execute("ALTER TABLE routes DROP COLUMN proxy_protocol")
    db.commit()
    db.close()
    with Store(tmp_path) as store:
        assert [(r.cidr, r.proxy_protocol) for r in store.list_routes()] == [("10.0.0.0/8", None)]
        store.add_route("192.0.2.0/24", "corp", proxy_protocol="v1")
        assert store.list_routes()[-1].proxy_protocol == "v1"


def test_router_gives_the_route_its_version(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        store.create_tunnel("corp")
        store.add_route("198.51.100.0/24", "corp", proxy_protocol="v1")
        routes = store.list_routes()

    async def resolve(host: str, port: int) -> str:
        return host

    async def main() -> None:
        router = Router(resolve, allow_direct=True, direct_proxy=lambda a: "v2")
        router.tables = VnetRoutes(routes).tables
        (tunnel_route,) = await router.candidates(
            Flow("socks5", CLIENT, Destination("198.51.100.10", 80)), "default"
        )
        assert tunnel_route.offramp == "tunnel" and tunnel_route.proxy_protocol == "v1"
        (direct,) = await router.candidates(
            Flow("socks5", CLIENT, Destination("192.0.2.10", 80)), "default"
        )
        assert direct.offramp == "direct" and direct.proxy_protocol == "v2"

    run(main())


class RecordingOrigin:
    """Reads the PROXY header each connection starts with, then echoes."""

    def __init__(self) -> None:
        self.headers: list[pp.ProxyHeader] = []
        self.port = 0

    async def start(self, host: str) -> None:
        self.server = await asyncio.start_server(self._serve, host, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        buf = b""
        while (got := pp.parse(buf)) is pp.NEED_DATA:
            chunk = await r.read(1)
            if not chunk:
                w.close()
                return
            buf += chunk
        assert isinstance(got, tuple)
        self.headers.append(got[0])
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()


def socks_through_balancer(port: int, host: str, dport: int, header: bytes) -> bytes:
    """A client behind a load balancer: the balancer's PROXY header, then SOCKS5 CONNECT;
    returns what the origin echoes of one message."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        sock.sendall(header + b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack("!H", dport))
        reply = b""
        while len(reply) < 10:
            reply += sock.recv(10 - len(reply))
        assert reply[1] == 0, reply
        sock.sendall(b"hello")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        return data
    finally:
        sock.close()


def _behind_balancer() -> dict[str, object]:
    return {
        "onramps": [
            {
                "type": "socks5",
                "listen": "127.0.0.1:0",
                "proxy_protocol": {"mode": "required", "trusted": ["127.0.0.0/8"]},
            }
        ]
    }


def test_through_a_tunnel_the_origin_gets_the_real_client(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        store.create_tunnel("corp")
        store.add_route("127.0.0.2/32", "corp", proxy_protocol="v2")
        store.add_route("127.0.0.3/32", "corp", proxy_protocol="v1")

    async def main() -> None:
        v2, v1 = RecordingOrigin(), RecordingOrigin()
        await v2.start("127.0.0.2")
        await v1.start("127.0.0.3")
        loop = asyncio.get_running_loop()
        async with tunnel(tmp_path, ha=1, **_behind_balancer()) as t:
            port = t.edge.onramps[0].port
            edge_addr = ("127.0.0.1", port)
            for origin, host in ((v2, "127.0.0.2"), (v1, "127.0.0.3")):
                header = pp.encode_v2(CLIENT, edge_addr)
                echoed = await loop.run_in_executor(
                    None, socks_through_balancer, port, host, origin.port, header
                )
                assert echoed == b"hello"
            audit = tmp_path / "audit.log"
            await until(lambda: audit.exists() and len(audit.read_text().splitlines()) == 2)
            records = [json.loads(line) for line in audit.read_text().splitlines()]
        (h2,), (h1,) = v2.headers, v1.headers
        assert h2.version == 2 and h2.source == CLIENT
        assert h2.destination == ("127.0.0.2", v2.port)
        assert h1.version == 1 and h1.source == CLIENT
        assert h1.destination == ("127.0.0.3", v1.port)
        # v2 names the flow the edge's audit log has, and the audit has the real client
        assert h2.flow_id == records[0]["flow"]
        assert all(r["source"].startswith("203.0.113.7") for r in records), records

    run(main())


def test_an_ipv6_client_reaches_an_ipv4_origin_as_mapped_ipv6(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        store.create_tunnel("corp")
        store.add_route("127.0.0.2/32", "corp", proxy_protocol="v2")
        store.add_route("127.0.0.3/32", "corp", proxy_protocol="v1")
    client6 = ("2001:db8::7", 40123)

    async def main() -> None:
        v2, v1 = RecordingOrigin(), RecordingOrigin()
        await v2.start("127.0.0.2")
        await v1.start("127.0.0.3")
        loop = asyncio.get_running_loop()
        async with tunnel(tmp_path, ha=1, **_behind_balancer()) as t:
            port = t.edge.onramps[0].port
            header = pp.encode_v2(client6, ("2001:db8::1", port))
            for origin, host in ((v2, "127.0.0.2"), (v1, "127.0.0.3")):
                echoed = await loop.run_in_executor(
                    None, socks_through_balancer, port, host, origin.port, header
                )
                assert echoed == b"hello"
        for origin, host in ((v2, "127.0.0.2"), (v1, "127.0.0.3")):
            (h,) = origin.headers
            assert h.family is pp.Family.INET6 and h.source == client6
            assert h.destination == (f"::ffff:{host}", origin.port)

    run(main())


def test_a_connector_that_sends_no_header_fails_the_flow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What an older connector does (it ignores the metadata key): the edge refuses to pass
    the flow on without the header the route asks for."""
    with Store(tmp_path) as store:
        store.create_tunnel("corp")
        store.add_route("127.0.0.2/32", "corp", proxy_protocol="v2")

    async def no_header(*args: object) -> None:
        return None

    monkeypatch.setattr(connector_side, "send_proxy_header", no_header)
    monkeypatch.setattr(connector_side, "proxy_sent", lambda version: "")

    async def main() -> None:
        origin = RecordingOrigin()
        await origin.start("127.0.0.2")
        async with tunnel(tmp_path, ha=1) as t:
            r, w = await asyncio.open_connection("127.0.0.1", t.socks_port)
            w.write(b"\x05\x01\x00")
            await r.readexactly(2)
            w.write(
                b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.2") + struct.pack("!H", origin.port)
            )
            reply = await r.readexactly(10)
            assert reply[1] == 0x01  # general failure
            w.close()
            audit = tmp_path / "audit.log"
            await until(lambda: audit.exists() and audit.read_text().strip() != "")
            (record,) = [json.loads(line) for line in audit.read_text().splitlines()]
        assert record["result"] == "error"
        assert "upgrade the connector" in record["reason"]
        assert origin.headers == []

    run(main())


def test_direct_egress_sends_the_header_with_identity(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        store.add_rule(Rule("loopback-origins", "allow", to="127.0.0.0/8"), 1)

    async def main() -> None:
        origin = RecordingOrigin()
        await origin.start("127.0.0.1")
        config = loopback_edge_config(
            tmp_path,
            allow_direct_egress=True,
            direct_egress_proxy_protocol={"127.0.0.0/8": "v2"},
            users={"alice": "pw"},
        )
        edge = Edge(config)
        await edge.start()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", edge.onramps[0].port)
            w.write(b"\x05\x01\x02")
            assert await r.readexactly(2) == b"\x05\x02"
            w.write(b"\x01\x05alice\x02pw")
            assert await r.readexactly(2) == b"\x01\x00"
            w.write(
                b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", origin.port)
            )
            assert (await r.readexactly(10))[1] == 0
            w.write(b"ping")
            assert await r.readexactly(4) == b"ping"
            local = w.get_extra_info("sockname")
            w.close()
        finally:
            await edge.close()
        (header,) = origin.headers
        assert header.version == 2
        assert header.source == (local[0], local[1])
        assert header.destination == ("127.0.0.1", origin.port)
        assert header.identity == "alice" and header.flow_id is not None

    run(main())


def test_direct_egress_versions_follow_the_config_on_reload(tmp_path: Path) -> None:
    def config(mapping: dict[str, str]) -> Any:
        return loopback_edge_config(
            tmp_path, allow_direct_egress=True, direct_egress_proxy_protocol=mapping
        )

    async def main() -> None:
        edge = Edge(config({"192.0.2.0/24": "v1"}))
        try:
            lookup = edge.router.direct_proxy
            assert lookup is not None
            assert (lookup("192.0.2.5"), lookup("198.51.100.1")) == ("v1", None)
            edge.reload_config(config({"192.0.2.0/25": "v2", "192.0.2.0/24": "v1"}))
            lookup = edge.router.direct_proxy
            assert lookup is not None
            assert (lookup("192.0.2.5"), lookup("192.0.2.200")) == ("v2", "v1")
            edge.reload_config(config({}))
            assert edge.router.direct_proxy is None
        finally:
            await edge.close()

    run(main())


def test_direct_egress_config_checks_its_cidrs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bad CIDR"):
        loopback_edge_config(tmp_path, direct_egress_proxy_protocol={"192.0.2.0/33": "v1"})
    with pytest.raises(ValueError):
        loopback_edge_config(tmp_path, direct_egress_proxy_protocol={"192.0.2.0/24": "v3"})
