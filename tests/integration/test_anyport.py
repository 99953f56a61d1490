"""The any-port on-ramp: every port of 203.0.113.64/26 on one TCP and one UDP socket.

C routes the prefix to E (`Lab.route_to_edge`); no interface of E holds its addresses. The
edge's config has two anyport on-ramps (TCP and UDP) with the same rule table: addresses of
203.0.113.64/28 go to the dialled port on ORIGIN, the rest of the prefix to the dialled port
on ORIGIN2, both through the tunnel to P, where `PortNames` sockets on 200 random ports answer
with their own address and port. Each test runs with sk_lookup and again with TPROXY forced,
and checks what the edge leaves behind: no BPF program or link, no nftables table, no routing
rule or route.
"""

from __future__ import annotations

import ipaddress
import random
import re
import signal
import socket
import subprocess
from collections.abc import Iterator

import pytest

from ramp.testing.lab import (
    ANYPORT_PREFIX,
    ANYPORT_PREFIX6,
    ORIGIN,
    ORIGIN2,
    ORIGIN6,
    ORIGIN6_PREFIX,
    ORIGIN_PREFIX,
    Lab,
    wait_until,
)
from ramp.testing.port_names import PortNames, ask_tcp, ask_udp, name_of

ADDRESSES = ["203.0.113.65", "203.0.113.78", "203.0.113.80", "203.0.113.101", "203.0.113.126"]
NEAR = "203.0.113.64/28"  # -> ORIGIN; the rest of the prefix -> ORIGIN2
PORT_COUNT = 200
MECHANISMS = ["sk_lookup", "tproxy"]
UDP_SHARE = 2 * len(ADDRESSES) * PORT_COUNT


def mapped(address: str) -> str:
    """The origin the rule table sends ADDRESS to."""
    return ORIGIN if ipaddress.ip_address(address) in ipaddress.ip_network(NEAR) else ORIGIN2


def onramps(mechanism: str) -> list[dict[str, object]]:
    rules = [{"addresses": NEAR, "to": {"host": ORIGIN}}, {"to": {"host": ORIGIN2}}]
    return [
        {
            "type": "anyport",
            "prefix": ANYPORT_PREFIX,
            "ports": "1-65535",
            "protocol": protocol,
            "to": rules,
            "mechanism": mechanism,
        }
        for protocol in ("tcp", "udp")
    ]


def random_ports(count: int = PORT_COUNT) -> list[int]:
    # below P's ephemeral range, so the connector's own connections never need one of them
    seed = random.randrange(1 << 32)
    print(f"ports from seed {seed}")
    return random.Random(seed).sample(range(10000, 32000), count)


def steering(lab: Lab) -> dict[str, str]:
    """What of ramp's steering exists in E: nftables tables, rules, routes."""
    ns = lab.edge_ns
    return {
        "nft": "\n".join(
            line
            for line in ns.run(["nft", "list", "tables"]).stdout.decode().splitlines()
            if "ramp_anyport" in line
        ),
        "rules": "\n".join(
            line
            for v in ("-4", "-6")
            for line in ns.run(["ip", v, "rule", "list"]).stdout.decode().splitlines()
            if "proto 245" in line
        ),
        "routes": "\n".join(
            line
            for v in ("-4", "-6")
            for line in ns.run(["ip", v, "route", "show", "table", "all"])
            .stdout.decode()
            .splitlines()
            if "proto 245" in line
        ),
    }


def bpf_ids(lab: Lab) -> list[tuple[int, int]]:
    """(program id, link id) of each sk_lookup program the edge logged."""
    assert lab.edge is not None
    return [
        (int(p), int(k))
        for p, k in re.findall(r"BPF program id (\d+), link id (\d+)", lab.edge.stderr())
    ]


def bpf_exists(kind: str, obj_id: int) -> bool:
    proc = subprocess.run(
        ["bpftool", kind, "show", "id", str(obj_id)], capture_output=True, check=False
    )
    return proc.returncode == 0


@pytest.fixture
def anyport_lab(bare_lab: Lab) -> Iterator[Lab]:
    lab = bare_lab
    lab.route_to_edge()
    lab.route_to_edge(ANYPORT_PREFIX6)
    lab.create_tunnel("corp", [ORIGIN_PREFIX, ORIGIN6_PREFIX])
    yield lab


def start(lab: Lab, mechanism: str, entries: list[dict[str, object]] | None = None) -> None:
    # one client holds a UDP session per address and port it sends to: past the default share
    config = lab.write_edge_config(
        {"onramps": entries or onramps(mechanism), "max_udp_sessions_per_source": UDP_SHARE}
    )
    lab.start_edge("--config", str(config))
    assert lab.edge is not None
    wait_until(
        lambda: (
            lab.edge is not None
            and lab.edge.stderr().count(
                f"{'sk_lookup' if mechanism == 'sk_lookup' else 'TPROXY'} steers"
            )
            == 2
        ),
        30,
        what=lambda: f"the edge to say it steers with {mechanism}\n{lab.log_tails(20)}",
    )
    if not lab.connectors:
        lab.start_connector(
            lab.tokens["corp"],
            "--connect-timeout",
            "2",
            "--max-udp-sessions-per-source",
            str(UDP_SHARE),
        )
    lab.wait_tunnel_connections("corp", 1)


def check_tcp(
    lab: Lab, ports: list[int], addresses: list[str] = ADDRESSES, to: str | None = None
) -> None:
    targets = [(a, p) for a in addresses for p in ports]
    got = ask_tcp(lab.client, targets)
    wrong = {t: g for t, g in got.items() if g != name_of((to or mapped(t[0]), t[1]))}
    assert not wrong, f"{len(wrong)} of {len(targets)} wrong, e.g. {list(wrong.items())[:5]}"


def check_udp(
    lab: Lab, ports: list[int], addresses: list[str] = ADDRESSES, to: str | None = None
) -> None:
    targets = [(a, p) for a in addresses for p in ports]
    got = ask_udp(lab.client, targets)
    missing = [t for t in targets if t not in got]
    assert not missing, f"{len(missing)} of {len(targets)} never answered, e.g. {missing[:5]}"
    for target, (name, source) in got.items():
        assert name == name_of((to or mapped(target[0]), target[1])), (target, name)
        # the reply comes from exactly the address and port the client sent to
        assert source == target, (target, source)


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_every_port_reaches_the_mapped_service(anyport_lab: Lab, mechanism: str) -> None:
    lab = anyport_lab
    ports = random_ports()
    names = [(host, p) for host in (ORIGIN, ORIGIN2) for p in ports]
    with PortNames(lab.private, names), PortNames(lab.private, names, udp=True):
        start(lab, mechanism)
        check_tcp(lab, ports)
        check_udp(lab, ports)
        # a second client (another source port) to the same addresses and ports while the
        # first one's sessions and their reply sockets are still there
        check_udp(lab, ports[:20])
        ids = bpf_ids(lab)
        if mechanism == "sk_lookup":
            assert len(ids) == 2 and all(bpf_exists("link", k) for _, k in ids)
            assert steering(lab)["routes"] and not steering(lab)["nft"]
        else:
            assert not ids and steering(lab)["nft"] and steering(lab)["rules"]
        assert lab.edge is not None
        assert lab.edge.stop() == 0
    # every flow took the normal path: policy, the tunnel, one audit line each (a burst of
    # new UDP sessions also meets the edge's share of flows opening at once per client: those
    # are refused busy, and the client's next datagram tries again)
    flows = [r for r in lab.audit_records() if r.get("onramp") == "anyport"]
    ok = [r for r in flows if r["result"] == "ok"]
    assert {r["protocol"] for r in ok} == {"tcp", "udp"}
    assert len(ok) >= 2 * len(ADDRESSES) * len(ports)
    assert all(r["tunnel"] == "corp" and r["rule"] == "default" for r in ok)
    # each says which public address and port the client dialled, and where that went
    dialled = {(r["protocol"], r["annotations"]["dialled"], r["destination"]) for r in ok}
    for address in ADDRESSES:
        for port in ports:
            for protocol in ("tcp", "udp"):
                want = (protocol, f"{address}:{port}", f"{mapped(address)}:{port}")
                assert want in dialled
    assert {r["result"] for r in flows} <= {"ok", "busy"}
    left = steering(lab)
    assert left == {"nft": "", "rules": "", "routes": ""}, left
    for prog, link in ids:
        assert not bpf_exists("prog", prog) and not bpf_exists("link", link)


ADDRESSES6 = ["2001:db8:203:64::1", "2001:db8:203:64::7:1", "2001:db8:203:64:ffff:ffff:ffff:fffe"]


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_ipv6_every_port_reaches_the_service(anyport_lab: Lab, mechanism: str) -> None:
    lab = anyport_lab
    ports = random_ports(50)
    entries = [
        {
            "type": "anyport",
            "prefix": ANYPORT_PREFIX6,
            "protocol": protocol,
            "to": {"host": ORIGIN6},
            "mechanism": mechanism,
        }
        for protocol in ("tcp", "udp")
    ]
    names = [(ORIGIN6, p) for p in ports]
    with PortNames(lab.private, names), PortNames(lab.private, names, udp=True):
        start(lab, mechanism, entries)
        check_tcp(lab, ports, ADDRESSES6, ORIGIN6)
        check_udp(lab, ports, ADDRESSES6, ORIGIN6)
        assert lab.edge is not None
        assert lab.edge.stop() == 0
    assert steering(lab) == {"nft": "", "rules": "", "routes": ""}


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_restart_after_a_crash_removes_the_leftovers(anyport_lab: Lab, mechanism: str) -> None:
    lab = anyport_lab
    ports = random_ports(20)
    names = [(host, p) for host in (ORIGIN, ORIGIN2) for p in ports]
    with PortNames(lab.private, names), PortNames(lab.private, names, udp=True):
        start(lab, mechanism)
        before = steering(lab)
        ids = bpf_ids(lab)
        assert lab.edge is not None
        lab.edge.kill()  # SIGKILL: no chance to clean up
        # the kernel drops programs and links with the last descriptor; the routing stays
        assert not any(bpf_exists("link", k) for _, k in ids)
        assert steering(lab) == before
        start(lab, mechanism)
        assert "removing steering left by process" in lab.edge.stderr()
        after = steering(lab)
        # as many tables, rules and routes as one edge makes, not two edges' worth
        assert {k: len(v.splitlines()) for k, v in after.items()} == {
            k: len(v.splitlines()) for k, v in before.items()
        }
        check_tcp(lab, ports)
        check_udp(lab, ports)
        lab.edge.signal(signal.SIGTERM)
        lab.edge.wait_exit(30)
    assert steering(lab) == {"nft": "", "rules": "", "routes": ""}


def test_fixed_destination_no_rule_and_policy(anyport_lab: Lab) -> None:
    lab = anyport_lab
    # the operator made the prefix local already: the edge uses that route and leaves it
    lab.edge_ns.ip("route", "add", "local", ANYPORT_PREFIX, "dev", "lo")
    config = lab.write_edge_config(
        {
            "onramps": [
                {
                    "type": "anyport",
                    "prefix": ANYPORT_PREFIX,
                    "ports": "1000-2000",
                    "protocol": protocol,
                    "to": [{"addresses": NEAR, "ports": "1000-1500", "to": f"{ORIGIN}:7"}],
                }
                for protocol in ("tcp", "udp")
            ]
        }
    )
    lab.start_edge("--config", str(config))
    lab.start_connector(lab.tokens["corp"], "--connect-timeout", "2")
    lab.wait_tunnel_connections("corp", 1)
    # a fixed destination: the echo on ORIGIN:7, whichever port of the rule was dialled
    for port in (1000, 1234, 1500):
        sock = lab.client_socket()
        sock.connect(("203.0.113.70", port))
        sock.sendall(b"hello\n")
        assert sock.recv(100) == b"hello\n"
        sock.close()
    # in the prefix and the ports, but no rule: accepted, then closed at once
    sock = lab.client_socket()
    sock.connect(("203.0.113.100", 1600))
    assert sock.recv(100) == b""
    sock.close()
    # outside the on-ramp's ports nothing answers
    sock = lab.client_socket()
    with pytest.raises(ConnectionRefusedError):
        sock.connect(("203.0.113.70", 2001))
    sock.close()
    # UDP: the lab's UDP echo on ORIGIN:7 answers from the dialled address and port
    targets = [("203.0.113.70", 1001), ("203.0.113.71", 1499)]
    udp = lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(2)
    try:
        for target in targets:
            echoed = wait_until(
                lambda t=target: _udp_echo(udp, t), 30, what=f"a UDP echo through {target}"
            )
            assert echoed == (b"ping", target)
        # no rule for this address: dropped and counted
        udp.sendto(b"ping", ("203.0.113.100", 1600))
        wait_until(
            lambda: (
                lab.edge_metrics().value("ramp_bad_input_total", onramp="anyport", reason="no_rule")
                >= 2  # the TCP connection above and this datagram
            ),
            30,
            what="the no_rule counter",
        )
    finally:
        udp.close()
    # policy sees these flows like any other: a rule for the on-ramp refuses them
    lab.add_rule("no-anyport", "deny", onramp="anyport", position=1)

    def refused() -> bool:
        sock = lab.client_socket()
        try:
            sock.connect(("203.0.113.70", 1000))
            sock.sendall(b"hello\n")
            return sock.recv(100) == b""
        except ConnectionResetError:
            return True
        finally:
            sock.close()

    wait_until(refused, 30, what="the deny rule to refuse anyport flows")
    denied = wait_until(
        lambda: [r for r in lab.audit_records() if r.get("rule") == "no-anyport"],
        30,
        what="the refused flow's audit line",
    )
    assert denied and all(
        r["onramp"] == "anyport" and r["result"] == "not_permitted" for r in denied
    )
    assert lab.edge is not None and lab.edge.stop() == 0
    routes = lab.edge_ns.ip("route", "show", "table", "local", "exact", ANYPORT_PREFIX)
    assert "local 203.0.113.64/26 dev lo" in routes and "proto 245" not in routes


def test_behind_a_load_balancer_the_proxy_header_names_the_client(anyport_lab: Lab) -> None:
    """A TCP anyport on-ramp takes PROXY headers from trusted balancers like the other TCP
    on-ramps: the flow's source is the header's client, the dialled address stays the one the
    balancer connected to."""
    lab = anyport_lab
    config = lab.write_edge_config(
        {
            "onramps": [
                {
                    "type": "anyport",
                    "prefix": ANYPORT_PREFIX,
                    "to": f"{ORIGIN}:7",
                    "proxy_protocol": {"mode": "required", "trusted": ["203.0.113.2/32"]},
                }
            ]
        }
    )
    lab.start_edge("--config", str(config))
    lab.start_connector(lab.tokens["corp"], "--connect-timeout", "2")
    lab.wait_tunnel_connections("corp", 1)
    sock = lab.client_socket()
    sock.connect(("203.0.113.90", 4433))
    sock.sendall(b"PROXY TCP4 192.0.2.77 203.0.113.90 5555 4433\r\nhello\n")
    assert sock.recv(100) == b"hello\n"
    sock.close()
    records = wait_until(
        lambda: [r for r in lab.audit_records() if r.get("onramp") == "anyport"],
        30,
        what="the flow's audit line",
    )
    assert records[0]["source"] == "192.0.2.77:5555"
    assert records[0]["annotations"]["dialled"] == "203.0.113.90:4433"
    assert records[0]["destination"] == f"{ORIGIN}:7"


def _udp_echo(sock: socket.socket, target: tuple[str, int]) -> tuple[bytes, tuple[str, int]]:
    """Send "ping" to target and return the answer and where it came from (None: lost)."""
    sock.sendto(b"ping", target)
    try:
        data, source = sock.recvfrom(100)
    except TimeoutError:
        return None  # type: ignore[return-value]
    return data, (source[0], int(source[1]))


def test_bad_config_says_what_is_wrong(anyport_lab: Lab) -> None:
    lab = anyport_lab
    for onramps_, message in (
        (
            [
                {
                    "type": "anyport",
                    "prefix": "203.0.113.64/26",
                    "to": [{"addresses": "198.51.100.0/28", "to": f"{ORIGIN}:7"}],
                }
            ],
            "not inside the prefix",
        ),
        (
            [
                {
                    "type": "anyport",
                    "prefix": "203.0.113.64/26",
                    "ports": "1-100",
                    "to": f"{ORIGIN}:7",
                },
                {
                    "type": "anyport",
                    "prefix": "203.0.113.96/27",
                    "ports": "100-200",
                    "to": f"{ORIGIN}:7",
                },
            ],
            "overlap",
        ),
    ):
        config = lab.write_edge_config({"onramps": onramps_}, name="bad.yaml")
        edge = lab.start_edge("--config", str(config), wait=False)
        assert edge.wait_exit(30) == 2
        assert message in edge.stderr(), edge.stderr()
    assert steering(lab) == {"nft": "", "rules": "", "routes": ""}


# the edge without the capabilities bpf(2) needs (CAP_BPF, CAP_SYS_ADMIN): sk_lookup cannot load
NO_BPF = ["setpriv", "--bounding-set", "-bpf,-sys_admin,-perfmon", "--"]


def test_auto_falls_back_to_tproxy_when_the_program_cannot_load(anyport_lab: Lab) -> None:
    lab = anyport_lab
    config = lab.write_edge_config(
        {"onramps": [{"type": "anyport", "prefix": ANYPORT_PREFIX, "to": {"host": ORIGIN}}]}
    )
    lab.start_edge("--config", str(config), wrapper=NO_BPF)
    lab.start_connector(lab.tokens["corp"], "--connect-timeout", "2")
    lab.wait_tunnel_connections("corp", 1)
    assert lab.edge is not None
    log = lab.edge.stderr()
    assert "sk_lookup unavailable" in log and "falling back to TPROXY" in log
    assert "TPROXY steers" in log
    ports = random_ports(10)
    with PortNames(lab.private, [(ORIGIN, p) for p in ports]):
        targets = [("203.0.113.70", p) for p in ports]
        assert ask_tcp(lab.client, targets) == {t: name_of((ORIGIN, t[1])) for t in targets}
    assert lab.edge.stop() == 0
    assert steering(lab) == {"nft": "", "rules": "", "routes": ""}


def test_a_forced_sk_lookup_that_cannot_load_stops_the_edge(anyport_lab: Lab) -> None:
    lab = anyport_lab
    config = lab.write_edge_config({"onramps": [{**onramps("sk_lookup")[0]}]})
    edge = lab.start_edge("--config", str(config), wrapper=NO_BPF, wait=False)
    assert edge.wait_exit(30) == 1  # could not start
    assert (
        "cannot start the edge: anyport tcp 203.0.113.64/26 ports 1-65535: the sk_lookup "
        "program did not load: [Errno 1] creating BPF map" in edge.stderr()
    ), edge.stderr()
    assert "Traceback" not in edge.stderr()
    assert steering(lab) == {"nft": "", "rules": "", "routes": ""}
