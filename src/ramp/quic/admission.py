"""Who may start a QUIC handshake on the tunnel listener, decided without I/O.

The handshake table is small (each entry holds a TLS state); without rules one client sending
fresh connection ids fills it and a real connector cannot register. The rules, in order:

- past `retry_threshold` handshaking connections, an Initial must carry a Retry token proving
  its source address, else it gets a Retry (RFC 9000 section 8.1.2) and takes no entry;
- the table has `max_handshakes` entries in all;
- one source address holds at most `per_source` of them. Validated and unvalidated entries are
  counted apart, so a forger using a connector's address cannot use up the connector's share;
  an unvalidated source over its share gets a Retry, a validated one is dropped.

Entries live at most `timeout` seconds (the endpoint enforces it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

MAX_HANDSHAKING = 256


@dataclass(frozen=True, slots=True)
class HandshakeLimits:
    max_handshakes: int = MAX_HANDSHAKING
    retry_threshold: int = MAX_HANDSHAKING // 2  # 0 = every new client gets a Retry
    per_source: int = 16  # 0 = no per-source share
    timeout: float = 2.0
    token_lifetime: float = 10.0


DEFAULT_LIMITS = HandshakeLimits()


class Admit(NamedTuple):
    """Start a connection; `retry_scid` is set when the client came back with a token."""

    original_dcid: bytes
    retry_scid: bytes | None


class SendRetry(NamedTuple):
    pass


class Drop(NamedTuple):
    reason: str  # a metric label


Decision = Admit | SendRetry | Drop


def decide(
    limits: HandshakeLimits,
    *,
    dcid: bytes,
    token: bytes,
    validated: tuple[bytes, bytes] | None,
    handshaking: int,
    source_held: int,
) -> Decision:
    """What to do with an Initial for an unknown connection.

    `validated` is what a valid token was issued for (None for no or a bad token),
    `source_held` the entries the source already holds in the same class (validated or not).
    """
    over_share = bool(limits.per_source) and source_held >= limits.per_source
    if validated is None:
        if token:
            # a client that already got a Retry may not get another (RFC 9000 section 17.2.5.2)
            # and a guessed token is not worth an answer
            if handshaking >= limits.retry_threshold or over_share:
                return Drop("token_invalid")
        elif handshaking >= limits.retry_threshold or over_share:
            return SendRetry()
    if handshaking >= limits.max_handshakes:
        return Drop("handshake_limit")
    if over_share:
        return Drop("source_limit")
    if validated is not None:
        return Admit(validated[0], validated[1])
    return Admit(dcid, None)
