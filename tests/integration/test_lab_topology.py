"""The lab itself: the private network is reachable only from the inside.

If these fail, every tunnel test would prove nothing: a flow that "works through the tunnel"
could have taken a direct path.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import subprocess
from pathlib import Path

import pytest

from ramp.net.netns import NETNS_RUN_DIR
from ramp.testing.clients import recv_until_eof
from ramp.testing.lab import (
    BLACKHOLE,
    BLACKHOLE6,
    CLOSED_PORT,
    ECHO_PORT,
    EDGE_TUNNEL_ADDR,
    HALF_CLOSE_PORT,
    HELLO_PORT,
    HTTP_PORT,
    ORIGIN,
    ORIGIN2,
    ORIGIN6,
    ORIGIN_NAME,
    PRIVATE_ADDR,
    Lab,
    Payload,
)
from ramp.testing.origins import half_close_reply


def _connect(addr: tuple[str, int], timeout: float = 1.0) -> str:
    """'ok', 'timeout', or the errno name of the failure."""
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(addr)
        except TimeoutError:
            return "timeout"
        except OSError as e:
            return errno.errorcode.get(e.errno or 0, str(e))
    return "ok"


@pytest.mark.parametrize("origin", [ORIGIN, ORIGIN6])
def test_edge_has_no_route_to_the_origins(bare_lab: Lab, origin: str) -> None:
    assert bare_lab.private.call(_connect, (origin, HTTP_PORT)) == "ok"
    assert bare_lab.edge_ns.call(_connect, (origin, HTTP_PORT)) == "ENETUNREACH"


def test_client_reaches_neither_the_private_network_nor_the_origins(bare_lab: Lab) -> None:
    for addr in (ORIGIN, PRIVATE_ADDR, EDGE_TUNNEL_ADDR):
        assert bare_lab.client.call(_connect, (addr, HTTP_PORT)) == "ENETUNREACH", addr


def test_private_network_accepts_no_inbound_connection(bare_lab: Lab) -> None:
    listener = bare_lab.private.socket()
    with listener:
        listener.bind(("0.0.0.0", 5555))
        listener.listen()
        # Dropped silently: no RST, no ICMP (either would be an error other than a timeout),
        # the SYN just vanishes.
        assert bare_lab.edge_ns.call(_connect, (PRIVATE_ADDR, 5555), 1.0) == "timeout"
        assert bare_lab.private.call(_connect, (PRIVATE_ADDR, 5555)) == "ok"


def test_private_network_can_dial_out_to_the_edge_over_tcp_and_udp(bare_lab: Lab) -> None:
    tcp = bare_lab.edge_ns.socket()
    udp = bare_lab.edge_ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with tcp, udp:
        tcp.bind((EDGE_TUNNEL_ADDR, 5556))
        tcp.listen()
        udp.bind((EDGE_TUNNEL_ADDR, 5557))
        udp.settimeout(2)
        assert bare_lab.private.call(_connect, (EDGE_TUNNEL_ADDR, 5556)) == "ok"

        sender = bare_lab.private.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sender:
            sender.settimeout(2)
            sender.sendto(b"ping", (EDGE_TUNNEL_ADDR, 5557))
            data, peer = udp.recvfrom(100)
            assert data == b"ping"
            assert peer[0] == PRIVATE_ADDR
            udp.sendto(b"pong", peer)  # the answer to an outbound datagram gets back in
            assert sender.recv(100) == b"pong"


def test_blackhole_times_out_and_closed_port_is_refused(bare_lab: Lab) -> None:
    assert bare_lab.private.call(_connect, (BLACKHOLE, HTTP_PORT), 1.0) == "timeout"
    assert bare_lab.private.call(_connect, (BLACKHOLE6, HTTP_PORT), 1.0) == "timeout"
    assert bare_lab.private.call(_connect, (ORIGIN, CLOSED_PORT)) == "ECONNREFUSED"


def test_origins_serve_inside_the_private_network(bare_lab: Lab, payload: Payload) -> None:
    for host in (ORIGIN, ORIGIN2, f"[{ORIGIN6}]"):
        out = bare_lab.private.run(
            ["curl", "-sS", "--fail", "--max-time", "10", f"http://{host}/small.bin"]
        ).stdout
        assert hashlib.sha256(out).hexdigest() == payload.small.sha256, host

    def talk() -> tuple[bytes, bytes, bytes]:
        with socket.create_connection((ORIGIN, ECHO_PORT), timeout=5) as s:
            s.sendall(b"hello")
            s.shutdown(socket.SHUT_WR)
            echoed = recv_until_eof(s)
        with socket.create_connection((ORIGIN, HELLO_PORT), timeout=5) as s:
            greeting = s.recv(100)
        with socket.create_connection((ORIGIN, HALF_CLOSE_PORT), timeout=5) as s:
            s.sendall(b"request")
            s.shutdown(socket.SHUT_WR)
            reply = recv_until_eof(s)
        return echoed, greeting, reply

    echoed, greeting, reply = bare_lab.private.call(talk)
    assert echoed == b"hello"
    assert greeting.startswith(ORIGIN.encode() + b" ")
    assert reply == half_close_reply(b"request")


def test_origin_http_accepts_absolute_form_targets(bare_lab: Lab) -> None:
    def get() -> bytes:
        with socket.create_connection((ORIGIN, HTTP_PORT), timeout=5) as s:
            s.sendall(
                f"GET http://{ORIGIN}/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
            )
            return recv_until_eof(s)

    assert bare_lab.private.call(get).startswith(b"HTTP/1.1 200 ")


def test_edge_resolves_lab_names_and_nothing_leaves(bare_lab: Lab) -> None:
    out = bare_lab.edge_ns.run(["getent", "hosts", ORIGIN_NAME]).stdout.decode()
    assert out.split()[0] == ORIGIN
    missing = bare_lab.edge_ns.run(["getent", "hosts", "nothing.example.com"], check=False)
    assert missing.returncode != 0


def test_namespaces_and_processes_are_removed_even_after_an_error(
    tmp_path: Path, payload: Payload
) -> None:
    lab = Lab(tmp_path, payload=payload)
    with pytest.raises(RuntimeError, match="boom"), lab:
        names = [lab.client.name, lab.edge_ns.name, lab.private.name]
        assert lab.origins is not None
        origins_pid = lab.origins.pid
        sleeper = lab.private.popen(["sleep", "60"])
        raise RuntimeError("boom")
    for name in names:
        assert not (NETNS_RUN_DIR / name).exists(), name
    assert sleeper.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(origins_pid, 0)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names)
