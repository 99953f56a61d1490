"""connect-ip (RFC 9484) on the edge, driven by aioquic's HTTP/3 client against an in-process
edge and connector (tunnel "corp" routes 127.0.0.0/8): addresses assigned, routes advertised
from policy, UDP packets to an origin and back, and each kind of bad packet dropped, answered
with the right ICMP error where a router would, and counted."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import random
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aioquic.h3.events import DataReceived
from test_masque_interop import AUTH, DatagramClient, edge, h3_client

from ramp.policy.identities import bearer
from ramp.policy.rules import Rule
from ramp.testing.loopback import Tunnel, run, udp_echo_origin
from ramp.testing.wait import until
from ramp.wire import connect_ip as cip
from ramp.wire import ip as wip
from ramp.wire import masque

A = ipaddress.ip_address
N = ipaddress.ip_network
POOL = ["192.0.2.0/24", "2001:db8:77::/64"]
GATEWAY = A("192.0.2.1")
ORIGIN = A("127.0.0.1")


def ip_headers(path: str = "/.well-known/masque/ip/*/*/") -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"CONNECT"),
        (b":protocol", b"connect-ip"),
        (b":scheme", b"https"),
        (b":authority", b"edge"),
        (b":path", path.encode()),
        (b"capsule-protocol", b"?1"),
        (b"proxy-authorization", AUTH),
    ]


class IpClient:
    """One connect-ip session of an aioquic client: capsules in, packets both ways."""

    def __init__(self, c: DatagramClient, sid: int) -> None:
        self.c = c
        self.sid = sid
        self.decoder = masque.CapsuleDecoder()
        self.assigned: list[cip.AddressEntry] = []
        self.routes: list[cip.RouteAdvertisement] = []
        self.capsule_packets: list[bytes] = []

    @property
    def address(self) -> ipaddress.IPv4Address:
        return next(e.prefix.network_address for e in self.assigned if e.ip_version == 4)

    def _pump(self) -> None:
        queue = self.c.streams.get(self.sid)
        while queue is not None and not queue.empty():
            ev = queue.get_nowait()
            if isinstance(ev, DataReceived):
                for cap in self.decoder.feed(ev.data):
                    parsed = cip.parse_capsule(cap.type, cap.value)
                    if isinstance(parsed, cip.AddressAssign):
                        self.assigned = list(parsed.addresses)
                    elif isinstance(parsed, cip.RouteAdvertisement):
                        self.routes.append(parsed)
                    elif cap.type == masque.CAPSULE_DATAGRAM:
                        self.capsule_packets.append(cap.value[1:])

    async def wait_setup(self) -> None:
        await until(lambda: self._pump() or (self.assigned and self.routes), what="capsules")

    async def latest_routes(self, count: int) -> list[ipaddress.IPv4Network]:
        await until(lambda: self._pump() or len(self.routes) >= count, what="a re-advertisement")
        return self.routes[-1].networks()  # type: ignore[return-value]

    def send(self, packet: bytes) -> None:
        self.c.h3.send_datagram(self.sid, b"\x00" + packet)
        self.c.transmit()

    def send_capsule(self, packet: bytes) -> None:
        self.c.send(self.sid, masque.encode_capsule(masque.CAPSULE_DATAGRAM, b"\x00" + packet))

    async def receive(self, timeout: float = 10.0) -> wip.Packet:
        queue = self.c.datagrams.setdefault(self.sid, asyncio.Queue())
        data = await asyncio.wait_for(queue.get(), timeout)
        assert data[0] == 0
        return wip.parse_packet(data[1:])


@asynccontextmanager
async def session(
    tmp_path: Path, **kw: Any
) -> AsyncIterator[tuple[Tunnel, DatagramClient, IpClient]]:
    kw.setdefault("masque_ip_pool", POOL)
    async with edge(tmp_path, **kw) as (t, port), h3_client(port, DatagramClient) as c:
        sid = c.request(ip_headers())
        status, headers = await c.status(sid)
        assert status == 200 and headers.get(b"capsule-protocol") == b"?1"
        ipc = IpClient(c, sid)
        await ipc.wait_setup()
        yield t, c, ipc


def dropped(t: Tunnel, reason: str) -> float:
    server = next(o for o in t.edge.onramps if o.onramp == "masque")
    return float(server.connect_ip.metrics.dropped.labels(reason)._value.get())


def bad(t: Tunnel, reason: str) -> float:
    return float(t.edge.metrics.bad_input.labels("masque", reason)._value.get())


def test_addresses_are_assigned_and_the_tunnel_routes_advertised(tmp_path: Path) -> None:
    async def go() -> None:
        async with session(tmp_path) as (t, c, ipc):
            got = {(e.ip_version, str(e.prefix)) for e in ipc.assigned}
            v4 = next(p for v, p in got if v == 4)
            v6 = next(p for v, p in got if v == 6)
            assert N(v4).prefixlen == 32 and N(v4).network_address in N(POOL[0])
            assert N(v6).prefixlen == 128 and N(v6).network_address in N(POOL[1])
            assert A(v4.split("/")[0]) != GATEWAY  # the edge's own
            assert ipc.routes[0].networks() == [N("127.0.0.0/8")]
            # a second session on the same connection gets other addresses
            sid2 = c.request(ip_headers())
            assert (await c.status(sid2))[0] == 200
            other = IpClient(c, sid2)
            await other.wait_setup()
            assert other.address != ipc.address
            c.send(sid2, b"", end=True)
            server = next(o for o in t.edge.onramps if o.onramp == "masque")
            await until(lambda: server.connect_ip.pool.in_use(4) == 1, what="address returned")

    run(go())


def test_an_address_request_is_honoured_when_free(tmp_path: Path) -> None:
    async def go() -> None:
        async with session(tmp_path) as (_, c, ipc):
            want = N("192.0.2.200/32")
            c.send(ipc.sid, cip.encode_capsule(cip.AddressRequest([(7, 4, want)])))
            await until(
                lambda: ipc._pump() or any(e.request_id == 7 for e in ipc.assigned),
                what="the answer to the request",
            )
            entry = next(e for e in ipc.assigned if e.ip_version == 4)
            assert entry.prefix == want and entry.request_id == 7

    run(go())


def test_a_udp_packet_reaches_the_origin_and_the_answer_comes_back(tmp_path: Path) -> None:
    async def go() -> None:
        echo, uport = await udp_echo_origin()
        async with session(tmp_path) as (_, _, ipc):
            for size in (1, 700):
                data = os.urandom(size)
                ipc.send(wip.build_udp(ipc.address, ORIGIN, 40000, uport, data, ttl=64))
                reply = await ipc.receive()
                udp = wip.parse_udp(reply)  # checksums checked
                assert (reply.src, reply.dst) == (ORIGIN, ipc.address)
                assert (udp.sport, udp.dport, udp.payload) == (uport, 40000, data)
            # too big for a DATAGRAM frame: a capsule, and the answer comes back as one
            big = os.urandom(1350)
            ipc.send_capsule(wip.build_udp(ipc.address, ORIGIN, 40000, uport, big))
            queue = ipc.c.datagrams[ipc.sid]
            await until(
                lambda: ipc._pump() or ipc.capsule_packets or queue.qsize(), what="the answer"
            )
            answer = ipc.capsule_packets[0] if ipc.capsule_packets else queue.get_nowait()[1:]
            assert wip.parse_udp(wip.parse_packet(answer)).payload == big
        echo.close()

    run(go())


def test_bad_packets_are_dropped_answered_and_counted(tmp_path: Path) -> None:
    async def go() -> None:
        echo, uport = await udp_echo_origin()
        async with session(tmp_path, masque_ip_mtu=1280) as (t, _, ipc):
            me = ipc.address
            good = wip.build_udp(me, ORIGIN, 40001, uport, b"x")
            # malformed: cut short, bad header checksum, a fragment, bad UDP checksum
            ipc.send(good[:15])
            broken = bytearray(good)
            broken[10] ^= 0xFF
            ipc.send(bytes(broken))
            frag = bytearray(good)
            frag[6] |= 0x20  # more fragments
            frag[10:12] = b"\0\0"
            frag[10:12] = wip.checksum(frag[:20]).to_bytes(2, "big")
            ipc.send(bytes(frag))
            bad_udp = bytearray(good)
            bad_udp[-1] ^= 0xFF
            ipc.send(bytes(bad_udp))
            # spoofed source
            ipc.send(wip.build_udp(A("192.0.2.99"), ORIGIN, 40001, uport, b"x"))
            await until(
                lambda: (
                    bad(t, "truncated") == 1
                    and bad(t, "bad_checksum") == 2
                    and bad(t, "fragment") == 1
                    and bad(t, "spoofed_source") == 1
                ),
                what="the malformed packets counted",
            )
            # not advertised: administratively prohibited, from the edge's address
            ipc.send(wip.build_udp(me, A("198.51.100.7"), 40001, 53, b"x"))
            err = await ipc.receive()
            icmp = wip.parse_icmp(err)
            assert (err.src, err.dst, icmp.type, icmp.code) == (GATEWAY, me, 3, 13)
            # too big: fragmentation needed with the MTU
            ipc.send_capsule(wip.build_udp(me, ORIGIN, 40001, uport, b"y" * 1300))
            err = await ipc.receive()
            icmp = wip.parse_icmp(err)
            assert (icmp.type, icmp.code, icmp.mtu) == (3, 4, 1280)
            # TTL 1: time exceeded from the edge, a hop of its own
            ipc.send(wip.build_udp(me, ORIGIN, 40001, uport, b"z", ttl=1))
            err = await ipc.receive()
            icmp = wip.parse_icmp(err)
            assert (err.src, icmp.type, icmp.code) == (GATEWAY, 11, 0)
            # an ICMP type other than echo request
            ipc.send(wip.build_icmp(me, ORIGIN, 13, 0, 0, b"\0" * 12))
            await until(lambda: bad(t, "icmp_type") == 1, what="the ICMP type counted")
            assert dropped(t, "not_advertised") == 1 and dropped(t, "too_big") == 1
            assert dropped(t, "ttl_exceeded") == 1
            # a TCP segment of no connection the edge knows: reset at once
            seg = bytearray(struct.pack("!HHIIBBHHH", 40003, 80, 1, 77, 5 << 4, 0x10, 999, 0, 0))
            seg[16:18] = wip.pseudo_header_checksum(me, ORIGIN, 6, bytes(seg)).to_bytes(2, "big")
            ipc.send(wip.build_ip(me, ORIGIN, 6, bytes(seg)))
            rst = await ipc.receive()
            tcp = wip.parse_tcp(rst)
            assert (rst.src, tcp.sport, tcp.dport, tcp.flags, tcp.seq) == (ORIGIN, 80, 40003, 4, 77)
            # the session still works after all that
            ipc.send(good)
            reply = await ipc.receive()
            assert wip.parse_udp(reply).payload == b"x"
            # and the edge answers a ping to its own address
            ipc.send(wip.build_echo(me, GATEWAY, 9, 1, b"hi", reply=False))
            pong = await ipc.receive()
            icmp = wip.parse_icmp(pong)
            assert pong.src == GATEWAY and icmp.is_echo_reply and icmp.data == b"hi"
        echo.close()

    run(go())


def test_routes_follow_policy_and_one_allowed_address_is_the_only_route(tmp_path: Path) -> None:
    async def go() -> None:
        echo, uport = await udp_echo_origin()
        async with session(tmp_path) as (t, _, ipc):
            store = t.edge.store
            store.delete_rule("default")
            store.add_rule(Rule("one", "allow", identity="u", to="127.0.0.1/32"))
            assert await ipc.latest_routes(2) == [N("127.0.0.1/32")]
            # another address of the tunnel's route is now administratively prohibited
            ipc.send(wip.build_udp(ipc.address, A("127.0.0.2"), 40002, uport, b"x"))
            err = await ipc.receive()
            assert wip.parse_icmp(err).code == 13
            # the allowed one still works
            ipc.send(wip.build_udp(ipc.address, ORIGIN, 40002, uport, b"ok"))
            assert wip.parse_udp(await ipc.receive()).payload == b"ok"
        echo.close()

    run(go())


def test_echo_requests_get_replies_and_two_clients_only_their_own(tmp_path: Path) -> None:
    async def go() -> None:
        async with session(tmp_path) as (t, c, first):
            sid2 = c.request(ip_headers())
            assert (await c.status(sid2))[0] == 200
            second = IpClient(c, sid2)
            await second.wait_setup()
            # the same echo id from both clients, to the same origin
            for seq in range(3):
                first.send(wip.build_echo(first.address, ORIGIN, 77, seq, b"one", reply=False))
                second.send(wip.build_echo(second.address, ORIGIN, 77, seq, b"two", reply=False))
            for ipc, data in ((first, b"one"), (second, b"two")):
                for _ in range(3):
                    reply = await ipc.receive()
                    icmp = wip.parse_icmp(reply)
                    assert (reply.src, reply.dst) == (ORIGIN, ipc.address)
                    assert icmp.is_echo_reply and (icmp.ident, icmp.data) == (77, data)
            # TTL 2: the edge passes it on with 1, and the connector (a hop too) answers
            first.send(wip.build_echo(first.address, ORIGIN, 78, 1, b"probe", False, ttl=2))
            err = await first.receive()
            icmp = wip.parse_icmp(err)
            assert (icmp.type, err.dst) == (wip.ICMP_TIME_EXCEEDED, first.address)
            quoted = wip.quoted_echo(icmp)
            assert quoted is not None and quoted[1].ident == 78
            # a reply for an echo id nobody sent is not delivered
            stray = wip.build_echo(ORIGIN, first.address, 999, 1, b"x", reply=True)
            t.edge._packet_from_tunnel(next(iter(t.edge.tunnels.tunnels)), stray)
            assert dropped(t, "no_flow") == 1
            assert first.c.datagrams[first.sid].empty()
            # the second client leaves: its echo flow ends with one audit line, its counts in it
            second_address = str(second.address)
            c.send(sid2, b"", end=True)

            def echo_records() -> list[dict[str, Any]]:
                return [
                    r
                    for r in _audit(t)
                    if r["protocol"] == "icmp" and second_address in str(r.get("annotations"))
                ]

            (record,) = await until(echo_records, what="the echo flow's audit line")
            assert (record["kind"], record["identity"], record["onramp"]) == (
                "packet",
                "u",
                "masque",
            )
            assert (record["packets_up"], record["packets_down"]) == (3, 3)
            assert record["tunnel"] == "corp" and record["result"] == "ok"

    run(go())


def _audit(t: Tunnel) -> list[dict[str, Any]]:
    path = t.data_dir / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_revoked_client_identity_loses_its_session_and_its_addresses(tmp_path: Path) -> None:
    async def go() -> None:
        async with edge(tmp_path, masque_ip_pool=POOL) as (t, port):
            client = t.edge.store.create_client("alice")
            token = bearer("alice", t.edge.store.client_secret("alice"))
            headers = [h for h in ip_headers() if h[0] != b"proxy-authorization"]
            headers.append((b"proxy-authorization", f"Bearer {token}".encode()))
            async with h3_client(port, DatagramClient) as c:
                sid = c.request(headers)
                assert (await c.status(sid))[0] == 200
                ipc = IpClient(c, sid)
                await ipc.wait_setup()
                server = next(o for o in t.edge.onramps if o.onramp == "masque")
                assert server.connect_ip.pool.in_use(4) == 1
                t.edge.store.revoke_client(client.name)

                # the edge's next store poll ends the session: FIN on the stream
                async def ended() -> bool:
                    while True:
                        ev = await c.next(sid)
                        if isinstance(ev, DataReceived) and ev.stream_ended:
                            return True

                assert await asyncio.wait_for(ended(), 30)
                assert server.connect_ip.pool.in_use(4) == 0

    run(go())


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(("flip", "set", "truncate", "insert", "delete"))
        at = rng.randrange(len(out)) if out else 0
        if kind == "flip" and out:
            out[at] ^= 1 << rng.randrange(8)
        elif kind == "set" and out:
            out[at] = rng.choice((0, 1, 0x45, 0x60, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif out:
            del out[at : at + rng.randint(1, 8)]
    return bytes(out)


def test_damaged_packets_never_break_the_session(tmp_path: Path) -> None:
    """Thousands of packets made from valid ones with a few bytes damaged (IPv4 and IPv6,
    UDP, TCP, ICMP): each is dropped, answered or forwarded, and the session still works."""

    async def go() -> None:
        echo, uport = await udp_echo_origin()
        async with session(tmp_path) as (t, _, ipc):
            me = ipc.address
            me6 = next(e.prefix.network_address for e in ipc.assigned if e.ip_version == 6)
            other6 = A("2001:db8:77::99")
            seg = struct.pack("!HHIIBBHHH", 40009, 80, 1, 0, 5 << 4, 0x02, 999, 0, 0)
            valid = [
                wip.build_udp(me, ORIGIN, 40010, uport, b"payload" * 10),
                wip.build_echo(me, ORIGIN, 5, 1, b"ping" * 8, reply=False),
                wip.build_ip(me, ORIGIN, 6, seg),
                wip.build_udp(me6, other6, 40010, 53, b"x" * 40),
                wip.build_echo(me6, other6, 5, 1, b"ping", reply=False),
            ]
            rng = random.Random(9484)
            for i in range(3000):
                ipc.send(_mutate(rng, valid[i % len(valid)]))
                if i % 100 == 0:
                    await asyncio.sleep(0)  # let the edge read them
            # the session still carries packets both ways
            queue = ipc.c.datagrams.setdefault(ipc.sid, asyncio.Queue())

            async def answered() -> bool:
                ipc.send(wip.build_udp(me, ORIGIN, 40011, uport, b"still here"))
                while True:
                    data = await asyncio.wait_for(queue.get(), 10)
                    got = wip.parse_packet(data[1:])
                    if got.proto == 17 and wip.parse_udp(got).payload == b"still here":
                        return True

            assert await answered()
            assert dropped(t, "internal_error") == 0
            assert sum(bad(t, r) for r in ("truncated", "bad_checksum", "bad_length")) > 100
        echo.close()

    run(go())


def test_connect_ip_can_be_turned_off(tmp_path: Path) -> None:
    async def go() -> None:
        async with (
            edge(tmp_path, masque_ip_template="off") as (_, port),
            h3_client(port, DatagramClient) as c,
        ):
            sid = c.request(ip_headers())
            assert (await c.status(sid))[0] == 501

    run(go())
