"""Socket activation: listeners take the sockets systemd passed, by name."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ramp.net.inherit import UNNAMED, SocketSet, install
from ramp.testing.clients import socks5_connect_async
from ramp.testing.lab import wait_until
from ramp.testing.loopback import run
from ramp.testing.loopback import tunnel as loopback_tunnel
from ramp.testing.notify import Manager, reap
from ramp.testing.wait import DEADLINE


def listener(family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
    sock = socket.socket(family, type)
    sock.bind(("127.0.0.1", 0))
    if type == socket.SOCK_STREAM:
        sock.listen()
    return sock


def test_systemd_descriptors_become_named_sockets() -> None:
    a, b = listener(), listener(type=socket.SOCK_DGRAM)
    # what systemd does: the sockets at consecutive descriptors, their names in order
    start = 100
    os.dup2(a.fileno(), start)
    os.dup2(b.fileno(), start + 1)
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "socks5:tunnel"}
    given = SocketSet.from_systemd(env, start=start)
    assert env == {}  # not passed on to children
    assert len(given) == 2
    tunnel = given.take("tunnel", socket.SOCK_DGRAM, "0.0.0.0", 7844)
    assert tunnel is not None and tunnel.getsockname() == b.getsockname()
    assert given.take("socks5", socket.SOCK_DGRAM, "127.0.0.1", 1080) is None  # wrong type
    socks = given.take("socks5", socket.SOCK_STREAM, "127.0.0.1", 1080)
    assert socks is not None and socks.getsockname() == a.getsockname()
    assert len(given) == 0
    for s in (a, b, tunnel, socks):
        s.close()


def test_descriptors_for_another_process_are_ignored() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert len(SocketSet.from_systemd(env, start=100)) == 0
    assert env == {}


def test_several_of_one_name_go_by_address_and_unnamed_only_by_exact_address() -> None:
    one, two, bare = listener(), listener(), listener()
    given = SocketSet([("http", one), ("http", two), (UNNAMED, bare)])
    host, port = two.getsockname()
    assert given.take("http", socket.SOCK_STREAM, host, port) is two
    assert given.take("http", socket.SOCK_STREAM, "127.0.0.1", 1) is one  # the only one left
    assert given.take("socks5", socket.SOCK_STREAM, "127.0.0.1", 1) is None
    assert given.take("socks5", socket.SOCK_STREAM, *bare.getsockname()) is bare
    for s in (one, two, bare):
        s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_systemd_socket_activate_starts_an_edge_on_its_socket(tmp_path: Path) -> None:
    port = free_port()
    manager = Manager(tmp_path / "notify")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    args = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=socks5"]
    args += ["-E", f"NOTIFY_SOCKET={tmp_path / 'notify'}", "-E", "PYTHONPATH"]
    args += [sys.executable, "-m", "ramp", "edge", "--data-dir", str(tmp_path / "data")]
    # the config names another port: the socket systemd passed under the name wins
    args += ["--tunnel-listen", "127.0.0.1:0", "--socks5-listen", "127.0.0.1:0"]
    args += ["--http-listen", "off", "--masque-listen", "off", "--metrics-listen", "off"]
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE)
    try:
        # systemd-socket-activate starts the edge at the first connection
        client = wait_until(
            lambda: socket.create_connection(("127.0.0.1", port), timeout=30),
            DEADLINE,
            what="systemd-socket-activate to listen",
        )
        with client:
            client.sendall(b"\x05\x01\x00")  # SOCKS5: no authentication
            assert client.recv(2) == b"\x05\x00"  # answered by the edge on the given socket
        assert manager.wait_for("READY")["READY"] == "1"
        proc.send_signal(signal.SIGTERM)
        assert manager.wait_for("STOPPING")["STOPPING"] == "1"
        assert proc.wait(60) == 0
    finally:
        err = reap(proc, manager)
    assert "socks5: using the inherited socket" in err


async def _through_given_sockets(tmp_path: Path) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    tcp = listener()
    tunnel_port, socks_port = udp.getsockname()[1], tcp.getsockname()[1]

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()

    origin = await asyncio.start_server(echo, "127.0.0.1", 0)
    origin_port = origin.sockets[0].getsockname()[1]
    install(SocketSet([("tunnel", udp), ("socks5", tcp)]))
    try:
        async with loopback_tunnel(tmp_path, ha=1) as t:
            # the connector dialled the given UDP socket; clients use the given listener
            assert t.edge.tunnels is not None and t.edge.tunnels.port == tunnel_port
            assert t.socks_port == socks_port
            reader, writer = await asyncio.open_connection("127.0.0.1", socks_port)
            assert await socks5_connect_async(reader, writer, "127.0.0.1", origin_port) == 0
            writer.write(b"through the tunnel")
            assert await reader.read(100) == b"through the tunnel"
            writer.close()
    finally:
        install(SocketSet())
        origin.close()


def test_an_in_process_edge_serves_the_tunnel_and_socks5_on_given_sockets(
    tmp_path: Path,
) -> None:
    run(_through_given_sockets(tmp_path))
