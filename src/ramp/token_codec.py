"""What every ramp token shares: one copy-pastable string, checked before it is trusted.

A token is base64url (no padding) of compact JSON whose first field is `"v"` (the version)
and whose last is `"c"`, a checksum: the first 8 hex digits of sha256 over the canonical JSON
of the other fields. The checksum catches copy-paste damage early with a message that says
so, instead of a refusal at the edge that looks like a wrong secret. A token's kind is field
`"k"`; connector tokens were made before kinds existed and have none (they carry `"t"`).

`decode_fields` does the checks every kind needs and returns the fields; each token module
(`ramp.tunnel.token`, `ramp.client_token`) checks its own fields on top.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import string
from pathlib import Path
from typing import Any

from ramp.config import parse_hostport

VERSION = 1
MAX_TOKEN_CHARS = 16384
MAX_EDGES = 64
KIND_TUNNEL = "tunnel"
KIND_CLIENT = "client"
_B64URL_CHARS = frozenset(string.ascii_letters + string.digits + "-_=")
_FP_RE = re.compile(r"[0-9a-f]{64}")
_DAMAGED = "damaged token (incomplete or broken data): the token was altered or truncated"
# How an operator recognises and makes each kind: for the wrong-kind message.
_KIND_WORDS = {
    KIND_TUNNEL: "a connector token (from `ramp tunnel token`, for `ramp tunnel run`)",
    KIND_CLIENT: "a client token (from `ramp client token`, for `ramp client run`)",
}


class TokenError(ValueError):
    """A token could not be read; the message says what is wrong with it."""


def token_text(token: str, token_file: Path | None, *, envvar: str = "RAMP_TUNNEL_TOKEN") -> str:
    """The token given directly (flag, environment, config) or in `token_file`; TokenError
    when both are given, or the file is unreadable, empty, or open to group or others.
    `envvar` names the environment variable the role reads the token from, for the message."""
    if token_file is None:
        return token
    if token:
        raise TokenError(
            "both a token and a token file are given: use --token-file alone "
            f"(unset {envvar} and drop --token / `token:`)"
        )
    try:
        with open(token_file, "rb") as f:
            # fstat, not stat: the mode checked is the one of the file read.
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise TokenError(f"token file {token_file}: not a regular file")
            # Writable by others is as bad as readable: a swapped token points the role at
            # someone else's edge, which then sees (or sends) its traffic.
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


def b64e(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: str) -> bytes:
    """Strict base64url, padding optional; raises ValueError."""
    body = text.rstrip("=")
    if not set(body) <= _B64URL_CHARS or "=" in body or len(body) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def checksum(fields: dict[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:8]


def encode_fields(fields: dict[str, Any]) -> str:
    """The token text of `fields` (which start with "v"), the checksum appended."""
    out = dict(fields)
    out["c"] = checksum(fields)
    return b64e(json.dumps(out, separators=(",", ":"), ensure_ascii=True).encode())


def kind_of(fields: dict[str, Any]) -> str:
    if "k" in fields:
        return str(fields["k"])
    return KIND_TUNNEL if "t" in fields else "unknown"


def decode_fields(s: object, kind: str) -> dict[str, Any]:
    """The fields (without "c") of token text `s` of kind `kind`: base64, JSON, version,
    checksum and kind checked. TokenError says which check failed, in words for a person."""
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
        raise TokenError(f"unsupported token version {version} (this ramp reads version {VERSION})")
    if "c" not in obj:
        raise TokenError("not a ramp token: unexpected or missing fields")
    check = obj.pop("c")
    if not isinstance(check, str) or check != checksum(obj):
        raise TokenError("checksum mismatch: the token was altered or truncated")
    # After the checksum: a token that passed it was made this way, not damaged on the way.
    found = kind_of(obj)
    if found != kind:
        what = _KIND_WORDS.get(found, f"a token of unknown kind {found!r}")
        raise TokenError(f"this is {what}, not {_KIND_WORDS.get(kind, kind)}")
    return obj


def check_edges(edges: object) -> list[str]:
    """The edge HOST:PORT list of a token whose checksum matched (so it was made wrong)."""
    if not isinstance(edges, list) or len(edges) > MAX_EDGES:
        raise TokenError("not a ramp token: bad edge list")
    for edge in edges:
        if not isinstance(edge, str):
            raise TokenError("not a ramp token: bad edge address")
        try:
            parse_hostport(edge)
        except ValueError as e:
            raise TokenError(f"not a ramp token: {e}") from None
    return list(edges)


def check_secret(secret_b64: object) -> bytes:
    try:
        if not isinstance(secret_b64, str):
            raise ValueError
        secret = b64d(secret_b64)
    except ValueError:
        raise TokenError("not a ramp token: the secret is not base64") from None
    if not 16 <= len(secret) <= 64:
        raise TokenError("not a ramp token: the secret has a wrong length")
    return secret


def check_fingerprint(fp: object) -> str:
    if not isinstance(fp, str) or not _FP_RE.fullmatch(fp):
        raise TokenError("not a ramp token: bad CA fingerprint")
    return fp
