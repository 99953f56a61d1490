"""Address-validation tokens for QUIC Retry (RFC 9000 section 8.1.2), sans-I/O.

A token proves the client received our Retry at the address it claims, so a flood from forged
sources cannot fill the handshake table. It binds the client's IP (not the port: a NAT may
rebind it between the two Initials), the client's original destination connection id, the
Retry's source connection id and the time it was issued; it is sealed with AES-GCM under a key
made at start, so it cannot be forged, altered or read, and it expires within seconds.

qh3 ships a token handler, but it seals with RSA-2048: every Initial carrying a 256-byte
garbage token would cost the server a private-key operation, and its tokens never expire.
"""

from __future__ import annotations

import ipaddress
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

TOKEN_FORMAT = 1  # first byte of every token; a new layout gets a new number
_NONCE = 12
_TAG = 16
_ISSUED = struct.Struct("!Q")  # milliseconds on the issuer's clock
MAX_CID = 20  # RFC 9000 section 17.2: connection ids are at most 20 bytes
MAX_TOKEN = 1 + _NONCE + _ISSUED.size + 1 + 2 * MAX_CID + _TAG
# a token from the future beyond this is not ours (clock steps are not expected: monotonic)
_CLOCK_SLACK = 1.0


class InvalidToken(ValueError):
    """A token that does not admit the client; `reason` is a metric label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _address(ip: str) -> bytes:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise InvalidToken("bad_address") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # a dual-stack socket reports IPv4 clients both ways
    return addr.packed


class RetryTokens:
    """Issues and checks Retry tokens; valid for `lifetime` seconds on the caller's clock."""

    def __init__(self, lifetime: float, key: bytes | None = None) -> None:
        self.lifetime = lifetime
        self._aead = AESGCM(key if key is not None else AESGCM.generate_key(bit_length=128))

    def issue(self, ip: str, original_dcid: bytes, retry_scid: bytes, now: float) -> bytes:
        if len(original_dcid) > MAX_CID or len(retry_scid) > MAX_CID:
            raise ValueError("connection id longer than 20 bytes")
        nonce = os.urandom(_NONCE)
        plain = (
            _ISSUED.pack(max(0, int(now * 1000)))
            + bytes([len(original_dcid)])
            + original_dcid
            + retry_scid
        )
        return bytes([TOKEN_FORMAT]) + nonce + self._aead.encrypt(nonce, plain, _address(ip))

    def check(self, ip: str, token: bytes, now: float) -> tuple[bytes, bytes]:
        """(original destination cid, retry source cid) the token was issued for; raises
        InvalidToken for anything else."""
        if not token or token[0] != TOKEN_FORMAT:
            raise InvalidToken("unknown_format")
        if not 1 + _NONCE + _ISSUED.size + 1 + _TAG <= len(token) <= MAX_TOKEN:
            raise InvalidToken("bad_length")
        nonce, sealed = token[1 : 1 + _NONCE], token[1 + _NONCE :]
        try:
            # the address is authenticated data: another client's token fails here too
            plain = self._aead.decrypt(nonce, sealed, _address(ip))
        except InvalidTag:
            raise InvalidToken("not_authentic") from None
        (issued_ms,) = _ISSUED.unpack_from(plain)
        age = now - issued_ms / 1000
        if age > self.lifetime or age < -_CLOCK_SLACK:
            raise InvalidToken("expired")
        cid_len = plain[_ISSUED.size]
        rest = plain[_ISSUED.size + 1 :]
        if cid_len > len(rest):  # only a key holder could seal this: a bug, still no crash
            raise InvalidToken("bad_length")
        return rest[:cid_len], rest[cid_len:]
