"""The connector token: everything `ramp tunnel run` needs, in one copy-pastable string.

base64url (no padding) of compact JSON `{"v":1,"t":ID,"s":SECRET,"e":[EDGES],"f":FP,"c":SUM}`:
tunnel id, tunnel secret (base64url), edge HOST:PORT addresses, the sha256 fingerprint of the
edge CA the connector pins, and a checksum. The encoding, checksum and token-file rules are
shared with the client token: see `ramp.token_codec`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ramp.token_codec import (
    KIND_TUNNEL,
    MAX_EDGES,
    MAX_TOKEN_CHARS,
    VERSION,
    TokenError,
    b64e,
    check_edges,
    check_fingerprint,
    check_secret,
    decode_fields,
    encode_fields,
    token_text,
)
from ramp.token_codec import checksum as _checksum

__all__ = [
    "MAX_EDGES",
    "MAX_TOKEN_CHARS",
    "VERSION",
    "Token",
    "TokenError",
    "_checksum",
    "token_text",
]

_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


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
            "s": b64e(self.secret),
            "e": list(self.edges),
            "f": self.ca_fingerprint,
        }

    def encode(self) -> str:
        return encode_fields(self._fields())

    @classmethod
    def decode(cls, s: str) -> Token:
        obj = decode_fields(s, KIND_TUNNEL)
        if set(obj) != {"v", "t", "s", "e", "f"}:
            raise TokenError("not a ramp token: unexpected or missing fields")
        # The checksum matched, so damage is ruled out: what fails here was made wrong.
        tunnel_id = obj["t"]
        if not isinstance(tunnel_id, str) or not _ID_RE.fullmatch(tunnel_id):
            raise TokenError("not a ramp token: bad tunnel id")
        return cls(
            tunnel_id=tunnel_id,
            secret=check_secret(obj["s"]),
            edges=check_edges(obj["e"]),
            ca_fingerprint=check_fingerprint(obj["f"]),
        )
