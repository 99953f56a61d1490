"""Internal DNS through the tunnel, with real `dig` and `curl` in the client namespace.

The zone corp.example exists only in the private namespace (dnsmasq on 198.51.100.53); the
edge answers it on `--dns-listen` by asking the connector, which asks its resolver. Names
outside every routed zone go to `--dns-upstream`, or get REFUSED without one.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ramp.testing.lab import (
    APP_NAME,
    BIG_NAME,
    BIG_TXT,
    CLIENT_ADDR6,
    DB_NAME,
    DNS_PORT,
    DNS_ZONE,
    EDGE_DNS,
    EDGE_PUBLIC_ADDR,
    EDGE_PUBLIC_ADDR2,
    EDGE_PUBLIC_ADDR6,
    EDGE_PUBLIC_ADDR6_2,
    HTTP_ALT_PORT,
    ORIGIN,
    ORIGIN2,
    ORIGIN_PREFIX,
    PRIVATE_DNS,
    PRIVATE_DNS_ADDR,
    PUBLIC_NAME,
    PUBLIC_NAME_ADDR,
    UPSTREAM_DNS,
    Dig,
    Lab,
    Payload,
    wait_until,
)
from ramp.testing.origins import INDEX_BODY
from ramp.testing.wait import DEADLINE

CONNECTOR_ARGS = ("--connect-timeout", "2")
APP_URL = f"http://{APP_NAME}:{HTTP_ALT_PORT}/"


def start_dns_lab(
    lab: Lab,
    *,
    dns_listen: str = EDGE_DNS,
    dns_route: bool = True,
    resolver_flag: bool = True,
    edge_args: tuple[str, ...] = (),
) -> None:
    """Tunnel "corp" (routes the origins; corp.example when `dns_route`), an edge serving DNS on
    `dns_listen`, one connector whose resolver is the private dnsmasq."""
    token = lab.create_tunnel("corp", [ORIGIN_PREFIX])
    if dns_route:
        lab.add_dns_route(DNS_ZONE, "corp")
    lab.start_edge(
        "--dns-listen", dns_listen, "--audit-log", str(lab.workdir / "audit.jsonl"), *edge_args
    )
    resolver = ("--dns-resolver", PRIVATE_DNS) if resolver_flag else ()
    lab.start_connector(token, *CONNECTOR_ARGS, *resolver)
    lab.wait_tunnel_connections("corp", 1)


@pytest.fixture
def fresh_lab(tmp_path: Path, payload: Payload, lab_opener: Callable[..., Any]) -> Iterator[Lab]:
    """The network only: each test starts ramp its own way."""
    with lab_opener(tmp_path, payload, standard=False) as lab:
        yield lab


@pytest.fixture(scope="module")
def dns_lab(
    tmp_path_factory: pytest.TempPathFactory, payload: Payload, lab_opener: Callable[..., Any]
) -> Iterator[Lab]:
    """corp.example routed to tunnel "corp", edge DNS on 203.0.113.1:53, no upstream."""
    with lab_opener(tmp_path_factory.mktemp("dns"), payload, standard=False) as lab:
        start_dns_lab(lab)
        yield lab


def answered(dig: Dig, address: str) -> bool:
    return dig.status == "NOERROR" and dig.answers("A") == [address]


def dig_until(lab: Lab, *args: str, server: str = EDGE_PUBLIC_ADDR, timeout: float = 10) -> Dig:
    """dig until it gets any answer (the store poll and tunnel registration take a moment)."""
    return wait_until(
        lambda: (d := lab.dig(*args, server=server)).status is not None and d,
        timeout,
        interval=0.2,
        what=f"an answer from the edge to dig {' '.join(args)}",
    )


# --- dig against the edge ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_dig_resolves_a_private_name_through_the_tunnel(dns_lab: Lab) -> None:
    lab = dns_lab
    # The edge itself cannot resolve or reach the private resolver.
    assert lab.edge_ns.run(["dig", f"@{PRIVATE_DNS_ADDR}", APP_NAME], check=False).returncode != 0
    dig = dig_until(lab, APP_NAME)
    assert answered(dig, ORIGIN), dig.output
    assert answered(lab.dig(DB_NAME), ORIGIN2)


@pytest.mark.timeout(60)
def test_dig_over_tcp(dns_lab: Lab) -> None:
    dig = dig_until(dns_lab, "+tcp", APP_NAME)
    assert answered(dig, ORIGIN), dig.output
    assert "(TCP)" in dig.output


@pytest.mark.timeout(60)
def test_an_answer_too_big_for_udp_is_truncated_and_complete_over_tcp(dns_lab: Lab) -> None:
    lab = dns_lab
    want = " ".join(f'"{t}"' for t in BIG_TXT)
    # Over UDP (no retry): the resolver's truncated answer reaches dig with TC set.
    truncated = dig_until(lab, "+ignore", BIG_NAME, "TXT")
    assert truncated.status == "NOERROR", truncated.output
    assert "tc" in truncated.flags, truncated.output
    # dig's default: UDP, then TCP after TC; and TCP from the start.
    for args in ((BIG_NAME, "TXT"), ("+tcp", BIG_NAME, "TXT")):
        dig = lab.dig(*args)
        assert dig.status == "NOERROR", dig.output
        assert dig.answers("TXT") == [want], dig.output
        assert "tc" not in dig.flags


@pytest.mark.timeout(60)
def test_names_outside_routed_zones_are_refused_without_an_upstream(dns_lab: Lab) -> None:
    lab = dns_lab
    dig_until(lab, APP_NAME)
    for name in (PUBLIC_NAME, "corp.example.org", "example"):
        dig = lab.dig(name)
        assert dig.status == "REFUSED", dig.output
        dig = lab.dig("+tcp", name)
        assert dig.status == "REFUSED", dig.output


@pytest.mark.timeout(90)
def test_names_outside_routed_zones_go_to_the_upstream(fresh_lab: Lab) -> None:
    lab = fresh_lab
    lab.start_upstream_dns()
    start_dns_lab(lab, edge_args=("--dns-upstream", UPSTREAM_DNS))
    dig = dig_until(lab, PUBLIC_NAME)
    assert answered(dig, PUBLIC_NAME_ADDR), dig.output
    assert answered(lab.dig("+tcp", PUBLIC_NAME), PUBLIC_NAME_ADDR)
    # The upstream knows nothing of corp.example: these answers come through the tunnel.
    assert answered(lab.dig(APP_NAME), ORIGIN)
    assert answered(lab.dig("+tcp", APP_NAME), ORIGIN)
    # What the upstream refuses, the client sees refused.
    assert lab.dig("unknown.example.net").status == "REFUSED"


@pytest.mark.timeout(90)
def test_route_dns_add_list_delete(fresh_lab: Lab) -> None:
    lab = fresh_lab
    start_dns_lab(lab, dns_route=False)
    assert dig_until(lab, APP_NAME).status == "REFUSED"

    lab.add_dns_route(DNS_ZONE, "corp")
    listing = lab.dns_routes()
    assert DNS_ZONE in listing and "corp" in listing, listing
    wait_until(
        lambda: answered(lab.dig(APP_NAME), ORIGIN),
        DEADLINE,
        interval=0.2,
        what="the edge to pick up the new DNS route",
    )

    lab.delete_dns_route(DNS_ZONE)
    assert DNS_ZONE not in lab.dns_routes()
    wait_until(
        lambda: lab.dig(APP_NAME).status == "REFUSED",
        DEADLINE,
        interval=0.2,
        what="the edge to drop the DNS route",
    )


@pytest.mark.timeout(90)
def test_the_connector_falls_back_to_its_resolv_conf(fresh_lab: Lab) -> None:
    lab = fresh_lab
    lab.private.set_etc_file("resolv.conf", f"nameserver {PRIVATE_DNS_ADDR}\n")
    start_dns_lab(lab, resolver_flag=False)
    dig = dig_until(lab, APP_NAME)
    assert answered(dig, ORIGIN), dig.output


# --- hostnames of proxy requests ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_curl_socks5_hostname_reaches_a_name_only_the_private_dns_knows(dns_lab: Lab) -> None:
    lab = dns_lab
    dig_until(lab, APP_NAME)
    got = lab.curl(*lab.proxy_args("socks5-hostname"), APP_URL, timeout=10)
    assert got.returncode == 0, got.stderr
    assert got.stdout == INDEX_BODY


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["forward", "connect"])
def test_http_proxy_requests_for_private_names(dns_lab: Lab, kind: str) -> None:
    lab = dns_lab
    dig_until(lab, APP_NAME)
    got = lab.curl(*lab.proxy_args(kind), APP_URL, timeout=10)
    assert got.returncode == 0, got.stderr
    assert got.stdout == INDEX_BODY


@pytest.mark.timeout(60)
def test_private_names_do_not_resolve_without_the_dns_route(fresh_lab: Lab) -> None:
    """The control for the tests above: nothing but the DNS route makes the name work."""
    lab = fresh_lab
    start_dns_lab(lab, dns_route=False)
    got = lab.curl(*lab.proxy_args("socks5-hostname"), APP_URL, timeout=10)
    assert got.returncode != 0
    assert got.stdout != INDEX_BODY


# --- source addresses of a wildcard listener --------------------------------------------------


@pytest.mark.timeout(90)
def test_a_wildcard_listener_answers_from_the_address_asked(fresh_lab: Lab) -> None:
    lab = fresh_lab
    lab.add_edge_address(EDGE_PUBLIC_ADDR2)
    start_dns_lab(lab, dns_listen=f"0.0.0.0:{DNS_PORT}")
    dig_until(lab, APP_NAME)
    # dig ignores answers from any other address and then reports no answer (exit code 9).
    for server in (EDGE_PUBLIC_ADDR, EDGE_PUBLIC_ADDR2, EDGE_PUBLIC_ADDR2, EDGE_PUBLIC_ADDR):
        dig = lab.dig(APP_NAME, server=server)
        assert dig.returncode == 0, f"asked {server}:\n{dig.output}"
        assert answered(dig, ORIGIN), dig.output
        assert dig.server() == f"{server}#{DNS_PORT}({server})", dig.output


@pytest.mark.timeout(90)
def test_a_wildcard_ipv6_listener_answers_from_the_address_asked(fresh_lab: Lab) -> None:
    lab = fresh_lab
    lab.add_edge_address(EDGE_PUBLIC_ADDR6_2)
    start_dns_lab(lab, dns_listen=f"[::]:{DNS_PORT}")
    dig_until(lab, "-6", APP_NAME, server=EDGE_PUBLIC_ADDR6)
    for server in (EDGE_PUBLIC_ADDR6, EDGE_PUBLIC_ADDR6_2, EDGE_PUBLIC_ADDR6_2):
        dig = lab.dig("-6", APP_NAME, server=server)
        assert dig.returncode == 0, f"asked {server} from {CLIENT_ADDR6}:\n{dig.output}"
        assert answered(dig, ORIGIN), dig.output


# --- bad input --------------------------------------------------------------------------------

_HEADER_QD1 = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)  # one question follows...
GARBAGE = [
    b"\x00",  # 1 byte
    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00",  # 11 bytes: header cut short
    _HEADER_QD1,  # ...but does not
    _HEADER_QD1 + b"\x3fabc",  # label longer than the message
    _HEADER_QD1 + b"\x03app\x04corp\x07example\x00\x00",  # QTYPE cut short
]


def _bad_dns(lab: Lab) -> float:
    return lab.edge_metrics().value("ramp_bad_input_total", onramp="dns")


@pytest.mark.timeout(60)
def test_garbage_to_the_dns_port_is_counted_and_the_server_keeps_answering(dns_lab: Lab) -> None:
    lab = dns_lab
    dig_until(lab, APP_NAME)
    before = _bad_dns(lab)
    udp = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with udp:
        for junk in GARBAGE:
            udp.sendto(junk, (EDGE_PUBLIC_ADDR, DNS_PORT))
    wait_until(
        lambda: _bad_dns(lab) >= before + len(GARBAGE),
        DEADLINE,
        what=lambda: f"{len(GARBAGE)} more bad DNS inputs counted (now {_bad_dns(lab) - before})",
    )
    assert answered(lab.dig(APP_NAME), ORIGIN)

    # Over TCP the framing stays intact, so the server may answer (FORMERR) and keep the
    # connection for more queries, or close it: either way it counts and keeps serving.
    before = _bad_dns(lab)
    for junk in GARBAGE[1:]:
        with lab.client_socket(timeout=5) as tcp:
            tcp.connect((EDGE_PUBLIC_ADDR, DNS_PORT))
            tcp.sendall(struct.pack("!H", len(junk)) + junk)
            tcp.settimeout(1.0)
            with contextlib.suppress(OSError):
                tcp.recv(4096)
    wait_until(
        lambda: _bad_dns(lab) >= before + len(GARBAGE) - 1,
        DEADLINE,
        what=lambda: f"the bad TCP DNS inputs counted (now {_bad_dns(lab) - before})",
    )
    assert answered(lab.dig(APP_NAME), ORIGIN)
    assert answered(lab.dig("+tcp", APP_NAME), ORIGIN)
    assert lab.edge is not None and lab.edge.alive()


@pytest.mark.timeout(60)
def test_dns_queries_through_the_tunnel_show_in_the_udp_metrics(dns_lab: Lab) -> None:
    lab = dns_lab
    dig_until(lab, APP_NAME)
    for side in (lab.edge, lab.connectors[0]):
        assert side is not None
        m = side.metrics()
        assert m.has("ramp_udp_sessions_active"), side.role
        assert m.value("ramp_udp_datagrams_total", direction="up") >= 1, side.role
        assert m.value("ramp_udp_datagrams_total", direction="down") >= 1, side.role
        assert m.value("ramp_udp_bytes_total", direction="down") >= 30, side.role
