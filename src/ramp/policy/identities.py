"""Client identities' credentials, in the one format every way in accepts (sans-I/O).

A client identity `NAME` has a 32-byte secret; its text form is base64url without padding.
The same pair authenticates everywhere:

- bearer (`Proxy-Authorization: Bearer NAME.SECRET` on HTTP/3 and HTTP/1.1): `NAME.SECRET`,
  split on the last '.', since names may contain dots and the secret text never does;
- SOCKS5 username/password (RFC 1929): NAME and SECRET;
- HTTP proxy Basic: NAME:SECRET.

This module knows no store: whether a (name, secret) pair is valid is asked of the callable
it is given (the store's `verify_client`, or a test's). Malformed input is an answer of None,
never an exception: these parse what anyone on the network sends.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable

SECRET_BYTES = 32
# base64url of 32 bytes without padding is 43 characters.
_SECRET_TEXT_RE = re.compile(r"[A-Za-z0-9_-]{43}")
# The store's name rule (ramp.store.db._check_name); checked here too so a junk name never
# costs a store query.
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")

Verify = Callable[[str, bytes], bool]


def secret_text(secret: bytes) -> str:
    """The text form of a client secret: base64url, no padding."""
    return base64.urlsafe_b64encode(secret).rstrip(b"=").decode("ascii")


def parse_secret_text(text: str) -> bytes | None:
    """The secret of its text form; None unless it is exactly 43 base64url characters."""
    if not _SECRET_TEXT_RE.fullmatch(text):
        return None
    try:
        secret = base64.urlsafe_b64decode(text + "=")
    except (binascii.Error, ValueError):
        return None
    # 43 characters carry 258 bits: the last 2 must be zero, or two texts would name one key
    return secret if secret_text(secret) == text else None


def bearer(name: str, secret: bytes) -> str:
    """The bearer credential of client `name`: `NAME.SECRET_TEXT`."""
    return f"{name}.{secret_text(secret)}"


def split_bearer(value: str) -> tuple[str, bytes] | None:
    """(name, secret) of a bearer credential, with or without the `Bearer ` scheme; None when
    it is not shaped like one."""
    text = value.strip()
    scheme, sep, rest = text.partition(" ")
    if sep and scheme.lower() == "bearer":
        text = rest.strip()
    name, dot, secret_part = text.rpartition(".")
    if not dot or not _NAME_RE.fullmatch(name):
        return None
    secret = parse_secret_text(secret_part)
    return None if secret is None else (name, secret)


def _text(value: bytes | str) -> str | None:
    if isinstance(value, str):
        return value
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return None


class ClientCredentials:
    """Checks client credentials against `verify(name, secret)`.

    `active` is whether any client identity is active: on-ramps then require credentials even
    when the config has no users."""

    def __init__(self, verify: Verify, active: bool = False) -> None:
        self._verify = verify
        self.active = active

    def _check(self, name: str, secret: bytes) -> str | None:
        try:
            return name if self._verify(name, secret) else None
        except Exception:
            # the store being unreadable is not a reason to let anyone in, nor to crash
            return None

    def check_bearer(self, value: bytes | str) -> str | None:
        """The client name of a bearer credential (`Bearer NAME.SECRET` or `NAME.SECRET`), or
        None."""
        text = _text(value)
        parts = split_bearer(text) if text is not None else None
        return None if parts is None else self._check(*parts)

    def check_password(self, name: bytes | str, password: bytes | str) -> str | None:
        """The client name when `password` is the secret text of client `name`, else None."""
        name_text, password_text = _text(name), _text(password)
        if name_text is None or password_text is None or not _NAME_RE.fullmatch(name_text):
            return None
        secret = parse_secret_text(password_text)
        return None if secret is None else self._check(name_text, secret)


NO_CLIENTS = ClientCredentials(lambda name, secret: False)
