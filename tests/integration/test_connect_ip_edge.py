"""connect-ip at the edge with real programs: a connect-ip session (aioquic, tests/integration/
ip_bridge.py) puts a TUN device with the assigned address and the advertised routes into the
client namespace, and plain dig and curl there reach the private network through it: UDP rides
the tunnel's UDP sessions, TCP is upgraded to kernel sockets in the edge's own namespace."""

from __future__ import annotations

import errno
import ipaddress
import socket

from ip_bridge import ip_bridge

from ramp.client_token import decode_client_token
from ramp.testing.lab import (
    APP_NAME,
    CLOSED_PORT,
    EDGE_PUBLIC_ADDR,
    MASQUE_PORT,
    ORIGIN,
    ORIGIN2,
    ORIGIN6,
    ORIGIN6_PREFIX,
    PRIVATE_DNS_ADDR,
    Lab,
    Payload,
    wait_until,
)

N = ipaddress.ip_network


def _bearer(lab: Lab, name: str) -> str:
    return decode_client_token(lab.client_token(name)).bearer


def test_dig_and_curl_reach_private_hosts_through_the_tun_device(
    lab: Lab, payload: Payload
) -> None:
    with ip_bridge(lab.client, EDGE_PUBLIC_ADDR, MASQUE_PORT, _bearer(lab, "alice")) as b:
        assert b.status == 200
        v4 = next(a for a in b.addresses if a.version == 4)
        assert v4.prefixlen == 32 and v4.network_address in N("100.96.0.0/12")
        assert b.routes == [N("198.51.100.0/24")]  # the tunnel's route; the policy allows all
        shown = lab.client.ip("-o", "address", "show", "dev", b.tun_name)
        assert str(v4) in shown
        # UDP: the private DNS server answers through the tunnel's UDP session
        dig = lab.client.run(
            ["dig", "+short", "+time=5", "+tries=1", f"@{PRIVATE_DNS_ADDR}", APP_NAME],
            check=False,
        )
        assert dig.stdout.decode().split() == [ORIGIN], dig.stderr
        # TCP: upgraded at the edge; the page arrives whole
        got = lab.curl_digest(f"http://{ORIGIN}/{payload.small.name}", timeout=60)
        assert got.returncode == 0, got.stderr
        assert (got.size, got.sha256) == (payload.small.size, payload.small.sha256)

        # a refused origin port: the edge answers the SYN with port unreachable, so the
        # client's connect() is refused at once, as with a direct connection
        sock = lab.client.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(20)
        try:
            assert sock.connect_ex((ORIGIN, CLOSED_PORT)) == errno.ECONNREFUSED
        finally:
            sock.close()

        # both went down the edge's flow path: audited with the identity and the origin
        def audited() -> list[dict[str, object]]:
            return [
                r
                for r in lab.audit_records()
                if r.get("identity") == "alice"
                and r.get("protocol") == "tcp"
                and r.get("destination") == f"{ORIGIN}:80"
            ]

        records = wait_until(audited, 30, what="the TCP flow's audit line")
        assert records[0]["onramp"] == "masque" and records[0]["result"] == "ok"
        assert int(records[0]["bytes_down"]) >= payload.small.size  # type: ignore[call-overload]


def test_one_allowed_address_is_the_only_route_and_others_are_prohibited(lab: Lab) -> None:
    lab.add_rule("alice-one", "allow", identity="alice", to=f"{ORIGIN}/32")
    lab.delete_rule("default")  # everything else denied
    with ip_bridge(lab.client, EDGE_PUBLIC_ADDR, MASQUE_PORT, _bearer(lab, "alice")) as b:
        # (the edge may take a store poll to see the new rules: then it re-advertises)
        wait_until(lambda: b.routes == [N(f"{ORIGIN}/32")], 30, what="the /32 route only")
        # force a packet elsewhere into the device: the edge answers administratively
        # prohibited, which makes connect() fail at once instead of timing out
        lab.client.ip("route", "add", f"{ORIGIN2}/32", "dev", b.tun_name)
        sock = lab.client.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(20)
        try:
            err = sock.connect_ex((ORIGIN2, 80))
        finally:
            sock.close()
        assert err == errno.EHOSTUNREACH, err  # ICMP type 3 code 13
        assert (
            lab.edge_metrics().value(
                "ramp_connect_ip_packets_dropped_total", reason="not_advertised"
            )
            >= 1
        )
        # the allowed one works
        ok = lab.curl("-o", "/dev/null", "-w", "%{http_code}", f"http://{ORIGIN}/")
        assert ok.stdout == b"200", ok.stderr
        # policy changes reach the client: allow the second origin too
        updates = b.updates
        lab.add_rule("alice-two", "allow", identity="alice", to=f"{ORIGIN2}/32")
        wait_until(lambda: b.updates > updates, 30, what="a new route advertisement")
        both = [N(f"{ORIGIN}/32"), N(f"{ORIGIN2}/32")]
        assert list(ipaddress.collapse_addresses(b.routes)) == list(  # type: ignore[arg-type]
            ipaddress.collapse_addresses(both)
        )


def test_ping_and_ipv6_through_the_tun_device(lab: Lab, payload: Payload) -> None:
    lab.add_route(ORIGIN6_PREFIX, "corp")
    with ip_bridge(lab.client, EDGE_PUBLIC_ADDR, MASQUE_PORT, _bearer(lab, "alice")) as b:
        wait_until(lambda: N(ORIGIN6_PREFIX) in b.routes, 30, what="the IPv6 route")
        v6 = next(a for a in b.addresses if a.version == 6)
        wait_until(
            lambda: str(v6) in lab.client.ip("-o", "address", "show", "dev", b.tun_name),
            30,
            what="the IPv6 address on the device",
        )
        for target in (ORIGIN, ORIGIN6):
            ping = lab.client.run(["ping", "-c", "3", "-W", "5", "-i", "0.2", target], check=False)
            out = ping.stdout.decode()
            assert ping.returncode == 0 and " 0% packet loss" in out, out
        got = lab.curl_digest(f"http://[{ORIGIN6}]/{payload.small.name}", timeout=60)
        assert got.returncode == 0, got.stderr
        assert got.sha256 == payload.small.sha256
        dig = lab.client.run(
            ["dig", "+short", "+time=5", "+tries=1", f"@{PRIVATE_DNS_ADDR}", APP_NAME],
            check=False,
        )
        assert dig.stdout.decode().split() == [ORIGIN], dig.stderr
