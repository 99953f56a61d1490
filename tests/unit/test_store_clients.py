"""Client identities in the store: create, list, revoke, secrets that can be printed again."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from ramp.store.db import Store, StoreError


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "data") as s:
        yield s


def test_create_list_and_verify(store: Store) -> None:
    before = store.data_version()
    alice = store.create_client("alice")
    assert store.data_version() != before
    bob = store.create_client("bob.laptop")
    assert [(c.name, c.status) for c in store.list_clients()] == [
        ("alice", "active"),
        ("bob.laptop", "active"),
    ]
    assert alice.id != bob.id and alice.revoked_at is None
    secret = store.client_secret("alice")
    assert len(secret) == 32
    assert store.client_secret("alice") == secret  # derived: the token can be printed again
    assert store.client_secret("bob.laptop") != secret
    assert store.verify_client("alice", secret)
    assert not store.verify_client("alice", store.client_secret("bob.laptop"))
    assert not store.verify_client("nobody", secret)
    assert not store.verify_client("alice", b"")


def test_client_secrets_survive_reopening(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        s.create_client("alice")
        secret = s.client_secret("alice")
    with Store(tmp_path) as s:
        assert s.client_secret("alice") == secret
        assert s.verify_client("alice", secret)


def test_revoke(store: Store) -> None:
    store.create_client("alice")
    secret = store.client_secret("alice")
    before = store.data_version()
    revoked = store.revoke_client("alice")
    assert revoked.status == "revoked" and revoked.revoked_at is not None
    assert store.data_version() != before
    assert not store.verify_client("alice", secret)
    assert store.revoked_clients() == {"alice"}
    assert [c.status for c in store.list_clients()] == ["revoked"]
    with pytest.raises(StoreError, match="client 'alice' was revoked"):
        store.client_secret("alice")
    # again: nothing changes, and it is no error
    assert store.revoke_client("alice") == revoked
    with pytest.raises(StoreError, match="unknown client 'ghost'"):
        store.revoke_client("ghost")
    with pytest.raises(StoreError, match="unknown client 'ghost'"):
        store.client_secret("ghost")


def test_a_revoked_name_is_never_reused(store: Store) -> None:
    store.create_client("alice")
    store.revoke_client("alice")
    with pytest.raises(StoreError, match="revoked names are not reused"):
        store.create_client("alice")


@pytest.mark.parametrize(
    "name", ["", "a b", "x" * 65, "ümlaut", "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"]
)
def test_bad_names_are_refused(store: Store, name: str) -> None:
    with pytest.raises(StoreError, match="bad client name"):
        store.create_client(name)
    assert store.list_clients() == []


def test_duplicate_name(store: Store) -> None:
    store.create_client("alice")
    with pytest.raises(StoreError, match="a client named 'alice' already exists"):
        store.create_client("alice")


def test_client_and_tunnel_secrets_differ(store: Store) -> None:
    store.create_client("same")
    tunnel = store.create_tunnel("same")
    assert store.client_secret("same") != store.tunnel_secret(tunnel.id)


def test_a_store_made_before_clients_gets_the_table(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        s.create_tunnel("office")
    db = sqlite3.connect(tmp_path / "ramp.db")
    db.execute("DROP TABLE clients")
    db.commit()
    db.close()
    with Store(tmp_path) as s:
        assert [t.name for t in s.list_tunnels()] == ["office"]
        s.create_client("alice")
        assert s.verify_client("alice", s.client_secret("alice"))
