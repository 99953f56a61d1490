"""The client token: everything `ramp client run` needs, in one copy-pastable string.

base64url (no padding) of compact JSON
`{"v":1,"k":"client","n":NAME,"s":SECRET,"e":[EDGES],"f":FP,"c":SUM}`: the client identity's
name and secret (base64url), the edge's MASQUE endpoint HOST:PORT addresses, the sha256
fingerprint of the edge CA the client pins, and a checksum. Encoding, checksum and token
files are shared with the connector token (`ramp.token_codec`); `"k"` tells the two apart, so
giving one where the other is expected says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ramp.policy.identities import SECRET_BYTES, bearer
from ramp.token_codec import (
    KIND_CLIENT,
    VERSION,
    TokenError,
    b64e,
    check_edges,
    check_fingerprint,
    check_secret,
    decode_fields,
    encode_fields,
)

__all__ = ["ClientToken", "TokenError", "decode_client_token", "encode_client_token"]

_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_FIELDS = {"v", "k", "n", "s", "e", "f"}


@dataclass(frozen=True, slots=True)
class ClientToken:
    name: str
    secret: bytes
    edges: list[str] = field(default_factory=list)  # MASQUE endpoints: HOST:PORT, [V6]:PORT
    ca_fingerprint: str = ""  # sha256 hex of the edge CA certificate DER

    @property
    def bearer(self) -> str:
        """The credential for `Proxy-Authorization: Bearer ...`."""
        return bearer(self.name, self.secret)

    def _fields(self) -> dict[str, Any]:
        return {
            "v": VERSION,
            "k": KIND_CLIENT,
            "n": self.name,
            "s": b64e(self.secret),
            "e": list(self.edges),
            "f": self.ca_fingerprint,
        }

    def encode(self) -> str:
        return encode_fields(self._fields())

    @classmethod
    def decode(cls, s: str) -> ClientToken:
        obj = decode_fields(s, KIND_CLIENT)
        if set(obj) != _FIELDS:
            raise TokenError("not a ramp client token: unexpected or missing fields")
        # The checksum matched, so damage is ruled out: what fails here was made wrong.
        name = obj["n"]
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise TokenError("not a ramp client token: bad client name")
        secret = check_secret(obj["s"])
        if len(secret) != SECRET_BYTES:
            raise TokenError("not a ramp client token: the secret has a wrong length")
        return cls(
            name=name,
            secret=secret,
            edges=check_edges(obj["e"]),
            ca_fingerprint=check_fingerprint(obj["f"]),
        )


def encode_client_token(name: str, secret: bytes, edges: list[str], ca_fingerprint: str) -> str:
    return ClientToken(name, secret, list(edges), ca_fingerprint).encode()


def decode_client_token(text: str) -> ClientToken:
    """The client token in `text`; TokenError with a message for a person otherwise."""
    return ClientToken.decode(text)
