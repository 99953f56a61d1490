"""Edge and connector in one process on loopback: the tunnel protocol end to end, including
its flow control, half-close, reset propagation, registration errors and connection loss."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
from pathlib import Path

import pytest

from ramp.config import ConnectorConfig
from ramp.connector import Connector
from ramp.policy.rules import Rule
from ramp.store.db import Store
from ramp.testing.loopback import make_token, run, tunnel
from ramp.testing.wait import settled, until
from ramp.tunnel.token import Token


async def socks_connect(
    port: int, host: str, dport: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"\x05\x01\x00")
    assert await r.readexactly(2) == b"\x05\x00"
    w.write(b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack("!H", dport))
    rep = await r.readexactly(10)
    return r, w, rep[1]


async def echo_server() -> tuple[asyncio.Server, int]:
    """A TCP echo origin on loopback: (server, port)."""

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def payload_origin(payload: bytes) -> tuple[asyncio.Server, int]:
    """An origin that sends `payload` to each client and closes: (server, port)."""

    async def origin(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(payload)
        await w.drain()
        w.close()

    srv = await asyncio.start_server(origin, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def slow_socks_client(
    socks_port: int, oport: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A SOCKS5 flow to the loopback origin on `oport` whose client reads through a tiny
    receive buffer, so the kernel cannot hide a stall."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", socks_port))
    r, w = await asyncio.open_connection(sock=sock, limit=65536)
    w.write(b"\x05\x01\x00")
    await r.readexactly(2)
    w.write(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", oport))
    assert (await r.readexactly(10))[1] == 0
    return r, w


def test_bulk_transfer_and_echo(tmp_path: Path) -> None:
    payload = os.urandom(8 * 1024 * 1024)

    async def main() -> None:
        async def origin(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            data = await r.read()  # until the client half-closes
            w.write(hashlib.sha256(data).digest())
            w.write(payload)
            await w.drain()
            w.close()

        srv = await asyncio.start_server(origin, "127.0.0.1", 0)
        oport = srv.sockets[0].getsockname()[1]
        async with tunnel(tmp_path) as t:
            r, w, rep = await socks_connect(t.socks_port, "127.0.0.1", oport)
            assert rep == 0
            up = os.urandom(3 * 1024 * 1024)
            w.write(up)
            await w.drain()
            w.write_eof()  # half-close: the answer must still come back whole
            digest = await r.readexactly(32)
            rest = await r.read()
            assert digest == hashlib.sha256(up).digest()
            assert len(rest) == len(payload), (len(rest), len(payload))
            if rest != payload:
                first = next(i for i in range(len(rest)) if rest[i] != payload[i])
                raise AssertionError(f"first difference at byte {first} of {len(rest)}")
            w.close()
        srv.close()

    run(main())


def test_slow_reader_is_bounded_by_flow_control(tmp_path: Path) -> None:
    """A client that does not read stalls the origin instead of filling the edge's memory."""
    total = 64 * 1024 * 1024
    sent = 0

    async def main() -> None:
        nonlocal sent

        async def origin(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            nonlocal sent
            chunk = b"x" * 65536
            try:
                while sent < total:
                    w.write(chunk)
                    sent += len(chunk)
                    await w.drain()
                w.close()
            except ConnectionError:
                pass

        srv = await asyncio.start_server(origin, "127.0.0.1", 0)
        oport = srv.sockets[0].getsockname()[1]
        async with tunnel(tmp_path) as t:
            # a tiny receive buffer so the kernel cannot hide the stall
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", t.socks_port))
            r, w = await asyncio.open_connection(sock=sock)
            w.write(b"\x05\x01\x00")
            await r.readexactly(2)
            w.write(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", oport))
            assert (await r.readexactly(10))[1] == 0
            # not reading: wait until the origin is held back (it stops getting anywhere)
            await until(lambda: sent > 0, what="the origin to start sending")
            await settled(lambda: sent, what="the origin to be held back")
            buffered = 0
            assert t.edge.tunnels is not None
            for entry in t.edge.tunnels.tunnels.values():
                for conn in entry.conns:
                    for b in conn.bridges.values():
                        tr = b._transport
                        buffered += (tr.get_write_buffer_size() if tr else 0) + b.state.pending_in
            # user space holds at most one window plus the write high-water mark
            assert buffered <= 1024 * 1024 + 512 * 1024, buffered
            # and the origin was held back (kernel buffers take a few MB at most)
            assert sent < 24 * 1024 * 1024, sent
            got = 0
            while True:
                data = await r.read(1 << 20)
                if not data:
                    break
                got += len(data)
            assert got == total
            w.close()
        srv.close()

    run(main())


def test_origin_reset_reaches_client(tmp_path: Path) -> None:
    async def main() -> None:
        async def origin(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.readexactly(5)
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()

        srv = await asyncio.start_server(origin, "127.0.0.1", 0)
        oport = srv.sockets[0].getsockname()[1]
        async with tunnel(tmp_path) as t:
            r, w, rep = await socks_connect(t.socks_port, "127.0.0.1", oport)
            assert rep == 0
            w.write(b"hello")
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(r.read(), 5)
        srv.close()
        log = (tmp_path / "audit.log").read_text()
        assert '"result":"reset"' in log

    run(main())


def test_refused_and_unrouted(tmp_path: Path) -> None:
    async def main() -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
        s.close()
        async with tunnel(tmp_path) as t:
            _, w, rep = await socks_connect(t.socks_port, "127.0.0.1", closed_port)
            assert rep == 0x05
            w.close()
            _, w, rep = await socks_connect(t.socks_port, "192.0.2.1", 80)
            assert rep == 0x02  # outside every route, direct egress off
            w.close()

    run(main())


def test_flows_spread_over_connections_and_survive_loss(tmp_path: Path) -> None:
    """Killing one tunnel connection breaks only its flows; new flows use the others."""

    async def main() -> None:
        srv, oport = await echo_server()
        async with tunnel(tmp_path, ha=2) as t:
            clients = [await socks_connect(t.socks_port, "127.0.0.1", oport) for _ in range(6)]
            assert t.edge.tunnels is not None
            conns = next(iter(t.edge.tunnels.tunnels.values())).conns
            assert all(c.bridges for c in conns), "flows should use every connection"
            victim = conns[0]
            victim_streams = set(victim.bridges)
            victim.quic.close(error_code=0, reason_phrase="test kill")
            victim.transmit()
            await until(lambda: not victim.bridges, what="the edge to drop the victim's flows")
            broken = 0
            for r, w, _ in clients:
                try:
                    w.write(b"ping")
                    await w.drain()
                    got = await asyncio.wait_for(r.readexactly(4), 10)
                    assert got == b"ping"
                except (ConnectionError, asyncio.IncompleteReadError):
                    broken += 1
            assert broken == len(victim_streams)
            # the connector redials; meanwhile new flows go to the survivor
            r, w, rep = await socks_connect(t.socks_port, "127.0.0.1", oport)
            assert rep == 0
            w.write(b"again")
            assert await asyncio.wait_for(r.readexactly(5), 10) == b"again"
            w.close()
        srv.close()

    run(main())


def test_deleted_tunnel_and_bad_secret_are_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with tunnel(tmp_path) as t:
            assert t.edge.tunnels is not None
            port = t.edge.tunnels.port
            good = Token.decode(make_token(tmp_path, "corp", port))
            bad = Token(good.tunnel_id, b"x" * 32, good.edges, good.ca_fingerprint)
            c = Connector(
                ConnectorConfig(
                    data_dir=tmp_path, token=bad.encode(), metrics_listen="off", ha_connections=1
                ),
                bad,
            )
            code = await asyncio.wait_for(c.run(asyncio.Event()), 10)
            assert code == 3
            with Store(tmp_path) as store:
                store.delete_tunnel("corp")
            # the edge notices within its poll interval and drops the live connections
            await until(lambda: not t.edge.ready()[0], what="the edge to drop the tunnel")
            c = Connector(
                ConnectorConfig(
                    data_dir=tmp_path, token=good.encode(), metrics_listen="off", ha_connections=1
                ),
                good,
            )
            assert await asyncio.wait_for(c.run(asyncio.Event()), 10) == 3
            reasons = {
                s.labels["reason"]: s.value
                for m in t.edge.metrics.registry.collect()
                if m.name == "ramp_tunnel_registration_failures"
                for s in m.samples
                if s.name.endswith("_total")
            }
            assert reasons.get("bad_proof", 0) >= 1
            assert reasons.get("tunnel_deleted", 0) >= 1

    run(main())


def test_graceful_shutdown_lets_open_flows_finish(tmp_path: Path) -> None:
    """SIGTERM path: the connector unregisters, gets no new flows, and exits once open flows
    are done (well within the grace period)."""

    async def main() -> None:
        srv, oport = await echo_server()
        async with tunnel(tmp_path) as t:
            t.connector.config.grace_period = 3600
            r, w, rep = await socks_connect(t.socks_port, "127.0.0.1", oport)
            assert rep == 0
            t.stop.set()  # what the first SIGTERM does
            await until(
                lambda: (
                    t.edge.tunnels is not None
                    and all(c.draining for e in t.edge.tunnels.tunnels.values() for c in e.conns)
                ),
                what="every connection to drain",
            )
            # no new flows go to a draining connector
            _, w2, rep2 = await socks_connect(t.socks_port, "127.0.0.1", oport)
            assert rep2 == 0x03
            w2.close()
            # the open flow still works
            w.write(b"still here")
            assert await asyncio.wait_for(r.readexactly(10), 5) == b"still here"
            assert not t.task.done()
            w.close()
            # exits with the last flow, long before the grace period would end it
            assert await asyncio.wait_for(t.task, 30) == 0
        srv.close()

    run(main())


def test_slow_reader_gets_the_whole_tail_after_the_origin_closes(tmp_path: Path) -> None:
    """The origin finishes and closes while the edge still holds bytes for a slow client:
    those bytes must all arrive before the client sees EOF."""
    payload = os.urandom(3 * 1024 * 1024)

    async def main() -> None:
        srv, oport = await payload_origin(payload)
        async with tunnel(tmp_path) as t:
            r, w = await slow_socks_client(t.socks_port, oport)
            w.write_eof()  # the client is done sending: the flow ends when the origin is
            got = bytearray()
            while chunk := await r.read(32768):
                got += chunk
                await asyncio.sleep(0.002)  # slower than the tunnel
            assert len(got) == len(payload)
            assert got == payload
            w.close()
        srv.close()

    run(main())


def test_version_negotiation_is_never_answered_to_vn_or_short_packets(tmp_path: Path) -> None:
    """A spoofed Version Negotiation or a tiny unknown-version packet gets no answer (no VN
    ping-pong between servers, no amplification), only a counter."""

    async def main() -> None:
        async with tunnel(tmp_path, ha=1) as t:
            assert t.edge.tunnels is not None
            port = t.edge.tunnels.port
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.bind(("127.0.0.1", 0))
            vn = b"\xc0" + b"\x00\x00\x00\x00" + b"\x08" + b"a" * 8 + b"\x08" + b"b" * 8
            sock.sendto(vn + b"\x00\x00\x00\x01", ("127.0.0.1", port))
            sock.sendto(
                b"\xc0\x1a\x2a\x3a\x4a\x08" + b"c" * 8 + b"\x08" + b"d" * 8, ("127.0.0.1", port)
            )

            def dropped() -> float:
                return sum(
                    s.value
                    for m in t.edge.metrics.registry.collect()
                    if m.name == "ramp_tunnel_bad_packets"
                    for s in m.samples
                    if s.name.endswith("_total")
                )

            # each packet is counted as it is dropped; an answer would have been sent then
            await until(lambda: dropped() >= 2, what="both packets to be counted")
            with pytest.raises(BlockingIOError):
                sock.recv(2048)
            sock.close()

    run(main())


@pytest.mark.parametrize("allow_direct", [False, True])
def test_a_non_socket_endpoint_is_a_flow_client_through_tunnel_and_direct(
    tmp_path: Path, allow_direct: bool
) -> None:
    """An in-process byte stream (the shape of an HTTP/3 CONNECT stream) rides the same flow
    path as a SOCKS5 socket: no socketpair, both through a tunnel and by direct egress."""
    from ramp.flows.endpoint import memory_pair, open_stream
    from ramp.flows.flow import Destination, Flow, FlowResult

    async def main() -> None:
        srv, port = await echo_server()
        async with tunnel(tmp_path, ha=1, allow_direct_egress=allow_direct) as t:
            if allow_direct:
                with Store(tmp_path) as store:
                    store.delete_route("127.0.0.0/8")
                    # the origin is on loopback: direct egress reaches it only when a rule says so
                    store.add_rule(Rule("loopback-origins", "allow", to="127.0.0.0/8"), 1)
                t.edge.reload_store()
            flow = Flow("test", ("192.0.2.1", 1), Destination("127.0.0.1", port))
            leg = await t.edge.pipeline.open_tcp(flow)
            assert flow.route is not None
            assert flow.route.offramp == ("direct" if allow_direct else "tunnel")
            ours, theirs = memory_pair()
            relay = asyncio.ensure_future(leg.relay(theirs, initial=b"hello "))
            reader, writer = await open_stream(ours)
            payload = os.urandom(1 << 20)
            writer.write(payload)
            writer.write_eof()
            got = await asyncio.wait_for(reader.read(), 30)
            assert len(got) == len(payload) + 6
            assert hashlib.sha256(got).digest() == hashlib.sha256(b"hello " + payload).digest()
            await asyncio.wait_for(relay, 30)
            writer.close()
            t.edge.flow_finished(flow)
            assert flow.result is FlowResult.OK
            assert (flow.bytes_up, flow.bytes_down) == (len(payload) + 6, len(payload) + 6)
        srv.close()

    asyncio.run(main())


def test_edge_and_connector_write_the_same_record_of_a_flow(tmp_path: Path) -> None:
    """One JSON record format on both roles; the connector's names the user, the on-ramp and
    the edge's flow id, so the two lines of a flow can be joined."""
    import json

    from ramp.testing.clients import socks5_connect

    async def main() -> None:
        srv, port = await echo_server()
        connector_log = tmp_path / "connector-audit.log"
        async with tunnel(
            tmp_path, ha=1, users={"alice": "pw"}, connector_kw={"audit_log": str(connector_log)}
        ) as t:

            def fetch() -> bytes:
                sock = socket.create_connection(("127.0.0.1", t.socks_port), timeout=30)
                try:
                    assert socks5_connect(sock, "127.0.0.1", port, user="alice", password="pw") == 0
                    sock.sendall(b"ping")
                    sock.shutdown(socket.SHUT_WR)
                    data = b""
                    while chunk := sock.recv(4096):
                        data += chunk
                    return data
                finally:
                    sock.close()

            assert await asyncio.get_running_loop().run_in_executor(None, fetch) == b"ping"
            edge_log = tmp_path / "audit.log"
            await until(lambda: edge_log.exists() and edge_log.read_text().strip() != "")
            await until(lambda: connector_log.exists() and connector_log.read_text().strip() != "")
            (edge_rec,) = [json.loads(line) for line in edge_log.read_text().splitlines()]
            (conn_rec,) = [json.loads(line) for line in connector_log.read_text().splitlines()]
        srv.close()
        assert list(edge_rec) == list(conn_rec)  # same record, same order
        assert edge_rec["flow"] == conn_rec["flow"]
        assert edge_rec["identity"] == conn_rec["identity"] == "alice"
        assert edge_rec["onramp"] == conn_rec["onramp"] == "socks5"
        assert edge_rec["rule"] == "default" and edge_rec["offramp"] == "tunnel"
        assert conn_rec["offramp"] == "origin" and conn_rec["vnet"] == "default"
        assert edge_rec["bytes_up"] == conn_rec["bytes_up"] == 4
        assert edge_rec["result"] == conn_rec["result"] == "ok"

    run(main())


def test_a_flow_keeps_its_window_in_the_budget_until_its_tail_reached_the_client(
    tmp_path: Path,
) -> None:
    """The origin's answer fits in one window and the flow ends while the edge still holds it
    for a client that does not read: the window is counted until the client has it all."""
    payload = os.urandom(960 * 1024)

    async def main() -> None:
        srv, oport = await payload_origin(payload)
        async with tunnel(tmp_path) as t:
            edge_budget = t.edge.offramps["tunnel"].budget
            connector_budget = t.connector.client.budget
            assert edge_budget is not None and connector_budget is not None
            # small fixed kernel buffers on both ends of the client's connection (accepted
            # sockets inherit the listener's), so the tail cannot all hide in the kernel
            listener = t.edge.onramps[0]._sock
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            r, w = await slow_socks_client(t.socks_port, oport)
            w.write_eof()
            # the connector's side is over once the origin's FIN went through the tunnel
            await until(lambda: connector_budget.reserved == 0, what="the connector's flow end")
            assert edge_budget.reserved > 0  # the tail still waits for the client
            got = bytearray()
            while chunk := await r.read(65536):
                got += chunk
            assert got == payload
            await until(lambda: edge_budget.reserved == 0, what="the edge's window back")
            w.close()
        srv.close()

    run(main())
