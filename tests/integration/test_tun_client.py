"""`ramp client run --tun` in the client namespace: a TUN device with the address the edge
assigned and routes to exactly the prefixes the identity may reach, and plain ping, curl, dig
and iperf3 against private addresses over it, with no proxy settings.

Every packet the kernel routes into the device rides one connect-ip request (RFC 9484) on the
client's QUIC connection to the edge's MASQUE endpoint (203.0.113.1:443/udp); the edge sends
ICMP echo down the tunnel as whole packets, UDP as the tunnel's UDP sessions and TCP upgraded
to kernel sockets on the stream path.
"""

from __future__ import annotations

import ipaddress
import json
import re
import signal
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from ramp.net.netns import Netns
from ramp.testing.lab import (
    APP_NAME,
    DNS_ZONE,
    ORIGIN,
    ORIGIN2,
    ORIGIN6,
    ORIGIN6_PREFIX,
    ORIGIN_PREFIX,
    PRIVATE_DNS,
    PRIVATE_DNS_ADDR,
    RAMP,
    Lab,
    LabProcess,
    Payload,
    wait_until,
)

TUN = "ramp0"
CLIENT_NAME = "laptop"
IPERF_PORT = 5201
# the edge's own address in its default pool (masque_ip_pool 100.96.0.0/12): ICMP errors the
# edge makes itself come from it
EDGE_POOL4 = ipaddress.ip_network("100.96.0.0/12")
EDGE_POOL6 = ipaddress.ip_network("fd72:616d:7000::/64")

LabOpener = Callable[..., AbstractContextManager[Lab]]


# --- helpers --------------------------------------------------------------------------------


def ip_json(ns: Netns, *args: str) -> list[dict[str, Any]]:
    out = ns.run(["ip", "-j", *args], check=False).stdout.decode() or "[]"
    return json.loads(out)  # type: ignore[no-any-return]


def device_exists(ns: Netns, name: str = TUN) -> bool:
    return any(link.get("ifname") == name for link in ip_json(ns, "link", "show"))


def device_addresses(
    ns: Netns, name: str = TUN
) -> set[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    out = set()
    for link in ip_json(ns, "addr", "show", "dev", name):
        for a in link.get("addr_info", []):
            iface = ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}")
            if not (iface.version == 6 and iface.ip.is_link_local):
                out.add(iface)
    return out


def device_routes(ns: Netns, name: str = TUN) -> set[str]:
    """Destinations routed through the device, except the kernel's own for its addresses."""
    out = set()
    for family in ("-4", "-6"):
        for r in ip_json(ns, family, "route", "show", "dev", name):
            if r.get("protocol") == "kernel":
                continue
            dst = r["dst"]
            if dst == "default":
                dst = "0.0.0.0/0" if family == "-4" else "::/0"
            out.add(
                str(
                    ipaddress.ip_network(
                        dst if "/" in dst else f"{dst}/{32 if family == '-4' else 128}"
                    )
                )
            )
    return out


def ready_info(proc: LabProcess) -> dict[str, Any]:
    _, body = proc.http_get("/ready")
    return json.loads(body)  # type: ignore[no-any-return]


def start_tun_lab(
    lab: Lab,
    *client_args: str,
    routes: tuple[str, ...] = (ORIGIN_PREFIX, ORIGIN6_PREFIX),
    ping_sockets: bool = False,
    name: str = CLIENT_NAME,
) -> LabProcess:
    """Tunnel "corp" for `routes` and corp.example, an edge, a connector in P (ping sockets
    allowed there or not, by P's ping_group_range), and `ramp client run --tun` in C, ready
    (connect-ip open, an address assigned) with a route for each of `routes`."""
    if ping_sockets:
        lab.private.sysctl("net.ipv4.ping_group_range", "0 2147483647")
    token = lab.create_tunnel("corp", list(routes))
    lab.add_dns_route(DNS_ZONE, "corp")
    lab.start_edge("--audit-log", str(lab.workdir / "audit.jsonl"))
    lab.start_connector(token, "--connect-timeout", "2", "--dns-resolver", PRIVATE_DNS)
    lab.wait_tunnel_connections("corp", 1)
    client = lab.start_client(lab.client_token(name), "--tun", *client_args)
    wait_routes(lab.client, set(routes), client)
    return client


def wait_routes(ns: Netns, expected: set[str], proc: LabProcess, name: str = TUN) -> None:
    wait_until(
        lambda: device_routes(ns, name) == expected,
        30,
        interval=0.2,
        what=lambda: (
            f"routes {sorted(expected)} on {name}, have {sorted(device_routes(ns, name))}"
            f"\n{proc.tail()}"
        ),
    )


def ping(ns: Netns, target: str, *extra: str, count: int = 5) -> subprocess.CompletedProcess[bytes]:
    return ns.run(
        ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "5", *extra, target],
        check=False,
        timeout=count * 6 + 10,
    )


def loss(output: bytes) -> float:
    m = re.search(rb"([\d.]+)% packet loss", output)
    assert m is not None, output.decode(errors="replace")
    return float(m.group(1))


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tun_lab(
    tmp_path_factory: pytest.TempPathFactory, payload: Payload, lab_opener: LabOpener
) -> Iterator[tuple[Lab, LabProcess]]:
    """One lab for the tests that leave it as they found it: ping sockets forbidden in P."""
    with lab_opener(tmp_path_factory.mktemp("tun"), payload, standard=False) as lab:
        yield lab, start_tun_lab(lab)


# --- the device -----------------------------------------------------------------------------


def test_the_device_gets_an_assigned_address_and_routes_to_exactly_the_private_prefixes(
    tun_lab: tuple[Lab, LabProcess],
) -> None:
    lab, client = tun_lab
    addresses = device_addresses(lab.client)
    v4 = [a for a in addresses if a.version == 4]
    v6 = [a for a in addresses if a.version == 6]
    assert len(v4) == 1 and v4[0].ip in EDGE_POOL4, addresses
    assert len(v6) == 1 and v6[0].ip in EDGE_POOL6, addresses
    assert device_routes(lab.client) == {ORIGIN_PREFIX, ORIGIN6_PREFIX}
    info = ready_info(client)["tun"]
    assert info["device"] == TUN
    assert info["session"] == "open"
    assert {ipaddress.ip_interface(a).ip for a in info["addresses"]} == {a.ip for a in addresses}
    assert set(info["routes"]) == {ORIGIN_PREFIX, ORIGIN6_PREFIX}
    # and `ramp client status` says so
    status = lab.client.run(
        [*RAMP, "client", "status", "--metrics-listen", "127.0.0.1:20243"],
        check=False,
        env=lab.env,
    )
    assert status.returncode == 0, status.stderr
    assert str(v4[0].ip) in status.stdout.decode()
    assert ORIGIN_PREFIX in status.stdout.decode()


def test_a_re_advertised_route_reaches_the_device(tun_lab: tuple[Lab, LabProcess]) -> None:
    lab, client = tun_lab
    extra = "198.18.200.0/24"
    lab.add_route(extra, "corp")
    try:
        wait_routes(lab.client, {ORIGIN_PREFIX, ORIGIN6_PREFIX, extra}, client)
    finally:
        lab.delete_route(extra)
    wait_routes(lab.client, {ORIGIN_PREFIX, ORIGIN6_PREFIX}, client)


# --- ping, both ways the connector may send echo requests -----------------------------------


def test_ping_with_ping_sockets_forbidden_at_the_connector(tun_lab: tuple[Lab, LabProcess]) -> None:
    lab, client = tun_lab
    assert lab.private.run(["sysctl", "-n", "net.ipv4.ping_group_range"]).stdout.split() == [
        b"1",
        b"0",
    ]
    got = ping(lab.client, ORIGIN)
    assert got.returncode == 0, got.stdout + got.stderr
    assert loss(got.stdout) == 0.0
    got6 = ping(lab.client, ORIGIN6, "-6")
    assert got6.returncode == 0, got6.stdout + got6.stderr
    assert loss(got6.stdout) == 0.0
    metrics = client.metrics()
    assert metrics.value("ramp_client_tun_packets_total", direction="up") >= 10
    assert metrics.value("ramp_client_tun_packets_total", direction="down") >= 10


def test_ping_with_ping_sockets_allowed_at_the_connector(
    tmp_path: Path, payload: Payload, lab_opener: LabOpener
) -> None:
    with lab_opener(tmp_path, payload, standard=False) as lab:
        start_tun_lab(lab, ping_sockets=True)
        got = ping(lab.client, ORIGIN)
        assert got.returncode == 0, got.stdout + got.stderr
        assert loss(got.stdout) == 0.0
        got6 = ping(lab.client, ORIGIN6, "-6")
        assert got6.returncode == 0, got6.stdout + got6.stderr
        assert loss(got6.stdout) == 0.0


# --- TCP, UDP -------------------------------------------------------------------------------


@pytest.mark.slow
def test_curl_fetches_100_mb_over_the_device(
    tun_lab: tuple[Lab, LabProcess], payload: Payload
) -> None:
    lab, client = tun_lab
    got = lab.curl_digest(f"http://{ORIGIN}/{payload.big.name}", timeout=300)
    assert got.returncode == 0, got.stderr
    assert got.size == payload.big.size
    assert got.sha256 == payload.big.sha256
    assert (
        client.metrics().value("ramp_client_tun_bytes_total", direction="down") > payload.big.size
    )


def test_curl_over_ipv6(tun_lab: tuple[Lab, LabProcess], payload: Payload) -> None:
    lab, _ = tun_lab
    got = lab.curl_digest(f"http://[{ORIGIN6}]/{payload.small.name}", timeout=60)
    assert got.returncode == 0, got.stderr
    assert got.sha256 == payload.small.sha256


def test_dig_asks_the_private_dns_server_over_the_device(tun_lab: tuple[Lab, LabProcess]) -> None:
    lab, _ = tun_lab
    answer = lab.dig(APP_NAME, server=PRIVATE_DNS_ADDR, timeout=3)
    assert answer.status == "NOERROR", answer.text
    assert answer.answers("A") == [ORIGIN]


@pytest.fixture
def iperf_server(tun_lab: tuple[Lab, LabProcess]) -> Iterator[LabProcess]:
    lab, _ = tun_lab
    server = lab.start_process(
        "iperf3", lab.private, ["iperf3", "-s", "-B", ORIGIN, "-p", str(IPERF_PORT)]
    )
    lab.wait_listening(lab.private, [("tcp", f"{ORIGIN}:{IPERF_PORT}")])
    yield server
    server.stop()


def iperf(lab: Lab, *args: str) -> dict[str, Any]:
    proc = lab.client.run(
        ["iperf3", "-c", ORIGIN, "-p", str(IPERF_PORT), "-t", "3", "-J", *args],
        check=False,
        timeout=60,
    )
    report = json.loads(proc.stdout or b"{}")
    assert proc.returncode == 0, report.get("error") or proc.stderr
    return report  # type: ignore[no-any-return]


def test_iperf3_tcp_completes(tun_lab: tuple[Lab, LabProcess], iperf_server: LabProcess) -> None:
    lab, _ = tun_lab
    report = iperf(lab)
    assert report["end"]["sum_received"]["bytes"] > 0


def test_iperf3_udp_completes(tun_lab: tuple[Lab, LabProcess], iperf_server: LabProcess) -> None:
    lab, _ = tun_lab
    report = iperf(lab, "-u", "-b", "20M", "-l", "1200")
    summary = report["end"]["sum"]
    assert summary["packets"] > 0
    assert summary["lost_packets"] < summary["packets"]


# --- two clients, one echo id ---------------------------------------------------------------

ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0
SHARED_ECHO_ID = 0x5EED


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _echo(ident: int, seq: int, data: bytes) -> bytes:
    head = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    return (
        struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, _icmp_checksum(head + data), ident, seq) + data
    )


def ping_with_id(ns: Netns, marker: bytes, count: int = 5) -> list[bytes]:
    """Echo requests with SHARED_ECHO_ID from a raw socket in `ns`; the payloads of every echo
    reply with that id the namespace receives until all `count` came back (or 10 s passed)."""

    def go() -> list[bytes]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        sock.settimeout(0.5)
        got: list[bytes] = []
        try:
            for seq in range(count):
                sock.sendto(_echo(SHARED_ECHO_ID, seq, marker + bytes([seq])), (ORIGIN, 0))
            deadline = 10.0
            while deadline > 0 and sum(1 for g in got if g.startswith(marker)) < count:
                try:
                    packet = sock.recv(2048)
                except TimeoutError:
                    deadline -= 0.5
                    continue
                ihl = (packet[0] & 0x0F) * 4
                kind, _, _, ident, _ = struct.unpack("!BBHHH", packet[ihl : ihl + 8])
                if kind == ICMP_ECHO_REPLY and ident == SHARED_ECHO_ID:
                    got.append(packet[ihl + 8 :])
        finally:
            sock.close()
        return got

    return ns.call(go)


def test_two_clients_with_the_same_echo_id_each_get_only_their_own_replies(
    tmp_path: Path, payload: Payload, lab_opener: LabOpener
) -> None:
    with lab_opener(tmp_path, payload, standard=False) as lab:
        start_tun_lab(lab)
        other = lab.add_client_namespace("client2")
        second = lab.start_client(lab.client_token("phone"), "--tun", ns=other, metrics_port=20244)
        wait_routes(other, {ORIGIN_PREFIX, ORIGIN6_PREFIX}, second)
        first_ip = {a.ip for a in device_addresses(lab.client)}
        second_ip = {a.ip for a in device_addresses(other)}
        assert not first_ip & second_ip, (first_ip, second_ip)

        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            mine = pool.submit(ping_with_id, lab.client, b"first-client:")
            theirs = pool.submit(ping_with_id, other, b"other-client:")
            got_first, got_second = mine.result(), theirs.result()
        assert sorted(got_first) == [b"first-client:" + bytes([i]) for i in range(5)]
        assert sorted(got_second) == [b"other-client:" + bytes([i]) for i in range(5)]


# --- policy: one /32 ------------------------------------------------------------------------


def test_an_identity_allowed_one_host_gets_one_route_and_elsewhere_is_prohibited(
    tmp_path: Path, payload: Payload, lab_opener: LabOpener
) -> None:
    with lab_opener(tmp_path, payload, standard=False) as lab:
        lab.delete_rule("default")
        lab.add_rule("laptop-one-host", "allow", identity=CLIENT_NAME, to=f"{ORIGIN}/32")
        token = lab.create_tunnel("corp", [ORIGIN_PREFIX])
        lab.start_edge()
        lab.start_connector(token, "--connect-timeout", "2")
        lab.wait_tunnel_connections("corp", 1)
        client = lab.start_client(lab.client_token(CLIENT_NAME), "--tun")
        wait_routes(lab.client, {f"{ORIGIN}/32"}, client)
        got = ping(lab.client, ORIGIN, count=2)
        assert got.returncode == 0, got.stdout + got.stderr
        # a packet elsewhere (routed into the device by hand) is answered, not dropped silently
        lab.client.add_route(f"{ORIGIN2}/32", dev=TUN)
        refused = ping(lab.client, ORIGIN2, count=1)
        assert refused.returncode != 0
        text = refused.stdout.decode()
        # iputils names ICMP type 3 code 13 "Packet filtered"
        assert "Packet filtered" in text, text
        assert (
            lab.edge_metrics().value(
                "ramp_connect_ip_packets_dropped_total", reason="not_advertised"
            )
            >= 1
        )


# --- bad input ------------------------------------------------------------------------------

ETH_P_IP = 0x0800


def inject(ns: Netns, packets: list[bytes], dev: str = TUN) -> None:
    """Hand raw packets to the device as if the kernel had routed them there (a packet socket
    on a TUN device queues to the device's reader, the client, byte for byte)."""

    def go() -> None:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
        try:
            for packet in packets:
                proto = 0x86DD if packet[:1] and packet[0] >> 4 == 6 else ETH_P_IP
                sock.sendto(packet, (dev, proto))
        finally:
            sock.close()

    ns.call(go)


def ipv4(src: str, dst: str, proto: int, payload: bytes, *, ttl: int = 64, frag: int = 0) -> bytes:
    head = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        0x1234,
        frag,
        ttl,
        proto,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    check = _icmp_checksum(head)
    return head[:10] + struct.pack("!H", check) + head[12:] + payload


def test_bad_packets_are_each_handled_and_counted_and_nothing_crashes(
    tun_lab: tuple[Lab, LabProcess],
) -> None:
    lab, client = tun_lab
    mine = next(str(a.ip) for a in device_addresses(lab.client) if a.version == 4)
    echo = _echo(0x4242, 1, b"x" * 16)
    good = ipv4(mine, ORIGIN, 1, echo)
    bad_checksum = good[:10] + b"\x00\x00" + good[12:]
    truncated = good[:12]
    bad_version = bytes([0x75]) + good[1:]
    fragment = ipv4(mine, ORIGIN, 1, echo, frag=0x2000)  # more fragments
    stamp = struct.pack("!BBHHH", 13, 0, 0, 7, 1) + b"\0" * 12  # an ICMP timestamp request
    stamp = stamp[:2] + struct.pack("!H", _icmp_checksum(stamp)) + stamp[4:]
    not_echo = ipv4(mine, ORIGIN, 1, stamp)
    spoofed = ipv4("203.0.113.77", ORIGIN, 1, echo)
    unadvertised = ipv4(mine, "192.0.2.77", 1, echo)
    before = lab.edge_metrics()
    inject(
        lab.client,
        [
            bad_checksum,
            truncated,
            bad_version,
            fragment,
            not_echo,
            spoofed,
            unadvertised,
        ],
    )

    def counted(reason: str) -> Callable[[], bool]:
        key = "ramp_connect_ip_packets_dropped_total"
        return lambda: (
            lab.edge_metrics().value(key, reason=reason) > before.value(key, reason=reason)
        )

    for reason in (
        "bad_checksum",
        "truncated",
        "bad_version",
        "fragment",
        "icmp_type",
        "spoofed_source",
        "not_advertised",
    ):
        wait_until(counted(reason), 20, interval=0.2, what=f"the edge to count a {reason} packet")
    # and the device, the client and the edge still carry traffic
    got = ping(lab.client, ORIGIN, count=2)
    assert got.returncode == 0, got.stdout + got.stderr
    assert client.alive
    assert lab.edge is not None and lab.edge.alive


def test_a_packet_too_big_for_the_edge_gets_fragmentation_needed(
    tmp_path: Path, payload: Payload, lab_opener: LabOpener
) -> None:
    # a device MTU past the edge's (masque_ip_mtu 1,400): the packet rides a capsule, the edge
    # answers "fragmentation needed" naming its MTU, and the kernel learns it (DF set)
    with lab_opener(tmp_path, payload, standard=False) as lab:
        start_tun_lab(lab, "--tun-mtu", "9000")
        got = ping(lab.client, ORIGIN, "-M", "do", "-s", "1472", count=2)
        text = got.stdout.decode() + got.stderr.decode()
        assert got.returncode != 0
        assert re.search(r"mtu ?= ?1400", text), text
        metrics = lab.edge_metrics()
        assert metrics.value("ramp_connect_ip_packets_dropped_total", reason="too_big") >= 1
        # and a packet that fits goes through
        fits = ping(lab.client, ORIGIN, "-M", "do", "-s", "1372", count=2)
        assert fits.returncode == 0, fits.stdout + fits.stderr


# --- lifecycle ------------------------------------------------------------------------------


def test_a_revoked_identity_loses_the_tunnel_and_nothing_leaks_around_it(
    tmp_path: Path, payload: Payload, lab_opener: LabOpener
) -> None:
    with lab_opener(tmp_path, payload, standard=False) as lab:
        client = start_tun_lab(lab)
        lab.ramp("client", "revoke", CLIENT_NAME)
        wait_until(
            lambda: ready_info(client)["tun"]["session"] != "open",
            30,
            interval=0.2,
            what="the edge to end the revoked identity's session",
        )
        # the routes stay on the dead device: the private prefixes fail closed
        assert device_routes(lab.client) == {ORIGIN_PREFIX, ORIGIN6_PREFIX}
        got = ping(lab.client, ORIGIN, count=2)
        assert got.returncode != 0 and loss(got.stdout) == 100.0
        assert client.metrics().value("ramp_client_tun_drops_total", reason="no_session") >= 2
        assert "edge answered" in (ready_info(client)["tun"]["session_error"] or ""), client.tail()


def test_the_device_stays_and_the_session_comes_back_when_the_edge_restarts(
    tmp_path: Path, payload: Payload, lab_opener: LabOpener
) -> None:
    with lab_opener(tmp_path, payload, standard=False) as lab:
        client = start_tun_lab(lab)

        def opens() -> float:
            return client.metrics().value("ramp_client_connect_ip_opens_total")

        before = opens()
        lab.restart_edge()
        lab.wait_tunnel_connections("corp", 1)
        wait_until(lambda: opens() > before, 60, interval=0.2, what="connect-ip to reopen")
        assert device_exists(lab.client)
        wait_routes(lab.client, {ORIGIN_PREFIX, ORIGIN6_PREFIX}, client)
        got = ping(lab.client, ORIGIN)
        assert got.returncode == 0, got.stdout + got.stderr
        assert loss(got.stdout) == 0.0


def test_sigterm_removes_the_device_and_its_routes(
    tmp_path: Path, payload: Payload, lab_opener: LabOpener
) -> None:
    with lab_opener(tmp_path, payload, standard=False) as lab:
        client = start_tun_lab(lab)
        client.signal(signal.SIGTERM)
        assert client.wait_exit(30) == 0, client.tail()
        assert not device_exists(lab.client)
        assert not any(r.get("dst") == ORIGIN_PREFIX for r in ip_json(lab.client, "route"))


def test_after_sigkill_the_next_start_finds_nothing_in_its_way(
    tmp_path: Path, payload: Payload, lab_opener: LabOpener
) -> None:
    with lab_opener(tmp_path, payload, standard=False) as lab:
        client = start_tun_lab(lab)
        client.kill()
        client.wait_exit(30)
        wait_until(lambda: not device_exists(lab.client), 10, what="the device to go with its fd")
        again = lab.start_client(lab.client_token(CLIENT_NAME), "--tun", metrics_port=20245)
        wait_routes(lab.client, {ORIGIN_PREFIX, ORIGIN6_PREFIX}, again)
        got = ping(lab.client, ORIGIN, count=2)
        assert got.returncode == 0, got.stdout + got.stderr


def test_a_leftover_persistent_device_of_the_same_name_is_replaced(
    tmp_path: Path, payload: Payload, lab_opener: LabOpener
) -> None:
    with lab_opener(tmp_path, payload, standard=False) as lab:
        lab.client.ip("tuntap", "add", "dev", TUN, "mode", "tun")
        lab.client.ip("addr", "add", "192.0.2.250/32", "dev", TUN)
        client = start_tun_lab(lab)
        assert ipaddress.ip_interface("192.0.2.250/32") not in device_addresses(lab.client)
        client.signal(signal.SIGTERM)
        assert client.wait_exit(30) == 0, client.tail()
        assert not device_exists(lab.client)


def test_without_cap_net_admin_the_client_says_what_it_needs(
    tmp_path: Path, payload: Payload, lab_opener: LabOpener
) -> None:
    with lab_opener(tmp_path, payload, standard=False) as lab:
        token_file = lab.write_file("t.token", lab.client_token(CLIENT_NAME) + "\n")
        token_file.chmod(0o600)
        # root without CAP_NET_ADMIN, as a user without the right would be
        got = lab.client.run(
            [
                "setpriv",
                "--bounding-set=-net_admin",
                "--inh-caps=-net_admin",
                *RAMP,
                *client_command(token_file),
            ],
            check=False,
            timeout=60,
            env=lab.env,
        )
        err = got.stderr.decode()
        assert got.returncode == 1, err
        assert "needs root or CAP_NET_ADMIN" in err, err
        assert not device_exists(lab.client)


def client_command(token_file: Path) -> list[str]:
    return [
        "client",
        "run",
        "--tun",
        "--token-file",
        str(token_file),
        "--metrics-listen",
        "off",
        "--socks5-listen",
        "off",
        "--http-listen",
        "off",
    ]


def test_without_dev_net_tun_the_client_says_how_to_get_it(
    tmp_path: Path, payload: Payload, lab_opener: LabOpener
) -> None:
    with lab_opener(tmp_path, payload, standard=False) as lab:
        token_file = lab.write_file("t.token", lab.client_token(CLIENT_NAME) + "\n")
        token_file.chmod(0o600)
        command = [*RAMP, *client_command(token_file)]
        # a mount namespace of its own where /dev/net is empty, as in a container without it
        got = lab.client.run(
            [
                "unshare",
                "-m",
                "sh",
                "-c",
                'mount -t tmpfs none /dev/net && exec "$@"',
                "-",
                *command,
            ],
            check=False,
            timeout=60,
            env=lab.env,
        )
        err = got.stderr.decode()
        assert got.returncode == 1, err
        assert "no /dev/net/tun" in err and "modprobe tun" in err, err
