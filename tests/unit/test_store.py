from __future__ import annotations

import hashlib
import hmac
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ramp.store.db import Store, StoreError


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path) -> Store:
    s = Store(data_dir)
    yield s
    s.close()


def test_data_dir_and_db_are_private_and_in_wal_mode(store: Store, data_dir: Path) -> None:
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((data_dir / "ramp.db").stat().st_mode) == 0o600
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_loose_data_dir_and_store_files_are_made_private_with_a_warning(
    store: Store, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store.create_tunnel("office")  # the open store keeps its -wal and -shm files around
    files = [data_dir / n for n in ("ramp.db", "ramp.db-wal", "ramp.db-shm")]
    assert all(f.exists() for f in files)
    data_dir.chmod(0o755)
    for f in files:
        f.chmod(0o644)
    with caplog.at_level("WARNING", logger="ramp.store.db"), Store(data_dir) as again:
        assert [t.name for t in again.list_tunnels()] == ["office"]
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert [stat.S_IMODE(f.stat().st_mode) for f in files] == [0o600] * 3
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 4
    assert f"{data_dir} was accessible by group or others (mode 0755)" in warnings[0]
    for f, w in zip(files, warnings[1:], strict=True):
        assert f"{f} was accessible by group or others (mode 0644): changed to 0600" in w
    # Private already: nothing to say.
    caplog.clear()
    with caplog.at_level("WARNING", logger="ramp.store.db"), Store(data_dir):
        pass
    assert caplog.records == []


def test_loose_store_of_another_user_is_refused_untouched(
    store: Store, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = data_dir / "ramp.db"
    db.chmod(0o640)
    monkeypatch.setattr("ramp.store.db.os.geteuid", lambda: db.stat().st_uid + 1)
    with pytest.raises(StoreError) as e:
        Store(data_dir)
    assert f"{db} is accessible by group or others (mode 0640)" in str(e.value)
    assert "belongs to another user" in str(e.value) and f"chmod 600 {db}" in str(e.value)
    assert stat.S_IMODE(db.stat().st_mode) == 0o640


def test_create_list_get_tunnel(store: Store) -> None:
    a = store.create_tunnel("office")
    b = store.create_tunnel("lab-2.x_y")
    assert sorted(t.name for t in store.list_tunnels()) == ["lab-2.x_y", "office"]
    assert store.get_tunnel("office") == a
    assert store.get_tunnel(b.id) == b
    assert store.get_tunnel(b.id.upper()) == b
    assert store.get_tunnel("nope") is None
    assert a.created_at.tzinfo is not None


def test_duplicate_name_refused(store: Store) -> None:
    store.create_tunnel("office")
    with pytest.raises(StoreError, match="already exists"):
        store.create_tunnel("office")


@pytest.mark.parametrize(
    "name", ["", "a b", "x" * 65, "ü", "a/b", "3f2b8c1e-0000-4000-8000-000000000000"]
)
def test_bad_tunnel_names(store: Store, name: str) -> None:
    with pytest.raises(StoreError, match="bad tunnel name"):
        store.create_tunnel(name)


def test_name_of_64_chars_is_fine(store: Store) -> None:
    assert store.create_tunnel("n" * 64).name == "n" * 64


def test_delete_keeps_tombstone_and_frees_name(store: Store) -> None:
    old = store.create_tunnel("office")
    store.add_route("10.0.0.0/8", "office")
    assert store.tunnel_status(old.id) == "active"
    store.delete_tunnel("office")
    assert store.tunnel_status(old.id) == "deleted"
    assert store.tunnel_status("00000000-0000-4000-8000-000000000000") == "unknown"
    assert store.list_tunnels() == []
    assert store.list_routes() == []
    assert store.get_tunnel(old.id) is None
    new = store.create_tunnel("office")
    assert new.id != old.id
    assert store.tunnel_status(old.id) == "deleted"
    assert store.tunnel_status(new.id) == "active"


def test_delete_unknown_tunnel(store: Store) -> None:
    with pytest.raises(StoreError, match="unknown tunnel 'ghost'"):
        store.delete_tunnel("ghost")


def test_secret_is_derived_stable_and_verified(store: Store, data_dir: Path) -> None:
    t = store.create_tunnel("office")
    secret = store.tunnel_secret(t.id)
    assert len(secret) == 32
    assert store.tunnel_secret(t.id) == secret
    assert store.verify_secret(t.id, secret)
    assert not store.verify_secret(t.id, secret[:-1] + bytes([secret[-1] ^ 1]))
    assert not store.verify_secret("00000000-0000-4000-8000-000000000000", secret)
    # Only the hash is stored; the secret is HMAC(master key, label + id).
    row = store._db.execute("SELECT secret_hash FROM tunnels WHERE id = ?", (t.id,)).fetchone()
    assert row[0] == hashlib.sha256(secret).digest()
    master = store._db.execute("SELECT value FROM meta WHERE key = 'master_key'").fetchone()[0]
    assert len(master) == 32
    expected = hmac.new(master, b"ramp tunnel secret v1" + t.id.encode(), "sha256").digest()
    assert secret == expected
    # Another process opening the same store derives the same secret.
    with Store(data_dir) as other:
        assert other.tunnel_secret(t.id) == secret
    # Different tunnels get different secrets.
    assert store.tunnel_secret(store.create_tunnel("lab").id) != secret


def test_secret_of_deleted_tunnel_no_longer_verifies(store: Store) -> None:
    t = store.create_tunnel("office")
    secret = store.tunnel_secret(t.id)
    store.delete_tunnel(t.id)
    assert not store.verify_secret(t.id, secret)
    with pytest.raises(StoreError, match="deleted"):
        store.tunnel_secret(t.id)
    with pytest.raises(StoreError, match="unknown tunnel"):
        store.tunnel_secret("00000000-0000-4000-8000-000000000000")


def test_routes_normalized_sorted_and_unique(store: Store) -> None:
    store.create_tunnel("a")
    b = store.create_tunnel("b")
    r = store.add_route("10.1.2.3/16", "a")
    assert r.cidr == "10.1.0.0/16"
    store.add_route("2001:DB8::1/32", b.id)
    store.add_route("192.0.2.7", "b")
    store.add_route("10.0.0.0/8", "b")
    assert [(r.cidr, r.tunnel_name) for r in store.list_routes()] == [
        ("10.0.0.0/8", "b"),
        ("10.1.0.0/16", "a"),
        ("192.0.2.7/32", "b"),
        ("2001:db8::/32", "b"),
    ]
    with pytest.raises(StoreError, match=r"route 10\.1\.0\.0/16 already exists"):
        store.add_route("10.1.0.0/16", "b")
    assert store.delete_route("10.1.9.9/16") == "10.1.0.0/16"
    with pytest.raises(StoreError, match="no route"):
        store.delete_route("10.1.0.0/16")


@pytest.mark.parametrize("cidr", ["10.0.0.0/33", "banana", "", "10.0.0.0/8/8", "::/129"])
def test_bad_cidr(store: Store, cidr: str) -> None:
    store.create_tunnel("a")
    with pytest.raises(StoreError, match="bad CIDR"):
        store.add_route(cidr, "a")


def test_route_to_unknown_tunnel(store: Store) -> None:
    with pytest.raises(StoreError, match="unknown tunnel 'ghost'"):
        store.add_route("10.0.0.0/8", "ghost")


def test_data_version_moves_on_changes_from_another_connection(
    store: Store, data_dir: Path
) -> None:
    v0 = store.data_version()
    assert store.data_version() == v0  # reading changes nothing
    with Store(data_dir) as cli:
        assert store.data_version() == v0  # opening changes nothing
        cli.create_tunnel("a")
    v1 = store.data_version()
    assert v1 != v0
    with Store(data_dir) as cli:
        cli.add_route("10.0.0.0/8", "a")
    v2 = store.data_version()
    assert v2 not in (v0, v1)
    assert [r.cidr for r in store.list_routes()] == ["10.0.0.0/8"]


def test_failed_write_changes_nothing(store: Store) -> None:
    store.create_tunnel("a")
    v = store.data_version()
    with pytest.raises(StoreError):
        store.create_tunnel("a")
    with pytest.raises(StoreError):
        store.add_route("10.0.0.0/8", "ghost")
    assert store.data_version() == v


def test_reader_never_errors_while_another_process_writes(store: Store, data_dir: Path) -> None:
    store.create_tunnel("a")
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        try:
            with Store(data_dir) as w:
                for i in range(100):
                    w.add_route(f"10.{i}.0.0/16", "a")
        except BaseException as e:
            errors.append(e)
        finally:
            stop.set()

    t = threading.Thread(target=writer)
    t.start()
    with Store(data_dir) as reader:
        while not stop.is_set():
            reader.data_version()
            reader.list_routes()
    t.join()
    assert errors == []
    assert len(store.list_routes()) == 100


def test_edge_identity_made_once_and_valid(store: Store, data_dir: Path) -> None:
    ident = store.edge_identity()
    assert store.edge_identity() == ident
    with Store(data_dir) as other:
        assert other.edge_identity() == ident

    ca = x509.load_pem_x509_certificate(ident.ca_cert_pem)
    leaf = x509.load_pem_x509_certificate(ident.leaf_cert_pem)
    key = serialization.load_pem_private_key(ident.leaf_key_pem, password=None)
    assert ident.ca_fingerprint == ca.fingerprint(hashes.SHA256()).hex()
    assert len(ident.ca_fingerprint) == 64

    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ramp edge CA"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= 3650
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"

    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ramp-edge"
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["ramp-edge"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert 360 <= (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days <= 366
    assert leaf.issuer == ca.subject
    leaf.verify_directly_issued_by(ca)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key().public_numbers() == leaf.public_key().public_numbers()


def test_unusable_data_dir_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot open store"):
        Store(blocker / "data")


# -- DNS routes -----------------------------------------------------------------------------------


def test_dns_routes_normalized_sorted_and_unique(store: Store) -> None:
    store.create_tunnel("a")
    b = store.create_tunnel("b")
    r = store.add_dns_route("Corp.Example.", "a")
    assert (r.zone, r.tunnel_name, r.tunnel_id) == ("corp.example", "a", store.get_tunnel("a").id)
    store.add_dns_route("lab.corp.example", b.id)
    store.add_dns_route("bücher.example", "b")
    store.add_dns_route("_sip._udp.other", "a")
    assert [(d.zone, d.tunnel_name) for d in store.list_dns_routes()] == [
        ("corp.example", "a"),
        ("lab.corp.example", "b"),
        ("xn--bcher-kva.example", "b"),
        ("_sip._udp.other", "a"),
    ]
    with pytest.raises(StoreError, match=r"DNS route corp\.example already exists \(tunnel 'a'\)"):
        store.add_dns_route("CORP.example", "b")
    assert store.delete_dns_route("LAB.corp.example.") == "lab.corp.example"
    with pytest.raises(StoreError, match=r"no DNS route lab\.corp\.example"):
        store.delete_dns_route("lab.corp.example")
    assert [d.zone for d in store.list_dns_routes()] == [
        "corp.example",
        "xn--bcher-kva.example",
        "_sip._udp.other",
    ]


@pytest.mark.parametrize(
    "zone",
    ["", ".", "a..b", "corp.example..", "a b.example", "-a.example", "a-.example", "*.corp",
     "x" * 64 + ".example", ".".join(["a" * 63] * 4), "xn--zz.example", "a\\.b.example", "@"],
)  # fmt: skip
def test_bad_dns_zones(store: Store, zone: str) -> None:
    store.create_tunnel("a")
    v = store.data_version()
    with pytest.raises(StoreError, match="bad DNS zone"):
        store.add_dns_route(zone, "a")
    assert store.list_dns_routes() == []
    assert store.data_version() == v


def test_dns_route_to_unknown_tunnel(store: Store) -> None:
    with pytest.raises(StoreError, match="unknown tunnel 'ghost'"):
        store.add_dns_route("corp.example", "ghost")


def test_deleting_a_tunnel_deletes_its_dns_routes(store: Store) -> None:
    store.create_tunnel("a")
    store.create_tunnel("b")
    store.add_dns_route("corp.example", "a")
    store.add_dns_route("lab.example", "b")
    store.delete_tunnel("a")
    assert [(d.zone, d.tunnel_name) for d in store.list_dns_routes()] == [("lab.example", "b")]
    # The zone is free again, for a new tunnel that reuses the old name too.
    store.create_tunnel("a")
    assert store.add_dns_route("corp.example", "a").tunnel_name == "a"


def test_dns_route_writes_bump_the_generation(store: Store, data_dir: Path) -> None:
    store.create_tunnel("a")
    seen = {store.data_version()}
    with Store(data_dir) as cli:
        cli.add_dns_route("corp.example", "a")
    assert store.data_version() not in seen
    seen.add(store.data_version())
    with Store(data_dir) as cli:
        cli.delete_dns_route("corp.example")
    assert store.data_version() not in seen
    v = store.data_version()
    with pytest.raises(StoreError):
        store.delete_dns_route("corp.example")
    assert store.data_version() == v
