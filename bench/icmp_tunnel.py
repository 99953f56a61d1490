"""ICMP echo through the tunnel's packet path vs. a ping from the connector's own namespace,
measured in one run on the namespace lab (router topology).

    python -m bench.icmp_tunnel [--pings N] [--mode ping_sockets|raw_socket]

Path under test: the edge's packet API (`EdgePackets.send`, in this process, in E) -> a PACKET
datagram over QUIC -> the connector in P -> a ping (or raw) socket -> the router R -> the
origin, and the reply back to `on_packet`. Baseline: a ping socket in P to the same origin
through the same router (the connector's own leg, without the tunnel). Echoes go one at a
time; it prints p50 and p99 of both, and the microseconds the tunnel adds at p50 and p99.

Needs root (network namespaces). Traffic stays inside the lab's namespaces; bounded by
`--pings` and a 5 s wait per echo.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import select
import socket
import statistics
import struct
import tempfile
import time
from pathlib import Path

from ramp.edge import Edge
from ramp.testing.edge_thread import EdgeThread
from ramp.testing.lab import ORIGIN, ORIGIN_PREFIX, Lab
from ramp.wire import ip

CLIENT = ipaddress.ip_address("100.96.0.2")
TARGET = ipaddress.ip_address(ORIGIN)
WAIT = 5.0


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def baseline(pings: int) -> list[float]:
    """Round trips of a ping socket (in the calling thread's namespace) to the origin, in s."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
    rtts = []
    try:
        for seq in range(pings):
            message = struct.pack("!BBHHH", 8, 0, 0, 0, seq) + b"x" * 56
            start = time.perf_counter()
            sock.sendto(message, (ORIGIN, 0))
            while True:
                ready, _, _ = select.select([sock], [], [], WAIT)
                if not ready:
                    raise TimeoutError(f"no echo reply to baseline ping {seq}")
                reply = sock.recv(2048)
                if struct.unpack_from("!H", reply, 6)[0] == seq:
                    break
            rtts.append(time.perf_counter() - start)
    finally:
        sock.close()
    return rtts


async def through_tunnel(edge: Edge, pings: int) -> list[float]:
    assert edge.packets is not None and edge.tunnels is not None
    tunnel = next(iter(edge.tunnels.tunnels))
    loop = asyncio.get_running_loop()
    waiting: dict[int, asyncio.Future[float]] = {}

    def on_packet(_: str, packet: bytes) -> None:
        icmp = ip.parse_icmp(ip.parse_packet(packet))
        fut = waiting.get(icmp.seq)
        if icmp.is_echo_reply and fut is not None and not fut.done():
            fut.set_result(time.perf_counter())

    edge.packets.on_packet = on_packet
    rtts = []
    for seq in range(pings):
        answered = waiting[seq] = loop.create_future()
        request = ip.build_echo(CLIENT, TARGET, 0x6262, seq, b"x" * 56, False)
        start = time.perf_counter()
        if not edge.packets.send(tunnel, request):
            raise RuntimeError("the edge found no connector taking packets")
        rtts.append(await asyncio.wait_for(answered, WAIT) - start)
        del waiting[seq]
    return rtts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pings", type=int, default=500)
    parser.add_argument("--mode", choices=["ping_sockets", "raw_socket"], default="ping_sockets")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as tmp,
        Lab(Path(tmp), router=True, private_dns=False) as lab,
    ):
        if args.mode == "ping_sockets":
            lab.set_ping_group_range(lab.private, 0, 2147483647)
        else:
            lab.set_ping_group_range(lab.private, 1, 0)
        token = lab.create_tunnel("corp", [ORIGIN_PREFIX])
        edge = EdgeThread(lab)
        try:
            lab.start_connector(token)
            lab.set_ping_group_range(lab.private, 0, 2147483647)  # for the baseline's socket
            base = lab.private.call(baseline, args.pings)
            tun = edge.call(lambda e: through_tunnel(e, args.pings), timeout=args.pings * WAIT)
        finally:
            edge.close()
    us = 1e6
    print(f"ICMP echo, {args.pings} one at a time, connector with {args.mode}")
    for name, values in (("baseline (ping socket in P)", base), ("through the tunnel", tun)):
        p50, p99 = _pct(values, 0.5) * us, _pct(values, 0.99) * us
        mean = statistics.mean(values) * us
        print(f"  {name:30s} p50 {p50:8.1f} us   p99 {p99:8.1f} us   mean {mean:8.1f} us")
    print(
        f"  added by the tunnel           p50 {(_pct(tun, 0.5) - _pct(base, 0.5)) * us:8.1f} us"
        f"   p99 {(_pct(tun, 0.99) - _pct(base, 0.99)) * us:8.1f} us"
        f"   ratio p50 {_pct(tun, 0.5) / _pct(base, 0.5):.1f}x"
    )


if __name__ == "__main__":
    main()
