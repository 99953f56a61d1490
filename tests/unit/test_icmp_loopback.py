"""ICMP through a real tunnel on loopback: an in-process edge sends client echo requests with
its packet API (`Edge.packets.send`) and gets the connector's packets back on `on_packet`."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from ramp.testing.loopback import run, tunnel
from ramp.testing.wait import until
from ramp.tunnel.connector_side import TunnelClient
from ramp.wire import ip

CLIENT = ipaddress.IPv4Address("100.96.0.2")  # a client address the edge would have assigned
TARGET = ipaddress.IPv4Address("127.0.0.1")


def _tunnel_id(t) -> str:
    return next(iter(t.edge.tunnels.tunnels))


def test_echo_through_the_tunnel_comes_back_to_the_client_with_its_echo_id(tmp_path: Path):
    async def main() -> None:
        async with tunnel(tmp_path, ha=1) as t:
            got: list[bytes] = []
            t.edge.packets.on_packet = lambda tunnel_id, packet: got.append(packet)
            tid = _tunnel_id(t)
            for seq in range(3):
                request = ip.build_echo(CLIENT, TARGET, 0xBEEF, seq, b"hello", False, ttl=64)
                assert t.edge.packets.send(tid, request)
            await until(lambda: len(got) >= 3, what="three echo replies")
            replies = [ip.parse_icmp(ip.parse_packet(p)) for p in got]
            assert sorted(r.seq for r in replies) == [0, 1, 2]
            for raw, r in zip(got, replies, strict=True):
                packet = ip.parse_packet(raw)
                assert (packet.src, packet.dst) == (TARGET, CLIENT)
                assert r.is_echo_reply and r.ident == 0xBEEF and r.data == b"hello"

    run(main())


def test_ttl_1_is_answered_with_time_exceeded_from_the_connector(tmp_path: Path):
    async def main() -> None:
        async with tunnel(tmp_path, ha=1) as t:
            got: list[bytes] = []
            t.edge.packets.on_packet = lambda tunnel_id, packet: got.append(packet)
            request = ip.build_echo(CLIENT, TARGET, 7, 1, b"probe", False, ttl=1)
            assert t.edge.packets.send(_tunnel_id(t), request)
            await until(lambda: got, what="an ICMP error")
            packet = ip.parse_packet(got[0])
            icmp = ip.parse_icmp(packet)
            assert (icmp.type, icmp.code) == (ip.ICMP_TIME_EXCEEDED, 0)
            assert packet.src == TARGET and packet.dst == CLIENT  # the connector's own address
            quoted = ip.quoted_echo(icmp)
            assert quoted is not None and (quoted[1].ident, quoted[1].seq) == (7, 1)

    run(main())


def test_icmp_other_than_echo_requests_is_dropped_and_counted(tmp_path: Path):
    async def main() -> None:
        async with tunnel(tmp_path, ha=1) as t:
            got: list[bytes] = []
            t.edge.packets.on_packet = lambda tunnel_id, packet: got.append(packet)
            tid = _tunnel_id(t)
            drops = t.connector.metrics.icmp_drops
            timestamp = ip.build_icmp(CLIENT, TARGET, 13, 0, 0, b"\0" * 12)
            reply = ip.build_echo(CLIENT, TARGET, 1, 1, b"", True)
            assert t.edge.packets.send(tid, timestamp)
            assert t.edge.packets.send(tid, reply)
            await until(
                lambda: drops.labels("not_echo_request")._value.get() == 2,
                what="two drops counted",
            )
            bad = bytearray(ip.build_echo(CLIENT, TARGET, 1, 1, b"x", False))
            bad[-1] ^= 1
            assert t.edge.packets.send(tid, bytes(bad))
            await until(lambda: drops.labels("bad_checksum")._value.get() == 1, what="a drop")
            # and the path still works afterwards
            assert t.edge.packets.send(tid, ip.build_echo(CLIENT, TARGET, 2, 9, b"", False))
            await until(lambda: got, what="an echo reply")
            assert ip.parse_icmp(ip.parse_packet(got[0])).seq == 9

    run(main())


def test_an_idle_echo_flow_is_closed_after_the_idle_timeout(tmp_path: Path):
    async def main() -> None:
        async with tunnel(tmp_path, ha=1, connector_kw={"icmp_idle_timeout": 0.5}) as t:
            got: list[bytes] = []
            t.edge.packets.on_packet = lambda tunnel_id, packet: got.append(packet)
            request = ip.build_echo(CLIENT, TARGET, 0x0A0A, 1, b"", False)
            assert t.edge.packets.send(_tunnel_id(t), request)
            await until(lambda: got, what="an echo reply")
            assert len(t.connector.icmp.table) == 1
            await until(lambda: len(t.connector.icmp.table) == 0, what="the flow to expire")
            assert t.connector.metrics.icmp_flows_active._value.get() == 0
            assert t.connector.metrics.icmp_flows.labels("ok")._value.get() == 1

    run(main())


def test_a_connector_that_predates_ip_packets_is_told_apart_at_registration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # what connectors before PACKET datagrams sent: version and host, no "+ip-packets"
    monkeypatch.setattr(TunnelClient, "client_info", lambda self: "ramp/0.9 old-host")

    async def main() -> None:
        async with tunnel(tmp_path, ha=1) as t:
            m = t.edge.metrics
            assert m.connectors_without_packets.labels("corp")._value.get() == 1
            request = ip.build_echo(CLIENT, TARGET, 1, 1, b"", False)
            assert not t.edge.packets.send(_tunnel_id(t), request)
            assert m.tunnel_packet_drops.labels("connector_predates_packets")._value.get() == 1
            # and the edge sent it nothing it could not read
            assert (
                t.connector.metrics.bad_input.labels("tunnel", "malformed_datagram")._value.get()
                == 0
            )

    run(main())
