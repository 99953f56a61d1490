"""Pinning the edge's certificate to the CA fingerprint a token carries.

Connectors and clients do not trust a public CA for the edge: the token they were given names
the edge's own CA by its sha256 fingerprint, and the handshake's chain must lead to it.
"""

from __future__ import annotations

import hashlib

from cryptography import x509
from qh3.quic.connection import QuicConnection


class PinError(Exception):
    """The edge's certificate is not signed by the CA the token names."""


def check_pin(conn: QuicConnection, ca_fingerprint: str) -> None:
    """Accept the edge only if its leaf certificate was issued by the pinned CA (or is it)."""
    want = ca_fingerprint.lower()
    leaf_h = conn.get_peercert()
    if leaf_h is None:
        raise PinError("the edge sent no certificate")
    leaf_der = leaf_h.public_bytes()
    if hashlib.sha256(leaf_der).hexdigest() == want:
        return
    try:
        leaf = x509.load_der_x509_certificate(leaf_der)
    except ValueError as e:
        raise PinError(f"the edge sent an unreadable certificate: {e}") from e
    for cert_h in conn.get_issuercerts():
        der = cert_h.public_bytes()
        if hashlib.sha256(der).hexdigest() != want:
            continue
        ca = x509.load_der_x509_certificate(der)
        try:
            leaf.verify_directly_issued_by(ca)
        except (ValueError, TypeError, Exception) as e:
            raise PinError(f"edge certificate not signed by the pinned CA: {e}") from e
        return
    raise PinError(
        "the edge's certificate does not match the CA fingerprint in the token "
        "(wrong edge address, or a token from another edge)"
    )


__all__ = ["PinError", "check_pin"]
