"""Virtual networks in the store: overlapping routes, assignments, and the v1 -> v2 migration."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from ramp.store.db import DEFAULT_VNET, SCHEMA_VERSION, Store, StoreError


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path) -> Iterator[Store]:
    s = Store(data_dir)
    yield s
    s.close()


def _routes(store: Store, vnet: str | None = None) -> list[tuple[str, str, str]]:
    return [(r.vnet, r.cidr, r.tunnel_name) for r in store.list_routes(vnet)]


def test_default_vnet_always_exists_and_cannot_be_deleted(store: Store, data_dir: Path) -> None:
    assert [v.name for v in store.list_vnets()] == [DEFAULT_VNET]
    with pytest.raises(StoreError, match="'default' virtual network cannot be deleted"):
        store.delete_vnet("default")
    # Opening again neither duplicates nor replaces it.
    vid = store.list_vnets()[0].id
    with Store(data_dir) as again:
        assert [(v.id, v.name) for v in again.list_vnets()] == [(vid, DEFAULT_VNET)]


def test_two_tenants_route_the_same_prefix_to_their_own_tunnels(store: Store) -> None:
    store.create_tunnel("a-tun")
    store.create_tunnel("b-tun")
    store.add_vnet("tenant-b")
    store.add_vnet("tenant-a")
    assert [v.name for v in store.list_vnets()] == ["default", "tenant-a", "tenant-b"]
    ra = store.add_route("198.51.100.0/24", "a-tun", vnet="tenant-a")
    assert (ra.vnet, ra.cidr, ra.tunnel_name) == ("tenant-a", "198.51.100.0/24", "a-tun")
    store.add_route("198.51.100.7/24", "b-tun", vnet="tenant-b")
    store.add_route("198.51.100.0/24", "a-tun")  # and once more in default
    store.add_route("10.0.0.0/8", "b-tun", vnet="tenant-b")
    assert _routes(store) == [
        ("default", "198.51.100.0/24", "a-tun"),
        ("tenant-a", "198.51.100.0/24", "a-tun"),
        ("tenant-b", "10.0.0.0/8", "b-tun"),
        ("tenant-b", "198.51.100.0/24", "b-tun"),
    ]
    assert _routes(store, "tenant-a") == [("tenant-a", "198.51.100.0/24", "a-tun")]
    # Unique within one vnet.
    with pytest.raises(StoreError, match=r"198\.51\.100\.0/24 already exists.*'tenant-b'"):
        store.add_route("198.51.100.0/24", "a-tun", vnet="tenant-b")
    # Deleting in one vnet leaves the others alone.
    assert store.delete_route("198.51.100.1/24", vnet="tenant-b") == "198.51.100.0/24"
    assert ("tenant-a", "198.51.100.0/24", "a-tun") in _routes(store)
    assert ("default", "198.51.100.0/24", "a-tun") in _routes(store)
    with pytest.raises(StoreError, match=r"no route 198\.51\.100\.0/24 in virtual network"):
        store.delete_route("198.51.100.0/24", vnet="tenant-b")


def test_unknown_vnet_is_refused_everywhere(store: Store) -> None:
    store.create_tunnel("a")
    v = store.data_version()
    msg = "unknown virtual network 'ghost'"
    with pytest.raises(StoreError, match=msg):
        store.add_route("10.0.0.0/8", "a", vnet="ghost")
    with pytest.raises(StoreError, match=msg):
        store.delete_route("10.0.0.0/8", vnet="ghost")
    with pytest.raises(StoreError, match=msg):
        store.list_routes("ghost")
    with pytest.raises(StoreError, match=msg):
        store.delete_vnet("ghost")
    with pytest.raises(StoreError, match=msg):
        store.assign_vnet("ghost", "alice")
    assert store.data_version() == v
    assert store.list_routes() == [] and store.vnet_assignments() == {}


@pytest.mark.parametrize(
    "name", ["", "a b", "x" * 65, "a/b", "3f2b8c1e-0000-4000-8000-000000000000"]
)
def test_bad_vnet_names(store: Store, name: str) -> None:
    with pytest.raises(StoreError, match="bad virtual network name"):
        store.add_vnet(name)
    assert [v.name for v in store.list_vnets()] == [DEFAULT_VNET]


def test_duplicate_vnet_refused(store: Store) -> None:
    store.add_vnet("t1")
    with pytest.raises(StoreError, match="virtual network named 't1' already exists"):
        store.add_vnet("t1")
    with pytest.raises(StoreError, match="already exists"):
        store.add_vnet("default")


def test_assignments_one_vnet_per_identity(store: Store) -> None:
    store.add_vnet("t1")
    store.add_vnet("t2")
    assert store.assign_vnet("t1", "alice") is None
    assert store.assign_vnet("t1", "bob") is None
    assert store.vnet_assignments() == {"alice": "t1", "bob": "t1"}
    # Assigning again moves the identity and says where it was.
    assert store.assign_vnet("t2", "alice") == "t1"
    assert store.vnet_assignments() == {"alice": "t2", "bob": "t1"}
    assert store.unassign_vnet("alice") == "t2"
    assert store.vnet_assignments() == {"bob": "t1"}
    with pytest.raises(StoreError, match="'alice' is not assigned"):
        store.unassign_vnet("alice")


@pytest.mark.parametrize("identity", ["", "a:b", "tab\there", "x" * 256])
def test_bad_identities(store: Store, identity: str) -> None:
    with pytest.raises(StoreError, match="bad identity"):
        store.assign_vnet("default", identity)
    assert store.vnet_assignments() == {}


def test_vnet_in_use_cannot_be_deleted(store: Store) -> None:
    store.create_tunnel("a")
    store.add_vnet("t1")
    store.add_route("10.0.0.0/8", "a", vnet="t1")
    store.add_route("10.1.0.0/16", "a", vnet="t1")
    store.assign_vnet("t1", "alice")
    v = store.data_version()
    with pytest.raises(StoreError, match=r"'t1' is in use \(2 routes and 1 assigned identity\)"):
        store.delete_vnet("t1")
    assert store.data_version() == v
    store.unassign_vnet("alice")
    with pytest.raises(StoreError, match=r"in use \(2 routes\)"):
        store.delete_vnet("t1")
    store.delete_route("10.0.0.0/8", vnet="t1")
    store.delete_route("10.1.0.0/16", vnet="t1")
    assert store.delete_vnet("t1").name == "t1"
    assert [v.name for v in store.list_vnets()] == [DEFAULT_VNET]
    # The name is free again.
    store.add_vnet("t1")


def test_deleting_a_tunnel_deletes_its_routes_in_every_vnet(store: Store) -> None:
    store.create_tunnel("a")
    store.create_tunnel("b")
    store.add_vnet("t1")
    store.add_route("10.0.0.0/8", "a")
    store.add_route("10.0.0.0/8", "a", vnet="t1")
    store.add_route("192.0.2.0/24", "b", vnet="t1")
    store.delete_tunnel("a")
    assert _routes(store) == [("t1", "192.0.2.0/24", "b")]
    # And so the vnet can go once its last route does.
    store.delete_tunnel("b")
    store.delete_vnet("t1")


def test_every_vnet_write_bumps_the_generation(store: Store, data_dir: Path) -> None:
    store.create_tunnel("a")
    seen = {store.data_version()}
    writes = [
        lambda s: s.add_vnet("t1"),
        lambda s: s.add_route("10.0.0.0/8", "a", vnet="t1"),
        lambda s: s.assign_vnet("t1", "alice"),
        lambda s: s.unassign_vnet("alice"),
        lambda s: s.delete_route("10.0.0.0/8", vnet="t1"),
        lambda s: s.delete_vnet("t1"),
    ]
    for write in writes:
        # From another connection, as the CLI does while an edge polls.
        with Store(data_dir) as cli:
            write(cli)
        assert store.data_version() not in seen
        seen.add(store.data_version())


# The schema of version 1 exactly as it shipped, so the migration is tested against the real
# thing rather than against whatever the current code would create.
_V1_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
    """CREATE TABLE IF NOT EXISTS tunnels (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        secret_hash BLOB NOT NULL,
        created_at  TEXT NOT NULL,
        deleted_at  TEXT
    )""",
    "CREATE UNIQUE INDEX IF NOT EXISTS tunnels_live_name ON tunnels(name) WHERE deleted_at IS NULL",
    """CREATE TABLE IF NOT EXISTS routes (
        cidr       TEXT PRIMARY KEY,
        tunnel_id  TEXT NOT NULL REFERENCES tunnels(id),
        created_at TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS routes_tunnel ON routes(tunnel_id)",
    """CREATE TABLE IF NOT EXISTS dns_routes (
        zone       TEXT PRIMARY KEY,
        tunnel_id  TEXT NOT NULL REFERENCES tunnels(id),
        created_at TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS dns_routes_tunnel ON dns_routes(tunnel_id)",
    "INSERT OR IGNORE INTO meta(key, value) VALUES ('generation', 0)",
    "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', 1)",
)
_CORP = "11111111-1111-4111-8111-111111111111"
_GONE = "22222222-2222-4222-8222-222222222222"


def _make_v1_store(data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    db = sqlite3.connect(data_dir / "ramp.db", isolation_level=None)
    for stmt in _V1_SCHEMA:
        db.execute(stmt)
    ts = "2026-01-02T03:04:05Z"
    db.execute(
        "INSERT INTO tunnels(id, name, secret_hash, created_at) VALUES (?, 'corp', ?, ?)",
        (_CORP, b"\0" * 32, ts),
    )
    db.execute(
        "INSERT INTO tunnels(id, name, secret_hash, created_at, deleted_at)"
        " VALUES (?, 'gone', ?, ?, ?)",
        (_GONE, b"\0" * 32, ts, ts),
    )
    for cidr in ("10.0.0.0/8", "2001:db8::/32", "192.0.2.0/24"):
        db.execute("INSERT INTO routes VALUES (?, ?, ?)", (cidr, _CORP, ts))
    db.execute("INSERT INTO dns_routes VALUES ('corp.example', ?, ?)", (_CORP, ts))
    db.execute("UPDATE meta SET value = 7 WHERE key = 'generation'")
    db.close()


def test_v1_store_is_migrated_in_place_with_its_routes_in_default(data_dir: Path) -> None:
    _make_v1_store(data_dir)
    with Store(data_dir) as store:
        assert [v.name for v in store.list_vnets()] == [DEFAULT_VNET]
        assert _routes(store) == [
            ("default", "10.0.0.0/8", "corp"),
            ("default", "192.0.2.0/24", "corp"),
            ("default", "2001:db8::/32", "corp"),
        ]
        assert _routes(store, "default") == _routes(store)
        # Everything else survived.
        assert [(t.id, t.name) for t in store.list_tunnels()] == [(_CORP, "corp")]
        assert store.tunnel_status(_GONE) == "deleted"
        assert [d.zone for d in store.list_dns_routes()] == ["corp.example"]
        # A poller that saw generation 7 learns that something changed.
        assert store.data_version() > 7
        schema = store._query("SELECT value FROM meta WHERE key = 'schema_version'")
        assert schema == [(SCHEMA_VERSION,)] and SCHEMA_VERSION == 2
        # The new rules hold on the migrated store: same CIDR in another vnet, not twice here.
        store.add_vnet("t1")
        store.add_route("10.0.0.0/8", "corp", vnet="t1")
        with pytest.raises(StoreError, match="already exists"):
            store.add_route("10.0.0.0/8", "corp")
        store.delete_tunnel("corp")
        assert store.list_routes() == []
    # Opening the migrated store again is a no-op.
    with Store(data_dir) as store:
        assert [v.name for v in store.list_vnets()] == [DEFAULT_VNET, "t1"]


def test_store_from_a_newer_ramp_is_refused(data_dir: Path) -> None:
    Store(data_dir).close()
    db = sqlite3.connect(data_dir / "ramp.db", isolation_level=None)
    db.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    db.close()
    with pytest.raises(StoreError, match=r"schema version 99.*upgrade ramp"):
        Store(data_dir)
