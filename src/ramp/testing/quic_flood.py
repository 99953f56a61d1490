"""Bounded attacks on a tunnel listener, for tests: a flood of QUIC Initial packets with fresh
connection ids, and a flood of registrations with a wrong secret.

The Initials are one real qh3 ClientHello datagram with its connection ids replaced, so each
parses as a new client's first packet (the server cannot decrypt it: keys derive from the
original id), which is all it takes to claim a handshake slot on a server without limits.

    python -m ramp.testing.quic_flood initials --target 192.0.2.1:7844 --rate 3000 --seconds 5
    python -m ramp.testing.quic_flood register --token TOKEN --count 100

Each prints one JSON line with what it sent and what came back.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection
from qh3.quic.packet import QuicPacketType

from ramp.config import parse_hostport
from ramp.quic import qh3compat
from ramp.tunnel.connector_side import RegistrationRefused, TunnelClient
from ramp.tunnel.token import Token
from ramp.wire.tunnel import ALPN

_DCID_AT = 6  # first byte, 4 bytes of version, 1 byte of length


def initial_template(cid_length: int = 8) -> bytes:
    """A client's first datagram: a long-header Initial padded to at least 1200 bytes."""
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=[ALPN]))
    quic.connect(("192.0.2.1", 7844), now=time.monotonic())
    data = quic.datagrams_to_send(now=time.monotonic())[0][0]
    if data[_DCID_AT - 1] != cid_length:
        raise RuntimeError(f"qh3 chose a {data[_DCID_AT - 1]}-byte destination cid")
    return bytes(data)


def fresh_initial(template: bytes) -> bytes:
    """`template` with new random destination and source connection ids."""
    dlen = template[_DCID_AT - 1]
    scid_at = _DCID_AT + dlen + 1
    slen = template[scid_at - 1]
    return (
        template[:_DCID_AT]
        + os.urandom(dlen)
        + template[_DCID_AT + dlen : scid_at]
        + os.urandom(slen)
        + template[scid_at + slen :]
    )


def flood_initials(
    target: tuple[str, int],
    rate: float,
    seconds: float,
    bind: str | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Send fresh Initials at up to `rate` per second for `seconds` (or until `stop()`);
    count what came back."""
    family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    template = initial_template()
    sent = errors = 0
    answers: dict[str, int] = {}
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        if bind:
            sock.bind((bind, 0))
        sock.setblocking(False)
        start = time.monotonic()
        while (now := time.monotonic()) - start < seconds and not stop():
            due = int((now - start) * rate) + 1
            while sent < due:
                try:
                    sock.sendto(fresh_initial(template), target)
                except (BlockingIOError, OSError):
                    errors += 1
                sent += 1
            _read_answers(sock, answers)
            time.sleep(0.001)
        _read_answers(sock, answers)
    return {"sent": sent, "send_errors": errors, "answers": answers}


def _read_answers(sock: socket.socket, answers: dict[str, int]) -> None:
    while True:
        try:
            data = sock.recv(65536)
        except (BlockingIOError, OSError):
            return
        kind = "other"
        try:
            ptype = qh3compat.pull_quic_header(data, 8)[1]
            kind = QuicPacketType(ptype).name.lower()
        except ValueError:
            pass
        answers[kind] = answers.get(kind, 0) + 1


async def flood_registrations(
    token: Token, count: int, concurrency: int = 4, timeout: float = 10.0
) -> dict[str, int]:
    """Register `count` times with `token` (a wrong secret, say), `concurrency` at once, each
    attempt given up after `timeout` seconds."""
    outcomes: dict[str, int] = {}
    host, port = parse_hostport(token.edges[0])
    client = TunnelClient(
        tunnel_id=token.tunnel_id,
        secret=token.secret,
        ca_fingerprint=token.ca_fingerprint,
        edges=[(host, port)],
        ha_connections=1,
        connect_timeout=5.0,
        idle_timeout=5.0,
        keepalive=1.0,
        on_flow_end=lambda end: None,
        on_connections=lambda n: None,
        on_refused=lambda e: None,
        on_dial_failure=lambda reason: None,
        metrics_bad_input=lambda kind, reason: None,
    )
    todo = iter(range(count))

    async def worker() -> None:
        for i in todo:
            try:
                async with asyncio.timeout(timeout):
                    conn = await client._connect(host, port, i)
            except RegistrationRefused as e:
                outcome = f"refused_{e.code.name.lower()}"
            except (OSError, ConnectionError, TimeoutError) as e:
                outcome = type(e).__name__
            else:
                outcome = "registered"
                conn.close_with(0, "flood done")
                conn.udp_transport.close()  # type: ignore[attr-defined]
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ramp.testing.quic_flood")
    sub = parser.add_subparsers(dest="what", required=True)
    initials = sub.add_parser("initials", help="Initial packets with fresh connection ids")
    initials.add_argument("--target", required=True, help="HOST:PORT of the tunnel listener")
    initials.add_argument("--bind", help="source address to send from")
    initials.add_argument("--rate", type=float, default=2000.0, help="packets per second")
    initials.add_argument("--seconds", type=float, default=5.0)
    register = sub.add_parser("register", help="registrations with the token given")
    register.add_argument("--token", required=True)
    register.add_argument("--wrong-secret", action="store_true", help="replace its secret")
    register.add_argument("--count", type=int, default=100)
    register.add_argument("--concurrency", type=int, default=4)
    register.add_argument("--timeout", type=float, default=10.0, help="seconds per attempt")
    args = parser.parse_args(argv)
    if args.what == "initials":
        stopped: list[int] = []
        # SIGTERM ends the flood early and still prints what it did
        signal.signal(signal.SIGTERM, lambda signum, frame: stopped.append(signum))
        result: Any = flood_initials(
            parse_hostport(args.target), args.rate, args.seconds, args.bind, lambda: bool(stopped)
        )
    else:
        token = Token.decode(args.token)
        if args.wrong_secret:
            token = dataclasses.replace(token, secret=os.urandom(len(token.secret)))
        result = asyncio.run(flood_registrations(token, args.count, args.concurrency, args.timeout))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
