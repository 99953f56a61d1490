"""PROXY protocol both ways with the real peers users put around an edge: Debian's haproxy in
front of the edge (send-proxy-v2 and send-proxy), nginx origins with `listen ... proxy_protocol`
behind the tunnel and behind direct egress.

    C 203.0.113.2 (and .4) ──► E: haproxy 203.0.113.1:1190 (v2) :1191 (v1) :1192 (v2, HTTP)
                                    └─► edge on-ramps on 127.0.0.1 (proxy_protocol required)
                                edge ──tunnel──► P: nginx 198.51.100.20:80 (route v2)
                                                      198.51.100.21:80 (route v1)
                                edge ──direct──► C: nginx 203.0.113.2:8090 (v1)

The edge also has on-ramps facing C directly, to show what it refuses: one that trusts only
127.0.0.1 (optional and required), one that trusts C (for damaged headers).
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest

from ramp.testing.clients import REP_NOT_ALLOWED, REP_SUCCEEDED, socks5_connect
from ramp.testing.lab import (
    CLIENT_ADDR,
    CLIENT_ADDR2,
    EDGE_PUBLIC_ADDR,
    Lab,
    Payload,
    wait_until,
)
from ramp.wire import proxy_protocol as pp

PP_V2 = "198.51.100.20"  # nginx origins in P, behind routes that ask for a header
PP_V1 = "198.51.100.21"
DIRECT_NGINX_PORT = 8090  # nginx in C, reached by direct egress
HAPROXY_V2, HAPROXY_V1, HAPROXY_HTTP = 1190, 1191, 1192
INNER_SOCKS, INNER_HTTP = 1090, 1092  # the edge's on-ramps behind haproxy, on E's loopback
OPTIONAL_PORT, REQUIRED_PORT, TRUSTS_C_PORT = 1095, 1096, 1097
DEADLINE = 20.0

HAPROXY_CFG = """\
global
    maxconn 512
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend socks_v2
    bind {edge}:{v2}
    default_backend socks_v2
backend socks_v2
    server edge 127.0.0.1:{socks} send-proxy-v2
frontend socks_v1
    bind {edge}:{v1}
    default_backend socks_v1
backend socks_v1
    server edge 127.0.0.1:{socks} send-proxy
frontend http_v2
    bind {edge}:{http}
    default_backend http_v2
backend http_v2
    server edge 127.0.0.1:{http_inner} send-proxy-v2
"""

NGINX_CFG = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 64; }}
http {{
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    log_format pp '$proxy_protocol_addr $proxy_protocol_port $remote_addr';
{servers}
}}
"""

NGINX_SERVER = """\
    server {{
        listen {listen} proxy_protocol;
        access_log {log} pp;
        location / {{ return 200 "{name}\\n"; }}
    }}
"""


def _edge_config() -> dict[str, object]:
    def onramp(kind: str, listen: str, mode: str, trusted: str) -> dict[str, object]:
        return {
            "type": kind,
            "listen": listen,
            "proxy_protocol": {"mode": mode, "trusted": [trusted], "timeout": 1.0},
        }

    return {
        "allow_direct_egress": True,
        "direct_egress_proxy_protocol": {f"{CLIENT_ADDR}/32": "v1"},
        "onramps": [
            onramp("socks5", f"127.0.0.1:{INNER_SOCKS}", "required", "127.0.0.1/32"),
            onramp("http", f"127.0.0.1:{INNER_HTTP}", "required", "127.0.0.1/32"),
            onramp("socks5", f"{EDGE_PUBLIC_ADDR}:{OPTIONAL_PORT}", "optional", "127.0.0.1/32"),
            onramp("socks5", f"{EDGE_PUBLIC_ADDR}:{REQUIRED_PORT}", "required", "127.0.0.1/32"),
            onramp(
                "socks5", f"{EDGE_PUBLIC_ADDR}:{TRUSTS_C_PORT}", "required", f"{CLIENT_ADDR}/32"
            ),
        ],
    }


def _start_nginx(lab: Lab, name: str, ns_name: str, servers: list[tuple[str, str]]) -> Path:
    """nginx in `ns_name` ("client" or "private") with a PROXY-protocol server per
    (listen, log name); returns its directory (the logs are NAME.log there)."""
    d = lab.workdir / f"nginx-{name}"
    d.mkdir()
    blocks = "".join(
        NGINX_SERVER.format(listen=listen, log=d / f"{log}.log", name=log)
        for listen, log in servers
    )
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CFG.format(dir=d, servers=blocks))
    ns = lab.client if ns_name == "client" else lab.private
    lab.start_process(f"nginx-{name}", ns, ["nginx", "-p", str(d), "-c", str(conf), "-e", "stderr"])
    lab.wait_listening(ns, [("tcp", listen) for listen, _ in servers])
    return d


@dataclass
class PPLab:
    lab: Lab
    origin_logs: Path  # nginx in P: v2.log, v1.log
    direct_logs: Path  # nginx in C: direct.log


@pytest.fixture(scope="module")
def pp_lab(
    tmp_path_factory: pytest.TempPathFactory,
    payload: Payload,
    lab_opener: Callable[..., AbstractContextManager[Lab]],
) -> Iterator[PPLab]:
    with lab_opener(tmp_path_factory.mktemp("pp"), payload, standard=False) as lab:
        for addr in (PP_V2, PP_V1):
            lab.private.add_address("lo", f"{addr}/32")
        lab.add_client_address()
        lab.create_tunnel("corp", ["198.51.100.0/24"])
        lab.ramp("tunnel", "route", "ip", "add", f"{PP_V2}/32", "corp", "--proxy-protocol", "v2")
        lab.ramp("tunnel", "route", "ip", "add", f"{PP_V1}/32", "corp", "--proxy-protocol", "v1")
        origin_logs = _start_nginx(
            lab, "origin", "private", [(f"{PP_V2}:80", "v2"), (f"{PP_V1}:80", "v1")]
        )
        direct_logs = _start_nginx(
            lab, "direct", "client", [(f"{CLIENT_ADDR}:{DIRECT_NGINX_PORT}", "direct")]
        )
        cfg = lab.write_edge_config(_edge_config())
        lab.start_edge("--config", str(cfg))
        lab.wait_listening(
            lab.edge_ns,
            [("tcp", f"127.0.0.1:{INNER_SOCKS}"), ("tcp", f"127.0.0.1:{INNER_HTTP}")],
        )
        haproxy_cfg = lab.write_file(
            "haproxy.cfg",
            HAPROXY_CFG.format(
                edge=EDGE_PUBLIC_ADDR,
                v2=HAPROXY_V2,
                v1=HAPROXY_V1,
                http=HAPROXY_HTTP,
                socks=INNER_SOCKS,
                http_inner=INNER_HTTP,
            ),
        )
        lab.start_process("haproxy", lab.edge_ns, ["haproxy", "-db", "-f", str(haproxy_cfg)])
        lab.wait_listening(
            lab.edge_ns,
            [("tcp", f"{EDGE_PUBLIC_ADDR}:{p}") for p in (HAPROXY_V2, HAPROXY_V1, HAPROXY_HTTP)],
        )
        lab.start_connector(lab.token("corp"), "--connect-timeout", "2")
        lab.wait_tunnel_connections("corp", 1)
        yield PPLab(lab, origin_logs, direct_logs)


def _curl(
    lab: Lab, proxy: str, url: str, source: str = CLIENT_ADDR
) -> subprocess.CompletedProcess[bytes]:
    return lab.curl("--interface", source, "-x", proxy, url, timeout=20)


def _log_lines(path: Path, n: int) -> list[list[str]]:
    wait_until(
        lambda: path.exists() and len(path.read_text().splitlines()) >= n,
        DEADLINE,
        what=f"{n} lines in {path.name}",
    )
    return [line.split() for line in path.read_text().splitlines()]


def _audit(lab: Lab, match: Callable[[dict[str, object]], bool]) -> dict[str, object]:
    found: list[dict[str, object]] = []

    def seen() -> bool:
        found[:] = [r for r in lab.audit_records() if match(r)]
        return bool(found)

    wait_until(seen, DEADLINE, what="the flow's audit record")
    return found[-1]


def _bad(lab: Lab, reason: str) -> float:
    return lab.edge_metrics().value("ramp_bad_input_total", onramp="socks5", reason=reason)


@pytest.mark.parametrize(
    "proxy, log",
    [
        (f"socks5://{EDGE_PUBLIC_ADDR}:{HAPROXY_V2}", "v2"),
        (f"socks5://{EDGE_PUBLIC_ADDR}:{HAPROXY_V1}", "v1"),
        (f"http://{EDGE_PUBLIC_ADDR}:{HAPROXY_HTTP}", "v2"),
    ],
)
def test_behind_haproxy_the_audit_and_the_origin_see_the_real_client(
    pp_lab: PPLab, proxy: str, log: str
) -> None:
    lab = pp_lab.lab
    origin = PP_V2 if log == "v2" else PP_V1
    path = pp_lab.origin_logs / f"{log}.log"
    before = len(path.read_text().splitlines()) if path.exists() else 0
    onramp = "http" if proxy.startswith("http") else "socks5"
    version = "v1" if proxy.endswith(str(HAPROXY_V1)) else "v2"

    def accepted() -> float:
        return lab.edge_metrics().value(
            "ramp_proxy_headers_total", onramp=onramp, version=version, kind="client"
        )

    accepted_before = accepted()
    r = _curl(lab, proxy, f"http://{origin}/")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{log}\n".encode()
    # nginx got the header from the connector: the real client, not the connector (P's own
    # address) nor haproxy (127.0.0.1)
    pp_addr, pp_port, remote = _log_lines(path, before + 1)[before]
    assert pp_addr == CLIENT_ADDR
    assert remote != CLIENT_ADDR
    record = _audit(
        lab,
        lambda rec: (
            rec["destination"] == f"{origin}:80" and str(rec["source"]).endswith(f":{pp_port}")
        ),
    )
    assert str(record["source"]) == f"{CLIENT_ADDR}:{pp_port}"
    assert record["result"] == "ok" and record["offramp"] == "tunnel"
    annotations = record.get("annotations")
    assert isinstance(annotations, dict) and annotations["proxy_peer"].startswith("127.0.0.1:")
    assert accepted() == accepted_before + 1


def test_policy_decides_on_the_real_client_address(pp_lab: PPLab) -> None:
    lab = pp_lab.lab
    lab.add_rule("deny-second-client", "deny", source=f"{CLIENT_ADDR2}/32", position=1)
    try:
        wait_until(
            lambda: (
                _curl(
                    lab,
                    f"socks5://{EDGE_PUBLIC_ADDR}:{HAPROXY_V2}",
                    f"http://{PP_V2}/",
                    CLIENT_ADDR2,
                ).returncode
                != 0
            ),
            DEADLINE,
            what="the edge to load the new rule",
        )
        # haproxy's address (127.0.0.1) is the same for both; only the header tells them apart
        with lab.client_socket() as sock:
            sock.bind((CLIENT_ADDR2, 0))
            sock.connect((EDGE_PUBLIC_ADDR, HAPROXY_V1))
            assert socks5_connect(sock, PP_V1, 80) == REP_NOT_ALLOWED
        record = _audit(lab, lambda rec: rec["rule"] == "deny-second-client")
        assert str(record["source"]).startswith(f"{CLIENT_ADDR2}:")
        assert record["result"] == "not_permitted"
        r = _curl(lab, f"socks5://{EDGE_PUBLIC_ADDR}:{HAPROXY_V2}", f"http://{PP_V2}/")
        assert r.returncode == 0, r.stderr
    finally:
        lab.delete_rule("deny-second-client")


def test_direct_egress_sends_the_header_to_an_nginx_origin(pp_lab: PPLab) -> None:
    lab = pp_lab.lab
    path = pp_lab.direct_logs / "direct.log"
    before = len(path.read_text().splitlines()) if path.exists() else 0
    r = _curl(
        lab,
        f"socks5://{EDGE_PUBLIC_ADDR}:{HAPROXY_V2}",
        f"http://{CLIENT_ADDR}:{DIRECT_NGINX_PORT}/",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"direct\n"
    pp_addr, pp_port, remote = _log_lines(path, before + 1)[before]
    # the connection came from the edge (203.0.113.1); the header names the client behind
    # haproxy, with the port of its own connection to haproxy
    assert (pp_addr, remote) == (CLIENT_ADDR, EDGE_PUBLIC_ADDR)
    record = _audit(lab, lambda rec: rec["offramp"] == "direct")
    assert record["source"] == f"{CLIENT_ADDR}:{pp_port}"


def _refused(lab: Lab, port: int, data: bytes, *, source: str = CLIENT_ADDR) -> bytes:
    """Send `data` to an on-ramp facing C and return what comes back before the close."""
    with lab.client_socket(timeout=DEADLINE) as sock:
        sock.bind((source, 0))
        sock.connect((EDGE_PUBLIC_ADDR, port))
        sock.sendall(data)
        got = b""
        try:
            while chunk := sock.recv(4096):
                got += chunk
        except ConnectionResetError:
            pass
        return got


def test_untrusted_malformed_and_missing_headers_are_refused_and_counted(
    pp_lab: PPLab,
) -> None:
    lab = pp_lab.lab
    header = pp.encode_v2((CLIENT_ADDR2, 5555), (EDGE_PUBLIC_ADDR, 1))
    greeting = b"\x05\x01\x00"
    body = header[16:] + bytes((pp.PP2_TYPE_RAMP_IDENTITY, 0x01, 0x00)) + b"alice"
    oversized_tlv = header[:14] + len(body).to_bytes(2, "big") + body
    cases = [
        # a header from a peer that is no trusted balancer
        (OPTIONAL_PORT, header + greeting, "proxy_header_untrusted"),
        (REQUIRED_PORT, header + greeting, "proxy_source_untrusted"),
        # from a trusted peer: damaged, missing, cut short
        (
            TRUSTS_C_PORT,
            b"PROXY TCP4 203.0.113.4 203.0.113.1 5555 99999\r\n",
            "proxy_header_malformed",
        ),
        (TRUSTS_C_PORT, pp.V2_SIGNATURE + b"\x21\x11\xff\xff" + greeting, "proxy_header_malformed"),
        (TRUSTS_C_PORT, header[:12] + b"\x22" + header[13:], "proxy_header_malformed"),
        # a TLV longer than the header, a length past the edge's limit
        (TRUSTS_C_PORT, oversized_tlv + greeting, "proxy_header_malformed"),
        (TRUSTS_C_PORT, header[:14] + b"\x13\x88" + header[16:], "proxy_header_malformed"),
        (TRUSTS_C_PORT, greeting, "proxy_header_missing"),
        (TRUSTS_C_PORT, header[:20], "proxy_header_timeout"),
    ]
    before = {reason: _bad(lab, reason) for _, _, reason in cases}
    for port, data, reason in cases:
        assert _refused(lab, port, data) == b"", reason
    expected = dict(before)
    for _, _, reason in cases:
        expected[reason] += 1
    wait_until(
        lambda: {reason: _bad(lab, reason) for reason in expected} == expected,
        DEADLINE,
        what=f"the bad-input counters to reach {expected}",
    )
    # a header cut at every byte, then closed: refused each time, and the edge serves on
    for cut in range(1, len(header)):
        with lab.client_socket(timeout=DEADLINE) as sock:
            sock.connect((EDGE_PUBLIC_ADDR, TRUSTS_C_PORT))
            sock.sendall(header[:cut])
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(16) == b""
    # the optional on-ramp still serves C as itself, and the good ones through haproxy
    with lab.client_socket() as sock:
        sock.connect((EDGE_PUBLIC_ADDR, OPTIONAL_PORT))
        assert socks5_connect(sock, PP_V2, 80) == REP_SUCCEEDED
    assert (
        _curl(lab, f"socks5://{EDGE_PUBLIC_ADDR}:{HAPROXY_V1}", f"http://{PP_V1}/").returncode == 0
    )
    assert lab.edge is not None
    lab.edge.check_alive()
