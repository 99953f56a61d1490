"""DNS through the tunnel: zone routing at the edge, the connector's private resolver, and
hostnames under a routed zone reached by TCP flows."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from ramp.store.db import Store
from ramp.testing.loopback import run, tunnel

BIG = [f"record {i} " + "x" * 80 for i in range(20)]  # ~2 KB: too big for plain UDP


def answer(query: dns.message.Message) -> dns.message.Message:
    reply = dns.message.make_response(query)
    q = query.question[0]
    name = q.name.to_text(omit_final_dot=True)
    if name == "app.corp.example" and q.rdtype == dns.rdatatype.A:
        reply.answer.append(dns.rrset.from_text(q.name, 60, "IN", "A", "127.0.0.1"))
    elif name == "big.corp.example" and q.rdtype == dns.rdatatype.TXT:
        reply.answer.append(
            dns.rrset.from_text_list(q.name, 60, "IN", "TXT", [f'"{t}"' for t in BIG])
        )
    elif name.endswith("corp.example"):
        reply.set_rcode(dns.rcode.NXDOMAIN)
    else:
        reply.set_rcode(dns.rcode.REFUSED)
    return reply


class PrivateResolver(asyncio.DatagramProtocol):
    """The private network's resolver: UDP (truncating like a real one) and TCP."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        limit = query.payload if query.edns >= 0 else 512
        wire = answer(query).to_wire(max_size=65535)
        if len(wire) > limit:
            reply = dns.message.make_response(query)
            reply.flags |= dns.flags.TC
            wire = reply.to_wire()
        self.transport.sendto(wire, addr)  # type: ignore[attr-defined]


async def tcp_resolver(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    (n,) = struct.unpack("!H", await r.readexactly(2))
    wire = answer(dns.message.from_wire(await r.readexactly(n))).to_wire()
    w.write(struct.pack("!H", len(wire)) + wire)
    await w.drain()
    w.close()


async def start_resolver() -> tuple[asyncio.DatagramTransport, asyncio.Server, int]:
    loop = asyncio.get_running_loop()
    tcp = await asyncio.start_server(tcp_resolver, "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    udp, _ = await loop.create_datagram_endpoint(PrivateResolver, local_addr=("127.0.0.1", port))
    return udp, tcp, port


def test_dns_and_hostnames_through_the_tunnel(tmp_path: Path) -> None:
    async def main() -> None:
        udp, tcp, rport = await start_resolver()

        async def hello(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"hello from app")
            await w.drain()
            w.close()

        origin = await asyncio.start_server(hello, "127.0.0.1", 0)
        oport = origin.sockets[0].getsockname()[1]
        with Store(tmp_path) as store:
            store.create_tunnel("corp")
            store.add_dns_route("corp.example", "corp")
        async with tunnel(
            tmp_path,
            dns_listen="127.0.0.1:0",
            connector_kw={"dns_resolver": f"127.0.0.1:{rport}"},
        ) as t:
            dport = next(o for o in t.edge.onramps if type(o).__name__ == "DnsServer").port
            q = dns.message.make_query("app.corp.example", "A")
            r = await dns.asyncquery.udp(q, "127.0.0.1", port=dport, timeout=5)
            assert r.id == q.id
            assert [x.to_text() for x in r.answer[0]] == ["127.0.0.1"]
            # NXDOMAIN from the private resolver passes through
            r = await dns.asyncquery.udp(
                dns.message.make_query("nope.corp.example", "A"), "127.0.0.1", port=dport, timeout=5
            )
            assert r.rcode() == dns.rcode.NXDOMAIN
            # outside every routed zone, no upstream: REFUSED
            r = await dns.asyncquery.udp(
                dns.message.make_query("www.example.net", "A"), "127.0.0.1", port=dport, timeout=5
            )
            assert r.rcode() == dns.rcode.REFUSED
            # an answer too big for UDP comes whole over TCP (edge asks the tunnel over TCP)
            r = await dns.asyncquery.tcp(
                dns.message.make_query("big.corp.example", "TXT", use_edns=False),
                "127.0.0.1",
                port=dport,
                timeout=5,
            )
            assert r.answer, r.to_text()
            assert len(r.answer[0]) == len(BIG)
            # a TCP flow to a name only the private resolver knows
            rd, w, rep = await socks_connect_name(t.socks_port, "app.corp.example", oport)
            assert rep == 0
            assert await asyncio.wait_for(rd.read(), 5) == b"hello from app"
            w.close()
        udp.close()
        tcp.close()
        origin.close()

    run(main())


async def socks_connect_name(
    port: int, host: str, dport: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"\x05\x01\x00")
    assert await r.readexactly(2) == b"\x05\x00"
    name = host.encode()
    w.write(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", dport))
    rep = await r.readexactly(4)
    if rep[3] == 1:
        await r.readexactly(6)
    elif rep[3] == 4:
        await r.readexactly(18)
    else:
        await r.readexactly((await r.readexactly(1))[0] + 2)
    return r, w, rep[1]
