"""The connector token: everything `ramp tunnel run` needs, in one copy-pastable string.

base64url (no padding) of compact JSON `{"v":1,"t":ID,"s":SECRET,"e":[EDGES],"f":FP,"c":SUM}`:
tunnel id, tunnel secret (base64url), edge HOST:PORT addresses, the sha256 fingerprint of the
edge CA the connector pins, and a checksum (first 8 hex digits of sha256 over the canonical JSON
of the other fields). The checksum catches copy-paste damage early with a message that says so,
instead of a registration failure at the edge that looks like a wrong secret.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ramp.config import parse_hostport

VERSION = 1
MAX_TOKEN_CHARS = 16384
MAX_EDGES = 64
_B64URL_CHARS = frozenset(string.ascii_letters + string.digits + "-_=")
_FP_RE = re.compile(r"[0-9a-f]{64}")
_DAMAGED = "damaged token (incomplete or broken data): the token was altered or truncated"
_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


class TokenError(ValueError):
    """A token could not be read; the message says what is wrong with it."""


def token_text(token: str, token_file: Path | None) -> str:
    """The token given directly (flag, environment, config) or in `token_file`; TokenError
    when both are given, or the file is unreadable, empty, or open to group or others."""
    if token_file is None:
        return token
    if token:
        raise TokenError(
            "both a token and a token file are given: use --token-file alone "
            "(unset RAMP_TUNNEL_TOKEN and drop --token / `token:`)"
        )
    try:
        with open(token_file, "rb") as f:
            # fstat, not stat: the mode checked is the one of the file read.
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise TokenError(f"token file {token_file}: not a regular file")
            # Writable by others is as bad as readable: a swapped token points the connector
            # at someone else's edge, which then sends flows into this network.
            if mode & 0o077:
                raise TokenError(
                    f"token file {token_file} is accessible by group or others "
                    f"(mode {stat.S_IMODE(mode):04o}): run `chmod 600 {token_file}`"
                )
            data = f.read(MAX_TOKEN_CHARS + 1)
    except OSError as e:
        raise TokenError(f"cannot read token file {token_file}: {e.strerror or e}") from None
    text = data.decode("utf-8", "replace").strip()
    if not text:
        raise TokenError(f"token file {token_file} is empty")
    return text


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    """Strict base64url, padding optional; raises ValueError."""
    body = text.rstrip("=")
    if not set(body) <= _B64URL_CHARS or "=" in body or len(body) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def _checksum(fields: dict[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class Token:
    tunnel_id: str
    secret: bytes
    edges: list[str] = field(default_factory=list)  # HOST:PORT, [V6]:PORT
    ca_fingerprint: str = ""  # sha256 hex of the edge CA certificate DER

    def _fields(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "t": self.tunnel_id,
            "s": _b64e(self.secret),
            "e": list(self.edges),
            "f": self.ca_fingerprint,
        }

    def encode(self) -> str:
        fields = self._fields()
        fields["c"] = _checksum(fields)
        raw = json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode()
        return _b64e(raw)

    @classmethod
    def decode(cls, s: str) -> Token:
        if not isinstance(s, str):
            raise TokenError("not a ramp token: expected text")
        s = "".join(s.split())  # tolerate line breaks from copy-paste
        if not s:
            raise TokenError("empty token")
        if len(s) > MAX_TOKEN_CHARS:
            raise TokenError(f"not a ramp token: longer than {MAX_TOKEN_CHARS} characters")
        bad = next((i for i, ch in enumerate(s) if ch not in _B64URL_CHARS), None)
        if bad is not None:
            raise TokenError(f"not base64: unexpected character {s[bad]!r} at position {bad}")
        body = s.rstrip("=")
        if "=" in body:
            raise TokenError("not base64: '=' inside the token")
        if len(body) % 4 == 1:
            if body.startswith("eyJ"):  # base64 of '{"': one of ours, cut short
                raise TokenError(_DAMAGED)
            raise TokenError("not base64: the token's length is impossible")
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            if raw.startswith(b'{"v":'):
                raise TokenError(_DAMAGED) from None
            raise TokenError("not a ramp token: it does not decode to JSON") from None
        if not isinstance(obj, dict) or "v" not in obj:
            raise TokenError("not a ramp token: no version field")
        version = obj["v"]
        if type(version) is not int:
            raise TokenError("not a ramp token: the version is not a number")
        if version != VERSION:
            raise TokenError(
                f"unsupported token version {version} (this ramp reads version {VERSION})"
            )
        if set(obj) != {"v", "t", "s", "e", "f", "c"}:
            raise TokenError("not a ramp token: unexpected or missing fields")
        check = obj.pop("c")
        if not isinstance(check, str) or check != _checksum(obj):
            raise TokenError("checksum mismatch: the token was altered or truncated")
        return cls._from_fields(obj)

    @classmethod
    def _from_fields(cls, obj: dict[str, Any]) -> Token:
        # The checksum matched, so damage is ruled out: what fails here was made wrong.
        tunnel_id, secret_b64, edges, fp = obj["t"], obj["s"], obj["e"], obj["f"]
        if not isinstance(tunnel_id, str) or not _ID_RE.fullmatch(tunnel_id):
            raise TokenError("not a ramp token: bad tunnel id")
        try:
            if not isinstance(secret_b64, str):
                raise ValueError
            secret = _b64d(secret_b64)
        except ValueError:
            raise TokenError("not a ramp token: the secret is not base64") from None
        if not 16 <= len(secret) <= 64:
            raise TokenError("not a ramp token: the secret has a wrong length")
        if not isinstance(edges, list) or len(edges) > MAX_EDGES:
            raise TokenError("not a ramp token: bad edge list")
        for edge in edges:
            if not isinstance(edge, str):
                raise TokenError("not a ramp token: bad edge address")
            try:
                parse_hostport(edge)
            except ValueError as e:
                raise TokenError(f"not a ramp token: {e}") from None
        if not isinstance(fp, str) or not _FP_RE.fullmatch(fp):
            raise TokenError("not a ramp token: bad CA fingerprint")
        return cls(tunnel_id=tunnel_id, secret=secret, edges=list(edges), ca_fingerprint=fp)
