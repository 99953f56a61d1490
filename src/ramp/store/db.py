"""Control-plane state in SQLite: tunnels, virtual networks, IP and DNS routes, the master key
and the edge's certificates.

The CLI writes while an edge reads, possibly in another process: WAL mode lets readers run
during a write, and a busy timeout makes the rare lock wait a pause instead of an error. Every
write bumps a `generation` counter in the same transaction, so a poller learns about changes
from any process with one cheap read (`data_version()`).

Tunnel secrets are never stored. Each is derived from a master key, so `ramp tunnel token` can
print the token again at any time, and only its SHA-256 is kept for the edge to verify against.
Deleting a tunnel keeps a tombstone row so the edge can tell "deleted" from "unknown".

Client identities (`ramp client ...`) work the same way: a secret derived from the master key
and a stored hash. Revoking one keeps its row and its name for good, so that a client made
later under the same name can never revive the old tokens.

IP routes live in virtual networks (vnets): a CIDR is unique within one vnet only, so tenants
can route the same private range to their own tunnels. The `default` vnet always exists, and
holds every route of a store made before vnets (schema version 1), migrated on open.

A route may ask that its origins get a PROXY protocol header (`proxy_protocol`: "v1", "v2" or
NULL). The column is added in place to stores made before it, as they are opened; an older ramp
still reads and writes such a store, and sends no header.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import sqlite3
import stat
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import dns.exception
import dns.name
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ramp.policy.rules import Rule, RuleError
from ramp.policy.rules import validate as validate_rule

DB_FILE = "ramp.db"
log = logging.getLogger(__name__)
BUSY_TIMEOUT_S = 30.0
SECRET_LABEL = b"ramp tunnel secret v1"
CLIENT_SECRET_LABEL = b"ramp client secret v1"
EDGE_SERVER_NAME = "ramp-edge"
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
# A hostname label; underscores are allowed for service zones such as _tcp.corp.example.
_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_UUID_RE = re.compile(r"[0-9a-f]{8}-(?:[0-9a-f]{4}-){3}[0-9a-f]{12}", re.IGNORECASE)
_CA_DAYS = 3650
_LEAF_DAYS = 365
# Reissue the leaf this long before it expires; the CA (and so every token) stays the same.
_LEAF_RENEW_BEFORE = dt.timedelta(days=30)

SCHEMA_VERSION = 2
DEFAULT_VNET = "default"
PROXY_PROTOCOL_VERSIONS = ("v1", "v2")
# Columns added to version 2 tables after the version was set: (table, column, definition).
# Each is added in place when missing; NULL is what a row made before it means.
_ADDED_COLUMNS = (("routes", "proxy_protocol", "TEXT"),)

# Tables whose shape is the same in every schema version.
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
    """CREATE TABLE IF NOT EXISTS tunnels (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL,
        secret_hash BLOB NOT NULL,
        created_at  TEXT NOT NULL,
        deleted_at  TEXT
    )""",
    # Names are unique among live tunnels only, so a deleted tunnel's name may be reused.
    "CREATE UNIQUE INDEX IF NOT EXISTS tunnels_live_name ON tunnels(name) WHERE deleted_at IS NULL",
    # Queries for names under `zone` (normalized: lowercase ASCII, no trailing dot) go to the
    # tunnel's connector; the longest matching zone wins.
    """CREATE TABLE IF NOT EXISTS dns_routes (
        zone       TEXT PRIMARY KEY,
        tunnel_id  TEXT NOT NULL REFERENCES tunnels(id),
        created_at TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS dns_routes_tunnel ON dns_routes(tunnel_id)",
    # Policy rules in evaluation order (`position`, dense from 1); see ramp.policy.rules.
    """CREATE TABLE IF NOT EXISTS policy_rules (
        id         TEXT PRIMARY KEY,
        position   INTEGER NOT NULL,
        action     TEXT NOT NULL,
        identity   TEXT,
        grp        TEXT,
        onramp     TEXT,
        source     TEXT,
        dest       TEXT,
        ports      TEXT,
        protocol   TEXT NOT NULL,
        created_at TEXT NOT NULL
    )""",
    # Client identities; added to version 2 stores as they are opened (a new table needs no
    # migration, and an older ramp simply does not see it). Rows are never deleted: a revoked
    # client keeps its name.
    """CREATE TABLE IF NOT EXISTS clients (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        secret_hash BLOB NOT NULL,
        created_at  TEXT NOT NULL,
        revoked_at  TEXT
    )""",
    "INSERT OR IGNORE INTO meta(key, value) VALUES ('generation', 0)",
)

# New in version 2. Routes and assignments refer to a vnet by id, so that the name is only a
# label and a rename would touch one row.
_VNETS_TABLE = """CREATE TABLE IF NOT EXISTS vnets (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
)"""
_ROUTES_TABLE = """CREATE TABLE IF NOT EXISTS routes (
    vnet_id    TEXT NOT NULL REFERENCES vnets(id),
    cidr       TEXT NOT NULL,
    tunnel_id  TEXT NOT NULL REFERENCES tunnels(id),
    created_at TEXT NOT NULL,
    PRIMARY KEY (vnet_id, cidr)
)"""
_SCHEMA_V2 = (
    _VNETS_TABLE,
    _ROUTES_TABLE,
    "CREATE INDEX IF NOT EXISTS routes_tunnel ON routes(tunnel_id)",
    # An identity is a proxy user name; it is in at most one vnet.
    """CREATE TABLE IF NOT EXISTS vnet_assignments (
        identity   TEXT PRIMARY KEY,
        vnet_id    TEXT NOT NULL REFERENCES vnets(id),
        created_at TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS vnet_assignments_vnet ON vnet_assignments(vnet_id)",
)

TunnelStatus = Literal["active", "deleted", "unknown"]
ClientStatus = Literal["active", "revoked"]


class StoreError(Exception):
    """A store operation was refused; the message says why, in words for the operator."""


@dataclass(frozen=True, slots=True)
class Tunnel:
    id: str
    name: str
    created_at: dt.datetime  # UTC, timezone-aware


@dataclass(frozen=True, slots=True)
class Client:
    """A client identity: who `ramp client run` (or a proxy user with its token) is."""

    id: str
    name: str
    created_at: dt.datetime  # UTC, timezone-aware
    revoked_at: dt.datetime | None = None

    @property
    def status(self) -> ClientStatus:
        return "active" if self.revoked_at is None else "revoked"


@dataclass(frozen=True, slots=True)
class Vnet:
    id: str
    name: str
    created_at: dt.datetime  # UTC, timezone-aware


@dataclass(frozen=True, slots=True)
class Route:
    cidr: str  # normalized, e.g. "10.1.0.0/16", "2001:db8::/32"
    tunnel_id: str
    tunnel_name: str
    vnet: str = DEFAULT_VNET  # the virtual network's name
    proxy_protocol: str | None = None  # "v1" or "v2": origins get a PROXY header

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(self.cidr)


@dataclass(frozen=True, slots=True)
class DnsRoute:
    zone: str  # normalized, e.g. "corp.example", "xn--bcher-kva.example"
    tunnel_id: str
    tunnel_name: str


@dataclass(frozen=True, slots=True)
class EdgeIdentity:
    ca_cert_pem: bytes
    leaf_cert_pem: bytes
    leaf_key_pem: bytes
    ca_fingerprint: str  # sha256 hex (lowercase) of the CA certificate DER


def normalize_cidr(cidr: str) -> str:
    """`10.1.2.3/16` -> `10.1.0.0/16`; a bare address becomes a host route."""
    try:
        return str(ipaddress.ip_network(cidr.strip(), strict=False))
    except ValueError as e:
        raise StoreError(f"bad CIDR {cidr!r}: {e}") from None


def normalize_zone(zone: str) -> str:
    """`Corp.Example.` -> `corp.example`. Unicode names become their IDNA (xn--) form, so a
    zone compares equal to the names resolvers put on the wire."""
    text = zone.strip()
    text = text[:-1] if text.endswith(".") else text
    if not text or "" in text.split("."):
        raise StoreError(f"bad DNS zone {zone!r}: empty name or empty label")
    try:
        name = dns.name.from_unicode(text)
        name.to_unicode()  # rejects xn-- labels that are not valid punycode
    except (dns.exception.DNSException, UnicodeError, ValueError) as e:
        raise StoreError(f"bad DNS zone {zone!r}: {e}") from None
    labels = name.to_text(omit_final_dot=True).lower().split(".")
    for label in labels:
        if not _LABEL_RE.fullmatch(label):
            raise StoreError(
                f"bad DNS zone {zone!r}: label {label!r} is not a hostname label "
                "(letters, digits, '-' and '_', not starting or ending with '-')"
            )
    return ".".join(labels)


def _check_name(kind: str, name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise StoreError(f"bad {kind} name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -")
    # Ids may one day be accepted wherever names are; a name shaped like one would be ambiguous.
    if _UUID_RE.fullmatch(name):
        raise StoreError(f"bad {kind} name {name!r}: a name must not look like an id")


def check_tunnel_name(name: str) -> None:
    _check_name("tunnel", name)


def check_client_name(name: str) -> None:
    _check_name("client", name)


def check_vnet_name(name: str) -> None:
    _check_name("virtual network", name)


def check_identity(identity: str) -> None:
    """An identity is a proxy user name: RFC 1929 allows 1-255 bytes, and neither `--user
    NAME:PASSWORD` nor HTTP Basic can carry a ':' in the name."""
    if not identity or len(identity.encode()) > 255:
        raise StoreError(f"bad identity {identity!r}: use 1-255 bytes")
    if ":" in identity or not identity.isprintable():
        raise StoreError(f"bad identity {identity!r}: no ':' or control characters")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _ts(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_ts(s: str) -> dt.datetime:
    return dt.datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)


def _route_sort_key(r: Route) -> tuple[bool, str, int, int, int]:
    net = r.network
    return (r.vnet != DEFAULT_VNET, r.vnet, net.version, int(net.network_address), net.prefixlen)


def _make_private(path: Path, mode: int) -> None:
    """Give `path`, if it exists, `mode` when group or others can get at it: the store holds
    the master key and the edge CA key. Files made by older versions, a copy (`cp -r`) or a
    loose umask are fixed, with a warning; another user's are refused, not touched."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StoreError(f"cannot open store: {path}: {e.strerror or e}") from e
    old = stat.S_IMODE(st.st_mode)
    if not old & 0o077:
        return
    if st.st_uid != os.geteuid():
        raise StoreError(
            f"{path} is accessible by group or others (mode {old:04o}) and belongs to another "
            f"user (uid {st.st_uid}): run `chmod {mode:o} {path}` as its owner, or use a "
            "--data-dir of your own"
        )
    try:
        os.chmod(path, mode)
    except OSError as e:
        raise StoreError(
            f"{path} is accessible by group or others (mode {old:04o}) and cannot be fixed "
            f"({e.strerror or e}): run `chmod {mode:o} {path}`"
        ) from e
    log.warning(
        "store: %s was accessible by group or others (mode %04o): changed to %04o", path, old, mode
    )


class Store:
    """One connection to the store; safe to share between threads of one process."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).expanduser()
        self.path = self.data_dir / DB_FILE
        self._lock = threading.RLock()
        try:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot open store {self.path}: {e}") from e
        # Before the database is opened: its content never sits in a loose file while we run.
        _make_private(self.data_dir, 0o700)
        for name in (DB_FILE, DB_FILE + "-wal", DB_FILE + "-shm"):
            _make_private(self.data_dir / name, 0o600)
        try:
            # The database holds the master key and the edge CA key: create it private. SQLite
            # gives its -wal and -shm files the same mode as the database file.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            self._db = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,
            )
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open store {self.path}: {e}") from e
        try:
            self._db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"cannot switch store {self.path} to WAL mode (got {mode})")
            self._db.execute("PRAGMA foreign_keys = ON")
            # WAL + NORMAL survives process crashes; a power cut may lose the last commit, which
            # is acceptable for CLI edits and saves an fsync per commit.
            self._db.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as e:
            self._db.close()
            raise StoreError(f"cannot use store {self.path}: {e}") from e
        except StoreError:
            self._db.close()
            raise
        try:
            self._setup_schema()
        except StoreError:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self, *, bump: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction that also bumps the generation counter."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise StoreError(f"store {self.path}: {e}") from e
            try:
                yield self._db
                if bump:
                    self._db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
                self._db.execute("COMMIT")
            except BaseException as e:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error):
                    raise StoreError(f"store {self.path}: {e}") from e
                raise

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"store {self.path}: {e}") from e

    def _setup_schema(self) -> None:
        """Create the tables, or bring an older store up to SCHEMA_VERSION in place."""
        # Under the write lock, so two processes opening an old store migrate it once.
        with self._write(bump=False) as db:
            for stmt in _SCHEMA:
                db.execute(stmt)
            found = self._meta(db, "schema_version")
            version = SCHEMA_VERSION if found is None else int(found)
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"store {self.path} has schema version {version}; this ramp knows only up "
                    f"to {SCHEMA_VERSION}: upgrade ramp"
                )
            if version == 1:
                _migrate_v1_to_v2(db)
                # Readers that cached routes must re-read them with their vnets.
                db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
            for stmt in _SCHEMA_V2:
                db.execute(stmt)
            _add_missing_columns(db)
            _ensure_default_vnet(db)
            self._seed_policy(db)
            db.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)",
                (SCHEMA_VERSION,),
            )

    def _meta(self, db: sqlite3.Connection, key: str) -> bytes | None:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def data_version(self) -> int:
        """A number that changes whenever any process commits a change to the store."""
        return int(self._query("SELECT value FROM meta WHERE key = 'generation'")[0][0])

    # -- secrets ------------------------------------------------------------------------------

    def _master_key(self) -> bytes:
        rows = self._query("SELECT value FROM meta WHERE key = 'master_key'")
        if rows:
            return bytes(rows[0][0])
        with self._write() as db:
            db.execute(
                "INSERT OR IGNORE INTO meta(key, value) VALUES ('master_key', ?)",
                (secrets.token_bytes(32),),
            )
            key = self._meta(db, "master_key")
        assert key is not None
        return bytes(key)

    def _derive_secret(self, tunnel_id: str) -> bytes:
        return hmac.new(self._master_key(), SECRET_LABEL + tunnel_id.encode(), "sha256").digest()

    def tunnel_secret(self, tunnel_id: str) -> bytes:
        """The secret a connector of this tunnel proves; only for live tunnels."""
        status = self.tunnel_status(tunnel_id)
        if status == "unknown":
            raise StoreError(f"unknown tunnel id {tunnel_id!r}")
        if status == "deleted":
            raise StoreError(f"tunnel {tunnel_id} was deleted")
        return self._derive_secret(tunnel_id)

    def verify_secret(self, tunnel_id: str, secret: bytes) -> bool:
        """True if `secret` is the secret of a live tunnel `tunnel_id`."""
        rows = self._query(
            "SELECT secret_hash FROM tunnels WHERE id = ? AND deleted_at IS NULL", (tunnel_id,)
        )
        if not rows:
            return False
        return hmac.compare_digest(hashlib.sha256(secret).digest(), bytes(rows[0][0]))

    # -- tunnels ------------------------------------------------------------------------------

    def create_tunnel(self, name: str) -> Tunnel:
        check_tunnel_name(name)
        tunnel_id = str(uuid.uuid4())
        secret_hash = hashlib.sha256(self._derive_secret(tunnel_id)).digest()
        created = _now()
        with self._write() as db:
            if db.execute(
                "SELECT 1 FROM tunnels WHERE name = ? AND deleted_at IS NULL", (name,)
            ).fetchone():
                raise StoreError(f"a tunnel named {name!r} already exists")
            db.execute(
                "INSERT INTO tunnels(id, name, secret_hash, created_at) VALUES (?, ?, ?, ?)",
                (tunnel_id, name, secret_hash, _ts(created)),
            )
        return Tunnel(tunnel_id, name, created)

    def list_tunnels(self) -> list[Tunnel]:
        rows = self._query(
            "SELECT id, name, created_at FROM tunnels WHERE deleted_at IS NULL"
            " ORDER BY created_at, name"
        )
        return [Tunnel(i, n, _parse_ts(c)) for i, n, c in rows]

    def _find_tunnel(self, db: sqlite3.Connection, name_or_id: str) -> Tunnel | None:
        cols = "SELECT id, name, created_at FROM tunnels WHERE deleted_at IS NULL"
        row = db.execute(cols + " AND name = ?", (name_or_id,)).fetchone()
        if row is None and _UUID_RE.fullmatch(name_or_id):
            row = db.execute(cols + " AND id = ?", (name_or_id.lower(),)).fetchone()
        return None if row is None else Tunnel(row[0], row[1], _parse_ts(row[2]))

    def get_tunnel(self, name_or_id: str) -> Tunnel | None:
        """A live tunnel by name, or by id; None if there is none."""
        with self._lock:
            try:
                return self._find_tunnel(self._db, name_or_id)
            except sqlite3.Error as e:
                raise StoreError(f"store {self.path}: {e}") from e

    def delete_tunnel(self, name: str) -> Tunnel:
        """Delete a live tunnel (by name or id) and its IP and DNS routes; keeps a tombstone."""
        with self._write() as db:
            tunnel = self._find_tunnel(db, name)
            if tunnel is None:
                raise StoreError(f"unknown tunnel {name!r}")
            db.execute("DELETE FROM routes WHERE tunnel_id = ?", (tunnel.id,))
            db.execute("DELETE FROM dns_routes WHERE tunnel_id = ?", (tunnel.id,))
            db.execute("UPDATE tunnels SET deleted_at = ? WHERE id = ?", (_ts(_now()), tunnel.id))
        return tunnel

    def tunnel_status(self, tunnel_id: str) -> TunnelStatus:
        rows = self._query("SELECT deleted_at FROM tunnels WHERE id = ?", (tunnel_id,))
        if not rows:
            return "unknown"
        return "active" if rows[0][0] is None else "deleted"

    # -- client identities ------------------------------------------------------------------

    def _derive_client_secret(self, client_id: str) -> bytes:
        # A label of its own: a client's secret can never equal a tunnel's.
        return hmac.new(
            self._master_key(), CLIENT_SECRET_LABEL + client_id.encode(), "sha256"
        ).digest()

    def _find_client(self, db: sqlite3.Connection, name: str) -> Client | None:
        row = db.execute(
            "SELECT id, name, created_at, revoked_at FROM clients WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None else _client(row)

    def create_client(self, name: str) -> Client:
        check_client_name(name)
        client_id = str(uuid.uuid4())
        secret_hash = hashlib.sha256(self._derive_client_secret(client_id)).digest()
        created = _now()
        with self._write() as db:
            found = self._find_client(db, name)
            if found is not None and found.revoked_at is not None:
                raise StoreError(
                    f"client {name!r} was revoked: revoked names are not reused, so that its "
                    "old tokens can never work again; choose another name"
                )
            if found is not None:
                raise StoreError(f"a client named {name!r} already exists")
            db.execute(
                "INSERT INTO clients(id, name, secret_hash, created_at) VALUES (?, ?, ?, ?)",
                (client_id, name, secret_hash, _ts(created)),
            )
        return Client(client_id, name, created)

    def list_clients(self) -> list[Client]:
        """Every client identity, revoked ones too, oldest first."""
        rows = self._query(
            "SELECT id, name, created_at, revoked_at FROM clients ORDER BY created_at, name"
        )
        return [_client(row) for row in rows]

    def get_client(self, name: str) -> Client | None:
        with self._lock:
            try:
                return self._find_client(self._db, name)
            except sqlite3.Error as e:
                raise StoreError(f"store {self.path}: {e}") from e

    def revoke_client(self, name: str) -> Client:
        """Revoke client `name`; revoking a revoked client again changes nothing."""
        with self._write() as db:
            found = self._find_client(db, name)
            if found is None:
                raise StoreError(f"unknown client {name!r}")
            if found.revoked_at is not None:
                return found
            revoked = _now()
            db.execute("UPDATE clients SET revoked_at = ? WHERE id = ?", (_ts(revoked), found.id))
        return Client(found.id, found.name, found.created_at, revoked)

    def client_secret(self, name: str) -> bytes:
        """The secret client `name` proves; only for active clients."""
        found = self.get_client(name)
        if found is None:
            raise StoreError(f"unknown client {name!r}")
        if found.revoked_at is not None:
            raise StoreError(f"client {name!r} was revoked")
        return self._derive_client_secret(found.id)

    def verify_client(self, name: str, secret: bytes) -> bool:
        """True if `secret` is the secret of the active client `name`."""
        rows = self._query(
            "SELECT secret_hash FROM clients WHERE name = ? AND revoked_at IS NULL", (name,)
        )
        # Hash and compare even for unknown names, so that timing does not tell names apart.
        expected = bytes(rows[0][0]) if rows else b"\0" * 32
        ok = hmac.compare_digest(hashlib.sha256(secret).digest(), expected)
        return ok and bool(rows)

    def revoked_clients(self) -> set[str]:
        return {n for (n,) in self._query("SELECT name FROM clients WHERE revoked_at IS NOT NULL")}

    # -- virtual networks -----------------------------------------------------------------

    def _vnet_id(self, db: sqlite3.Connection, name: str) -> str:
        row = db.execute("SELECT id FROM vnets WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise StoreError(f"unknown virtual network {name!r}")
        return str(row[0])

    def add_vnet(self, name: str) -> Vnet:
        check_vnet_name(name)
        vnet = Vnet(str(uuid.uuid4()), name, _now())
        with self._write() as db:
            if db.execute("SELECT 1 FROM vnets WHERE name = ?", (name,)).fetchone():
                raise StoreError(f"a virtual network named {name!r} already exists")
            db.execute(
                "INSERT INTO vnets(id, name, created_at) VALUES (?, ?, ?)",
                (vnet.id, vnet.name, _ts(vnet.created_at)),
            )
        return vnet

    def list_vnets(self) -> list[Vnet]:
        """All virtual networks, `default` first, then by name."""
        rows = self._query(
            "SELECT id, name, created_at FROM vnets ORDER BY name != ?, name", (DEFAULT_VNET,)
        )
        return [Vnet(i, n, _parse_ts(c)) for i, n, c in rows]

    def delete_vnet(self, name: str) -> Vnet:
        """Delete an unused virtual network; `default`, and one with routes or identities
        assigned to it, are refused (deleting those silently would reroute their traffic)."""
        if name == DEFAULT_VNET:
            raise StoreError(f"the {DEFAULT_VNET!r} virtual network cannot be deleted")
        with self._write() as db:
            row = db.execute(
                "SELECT id, name, created_at FROM vnets WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                raise StoreError(f"unknown virtual network {name!r}")
            vnet = Vnet(row[0], row[1], _parse_ts(row[2]))
            n_routes = db.execute(
                "SELECT count(*) FROM routes WHERE vnet_id = ?", (vnet.id,)
            ).fetchone()[0]
            n_idents = db.execute(
                "SELECT count(*) FROM vnet_assignments WHERE vnet_id = ?", (vnet.id,)
            ).fetchone()[0]
            if n_routes or n_idents:
                uses = []
                if n_routes:
                    uses.append(f"{n_routes} route{'s' if n_routes != 1 else ''}")
                if n_idents:
                    uses.append(f"{n_idents} assigned identit{'ies' if n_idents != 1 else 'y'}")
                raise StoreError(
                    f"virtual network {name!r} is in use ({' and '.join(uses)}): delete its "
                    "routes and unassign its identities first"
                )
            db.execute("DELETE FROM vnets WHERE id = ?", (vnet.id,))
        return vnet

    def assign_vnet(self, name: str, identity: str) -> str | None:
        """Put `identity` in the virtual network `name`, replacing an earlier assignment;
        returns the name of the vnet it was in before, if any."""
        check_identity(identity)
        with self._write() as db:
            vnet_id = self._vnet_id(db, name)
            row = db.execute(
                "SELECT v.name FROM vnet_assignments a JOIN vnets v ON v.id = a.vnet_id"
                " WHERE a.identity = ?",
                (identity,),
            ).fetchone()
            db.execute(
                "INSERT OR REPLACE INTO vnet_assignments(identity, vnet_id, created_at)"
                " VALUES (?, ?, ?)",
                (identity, vnet_id, _ts(_now())),
            )
        return None if row is None else str(row[0])

    def unassign_vnet(self, identity: str) -> str:
        """Remove the assignment of `identity`; returns the vnet name it was in."""
        with self._write() as db:
            row = db.execute(
                "SELECT v.name FROM vnet_assignments a JOIN vnets v ON v.id = a.vnet_id"
                " WHERE a.identity = ?",
                (identity,),
            ).fetchone()
            if row is None:
                raise StoreError(f"identity {identity!r} is not assigned to a virtual network")
            db.execute("DELETE FROM vnet_assignments WHERE identity = ?", (identity,))
        return str(row[0])

    def vnet_assignments(self) -> dict[str, str]:
        """Identity -> the name of its virtual network."""
        rows = self._query(
            "SELECT a.identity, v.name FROM vnet_assignments a JOIN vnets v ON v.id = a.vnet_id"
            " ORDER BY a.identity"
        )
        return {i: n for i, n in rows}

    # -- routes -------------------------------------------------------------------------------

    def add_route(
        self,
        cidr: str,
        tunnel_name: str,
        vnet: str = DEFAULT_VNET,
        *,
        proxy_protocol: str | None = None,
    ) -> Route:
        """Send traffic for `cidr` in virtual network `vnet` to the tunnel `tunnel_name` (a
        name or an id); with `proxy_protocol` ("v1" or "v2") its origins get a PROXY header."""
        net = normalize_cidr(cidr)
        if proxy_protocol not in (None, *PROXY_PROTOCOL_VERSIONS):
            raise StoreError(f"unknown PROXY protocol version {proxy_protocol!r} (v1 or v2)")
        with self._write() as db:
            vnet_id = self._vnet_id(db, vnet)
            tunnel = self._find_tunnel(db, tunnel_name)
            if tunnel is None:
                raise StoreError(f"unknown tunnel {tunnel_name!r}")
            row = db.execute(
                "SELECT t.name FROM routes r JOIN tunnels t ON t.id = r.tunnel_id"
                " WHERE r.vnet_id = ? AND r.cidr = ?",
                (vnet_id, net),
            ).fetchone()
            if row is not None:
                raise StoreError(
                    f"route {net} already exists (tunnel {row[0]!r}, virtual network {vnet!r})"
                )
            db.execute(
                "INSERT INTO routes(vnet_id, cidr, tunnel_id, created_at, proxy_protocol)"
                " VALUES (?, ?, ?, ?, ?)",
                (vnet_id, net, tunnel.id, _ts(_now()), proxy_protocol),
            )
        return Route(net, tunnel.id, tunnel.name, vnet, proxy_protocol)

    def list_routes(self, vnet: str | None = None) -> list[Route]:
        """The routes of `vnet`, or of every vnet (`default` first, then by name); within a
        vnet IPv4 before IPv6, in address order."""
        sql = (
            "SELECT r.cidr, r.tunnel_id, t.name, v.name, r.proxy_protocol FROM routes r"
            " JOIN tunnels t ON t.id = r.tunnel_id JOIN vnets v ON v.id = r.vnet_id"
        )
        if vnet is None:
            rows = self._query(sql)
        else:
            with self._lock:
                try:
                    vnet_id = self._vnet_id(self._db, vnet)
                except sqlite3.Error as e:
                    raise StoreError(f"store {self.path}: {e}") from e
            rows = self._query(sql + " WHERE r.vnet_id = ?", (vnet_id,))
        return sorted((Route(*row) for row in rows), key=_route_sort_key)

    def delete_route(self, cidr: str, vnet: str = DEFAULT_VNET) -> str:
        """Delete the route for `cidr` in `vnet`; returns it normalized."""
        net = normalize_cidr(cidr)
        with self._write() as db:
            vnet_id = self._vnet_id(db, vnet)
            deleted = db.execute(
                "DELETE FROM routes WHERE vnet_id = ? AND cidr = ?", (vnet_id, net)
            ).rowcount
            if deleted == 0:
                raise StoreError(f"no route {net} in virtual network {vnet!r}")
        return net

    # -- DNS routes ---------------------------------------------------------------------------

    def add_dns_route(self, zone: str, tunnel_name: str) -> DnsRoute:
        """Send DNS queries for names under `zone` to the tunnel `tunnel_name` (name or id)."""
        name = normalize_zone(zone)
        with self._write() as db:
            tunnel = self._find_tunnel(db, tunnel_name)
            if tunnel is None:
                raise StoreError(f"unknown tunnel {tunnel_name!r}")
            row = db.execute(
                "SELECT t.name FROM dns_routes r JOIN tunnels t ON t.id = r.tunnel_id"
                " WHERE r.zone = ?",
                (name,),
            ).fetchone()
            if row is not None:
                raise StoreError(f"DNS route {name} already exists (tunnel {row[0]!r})")
            db.execute(
                "INSERT INTO dns_routes(zone, tunnel_id, created_at) VALUES (?, ?, ?)",
                (name, tunnel.id, _ts(_now())),
            )
        return DnsRoute(name, tunnel.id, tunnel.name)

    def list_dns_routes(self) -> list[DnsRoute]:
        """All DNS routes, sorted by zone read from the top label down (siblings together)."""
        rows = self._query(
            "SELECT r.zone, r.tunnel_id, t.name FROM dns_routes r"
            " JOIN tunnels t ON t.id = r.tunnel_id"
        )
        routes = [DnsRoute(z, i, n) for z, i, n in rows]
        return sorted(routes, key=lambda r: list(reversed(r.zone.split("."))))

    def delete_dns_route(self, zone: str) -> str:
        """Delete the DNS route for `zone`; returns it normalized."""
        name = normalize_zone(zone)
        with self._write() as db:
            if db.execute("DELETE FROM dns_routes WHERE zone = ?", (name,)).rowcount == 0:
                raise StoreError(f"no DNS route {name}")
        return name

    # -- policy -------------------------------------------------------------------------------

    def _seed_policy(self, db: sqlite3.Connection) -> None:
        """A new store allows everyone to every routed destination (rule `default`); once
        seeded, deleting that rule sticks."""
        if self._meta(db, "policy_seeded") is not None:
            return
        db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('policy_seeded', 1)")
        if db.execute("SELECT 1 FROM policy_rules WHERE id = 'default'").fetchone() is None:
            db.execute(
                "UPDATE policy_rules SET position = position + 1"
            )  # keep whatever is there after it
            db.execute(
                "INSERT INTO policy_rules(id, position, action, protocol, created_at)"
                " VALUES ('default', 1, 'allow', 'any', ?)",
                (_ts(_now()),),
            )

    def list_rules(self) -> list[Rule]:
        """Policy rules in evaluation order."""
        rows = self._query(
            "SELECT id, action, identity, grp, onramp, source, dest, ports, protocol"
            " FROM policy_rules ORDER BY position"
        )
        return [Rule(*row) for row in rows]

    def add_rule(self, rule: Rule, position: int | None = None) -> int:
        """Insert `rule` at 1-based `position` (default: last); returns its position."""
        try:
            rule = validate_rule(rule)
        except RuleError as e:
            raise StoreError(f"bad rule: {e}") from None
        with self._write() as db:
            if db.execute("SELECT 1 FROM policy_rules WHERE id = ?", (rule.id,)).fetchone():
                raise StoreError(f"a rule with id {rule.id!r} already exists")
            count = db.execute("SELECT COUNT(*) FROM policy_rules").fetchone()[0]
            if position is None:
                position = count + 1
            if not 1 <= position <= count + 1:
                raise StoreError(f"position {position} is out of range 1-{count + 1}")
            db.execute(
                "UPDATE policy_rules SET position = position + 1 WHERE position >= ?", (position,)
            )
            db.execute(
                "INSERT INTO policy_rules(id, position, action, identity, grp, onramp, source,"
                " dest, ports, protocol, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rule.id,
                    position,
                    rule.action,
                    rule.identity,
                    rule.group,
                    rule.onramp,
                    rule.source,
                    rule.to,
                    rule.ports,
                    rule.protocol,
                    _ts(_now()),
                ),
            )
        return position

    def delete_rule(self, rule_id: str) -> None:
        with self._write() as db:
            row = db.execute(
                "SELECT position FROM policy_rules WHERE id = ?", (rule_id,)
            ).fetchone()
            if row is None:
                raise StoreError(f"no rule {rule_id!r}")
            db.execute("DELETE FROM policy_rules WHERE id = ?", (rule_id,))
            db.execute(
                "UPDATE policy_rules SET position = position - 1 WHERE position > ?", (row[0],)
            )

    # -- edge certificates --------------------------------------------------------------------

    def edge_identity(self) -> EdgeIdentity:
        """The edge's CA and server certificate, made on first use and renewed before expiry."""
        keys = ("edge_ca_cert", "edge_ca_key", "edge_leaf_cert", "edge_leaf_key")
        with self._lock:
            try:
                found = {k: self._meta(self._db, k) for k in keys}
            except sqlite3.Error as e:
                raise StoreError(f"store {self.path}: {e}") from e
        if not _identity_usable(found):
            with self._write() as db:
                # Another process may have made it meanwhile: decide again under the write lock.
                found = {k: self._meta(db, k) for k in keys}
                if found["edge_ca_cert"] is None or found["edge_ca_key"] is None:
                    ca_cert, ca_key = _make_ca()
                    found["edge_ca_cert"], found["edge_ca_key"] = ca_cert, ca_key
                    found["edge_leaf_cert"] = None
                if not _identity_usable(found):
                    leaf_cert, leaf_key = _make_leaf(found["edge_ca_cert"], found["edge_ca_key"])
                    found["edge_leaf_cert"], found["edge_leaf_key"] = leaf_cert, leaf_key
                for k in keys:
                    db.execute(
                        "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (k, found[k])
                    )
        ca_pem = bytes(found["edge_ca_cert"] or b"")
        return EdgeIdentity(
            ca_cert_pem=ca_pem,
            leaf_cert_pem=bytes(found["edge_leaf_cert"] or b""),
            leaf_key_pem=bytes(found["edge_leaf_key"] or b""),
            ca_fingerprint=ca_fingerprint(ca_pem),
        )


def _client(row: tuple) -> Client:
    revoked = None if row[3] is None else _parse_ts(row[3])
    return Client(row[0], row[1], _parse_ts(row[2]), revoked)


def _ensure_default_vnet(db: sqlite3.Connection) -> None:
    db.execute(
        "INSERT OR IGNORE INTO vnets(id, name, created_at) VALUES (?, ?, ?)",
        (str(uuid.uuid4()), DEFAULT_VNET, _ts(_now())),
    )


def _add_missing_columns(db: sqlite3.Connection) -> None:
    for table, column, definition in _ADDED_COLUMNS:
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")


def _migrate_v1_to_v2(db: sqlite3.Connection) -> None:
    """Version 1 keyed routes by CIDR alone; version 2 keys them by (vnet, CIDR). SQLite cannot
    change a primary key in place, so the table is rebuilt, its routes going to `default`."""
    db.execute(_VNETS_TABLE)
    _ensure_default_vnet(db)
    (default_id,) = db.execute("SELECT id FROM vnets WHERE name = ?", (DEFAULT_VNET,)).fetchone()
    db.execute("ALTER TABLE routes RENAME TO routes_v1")
    # The old index moved with the table; its name is needed for the new one.
    db.execute("DROP INDEX IF EXISTS routes_tunnel")
    db.execute(_ROUTES_TABLE)
    db.execute(
        "INSERT INTO routes(vnet_id, cidr, tunnel_id, created_at)"
        " SELECT ?, cidr, tunnel_id, created_at FROM routes_v1",
        (default_id,),
    )
    db.execute("DROP TABLE routes_v1")


def ca_fingerprint(ca_cert_pem: bytes) -> str:
    """sha256 hex of a certificate's DER: what a token pins."""
    cert = x509.load_pem_x509_certificate(ca_cert_pem)
    return cert.fingerprint(hashes.SHA256()).hex()


def _identity_usable(found: dict[str, bytes | None]) -> bool:
    if any(v is None for v in found.values()):
        return False
    leaf = x509.load_pem_x509_certificate(bytes(found["edge_leaf_cert"] or b""))
    return leaf.not_valid_after_utc - dt.datetime.now(dt.UTC) > _LEAF_RENEW_BEFORE


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _make_ca() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ramp edge CA")])
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))  # tolerate clock skew
        .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _make_leaf(ca_cert_pem: bytes | None, ca_key_pem: bytes | None) -> tuple[bytes, bytes]:
    assert ca_cert_pem is not None and ca_key_pem is not None
    ca_cert = x509.load_pem_x509_certificate(bytes(ca_cert_pem))
    ca_key = serialization.load_pem_private_key(bytes(ca_key_pem), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, EDGE_SERVER_NAME)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=_LEAF_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(EDGE_SERVER_NAME)]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)
