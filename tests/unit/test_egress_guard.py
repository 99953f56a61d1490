"""Direct egress never reaches the edge's own services, link-local neighbours or metadata
endpoints unless a policy rule names them, whatever form the address is written in."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from pathlib import Path

import pytest

from ramp.edge import Edge
from ramp.net import egress
from ramp.net.egress import EgressGuard
from ramp.policy.rules import Rule
from ramp.store.db import Store
from ramp.testing.loopback import loopback_edge_config, run
from ramp.testing.wait import until

OWN = frozenset({ipaddress.ip_address("192.0.2.2"), ipaddress.ip_address("2001:db8::2")})


def no_rule() -> None:
    return None


@pytest.mark.parametrize(
    ("address", "what"),
    [
        ("127.0.0.1", "loopback"),
        ("127.9.9.9", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0:0:0:0:0:ffff:7f00:1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("169.254.169.254", "a metadata address"),
        ("::ffff:169.254.169.254", "a metadata address"),
        ("100.100.100.200", "a metadata address"),
        ("fd00:ec2::254", "a metadata address"),
        ("169.254.1.1", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("192.0.2.2", "an address of the edge"),
        ("::ffff:192.0.2.2", "an address of the edge"),
        ("2001:db8::2", "an address of the edge"),
    ],
)
def test_denied_addresses_say_what_they_are(address: str, what: str) -> None:
    problem = EgressGuard(OWN).problem(address, no_rule)
    assert problem is not None
    assert problem.startswith(egress.REASON)
    assert problem.endswith(f"is {what})")


@pytest.mark.parametrize("address", ["192.0.2.3", "10.1.2.3", "8.8.8.8", "2001:db8::3"])
def test_other_addresses_are_not_denied(address: str) -> None:
    assert EgressGuard(OWN).problem(address, no_rule) is None


@pytest.mark.parametrize(
    ("address", "to", "allowed"),
    [
        ("127.0.0.1", "127.0.0.1/32", True),
        ("::ffff:127.0.0.1", "127.0.0.1/32", True),
        ("127.0.0.1", "127.0.0.0/8", True),
        ("127.0.0.2", "127.0.0.1/32", False),
        ("127.0.0.1", "0.0.0.0/0", False),  # a catch-all does not name loopback
        ("169.254.1.1", "169.254.0.0/16", True),
        ("169.254.1.1", "169.254.0.0/15", False),
        ("169.254.169.254", "169.254.169.254/32", True),
        ("169.254.169.254", "169.254.0.0/16", False),  # metadata must be named itself
        ("::1", "::1/128", True),
        ("::1", "::/0", False),
        ("192.0.2.2", "192.0.2.2/32", True),
        ("192.0.2.2", "192.0.2.0/24", False),  # the edge's LAN is not the edge
        ("127.0.0.1", "*.corp.example", False),
        ("127.0.0.1", None, False),
    ],
)
def test_a_rule_allows_a_denied_address_only_by_naming_it(
    address: str, to: str | None, allowed: bool
) -> None:
    problem = EgressGuard(OWN).problem(address, lambda: to)
    assert (problem is None) is allowed


def test_the_edge_addresses_include_every_interface() -> None:
    found = egress.interface_addresses()
    assert ipaddress.ip_address("127.0.0.1") in found
    assert egress._ipv4_ioctl() <= found
    assert egress._ipv6_proc() <= found


async def socks(port: int, atyp: int, addr: bytes, dport: int) -> int:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"\x05\x01\x00")
    await r.readexactly(2)
    w.write(b"\x05\x01\x00" + bytes([atyp]) + addr + struct.pack("!H", dport))
    head = await r.readexactly(4)
    await r.readexactly(6 if head[3] == 1 else 18)
    w.close()
    return head[1]


def test_direct_egress_refuses_the_edges_loopback_until_a_rule_names_it(tmp_path: Path) -> None:
    async def main() -> None:
        srv = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        oport = srv.sockets[0].getsockname()[1]
        with Store(tmp_path) as store:
            store.add_rule(Rule("everything", "allow", to="0.0.0.0/0"), 1)
        edge = Edge(loopback_edge_config(tmp_path, allow_direct_egress=True))
        await edge.start()
        port = edge.onramps[0].port
        try:
            v4 = socket.inet_aton("127.0.0.1")
            mapped = socket.inet_pton(socket.AF_INET6, "::ffff:127.0.0.1")
            assert await socks(port, 1, v4, oport) == 0x02
            assert await socks(port, 4, mapped, oport) == 0x02
            denied = edge.metrics.registry.get_sample_value(
                "ramp_flows_rejected_total", {"reason": "direct_egress_denied"}
            )
            assert denied == 2
            with Store(tmp_path) as store:
                store.add_rule(Rule("local-origin", "allow", to="127.0.0.1/32"), 1)
            edge.reload_store()
            assert await socks(port, 1, v4, oport) == 0x00
            assert await socks(port, 4, mapped, oport) == 0x00
        finally:
            await edge.close()
            srv.close()
        audit = (tmp_path / "audit.log").read_text()
        assert audit.count(f"{egress.REASON} (127.0.0.1 is loopback)") == 2

    run(main())


def test_the_edge_addresses_are_read_again_when_stale() -> None:
    async def main() -> None:
        guard = EgressGuard(refresh_after=0)
        guard.own = frozenset()  # as if the interfaces had just come up
        assert guard.problem("127.0.0.2", no_rule) is not None  # loopback needs no refresh
        guard.maybe_refresh()
        await until(lambda: ipaddress.ip_address("127.0.0.1") in guard.own, what="a refresh")

    run(main())
