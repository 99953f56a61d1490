"""Garbage on every port of the edge: closed with an error, counted, everyone else served."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

import pytest

from ramp.testing.clients import REP_SUCCEEDED, recv_until_eof
from ramp.testing.lab import (
    ECHO_PORT,
    EDGE_TUNNEL_ADDR,
    ORIGIN,
    TUNNEL_PORT,
    Lab,
    Payload,
    wait_until,
)
from ramp.testing.wait import DEADLINE


@pytest.fixture
def bystander(shared_lab: Lab) -> Iterator[socket.socket]:
    """An echo flow that is open while the garbage arrives; it must not notice."""
    code, sock = shared_lab.socks5(ORIGIN, ECHO_PORT)
    assert code == REP_SUCCEEDED
    yield sock
    sock.close()


def _still_echoes(sock: socket.socket) -> bool:
    data = os.urandom(1000)
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(len(data) - len(got))
        if not chunk:
            return False
        got += chunk
    return got == data


def _answer_then_close(sock: socket.socket) -> bytes:
    """What the edge sends back before closing; a reset counts as a close."""
    try:
        return recv_until_eof(sock)
    except ConnectionResetError:
        return b""


def _serves_normally(lab: Lab, payload: Payload) -> None:
    got = lab.curl_digest(
        *lab.proxy_args("socks5"), f"http://{ORIGIN}/{payload.small.name}", timeout=20
    )
    assert got.returncode == 0, got.stderr
    assert got.sha256 == payload.small.sha256


def _wait_counted(lab: Lab, name: str, before: float, **labels: str) -> None:
    wait_until(
        lambda: lab.edge_metrics().value(name, **labels) > before,
        DEADLINE,
        what=f"{name}{labels} to grow past {before}",
    )


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)),  # a TLS ClientHello
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # HTTP to the SOCKS port
        b"\x04\x01\x00\x50\xc6\x33\x64\x0a\x00",  # SOCKS4
        b"\x05\x00",  # SOCKS5 greeting offering no methods at all
        bytes([0x05, 0x01, 0x00]) + b"\x05\x01\x00\x09" + os.urandom(40),  # bad ATYP 9
    ],
    ids=["tls", "http", "socks4", "no-methods", "bad-atyp"],
)
def test_garbage_on_the_socks5_port(
    shared_lab: Lab, payload: Payload, bystander: socket.socket, garbage: bytes
) -> None:
    lab = shared_lab
    before = lab.edge_metrics().value("ramp_bad_input_total", onramp="socks5")
    with lab.connect_socks(timeout=5) as sock:
        sock.sendall(garbage)
        answer = _answer_then_close(sock)  # a timeout here means the edge hung on it
    # At most a method reply and an error reply: never a success.
    assert len(answer) <= 12
    assert bytes([5, REP_SUCCEEDED, 0]) not in answer[2:]
    _wait_counted(lab, "ramp_bad_input_total", before, onramp="socks5")
    assert _still_echoes(bystander)
    _serves_normally(lab, payload)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00" + bytes(range(256)) + b"\r\n\r\n",
        b"\x05\x01\x00\x05\x01\x00\x01\xc6\x33\x64\x0a\x00\x50\r\n\r\n",  # SOCKS5
        b"CONNECT\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: x\r\n\r\n",
    ],
    ids=["binary", "socks5", "no-target", "bad-headers"],
)
def test_garbage_on_the_http_port(
    shared_lab: Lab, payload: Payload, bystander: socket.socket, garbage: bytes
) -> None:
    lab = shared_lab
    before = lab.edge_metrics().value("ramp_bad_input_total", onramp="http")
    with lab.connect_http_proxy(timeout=15) as sock:
        sock.sendall(garbage)
        answer = _answer_then_close(sock)
    if answer:
        status = answer.split(b" ", 2)[1] if answer.startswith(b"HTTP/1.") else b""
        assert status.startswith(b"4"), answer[:200]
    _wait_counted(lab, "ramp_bad_input_total", before, onramp="http")
    assert _still_echoes(bystander)
    _serves_normally(lab, payload)


def _garbage_datagrams() -> list[bytes]:
    grams = [os.urandom(n) for n in (1, 2, 7, 20, 100, 500, 1200, 1350, 1500)]
    # Long headers that look like QUIC: unknown version, Initial with junk, huge CID lengths.
    grams.append(b"\xc0\x1a\x2a\x3a\x4a\x08" + os.urandom(8) + b"\x08" + os.urandom(1200))
    grams.append(b"\xc0\x00\x00\x00\x01\x08" + os.urandom(8) + b"\x00" + os.urandom(1200))
    grams.append(b"\xc0\x00\x00\x00\x01\xff" + os.urandom(1200))
    grams.append(b"\xc0\x00\x00\x00\x01")
    # Short headers with connection ids nobody issued.
    grams += [b"\x40" + os.urandom(n) for n in (8, 40, 1200)]
    return grams * 5


def test_garbage_datagrams_on_the_tunnel_port(
    shared_lab: Lab, payload: Payload, bystander: socket.socket
) -> None:
    lab = shared_lab
    before = lab.edge_metrics()
    sender = lab.private.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sender:
        for gram in _garbage_datagrams():
            sender.sendto(gram, (EDGE_TUNNEL_ADDR, TUNNEL_PORT))
    _wait_counted(
        lab, "ramp_tunnel_bad_packets_total", before.value("ramp_tunnel_bad_packets_total")
    )
    # The connector's connections survived: same count, and flows still work.
    assert lab.edge_metrics().value("ramp_tunnel_connections", tunnel="corp") == before.value(
        "ramp_tunnel_connections", tunnel="corp"
    )
    assert _still_echoes(bystander)
    _serves_normally(lab, payload)


def test_a_garbage_flood_on_the_tunnel_port_leaves_the_edge_serving(
    shared_lab: Lab, payload: Payload, bystander: socket.socket
) -> None:
    lab = shared_lab
    sender = lab.private.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sender:
        for i in range(5000):
            sender.sendto(struct.pack("!I", i) + os.urandom(1196), (EDGE_TUNNEL_ADDR, TUNNEL_PORT))
    assert lab.edge is not None and lab.edge.alive()
    assert _still_echoes(bystander)
    _serves_normally(lab, payload)
