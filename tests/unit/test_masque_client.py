"""The client role against an in-process edge and tunnel on loopback: what a user of
`ramp client run` sees when a reader is slow, when the edge connection drops, and what
`/ready` says."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from click.testing import CliRunner

from ramp.cli import main
from ramp.client import Client
from ramp.config import ClientConfig
from ramp.offramps.masque import EdgeTarget
from ramp.policy.identities import bearer
from ramp.quic import endpoint, h3, qh3compat
from ramp.store.db import Store
from ramp.testing.clients import socks5_connect_async
from ramp.testing.loopback import Tunnel, run, tunnel
from ramp.testing.wait import until

SIZE = 48 * 1024 * 1024


def _block(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "big")).digest() * 2048  # 64 KiB, distinct per i


async def _source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Sends SIZE bytes, then closes."""
    for i in range(SIZE // (64 * 1024)):
        writer.write(_block(i))
        await writer.drain()
    writer.close()


def _digest() -> str:
    d = hashlib.sha256()
    for i in range(SIZE // (64 * 1024)):
        d.update(_block(i))
    return d.hexdigest()


@asynccontextmanager
async def client_and_edge(tmp_path: Path) -> AsyncIterator[tuple[Client, Tunnel]]:
    with Store(tmp_path) as store:
        store.create_client("alice")
        secret = store.client_secret("alice")
        fp = store.edge_identity().ca_fingerprint
    async with tunnel(tmp_path, masque_listen="127.0.0.1:0") as t:
        masque = next(o for o in t.edge.onramps if o.onramp == "masque")
        target = EdgeTarget((f"127.0.0.1:{masque.port}",), fp, bearer("alice", secret))
        config = ClientConfig(
            data_dir=tmp_path / "client",
            socks5_listen="127.0.0.1:0",
            http_listen="off",
            metrics_listen="off",
            audit_log=str(tmp_path / "client-audit.log"),
        )
        client = Client(config, target)
        await client.start()
        try:
            await until(lambda: client.link.state == "connected", what="the client to connect")
            yield client, t
        finally:
            await client.close()


async def _open(client: Client, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", client.onramps[0].port, limit=1 << 20
    )
    assert await socks5_connect_async(reader, writer, "127.0.0.1", port) == 0
    return reader, writer


def test_a_stalled_reader_holds_the_edge_back_and_still_gets_every_byte(tmp_path: Path) -> None:
    async def go() -> None:
        origin = await asyncio.start_server(_source, "127.0.0.1", 0)
        port = origin.sockets[0].getsockname()[1]
        async with client_and_edge(tmp_path) as (client, _):
            reader, writer = await _open(client, port)
            peer = client.link.peer
            assert peer is not None
            # nobody reads: the client must stop taking packets instead of buffering 48 MB
            await until(lambda: peer.held_total > 0, what="the client to hold packets back")
            assert peer.unread <= h3.HOLD_HIGH + 2 * 1024 * 1024
            digest = hashlib.sha256()
            got = 0
            while chunk := await reader.read(1 << 20):
                digest.update(chunk)
                got += len(chunk)
            writer.close()
            assert got == SIZE
            assert digest.hexdigest() == _digest()
        origin.close()

    run(go())


def test_packets_are_as_large_as_the_path_allows_both_ways(tmp_path: Path) -> None:
    # the client's Initial is 1,280 bytes, so the edge answers with 1,452-byte packets (and
    # still with qh3's 1,280 to a 1,200-byte Initial: the aioquic interop tests); the client
    # probes its way up to 1,452 as it sends
    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = 0
        while chunk := await reader.read(1 << 20):
            got += len(chunk)
        writer.write(str(got).encode())
        writer.close()

    def path_size(quic: object) -> int:
        room = qh3compat.datagram_room(quic)  # type: ignore[arg-type]
        return room[1] if room is not None else 0

    async def go() -> None:
        origin = await asyncio.start_server(sink, "127.0.0.1", 0)
        port = origin.sockets[0].getsockname()[1]
        async with client_and_edge(tmp_path) as (client, t):
            masque = next(o for o in t.edge.onramps if o.onramp == "masque")
            (edge_side,) = masque.server.all_protocols()
            assert path_size(edge_side.quic) == endpoint.LARGE_DATAGRAM_SIZE
            peer = client.link.peer
            assert peer is not None
            reader, writer = await _open(client, port)
            writer.write(b"\0" * (8 * 1024 * 1024))
            writer.write_eof()
            assert await reader.read() == str(8 * 1024 * 1024).encode()
            writer.close()
            assert path_size(peer.quic) >= endpoint.LARGE_DATAGRAM_SIZE
        origin.close()

    run(go())


def test_the_client_redials_a_lost_edge_connection_and_serves_again(tmp_path: Path) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    async def go() -> None:
        origin = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = origin.sockets[0].getsockname()[1]
        async with client_and_edge(tmp_path) as (client, t):
            first = client.link.peer
            masque = next(o for o in t.edge.onramps if o.onramp == "masque")
            for peer in list(masque.peers):  # the edge drops the client's connection
                peer.close_with(0x100, "test")
            await until(
                lambda: client.link.state == "connected" and client.link.peer is not first,
                what="the client to dial again",
            )
            assert client.metrics.edge_connects._value.get() == 2
            reader, writer = await _open(client, port)
            writer.write(b"again")
            assert await reader.readexactly(5) == b"again"
            writer.close()
            ok, info = client.ready()
            assert ok and info["status"] == "connected" and info["rtt_ms"] is not None
        origin.close()

    run(go())


def test_client_run_without_a_token_says_how_to_get_one(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["client", "run", "--data-dir", str(tmp_path)], env={"RAMP_CLIENT_TOKEN": ""}
    )
    assert result.exit_code == 2
    assert "ramp client token" in result.output


def test_client_run_refuses_a_damaged_token(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["client", "run", "--data-dir", str(tmp_path), "--token", "eyJ2IjoxfQ"]
    )
    assert result.exit_code == 2
    assert "invalid token" in result.output


def test_client_status_without_a_running_client_fails_clearly() -> None:
    result = CliRunner().invoke(main, ["client", "status", "--metrics-listen", "127.0.0.1:9"])
    assert result.exit_code == 2
    assert "no client answers on 127.0.0.1:9" in result.output
