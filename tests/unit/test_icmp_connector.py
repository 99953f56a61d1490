"""The connector's ICMP parts without a network: the echo id table, the error-queue and TTL
control messages, PACKET datagrams, the registration's capability words, and how replies and
router errors become packets for the client."""

from __future__ import annotations

import ipaddress
import socket
import struct
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ramp.flows.echo_nat import EchoTable, TableFull
from ramp.net import ping
from ramp.offramps.icmp import ConnectorIcmp
from ramp.testing.mutate import mutated
from ramp.wire import ip
from ramp.wire.tunnel import (
    CAP_IP_PACKETS,
    DatagramKind,
    ProtocolError,
    Register,
    capabilities,
    encode_frame,
    encode_packet_datagram,
    is_packet_datagram,
    parse_datagram,
    parse_frame,
    parse_packet_datagram,
    with_capabilities,
)

A = ipaddress.ip_address("100.96.0.2")
B = ipaddress.ip_address("100.96.0.3")
ORIGIN = ipaddress.ip_address("198.51.100.10")


def test_two_clients_with_one_echo_id_get_two_ids_on_the_wire() -> None:
    table = EchoTable(limit=10, idle_timeout=10)
    a = table.add(("edge", "default", A, ORIGIN, 7), table.free_ident(ORIGIN), now=0)
    b = table.add(("edge", "default", B, ORIGIN, 7), table.free_ident(ORIGIN), now=0)
    assert a.local_ident != b.local_ident
    assert table.by_reply(ORIGIN, a.local_ident) is a
    assert table.by_reply(ORIGIN, b.local_ident) is b
    assert (a.client_ident, b.client_ident) == (7, 7)


def test_an_id_in_use_to_one_origin_is_refused_and_the_limit_holds() -> None:
    table = EchoTable(limit=2, idle_timeout=10)
    table.add(("e", "default", A, ORIGIN, 1), 500, now=0)
    with pytest.raises(TableFull):
        table.add(("e", "default", B, ORIGIN, 1), 500, now=0)
    table.add(("e", "default", B, ORIGIN, 1), 501, now=0)
    with pytest.raises(TableFull):
        table.add(("e", "default", B, ORIGIN, 2), 502, now=0)


def test_idle_flows_expire_and_free_their_ids() -> None:
    table = EchoTable(limit=10, idle_timeout=10)
    old = table.add(("e", "default", A, ORIGIN, 1), 9, now=0)
    fresh = table.add(("e", "default", B, ORIGIN, 1), 10, now=0)
    fresh.last_active = 8
    assert table.expire(now=12) == [old]
    assert table.by_reply(ORIGIN, 9) is None and table.by_reply(ORIGIN, 10) is fresh
    assert len(table) == 1


def _errqueue_cmsg(family: int, icmp_type: int, code: int, info: int, offender: str) -> bytes:
    ee = struct.pack(
        "=IBBBBII", 113, 2 if family == socket.AF_INET else 3, icmp_type, code, 0, info, 0
    )
    if family == socket.AF_INET:
        addr = struct.pack("=H", socket.AF_INET) + b"\0\0" + socket.inet_aton(offender) + b"\0" * 8
    else:
        addr = struct.pack("=HHI", socket.AF_INET6, 0, 0) + socket.inet_pton(
            socket.AF_INET6, offender
        )
        addr += b"\0" * 4
    return ee + addr


def test_a_routers_error_is_read_from_the_error_queue_message() -> None:
    data = _errqueue_cmsg(socket.AF_INET, 11, 0, 0, "198.51.100.2")
    err = ping.parse_queued_error([(ping.SOL_IP, ping.IP_RECVERR, data)])
    assert err == ping.QueuedError(11, 0, 0, ipaddress.ip_address("198.51.100.2"))
    data6 = _errqueue_cmsg(socket.AF_INET6, 2, 0, 1400, "2001:db8:198:1::2")
    err6 = ping.parse_queued_error([(ping.SOL_IPV6, ping.IPV6_RECVERR, data6)])
    assert err6 is not None and err6.info == 1400 and str(err6.offender) == "2001:db8:198:1::2"


def test_local_errors_and_short_messages_are_not_router_errors() -> None:
    local = bytearray(_errqueue_cmsg(socket.AF_INET, 0, 0, 0, "0.0.0.0"))
    local[4] = 1  # SO_EE_ORIGIN_LOCAL
    assert ping.parse_queued_error([(ping.SOL_IP, ping.IP_RECVERR, bytes(local))]) is None
    assert ping.parse_queued_error([(ping.SOL_IP, ping.IP_RECVERR, b"\0" * 10)]) is None
    assert ping.parse_queued_error([]) is None


def test_the_received_ttl_comes_from_its_control_message() -> None:
    assert ping.received_ttl([(ping.SOL_IP, ping.IP_TTL, struct.pack("=i", 63))]) == 63
    assert ping.received_ttl([(ping.SOL_IPV6, ping.IPV6_HOPLIMIT, struct.pack("=i", 1))]) == 1
    assert ping.received_ttl([]) is None


@given(st.binary(min_size=20, max_size=2000), st.sampled_from(["default", "", "tenant-a"]))
def test_packet_datagrams_round_trip(packet: bytes, vnet: str) -> None:
    data = encode_packet_datagram(packet, vnet or "default")
    assert is_packet_datagram(data) and data[0] == DatagramKind.PACKET
    got = parse_packet_datagram(data)
    assert (got.packet, got.vnet) == (packet, vnet or "default")


def test_a_packet_datagram_is_never_taken_for_a_session_datagram() -> None:
    with pytest.raises(ProtocolError, match="PACKET"):
        parse_datagram(encode_packet_datagram(ip.build_echo(A, ORIGIN, 1, 1, b"", False)))
    with pytest.raises(ProtocolError, match="holds no IP packet"):
        parse_packet_datagram(encode_packet_datagram(b"short"))


valid = st.builds(
    lambda p, v: encode_packet_datagram(p, v),
    st.binary(min_size=20, max_size=200),
    st.sampled_from(["default", "tenant-a"]),
)


@given(mutated(valid))
def test_damaged_packet_datagrams_raise_only_protocol_errors(data: bytes) -> None:
    try:
        got = parse_packet_datagram(data)
    except ProtocolError:
        return
    assert len(got.packet) >= 20


def test_capabilities_are_words_of_the_client_info_an_old_edge_reads_as_text() -> None:
    info = with_capabilities("ramp/1.0 host-a", {CAP_IP_PACKETS})
    assert capabilities(info) == {CAP_IP_PACKETS}
    assert capabilities("ramp/0.9 host-a") == frozenset()
    # the REGISTER frame an edge of any version parses, unchanged in layout
    frame = Register(uuid.uuid4(), uuid.uuid4(), 0, b"s" * 32, client_info=info)
    parsed, _ = parse_frame(encode_frame(frame))
    assert parsed == frame


class _Link:
    """The tunnel connection as the ICMP off-ramp sees it: what it sends back is kept."""

    edge_id = "edge-1"
    closed = False

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send_datagram(self, data: bytes) -> bool:
        self.sent.append(data)
        return True


def _icmp_with_flow(dst):
    icmp = ConnectorIcmp()
    link = _Link()
    flow = icmp.table.add(
        ("edge-1", "default", A if dst.version == 4 else A6, dst, 0x1111), 0x2222, 0
    )
    flow.link = link
    return icmp, link, flow


A6 = ipaddress.ip_address("fd00:96::2")
ROUTER = ipaddress.ip_address("198.51.100.2")


def test_a_routers_time_exceeded_about_our_echo_goes_to_the_client_about_its_own():
    icmp, link, flow = _icmp_with_flow(ORIGIN)
    # what the raw socket reads: R's error quoting the request the connector sent (its id)
    ours = ip.build_echo(
        ipaddress.ip_address("198.51.100.1"), ORIGIN, 0x2222, 5, b"probe", False, ttl=1
    )
    error = ip.build_icmp_error(ours, ROUTER, "time_exceeded")
    icmp._raw_v4(error)
    (datagram,) = link.sent
    back = ip.parse_packet(parse_packet_datagram(datagram).packet)
    got = ip.parse_icmp(back)
    assert (back.src, back.dst, got.type, got.code) == (ROUTER, A, 11, 0)
    quoted = ip.quoted_echo(got)
    assert quoted is not None
    assert (quoted[0].src, quoted[0].dst, quoted[1].ident, quoted[1].seq) == (A, ORIGIN, 0x1111, 5)
    assert quoted[1].data == b"probe"
    assert flow.errors == 1


def test_an_echo_reply_gets_the_clients_id_and_keeps_its_ttl():
    icmp, link, _ = _icmp_with_flow(ORIGIN)
    reply = ip.build_echo(
        ORIGIN, ipaddress.ip_address("198.51.100.1"), 0x2222, 9, b"pong", True, ttl=61
    )
    icmp._raw_v4(reply)
    (datagram,) = link.sent
    back = ip.parse_packet(parse_packet_datagram(datagram).packet)
    got = ip.parse_icmp(back)
    assert (back.src, back.dst, back.ttl) == (ORIGIN, A, 61)
    assert (got.ident, got.seq, got.data, got.is_echo_reply) == (0x1111, 9, b"pong", True)


def test_replies_and_errors_for_ids_of_no_flow_are_not_passed_on():
    icmp, link, _ = _icmp_with_flow(ORIGIN)
    icmp._raw_v4(ip.build_echo(ORIGIN, A, 0x3333, 1, b"", True))  # another program's ping
    other = ip.build_echo(A, ORIGIN, 0x3333, 1, b"", False)
    icmp._raw_v4(ip.build_icmp_error(other, ROUTER, "time_exceeded"))
    icmp._raw_v4(ip.build_icmp(ORIGIN, A, 13, 0, 0, b"\0" * 12))  # not an echo reply or error
    assert link.sent == []


def test_an_ipv6_packet_too_big_keeps_its_mtu():
    origin6 = ipaddress.ip_address("2001:db8:198::10")
    router6 = ipaddress.ip_address("2001:db8:198:1::2")
    icmp, link, _ = _icmp_with_flow(origin6)
    ours = ip.build_echo(
        ipaddress.ip_address("2001:db8:198:1::1"), origin6, 0x2222, 3, b"x" * 1300, False
    )
    error = ip.build_icmp_error(ours, router6, "packet_too_big", mtu=1280)
    packet = ip.parse_packet(error)
    icmp._raw_v6(packet.payload, router6, [])
    back = ip.parse_packet(parse_packet_datagram(link.sent[0]).packet)
    got = ip.parse_icmp(back)
    assert (back.src, back.dst, got.type, got.mtu) == (router6, A6, 2, 1280)
