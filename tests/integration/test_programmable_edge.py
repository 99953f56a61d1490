"""The programmable edge as its operator and users see it: policy rules changed with the CLI,
virtual networks, on-ramps from the config file, Python hooks, and SIGHUP reloads.

Most tests share one lab (`edge_lab`): users alice, bob and carol; tunnel "corp" in P (also
routed the DNS zone corp.example) and tunnel "branch" in a second private network B whose
origin has the same address (198.51.100.10) but other files; vnet tenant-a routes
198.51.100.0/24 to corp and holds alice, vnet tenant-b routes it to branch and holds bob, carol
is in no vnet (default: corp). Its edge config adds forward on-ramps (ssh and HTTP of the
origin in P), a SOCKS5 on-ramp bound to tenant-b, two hooks that fail for one port each and
one that annotates flows and answers marked HTTP proxy requests. Each of those tests puts the
policy back to the single `default` rule when it ends (`plab`). The SIGHUP tests have labs of
their own.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest

import ramp.edge
from ramp.net.netns import stop_process
from ramp.onramps import registry
from ramp.testing.clients import (
    REP_NOT_ALLOWED,
    REP_SUCCEEDED,
    ProxyError,
    http_connect,
    socks5_connect,
    socks5_udp_associate,
    udp_unwrap,
    udp_wrap,
)
from ramp.testing.lab import (
    APP_NAME,
    CLIENT_ADDR,
    DNS_ZONE,
    EDGE_PUBLIC_ADDR,
    HALF_CLOSE_PORT,
    HELLO_PORT,
    HTTP_ALT_PORT,
    HTTP_PORT,
    HTTP_PROXY,
    ORIGIN,
    ORIGIN_PREFIX,
    PRIVATE_DNS,
    SOCKS_PORT,
    SOCKS_PROXY,
    SSH_PORT,
    UDP_ECHO_PORT,
    Digest,
    Lab,
    Metrics,
    Payload,
    make_payload,
    wait_until,
)

USERS = {"alice": "alice-secret", "bob": "bob-secret", "carol": "carol-secret"}
STORE_DEADLINE = 10.0  # the edge re-reads the store every second; room for a busy machine
REVOKE_DEADLINE = 20.0
RELOAD_DEADLINE = 20.0

SSH_FORWARD_PORT = 2222
HTTP_FORWARD_PORT = 2280
TENANT_B_SOCKS_PORT = 1081
RAISE_PORT = HALF_CLOSE_PORT  # the raising hook fails flows to this port
HANG_PORT = HELLO_PORT  # the async hook never answers for this one

RAISING_HOOK = """
PORT = None


def setup(options):
    global PORT
    PORT = int(options["port"])


def flow_start(flow):
    if flow.destination.port == PORT:
        raise RuntimeError(f"this hook breaks on port {PORT}")
    return None
"""

HANGING_HOOK = """
import asyncio

PORT = None


def setup(options):
    global PORT
    PORT = int(options["port"])


async def flow_start(flow):
    if flow.destination.port == PORT:
        await asyncio.Event().wait()  # forever
    return None
"""

ANSWERING_HOOK = """
from ramp.policy.hooks import Reply


def flow_start(flow):
    flow.annotations["seen_by"] = "answering_hook"
    return None


def connect_request(flow, request):
    if request.header("X-Ramp-Test") == "answer-me":
        return Reply(418, "answered by the hook\\n", (("X-Answered-By", "answering_hook"),))
    return None
"""

GATE_HOOK = """
from ramp.policy.hooks import Deny

VERSION = {version}


def flow_start(flow):
    flow.annotations["gate"] = f"v{{VERSION}}"
    if VERSION > 1 and flow.destination.port == {port}:
        return Deny(f"gate v{{VERSION}} closes port {port}")
    return None
"""


DENY_ALL_HOOK = """
from ramp.policy.hooks import Deny


def flow_start(flow):
    return Deny("closed for maintenance")
"""


@dataclass
class EdgeLab:
    lab: Lab
    tenant_b: Payload  # what the origin in network B serves
    ssh_key: Path


def edge_user_args() -> list[str]:
    return [a for user, pw in USERS.items() for a in ("--user", f"{user}:{pw}")]


@pytest.fixture(scope="module")
def edge_lab(
    tmp_path_factory: pytest.TempPathFactory,
    payload: Payload,
    lab_opener: Callable[..., AbstractContextManager[Lab]],
) -> Iterator[EdgeLab]:
    with lab_opener(tmp_path_factory.mktemp("lab"), payload, standard=False) as lab:
        # A client's kernel hands it the bytes queued before a reset first, and curl
        # --limit-rate reads a big queue slowly: keep C's receive buffers small so that an
        # ended flow shows at once instead of after megabytes of backlog.
        lab.client.sysctl("net.ipv4.tcp_rmem", "4096 65536 262144")
        tenant_b = make_payload(lab.workdir / "tenant-b-www", big_size=256 * 1024)
        network_b = lab.add_private_network("private-b", tenant_b.directory)
        ssh_key = lab.start_sshd()

        lab.create_tunnel("corp", [ORIGIN_PREFIX])
        lab.create_tunnel("branch")
        lab.vnet("add", "tenant-a")
        lab.vnet("add", "tenant-b")
        lab.add_route(ORIGIN_PREFIX, "corp", vnet="tenant-a")
        lab.add_route(ORIGIN_PREFIX, "branch", vnet="tenant-b")
        lab.vnet("assign", "tenant-a", "--identity", "alice")
        lab.vnet("assign", "tenant-b", "--identity", "bob")

        raising = lab.write_file("raising_hook.py", RAISING_HOOK)
        hanging = lab.write_file("hanging_hook.py", HANGING_HOOK)
        answering = lab.write_file("answering_hook.py", ANSWERING_HOOK)
        config = lab.write_edge_config(
            {
                "onramps": [
                    {
                        "type": "forward",
                        "listen": f"{EDGE_PUBLIC_ADDR}:{SSH_FORWARD_PORT}",
                        "to": f"{ORIGIN}:{SSH_PORT}",
                    },
                    {
                        "type": "forward",
                        "listen": f"{EDGE_PUBLIC_ADDR}:{HTTP_FORWARD_PORT}",
                        "to": f"{ORIGIN}:{HTTP_PORT}",
                    },
                    {
                        "type": "socks5",
                        "listen": f"{EDGE_PUBLIC_ADDR}:{TENANT_B_SOCKS_PORT}",
                        "vnet": "tenant-b",
                    },
                ],
                "hooks": [
                    {"path": str(raising), "options": {"port": RAISE_PORT}},
                    {"path": str(hanging), "options": {"port": HANG_PORT}},
                    str(answering),
                ],
            }
        )
        lab.start_edge("--config", str(config), *edge_user_args())
        lab.wait_listening(
            lab.edge_ns,
            [
                ("tcp", f"{EDGE_PUBLIC_ADDR}:{port}")
                for port in (SSH_FORWARD_PORT, HTTP_FORWARD_PORT, TENANT_B_SOCKS_PORT)
            ],
        )
        lab.add_dns_route(DNS_ZONE, "corp")  # names in corp.example: resolved inside P
        lab.start_connector(
            lab.tokens["corp"], "--connect-timeout", "2", "--dns-resolver", PRIVATE_DNS
        )
        lab.start_connector(lab.tokens["branch"], "--connect-timeout", "2", ns=network_b)
        lab.wait_tunnel_connections("corp", 1)
        lab.wait_tunnel_connections("branch", 1)
        yield EdgeLab(lab, tenant_b, ssh_key)


@pytest.fixture
def plab(edge_lab: EdgeLab) -> Iterator[EdgeLab]:
    """The shared lab; afterwards its policy is `default` again, and the edge uses it."""
    yield edge_lab
    lab = edge_lab.lab
    lab.reset_policy()
    wait_until(
        lambda: all(socks_rep(lab, user, ORIGIN, HTTP_PORT) == REP_SUCCEEDED for user in USERS),
        STORE_DEADLINE,
        what="every user to be allowed again after the policy reset",
    )


# --- helpers ---------------------------------------------------------------------------------


def socks_rep(lab: Lab, user: str, host: str, port: int, proxy_port: int = SOCKS_PORT) -> int:
    """The REP byte of a SOCKS5 CONNECT as `user` (with the right password)."""
    with lab.client_socket() as sock:
        sock.connect((EDGE_PUBLIC_ADDR, proxy_port))
        return socks5_connect(sock, host, port, user=user, password=USERS[user])


def proxy_flags(via: str, proxy_port: int = SOCKS_PORT) -> list[str]:
    return {
        "socks5": ["--socks5", f"{EDGE_PUBLIC_ADDR}:{proxy_port}"],
        "socks5-hostname": ["--socks5-hostname", f"{EDGE_PUBLIC_ADDR}:{proxy_port}"],
        "connect": ["--proxytunnel", "--proxy", f"http://{HTTP_PROXY}"],
        "forward": ["--proxy", f"http://{HTTP_PROXY}"],
    }[via]


def fetch(lab: Lab, user: str, via: str, url: str, proxy_port: int = SOCKS_PORT) -> Digest:
    return lab.curl_digest(
        "--proxy-user", f"{user}:{USERS[user]}", *proxy_flags(via, proxy_port), url, timeout=30
    )


def records_where(lab: Lab, since: int = 0, **want: object) -> list[dict[str, object]]:
    """The audit records after the first `since` (see `mark`) with the fields of `want`."""
    return [r for r in lab.audit_records()[since:] if all(r.get(k) == v for k, v in want.items())]


def mark(lab: Lab) -> int:
    """How many audit records there are now: records of this test come after."""
    return len(lab.audit_records())


@contextlib.contextmanager
def background_curl(lab: Lab, *args: str) -> Iterator[tuple[Callable[[], int | None], Path]]:
    """curl in C writing the body to a file; yields (poll, the file). Stopped on the way out."""
    out = lab.workdir / f"download-{time.monotonic_ns()}.bin"
    err = out.with_suffix(".stderr.log")
    with out.open("wb") as o, err.open("wb") as e:
        proc = lab.client.popen(
            ["curl", "-sS", "--fail", "--max-time", "280", *args], stdout=o, stderr=e, env=lab.env
        )
    try:
        yield proc.poll, out
    finally:
        stop_process(proc, 1.0)
        with contextlib.suppress(ValueError):
            lab.client.procs.remove(proc)
        out.unlink(missing_ok=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.value(f"{name}_total", **labels)


# --- 1. policy rules -------------------------------------------------------------------------


def test_policy_lets_alice_reach_one_port_and_bob_nothing(plab: EdgeLab, payload: Payload) -> None:
    lab = plab.lab
    since = mark(lab)
    # alice's rule first: once bob is denied (default gone), the edge has both changes
    lab.add_rule(
        "alice-web",
        "allow",
        identity="alice",
        to=f"{ORIGIN}/32",
        ports=HTTP_ALT_PORT,
        protocol="tcp",
    )
    lab.delete_rule("default")
    wait_until(
        lambda: socks_rep(lab, "bob", ORIGIN, HTTP_ALT_PORT) == REP_NOT_ALLOWED,
        STORE_DEADLINE,
        what="the edge to apply the new rules (bob denied)",
    )

    url = f"http://{ORIGIN}:{HTTP_ALT_PORT}/{payload.small.name}"
    for via in ("socks5", "connect", "forward"):
        got = fetch(lab, "alice", via, url)
        assert got.returncode == 0, (via, got.stderr)
        assert got.sha256 == payload.small.sha256, via
    # that port only
    assert socks_rep(lab, "alice", ORIGIN, HTTP_PORT) == REP_NOT_ALLOWED

    bob = ["--proxy-user", f"bob:{USERS['bob']}"]
    out = lab.curl(*bob, "--socks5", SOCKS_PROXY, url, timeout=20)
    assert out.returncode == 97, out.stderr  # CURLE_PROXY: the SOCKS5 reply was not success
    assert socks_rep(lab, "bob", ORIGIN, HTTP_ALT_PORT) == REP_NOT_ALLOWED
    out = lab.curl(
        *bob, *proxy_flags("forward"), "-o", "/dev/null", "-w", "%{http_code}", url, timeout=20
    )
    assert out.stdout == b"403", out.stderr
    auth = "Basic " + base64.b64encode(f"bob:{USERS['bob']}".encode()).decode()
    with lab.connect_http_proxy() as sock:
        status, _ = http_connect(sock, ORIGIN, HTTP_ALT_PORT, auth=auth)
    assert status == 403

    def bob_denied() -> list[dict[str, object]]:
        found = records_where(
            lab,
            since,
            identity="bob",
            destination=f"{ORIGIN}:{HTTP_ALT_PORT}",
            result="not_permitted",
        )
        # the audit line may come just after the client saw the refusal
        return found if {r["onramp"] for r in found} >= {"socks5", "http"} else []

    denied = wait_until(bob_denied, 5, what="the audit lines of bob's refused flows")
    assert {r["rule"] for r in denied} == {"implicit-deny"}
    allowed = wait_until(
        lambda: records_where(
            lab, since, identity="alice", destination=f"{ORIGIN}:{HTTP_ALT_PORT}", result="ok"
        ),
        5,
        what="the audit lines of alice's flows",
    )
    assert {r["rule"] for r in allowed} == {"alice-web"}

    alice_says = lab.policy_test(f"{ORIGIN}:{HTTP_ALT_PORT}", "alice")
    assert alice_says[0] == "allow alice-web"
    assert "alice-web" in alice_says[1]
    bob_says = lab.policy_test(f"{ORIGIN}:{HTTP_ALT_PORT}", "bob")
    assert bob_says[0] == "deny implicit-deny"
    assert "no rule matched" in bob_says[1]
    assert lab.policy_test(f"{ORIGIN}:{HTTP_PORT}", "alice")[0] == "deny implicit-deny"
    assert lab.policy_test(f"{ORIGIN}:{HTTP_ALT_PORT}/udp", "alice")[0] == "deny implicit-deny"


def test_explicit_deny_rule_is_named_in_the_audit(plab: EdgeLab) -> None:
    lab = plab.lab
    since = mark(lab)
    lab.add_rule("no-bob", "deny", identity="bob", position=1)
    wait_until(
        lambda: socks_rep(lab, "bob", ORIGIN, HTTP_PORT) == REP_NOT_ALLOWED,
        STORE_DEADLINE,
        what="the deny rule to reach the edge",
    )
    assert socks_rep(lab, "carol", ORIGIN, HTTP_PORT) == REP_SUCCEEDED
    assert lab.policy_test(f"{ORIGIN}:{HTTP_PORT}", "bob")[0] == "deny no-bob"
    assert lab.policy_test(f"{ORIGIN}:{HTTP_PORT}", "carol")[0] == "allow default"
    records = wait_until(
        lambda: records_where(lab, since, identity="bob", rule="no-bob"), 5, what="bob's audit line"
    )
    assert {r["result"] for r in records} == {"not_permitted"}


# --- 2. a rule changed during a flow ends it -------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("via", ["socks5", "connect", "forward", "forward-onramp"])
def test_a_rule_added_during_a_long_download_ends_it(
    plab: EdgeLab, payload: Payload, via: str
) -> None:
    lab = plab.lab
    since = mark(lab)
    if via == "forward-onramp":  # anonymous: the rule matches the on-ramp
        url = f"http://{EDGE_PUBLIC_ADDR}:{HTTP_FORWARD_PORT}/{payload.big.name}"
        args, identity, match = [], None, {"onramp": "forward"}
    else:
        url = f"http://{ORIGIN}/{payload.big.name}"
        args = ["--proxy-user", f"alice:{USERS['alice']}", *proxy_flags(via)]
        identity, match = "alice", {"identity": "alice"}
    # 100 MiB at 1 MB/s: far longer than the deadline below
    with background_curl(lab, *args, "--limit-rate", "1M", url) as (poll, out):
        wait_until(
            lambda: poll() is None and out.stat().st_size > 0,
            STORE_DEADLINE,
            what="the download to start",
        )
        lab.add_rule("stop", "deny", position=1, **match)
        returncode = wait_until(poll, REVOKE_DEADLINE, what="curl to end")  # nonzero: truthy
        assert returncode != 0
        assert out.stat().st_size < payload.big.size

    (record,) = wait_until(
        lambda: [
            r
            for r in records_where(
                lab, since, identity=identity, rule="stop", result="not_permitted"
            )
            if "policy changed" in str(r["reason"])
        ],
        5,
        what="the audit line of the ended download",
    )
    assert record["destination"] == f"{ORIGIN}:{HTTP_PORT}"
    assert 0 < int(record["bytes_down"]) < payload.big.size  # type: ignore[call-overload]
    assert counter(lab.edge_metrics(), "ramp_flows_revoked") >= 1
    if identity is not None:  # and new flows of alice are refused by the same rule
        assert socks_rep(lab, "alice", ORIGIN, HTTP_PORT) == REP_NOT_ALLOWED


@pytest.mark.timeout(120)
def test_deleting_the_rule_that_allowed_a_download_ends_it(plab: EdgeLab, payload: Payload) -> None:
    lab = plab.lab
    since = mark(lab)
    lab.add_rule("alice-http", "allow", identity="alice", ports=HTTP_PORT, position=1)
    lab.delete_rule("default")
    wait_until(
        lambda: socks_rep(lab, "bob", ORIGIN, HTTP_PORT) == REP_NOT_ALLOWED,
        STORE_DEADLINE,
        what="the edge to apply the new rules",
    )
    args = ["--proxy-user", f"alice:{USERS['alice']}", "--socks5", SOCKS_PROXY]
    with background_curl(
        lab, *args, "--limit-rate", "1M", f"http://{ORIGIN}/{payload.big.name}"
    ) as (poll, out):
        wait_until(
            lambda: poll() is None and out.stat().st_size > 0,
            STORE_DEADLINE,
            what="the download to start",
        )
        lab.delete_rule("alice-http")
        returncode = wait_until(poll, REVOKE_DEADLINE, what="curl to end")
        assert returncode != 0
    (record,) = wait_until(
        lambda: [
            r
            for r in records_where(lab, since, identity="alice", rule="implicit-deny")
            if "policy changed" in str(r["reason"])
        ],
        5,
        what="the audit line of the ended download",
    )
    assert record["result"] == "not_permitted"
    assert not records_where(lab, since, identity="alice", result="ok")  # it never completed


@contextlib.contextmanager
def udp_association(lab: Lab, user: str) -> Iterator[Callable[[], bool]]:
    """A SOCKS5 UDP ASSOCIATE as `user`; yields ping(): one datagram to the UDP echo of
    ORIGIN came back intact (within a second)."""
    with lab.connect_socks() as ctrl, lab.client.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((CLIENT_ADDR, 0))
        relay = socks5_udp_associate(ctrl, *udp.getsockname(), user=user, password=USERS[user])
        udp.connect(relay)

        def ping() -> bool:
            data = os.urandom(32)
            udp.send(udp_wrap(ORIGIN, UDP_ECHO_PORT, data))
            udp.settimeout(1.0)
            try:
                while True:
                    if udp_unwrap(udp.recv(2048))[2] == data:
                        return True
            except (TimeoutError, ConnectionRefusedError):
                return False

        yield ping


def test_a_udp_rule_ends_an_open_udp_session_and_leaves_tcp_alone(plab: EdgeLab) -> None:
    lab = plab.lab
    since = mark(lab)
    with udp_association(lab, "alice") as ping:
        assert wait_until(ping, STORE_DEADLINE, what="the UDP echo to answer")
        lab.add_rule("no-udp", "deny", identity="alice", protocol="udp", position=1)
        wait_until(lambda: not ping(), STORE_DEADLINE, what="the UDP echo to stop answering")
        (record,) = wait_until(
            lambda: [
                r
                for r in records_where(lab, since, identity="alice", protocol="udp", rule="no-udp")
                if "policy changed" in str(r["reason"])
            ],
            5,
            what="the audit line of the ended UDP session",
        )
        assert record["destination"] == f"{ORIGIN}:{UDP_ECHO_PORT}"
        assert record["result"] == "not_permitted"
        assert not ping()  # a new session is denied too
    assert socks_rep(lab, "alice", ORIGIN, HTTP_PORT) == REP_SUCCEEDED
    with udp_association(lab, "carol") as ping:
        assert ping()
    assert lab.policy_test(f"{ORIGIN}:{UDP_ECHO_PORT}/udp", "alice")[0] == "deny no-udp"
    assert lab.policy_test(f"{ORIGIN}:{UDP_ECHO_PORT}/tcp", "alice")[0] == "allow default"


# --- 3. virtual networks ---------------------------------------------------------------------


def test_two_vnets_route_the_same_prefix_to_their_own_origins(
    plab: EdgeLab, payload: Payload
) -> None:
    lab, tenant_b = plab.lab, plab.tenant_b
    since = mark(lab)
    assert payload.small.sha256 != tenant_b.small.sha256
    url = f"http://{ORIGIN}/{payload.small.name}"  # both origins have a small.bin
    for user, expected in (("alice", payload.small), ("bob", tenant_b.small)):
        for via in ("socks5", "connect", "forward"):
            got = fetch(lab, user, via, url)
            assert got.returncode == 0, (user, via, got.stderr)
            assert got.sha256 == expected.sha256, (user, via)

    # carol has no vnet: the on-ramp's decides (default -> corp; the tenant-b SOCKS5 -> branch)
    got = fetch(lab, "carol", "socks5", url)
    assert got.returncode == 0, got.stderr
    assert got.sha256 == payload.small.sha256
    got = fetch(lab, "carol", "socks5", url, proxy_port=TENANT_B_SOCKS_PORT)
    assert got.returncode == 0, got.stderr
    assert got.sha256 == tenant_b.small.sha256
    # an identity's own assignment beats the on-ramp's vnet
    got = fetch(lab, "alice", "socks5", url, proxy_port=TENANT_B_SOCKS_PORT)
    assert got.sha256 == payload.small.sha256

    for user, vnet, tunnel in (("alice", "tenant-a", "corp"), ("bob", "tenant-b", "branch")):
        ok = wait_until(
            lambda user=user: records_where(
                lab, since, identity=user, destination=f"{ORIGIN}:{HTTP_PORT}", result="ok"
            ),
            5,
            what=f"the audit lines of {user}'s flows",
        )
        assert {(r["vnet"], r["tunnel"]) for r in ok} == {(vnet, tunnel)}, user
    listing = lab.vnet("list").stdout
    assert "tenant-a" in listing and "tenant-b" in listing
    assert any(
        "routed to tunnel branch" in line
        for line in lab.policy_test(f"{ORIGIN}:{HTTP_PORT}", "bob")
    )


def test_names_in_a_routed_dns_zone_work_in_the_default_vnet(
    plab: EdgeLab, payload: Payload
) -> None:
    """carol (no vnet) reaches app.corp.example, resolved inside P, through tunnel corp."""
    lab = plab.lab
    got = fetch(lab, "carol", "socks5-hostname", f"http://{APP_NAME}/{payload.small.name}")
    assert got.returncode == 0, got.stderr
    assert got.sha256 == payload.small.sha256


def test_a_dns_zone_route_does_not_cross_virtual_networks(plab: EdgeLab, payload: Payload) -> None:
    lab = plab.lab
    since = mark(lab)
    got = fetch(lab, "bob", "socks5-hostname", f"http://{APP_NAME}/{payload.small.name}")
    records = wait_until(
        lambda: records_where(lab, since, identity="bob", destination=f"{APP_NAME}:{HTTP_PORT}"),
        5,
        what="the audit line of bob's flow",
    )
    # DNS zone routes are in the default vnet only: bob's name is not sent to corp
    assert records[-1]["tunnel"] != "corp", records[-1]
    assert records[-1]["result"] != "ok", records[-1]
    assert got.returncode != 0
    assert got.sha256 != payload.small.sha256


# --- 4. the TCP forward on-ramp --------------------------------------------------------------


def test_forward_onramp_carries_ssh_and_http(plab: EdgeLab, payload: Payload) -> None:
    lab = plab.lab
    since = mark(lab)
    out = lab.ssh(plab.ssh_key, EDGE_PUBLIC_ADDR, SSH_FORWARD_PORT, "echo", "ok")
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    assert out.stdout.strip() == b"ok"

    got = lab.curl_digest(
        f"http://{EDGE_PUBLIC_ADDR}:{HTTP_FORWARD_PORT}/{payload.small.name}", timeout=30
    )
    assert got.returncode == 0, got.stderr
    assert got.sha256 == payload.small.sha256

    records = wait_until(
        lambda: records_where(lab, since, onramp="forward", destination=f"{ORIGIN}:{SSH_PORT}"),
        5,
        what="the audit line of the ssh flow",
    )
    assert records[-1]["result"] == "ok"
    assert records[-1]["tunnel"] == "corp"
    assert records[-1]["identity"] is None

    # the on-ramp came in as a module of its own, not as an edit of the edge's core
    assert "forward" in registry.known()
    assert "forward" not in Path(ramp.edge.__file__).read_text()


def test_policy_can_close_the_forward_onramp(plab: EdgeLab) -> None:
    lab = plab.lab
    since = mark(lab)
    lab.add_rule("no-forward", "deny", onramp="forward", position=1)

    def refused() -> bool:
        with lab.client_socket() as sock:
            sock.connect((EDGE_PUBLIC_ADDR, HTTP_FORWARD_PORT))
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            try:
                return sock.recv(100) == b""  # closed without an answer
            except ConnectionResetError:
                return True

    wait_until(refused, STORE_DEADLINE, what="the forward on-ramp to be refused")
    wait_until(
        lambda: records_where(
            lab, since, onramp="forward", rule="no-forward", result="not_permitted"
        ),
        5,
        what="the audit line of the refused forward flow",
    )
    assert socks_rep(lab, "carol", ORIGIN, HTTP_PORT) == REP_SUCCEEDED


# --- 5. hooks --------------------------------------------------------------------------------


def test_failing_hooks_deny_their_flows_and_are_counted(plab: EdgeLab, payload: Payload) -> None:
    lab = plab.lab
    since = mark(lab)
    before = lab.edge_metrics()
    assert socks_rep(lab, "carol", ORIGIN, RAISE_PORT) == REP_NOT_ALLOWED
    assert socks_rep(lab, "carol", ORIGIN, HANG_PORT) == REP_NOT_ALLOWED

    def counted() -> Metrics | None:
        m = lab.edge_metrics()
        raised = counter(m, "ramp_hook_errors", hook="raising_hook", kind="raised") - counter(
            before, "ramp_hook_errors", hook="raising_hook", kind="raised"
        )
        timeout = counter(m, "ramp_hook_errors", hook="hanging_hook", kind="timeout") - counter(
            before, "ramp_hook_errors", hook="hanging_hook", kind="timeout"
        )
        return m if raised >= 1 and timeout >= 1 else None

    metrics = wait_until(counted, 5, what="ramp_hook_errors to count both failures")
    points = {
        (labels["hook"], labels["point"], labels["kind"])
        for labels in metrics.labels("ramp_hook_errors_total")
    }
    assert ("raising_hook", "flow_start", "raised") in points
    assert ("hanging_hook", "flow_start", "timeout") in points

    for port, hook in ((RAISE_PORT, "raising_hook"), (HANG_PORT, "hanging_hook")):
        records = wait_until(
            lambda port=port: records_where(
                lab, since, identity="carol", destination=f"{ORIGIN}:{port}", result="not_permitted"
            ),
            5,
            what=f"the audit line of the flow to port {port}",
        )
        assert records[-1]["rule"] == f"hook:{hook}"
        assert "hook_error" in str(records[-1]["reason"])

    # other ports are untouched, and the edge lives on
    got = fetch(lab, "carol", "socks5", f"http://{ORIGIN}/{payload.small.name}")
    assert got.returncode == 0, got.stderr
    assert got.sha256 == payload.small.sha256
    assert lab.edge is not None and lab.edge.alive()


def test_a_connect_request_hook_answers_http_proxy_requests(
    plab: EdgeLab, payload: Payload
) -> None:
    lab = plab.lab
    since = mark(lab)
    url = f"http://{ORIGIN}/{payload.small.name}"
    for via in ("forward", "connect"):
        out = lab.curl(
            "--proxy-user",
            f"carol:{USERS['carol']}",
            *proxy_flags(via),
            "--proxy-header" if via == "connect" else "--header",
            "X-Ramp-Test: answer-me",
            "-i",
            url,
            timeout=20,
        )
        head = out.stdout.split(b"\r\n\r\n")[0].lower()
        assert b" 418" in head.split(b"\r\n")[0], (via, out.stdout[:300], out.stderr)
        assert b"x-answered-by: answering_hook" in head, via
        if via == "forward":  # curl shows no body of a CONNECT answer
            assert b"answered by the hook" in out.stdout.split(b"\r\n\r\n", 1)[1]
    # without the header the request goes through, and flow_start's annotation is audited
    got = fetch(lab, "carol", "forward", url)
    assert got.returncode == 0, got.stderr
    assert got.sha256 == payload.small.sha256
    wait_until(
        lambda: any(
            r.get("annotations") == {"seen_by": "answering_hook"}
            for r in records_where(lab, since, identity="carol", result="ok")
        ),
        5,
        what="the audit line of carol's flow with the hook's annotation",
    )


# --- 6. SIGHUP -------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_sighup_keeps_the_old_config_on_errors_and_takes_a_good_one(
    tmp_path: Path,
    payload: Payload,
    lab_opener: Callable[..., AbstractContextManager[Lab]],
) -> None:
    with lab_opener(tmp_path, payload, standard=False) as lab:
        # the running config: a hook that closes port 8000
        gate = lab.write_file("gate.py", GATE_HOOK.format(version=2, port=HTTP_ALT_PORT))
        config = lab.write_edge_config({"hooks": [str(gate)]})
        token = lab.create_tunnel("corp", [ORIGIN_PREFIX])
        lab.start_edge("--config", str(config))
        lab.start_connector(token, "--connect-timeout", "2")
        lab.wait_tunnel_connections("corp", 1)
        edge = lab.edge
        assert edge is not None
        small = f"http://{ORIGIN}/{payload.small.name}"

        def reloads(result: str) -> float:
            return counter(lab.edge_metrics(), "ramp_config_reloads", result=result)

        # broken YAML, then a key the edge does not know, then a hook that cannot load
        bad_hook = lab.write_file("bad_hook.py", "raise ImportError('no such thing')\n")
        for n, write in enumerate(
            [
                lambda: lab.write_file(config.name, "onramps: [unclosed\n  - :\n"),
                lambda: lab.write_edge_config({"no_such_key": 1}),
                lambda: lab.write_edge_config({"hooks": [str(bad_hook)]}),
            ],
            start=1,
        ):
            write()
            lab.reload_edge()
            wait_until(
                lambda n=n: reloads("failed") == n,
                RELOAD_DEADLINE,
                what=f"failed reload number {n}",
            )
            assert edge.alive()
            got = lab.curl_digest(*lab.proxy_args("socks5"), small, timeout=30)
            assert got.returncode == 0, (n, got.stderr)
            assert got.sha256 == payload.small.sha256
            code, sock = lab.socks5(ORIGIN, HTTP_ALT_PORT)  # the old hook still runs
            sock.close()
            assert code == REP_NOT_ALLOWED, n
        assert edge.stderr().count("reload failed, keeping the running configuration") == 3
        assert reloads("ok") == 0

        # a good config with a hook that denies every new flow, while a download runs
        deny_all = lab.write_file("deny_all.py", DENY_ALL_HOOK)
        big = f"http://{ORIGIN}/{payload.big.name}"
        # 100 MiB at 5 MB/s: still running when the reload is done
        with background_curl(lab, "--socks5", SOCKS_PROXY, "--limit-rate", "5M", big) as (
            poll,
            out,
        ):
            wait_until(
                lambda: poll() is None and out.stat().st_size > 0,
                RELOAD_DEADLINE,
                what="the download to start",
            )
            lab.write_edge_config({"hooks": [str(deny_all)]})
            lab.reload_edge()
            wait_until(lambda: reloads("ok") == 1, RELOAD_DEADLINE, what="the good reload")
            assert poll() is None, "the download ended before the reload: it checks nothing"

            code, sock = lab.socks5(ORIGIN, HTTP_PORT)
            sock.close()
            assert code == REP_NOT_ALLOWED
            got = lab.curl_digest(*lab.proxy_args("socks5"), small, timeout=30)
            assert got.returncode == 97, got.stderr

            returncode = wait_until(
                lambda: poll() is not None and (poll(),), 200, what="the download to finish"
            )
            assert returncode == (0,)
            assert out.stat().st_size == payload.big.size
            assert sha256_of(out) == payload.big.sha256

        denied = [
            r
            for r in lab.audit_records()
            if r["result"] == "not_permitted" and r["rule"] == "hook:deny_all"
        ]
        assert denied
        assert all("closed for maintenance" in str(r["reason"]) for r in denied)
        assert reloads("failed") == 3


@pytest.mark.timeout(180)
def test_sighup_takes_new_users_groups_and_an_edited_hook_file(
    tmp_path: Path,
    payload: Payload,
    lab_opener: Callable[..., AbstractContextManager[Lab]],
) -> None:
    with lab_opener(tmp_path, payload, standard=False) as lab:
        gate = lab.write_file("gate.py", GATE_HOOK.format(version=1, port=HTTP_ALT_PORT))
        users = {"alice": USERS["alice"], "bob": USERS["bob"]}
        config = lab.write_edge_config(
            {"users": users, "groups": {"eng": ["alice"]}, "hooks": [str(gate)]}
        )
        token = lab.create_tunnel("corp", [ORIGIN_PREFIX])
        lab.delete_rule("default")
        lab.add_rule("eng", "allow", group="eng")
        lab.start_edge("--config", str(config))
        lab.start_connector(token, "--connect-timeout", "2")
        lab.wait_tunnel_connections("corp", 1)
        since = mark(lab)

        def reloads(result: str) -> float:
            return counter(lab.edge_metrics(), "ramp_config_reloads", result=result)

        def sighup(n: int) -> None:
            lab.reload_edge()
            wait_until(lambda: reloads("ok") == n, RELOAD_DEADLINE, what=f"reload {n}")

        assert socks_rep(lab, "alice", ORIGIN, HTTP_PORT) == REP_SUCCEEDED
        assert socks_rep(lab, "bob", ORIGIN, HTTP_PORT) == REP_NOT_ALLOWED
        assert lab.policy_test(f"{ORIGIN}:80", "alice", "--config", str(config))[0] == "allow eng"

        # groups: bob joins eng, alice leaves it
        lab.write_edge_config({"users": users, "groups": {"eng": ["bob"]}, "hooks": [str(gate)]})
        sighup(1)
        assert socks_rep(lab, "bob", ORIGIN, HTTP_PORT) == REP_SUCCEEDED
        assert socks_rep(lab, "alice", ORIGIN, HTTP_PORT) == REP_NOT_ALLOWED

        # users: bob's password changes, alice is gone
        lab.write_edge_config(
            {"users": {"bob": "new-secret"}, "groups": {"eng": ["bob"]}, "hooks": [str(gate)]}
        )
        sighup(2)
        for user, password in (("alice", USERS["alice"]), ("bob", USERS["bob"])):
            with lab.connect_socks() as sock, pytest.raises(ProxyError):
                socks5_connect(sock, ORIGIN, HTTP_PORT, user=user, password=password)
        with lab.connect_socks() as sock:
            assert socks5_connect(sock, ORIGIN, HTTP_PORT, user="bob", password="new-secret") == 0

        # the hook file edited in place, the config unchanged: SIGHUP runs the new code
        lab.write_file(gate.name, GATE_HOOK.format(version=2, port=HTTP_ALT_PORT))
        sighup(3)
        with lab.connect_socks() as sock:
            rep = socks5_connect(sock, ORIGIN, HTTP_ALT_PORT, user="bob", password="new-secret")
        assert rep == REP_NOT_ALLOWED
        with lab.connect_socks() as sock:
            rep = socks5_connect(sock, ORIGIN, HTTP_PORT, user="bob", password="new-secret")
        assert rep == REP_SUCCEEDED

        records = wait_until(
            lambda: records_where(lab, since, identity="bob", rule="hook:gate"),
            5,
            what="the audit line of the flow the edited hook denied",
        )
        assert records[-1]["reason"] == f"denied by hook:gate: gate v2 closes port {HTTP_ALT_PORT}"
        assert records[-1]["annotations"] == {"gate": "v2"}
        assert reloads("failed") == 0


@pytest.mark.timeout(120)
def test_a_group_change_by_sighup_ends_open_flows_it_now_denies(
    tmp_path: Path,
    payload: Payload,
    lab_opener: Callable[..., AbstractContextManager[Lab]],
) -> None:
    with lab_opener(tmp_path, payload, standard=False) as lab:
        lab.client.sysctl("net.ipv4.tcp_rmem", "4096 65536 262144")  # see edge_lab
        users = {"alice": USERS["alice"]}
        config = lab.write_edge_config({"users": users, "groups": {"eng": ["alice"]}})
        token = lab.create_tunnel("corp", [ORIGIN_PREFIX])
        lab.add_rule("eng", "allow", group="eng", position=1)
        lab.delete_rule("default")
        lab.start_edge("--config", str(config))
        lab.start_connector(token, "--connect-timeout", "2")
        lab.wait_tunnel_connections("corp", 1)
        args = ["--proxy-user", f"alice:{USERS['alice']}", "--socks5", SOCKS_PROXY]
        url = f"http://{ORIGIN}/{payload.big.name}"
        with background_curl(lab, *args, "--limit-rate", "1M", url) as (poll, out):
            wait_until(
                lambda: poll() is None and out.stat().st_size > 0,
                STORE_DEADLINE,
                what="the download to start",
            )
            lab.write_edge_config({"users": users, "groups": {"eng": []}})
            lab.reload_edge()
            wait_until(
                lambda: counter(lab.edge_metrics(), "ramp_config_reloads", result="ok") == 1,
                RELOAD_DEADLINE,
                what="the reload",
            )
            assert socks_rep(lab, "alice", ORIGIN, HTTP_PORT) == REP_NOT_ALLOWED  # new flows
            returncode = wait_until(poll, REVOKE_DEADLINE, what="the open download to end")
            assert returncode != 0
