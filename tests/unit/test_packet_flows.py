"""The edge's packet flow table: keys, per-protocol idle expiry, TCP closing, the size limit."""

from __future__ import annotations

import ipaddress

import pytest

from ramp.flows.flow import Destination, Flow
from ramp.flows.packet_flows import FIN, RST, FlowLimit, PacketFlows, PacketKey

A = ipaddress.ip_address
CLIENT = A("192.0.2.5")
PEER = A("198.51.100.10")


def _flow() -> Flow:
    return Flow(onramp="masque", source=("203.0.113.2", 5000), destination=Destination("x", 1))


def test_keys_tell_flows_apart_by_protocol_addresses_and_ports() -> None:
    table = PacketFlows(10)
    udp = PacketKey(17, CLIENT, 4000, PEER, 53)
    echo = PacketKey(1, CLIENT, 7, PEER, 7)
    table.add(udp, _flow(), 0.0)
    table.add(echo, _flow(), 0.0)
    assert table.get(PacketKey(17, CLIENT, 4000, PEER, 53)) is not None
    assert table.get(PacketKey(17, CLIENT, 4001, PEER, 53)) is None
    assert table.get(PacketKey(1, CLIENT, 8, PEER, 8)) is None  # another echo id
    assert table.get(PacketKey(1, A("192.0.2.6"), 7, PEER, 7)) is None  # another client
    with pytest.raises(KeyError):
        table.add(udp, _flow(), 1.0)
    assert str(udp) == "udp 192.0.2.5:4000 -> 198.51.100.10:53"


def test_idle_expiry_is_per_protocol_and_traffic_keeps_a_flow() -> None:
    table = PacketFlows(10, icmp_idle=10.0, udp_idle=30.0, tcp_idle=100.0)
    echo = PacketKey(1, CLIENT, 7, PEER, 7)
    udp = PacketKey(17, CLIENT, 4000, PEER, 53)
    tcp = PacketKey(6, CLIENT, 4000, PEER, 80)
    for key in (echo, udp, tcp):
        table.add(key, _flow(), 0.0)
    assert table.expire(9.9) == []
    table.touch(udp, 5.0)
    assert [pf.key for pf in table.expire(10.0)] == [echo]
    assert table.expire(34.9) == []
    assert [pf.key for pf in table.expire(35.0)] == [udp]
    assert [pf.key for pf in table.expire(100.0)] == [tcp]
    assert len(table) == 0


def test_tcp_ends_after_fin_both_ways_or_rst_and_a_linger() -> None:
    table = PacketFlows(10, tcp_linger=2.0)
    a = table.add(PacketKey(6, CLIENT, 1, PEER, 80), _flow(), 0.0)
    b = table.add(PacketKey(6, CLIENT, 2, PEER, 80), _flow(), 0.0)
    a.saw_tcp_flags(FIN, True, 1.0)
    assert a.closing_since is None  # half closed: data may still flow the other way
    a.saw_tcp_flags(FIN, False, 3.0)
    b.saw_tcp_flags(RST, False, 4.0)
    assert [pf.key.sport for pf in table.expire(5.0)] == [1]
    assert [pf.key.sport for pf in table.expire(6.0)] == [2]


def test_the_table_is_bounded() -> None:
    table = PacketFlows(2)
    table.add(PacketKey(17, CLIENT, 1, PEER, 53), _flow(), 0.0)
    table.add(PacketKey(17, CLIENT, 2, PEER, 53), _flow(), 0.0)
    with pytest.raises(FlowLimit):
        table.add(PacketKey(17, CLIENT, 3, PEER, 53), _flow(), 0.0)
    table.remove(PacketKey(17, CLIENT, 1, PEER, 53))
    table.add(PacketKey(17, CLIENT, 3, PEER, 53), _flow(), 0.0)
    assert [pf.key.sport for pf in table.of_client(CLIENT)] == [2, 3]
