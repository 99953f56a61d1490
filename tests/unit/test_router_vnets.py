"""Route lookup per virtual network."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from ramp.policy import router
from ramp.policy.router import RouteEntry, RouteTable, VnetRoutes
from ramp.store import db
from ramp.store.db import Store


def entry(cidr: str, tunnel: str, vnet: str = "default") -> RouteEntry:
    return RouteEntry(ipaddress.ip_network(cidr), f"id-{tunnel}", tunnel, vnet)


def test_overlapping_prefixes_in_two_vnets_go_to_their_own_tunnels() -> None:
    routes = VnetRoutes(
        [
            entry("198.51.100.0/24", "a-tun", "tenant-a"),
            entry("198.51.100.0/24", "b-tun", "tenant-b"),
            entry("198.51.100.128/25", "b-narrow", "tenant-b"),
            entry("10.0.0.0/8", "corp"),
            entry("2001:db8::/32", "a6", "tenant-a"),
        ]
    )
    hit = routes.lookup("tenant-a", "198.51.100.200")
    assert hit is not None and (hit.tunnel_name, hit.vnet) == ("a-tun", "tenant-a")
    hit = routes.lookup("tenant-b", "198.51.100.1")
    assert hit is not None and hit.tunnel_name == "b-tun"
    # Longest prefix wins, within the vnet only.
    hit = routes.lookup("tenant-b", "198.51.100.200")
    assert hit is not None and hit.tunnel_name == "b-narrow"
    hit = routes.lookup("tenant-a", ipaddress.ip_address("2001:db8::1"))
    assert hit is not None and hit.tunnel_name == "a6"
    # No leaking between vnets, default included.
    assert routes.lookup("default", "198.51.100.1") is None
    assert routes.lookup("tenant-a", "10.1.2.3") is None
    hit = routes.lookup("default", "10.1.2.3")
    assert hit is not None and hit.tunnel_name == "corp"
    assert routes.lookup("tenant-b", "2001:db8::1") is None


def test_tables_default_always_present_and_unknown_vnet_matches_nothing() -> None:
    empty = VnetRoutes()
    assert set(empty.tables) == {"default"} and len(empty) == 0
    assert empty.lookup("default", "10.0.0.1") is None
    routes = VnetRoutes([entry("0.0.0.0/0", "all", "t1"), entry("::/0", "all6", "t1")])
    assert set(routes.tables) == {"default", "t1"}
    assert isinstance(routes.tables["t1"], RouteTable) and len(routes.tables["t1"]) == 2
    assert len(routes) == 2
    assert routes.lookup("ghost", "10.0.0.1") is None
    # An IPv4-mapped IPv6 address matches IPv4 routes, as in RouteTable.
    hit = routes.lookup("t1", "::ffff:192.0.2.1")
    assert hit is not None and hit.tunnel_name == "all"


def test_existing_route_entries_are_in_default() -> None:
    e = RouteEntry(ipaddress.ip_network("10.0.0.0/8"), "w", "wide")
    assert e.vnet == "default"
    assert VnetRoutes([e]).lookup("default", "10.9.9.9") is e
    assert router.DEFAULT_VNET == db.DEFAULT_VNET


def test_built_straight_from_the_store(tmp_path: Path) -> None:
    with Store(tmp_path / "data") as store:
        store.create_tunnel("a-tun")
        store.create_tunnel("b-tun")
        store.add_vnet("tenant-a")
        store.add_vnet("tenant-b")
        store.add_route("198.51.100.0/24", "a-tun", vnet="tenant-a")
        store.add_route("198.51.100.0/24", "b-tun", vnet="tenant-b")
        routes = VnetRoutes(store.list_routes())
        tunnel_b = store.get_tunnel("b-tun")
    hit = routes.lookup("tenant-b", "198.51.100.9")
    assert tunnel_b is not None and hit is not None
    assert (hit.tunnel_id, hit.tunnel_name, hit.vnet) == (tunnel_b.id, "b-tun", "tenant-b")
    assert hit.network == ipaddress.ip_network("198.51.100.0/24")
    assert routes.lookup("default", "198.51.100.9") is None


def test_edge_keeps_one_table_per_vnet_so_tenant_prefixes_cannot_collide(tmp_path: Path) -> None:
    from ramp.config import EdgeConfig
    from ramp.edge import Edge

    with Store(tmp_path) as store:
        store.create_tunnel("corp")
        store.create_tunnel("a-tun")
        store.add_vnet("tenant-a")
        store.add_route("198.51.100.0/24", "corp")
        store.add_route("198.51.100.0/24", "a-tun", vnet="tenant-a")
        store.add_route("203.0.113.0/24", "a-tun", vnet="tenant-a")
    edge = Edge(EdgeConfig(data_dir=tmp_path, audit_log=str(tmp_path / "audit.log")))
    try:
        edge.reload_store()
        tables = edge.router.tables
        hit = tables["default"].lookup("198.51.100.1")
        assert hit is not None and hit.tunnel_name == "corp"
        assert tables["default"].lookup("203.0.113.1") is None
        hit = tables["tenant-a"].lookup("198.51.100.1")
        assert hit is not None and hit.tunnel_name == "a-tun"
    finally:
        edge.store.close()
