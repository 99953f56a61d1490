"""ICMP through the tunnel to private hosts behind a router: an edge (in this process, in the
edge namespace) sends client packets with its packet API, a real connector in P answers with
ping sockets (ping_group_range allowing them) or a raw socket (the kernel's default `1 0`
forbidding them), and the router R between P and the origins shows up as a hop."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterator

import pytest

from ramp.edge import Edge
from ramp.testing.edge_thread import EdgeThread
from ramp.testing.lab import (
    ORIGIN,
    ORIGIN6,
    ORIGIN6_PREFIX,
    ORIGIN_PREFIX,
    PRIVATE_ROUTER_ADDR,
    PRIVATE_ROUTER_ADDR6,
    ROUTER_ADDR,
    ROUTER_ADDR6,
    Lab,
    wait_until,
)
from ramp.testing.wait import until
from ramp.wire import ip

CLIENT = ipaddress.ip_address("100.96.0.2")  # addresses an edge would assign to clients
CLIENT_B = ipaddress.ip_address("100.96.0.3")
CLIENT6 = ipaddress.ip_address("fd00:96::2")
TARGET = ipaddress.ip_address(ORIGIN)
TARGET6 = ipaddress.ip_address(ORIGIN6)


@pytest.fixture(scope="module", params=["ping_sockets", "raw_socket"])
def icmp_lab(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, lab_opener
) -> Iterator[tuple[Lab, EdgeThread, str]]:
    mode = request.param
    with lab_opener(
        tmp_path_factory.mktemp(f"icmp-{mode}"),
        None,
        standard=False,
        lab_kwargs={"router": True, "private_dns": False},
    ) as lab:
        if mode == "ping_sockets":
            lab.set_ping_group_range(lab.private, 0, 2147483647)
        else:
            lab.set_ping_group_range(lab.private, 1, 0)
        token = lab.create_tunnel("corp", [ORIGIN_PREFIX, ORIGIN6_PREFIX])
        edge = EdgeThread(lab)
        try:
            lab.start_connector(token)
            edge.call(
                lambda e: until(lambda: e.tunnels.count() >= 1, what="a registered connector")
            )
            yield lab, edge, mode
        finally:
            edge.close()


def _tunnel_id(edge: EdgeThread) -> str:
    return edge.call(_first_tunnel)


async def _first_tunnel(e: Edge) -> str:
    assert e.tunnels is not None
    return next(iter(e.tunnels.tunnels))


def _exchange(edge: EdgeThread, packets: list[bytes], want: Callable[[ip.Packet], bool], n: int):
    """Send `packets` through the edge's packet API; the first `n` packets back that `want`."""
    tunnel = _tunnel_id(edge)
    edge.received.clear()

    async def go(e: Edge) -> None:
        assert e.packets is not None
        for p in packets:
            assert e.packets.send(tunnel, p), "the edge found no connector taking packets"

    edge.call(go)

    def matching() -> list[ip.Packet]:
        got = [ip.parse_packet(p) for _, p in list(edge.received)]
        return [p for p in got if want(p)]

    wait_until(lambda: len(matching()) >= n, 20, what=f"{n} packets back from the connector")
    return matching()[:n]


@pytest.mark.parametrize(
    ("src", "dst"), [(CLIENT, TARGET), (CLIENT6, TARGET6)], ids=["ipv4", "ipv6"]
)
def test_five_echoes_to_a_private_origin_all_come_back_with_their_ttl(icmp_lab, src, dst):
    _, edge, _ = icmp_lab
    requests = [ip.build_echo(src, dst, 0x1234, seq, b"ramp-ping", False) for seq in range(5)]
    replies = _exchange(edge, requests, lambda p: p.src == dst, 5)
    icmps = [ip.parse_icmp(p) for p in replies]
    assert sorted(i.seq for i in icmps) == [0, 1, 2, 3, 4]  # 0 % loss
    assert all(i.is_echo_reply and i.ident == 0x1234 and i.data == b"ramp-ping" for i in icmps)
    assert all(p.dst == src for p in replies)
    # the origin answers with 64; its reply crossed the router once and keeps that TTL
    assert {p.ttl for p in replies} == {63}


def test_the_connector_says_which_echo_sockets_it_uses(icmp_lab):
    lab, _, mode = icmp_lab
    connector = lab.connectors[0]
    status, body = connector.http_get("/ready")
    assert status == 200
    icmp = json.loads(body)["icmp"]
    metrics = connector.metrics()
    if mode == "ping_sockets":
        assert icmp["ipv4"] == "ping_socket"
        assert metrics.value("ramp_icmp_mode", family="ipv4", mode="ping_socket") == 1
    else:
        assert icmp["ipv4"].startswith("raw_socket: ping sockets are not permitted")
        assert "'1 0'" in icmp["ipv4"]
        assert metrics.value("ramp_icmp_mode", family="ipv4", mode="raw_socket") == 1
        assert "ping sockets are not permitted" in connector.stderr()


@pytest.mark.parametrize(
    ("src", "dst", "connector", "router"),
    [
        (CLIENT, TARGET, PRIVATE_ROUTER_ADDR, ROUTER_ADDR),
        (CLIENT6, TARGET6, PRIVATE_ROUTER_ADDR6, ROUTER_ADDR6),
    ],
    ids=["ipv4", "ipv6"],
)
def test_low_ttls_expire_at_the_connector_then_at_the_router(icmp_lab, src, dst, connector, router):
    _, edge, _ = icmp_lab
    hops = []
    for ttl in (1, 2, 3):
        probe = ip.build_echo(src, dst, 0x7777, 100 + ttl, b"traceroute", False, ttl=ttl)
        (answer,) = _exchange(edge, [probe], lambda p: True, 1)
        icmp = ip.parse_icmp(answer)
        assert answer.dst == src
        if icmp.is_error:
            quoted = ip.quoted_echo(icmp)
            assert quoted is not None, "the error quotes the client's probe"
            assert (quoted[1].ident, quoted[1].seq) == (0x7777, 100 + ttl)
            assert quoted[0].src == src and quoted[0].dst == dst
            time_exceeded = ip.ICMP_TIME_EXCEEDED if src.version == 4 else ip.ICMPV6_TIME_EXCEEDED
            assert icmp.type == time_exceeded
        else:
            assert icmp.is_echo_reply and icmp.seq == 100 + ttl
        hops.append(str(answer.src))
    assert hops == [connector, router, str(dst)]


def test_two_sources_with_the_same_echo_id_each_get_only_their_own_replies(icmp_lab):
    _, edge, _ = icmp_lab
    requests = []
    for seq in range(3):
        requests.append(ip.build_echo(CLIENT, TARGET, 0x4242, seq, b"from-a", False))
        requests.append(ip.build_echo(CLIENT_B, TARGET, 0x4242, seq, b"from-b", False))
    replies = _exchange(edge, requests, lambda p: p.src == TARGET, 6)
    by_client: dict[str, list[ip.Icmp]] = {}
    for p in replies:
        by_client.setdefault(str(p.dst), []).append(ip.parse_icmp(p))
    assert sorted(i.seq for i in by_client[str(CLIENT)]) == [0, 1, 2]
    assert sorted(i.seq for i in by_client[str(CLIENT_B)]) == [0, 1, 2]
    assert all(i.data == b"from-a" and i.ident == 0x4242 for i in by_client[str(CLIENT)])
    assert all(i.data == b"from-b" and i.ident == 0x4242 for i in by_client[str(CLIENT_B)])


def test_icmp_other_than_echo_is_dropped_and_counted(icmp_lab):
    lab, edge, _ = icmp_lab
    connector = lab.connectors[0]
    before = connector.metrics().value("ramp_icmp_drops_total", reason="not_echo_request")
    timestamp = ip.build_icmp(CLIENT, TARGET, 13, 0, 0x00010001, b"\0" * 12)
    unreachable = ip.build_icmp_error(
        ip.build_udp(CLIENT, TARGET, 5000, 53, b"q"), CLIENT, "port_unreachable"
    )
    marker = ip.build_echo(CLIENT, TARGET, 0x5151, 1, b"after", False)
    # the echo after them still works, and is the only answer
    replies = _exchange(edge, [timestamp, unreachable, marker], lambda p: True, 1)
    assert ip.parse_icmp(replies[0]).ident == 0x5151
    wait_until(
        lambda: (
            connector.metrics().value("ramp_icmp_drops_total", reason="not_echo_request")
            >= before + 2
        ),
        10,
        what="two drops counted",
    )
    assert all(ip.parse_icmp(ip.parse_packet(p)).ident == 0x5151 for _, p in edge.received)


def test_a_big_echo_with_df_gets_fragmentation_needed_and_one_without_df_gets_through(icmp_lab):
    # Last in the module: it leaves P with a path MTU of 1,000 toward the origins learnt.
    lab, edge, _ = icmp_lab
    for ns, dev in ((lab.router_ns, "to-origins"), (lab.origin_ns, "to-router")):
        ns.ip("link", "set", dev, "mtu", "1000")
    data = b"m" * 1200
    no_df = bytearray(ip.build_echo(CLIENT, TARGET, 0x3131, 1, data, False))
    no_df[6] &= ~0x40
    no_df[10:12] = b"\0\0"
    no_df[10:12] = ip.checksum(no_df[:20]).to_bytes(2, "big")
    (reply,) = _exchange(edge, [bytes(no_df)], lambda p: True, 1)
    icmp = ip.parse_icmp(reply)
    assert icmp.is_echo_reply and icmp.data == data  # fragmented on the way and back
    answers = []
    for seq in (2, 3):
        with_df = ip.build_echo(CLIENT, TARGET, 0x3131, seq, data, False)  # DF set
        (answer,) = _exchange(edge, [with_df], lambda p: True, 1)
        icmp = ip.parse_icmp(answer)
        assert (icmp.type, icmp.code, icmp.mtu) == (ip.ICMP_DEST_UNREACHABLE, 4, 1000)
        quoted = ip.quoted_echo(icmp)
        assert quoted is not None and quoted[1].seq == seq and answer.dst == CLIENT
        answers.append(str(answer.src))
    # the router tells first; then the connector knows the path MTU and answers itself
    assert answers == [ROUTER_ADDR, PRIVATE_ROUTER_ADDR]
