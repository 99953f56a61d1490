"""Who may start a QUIC handshake on the tunnel listener, decided without I/O.

The handshake table is small (each entry holds a TLS state); without rules one client sending
fresh connection ids fills it and a real connector cannot register. The rules, in order:

- past `retry_threshold` handshaking connections, an Initial must carry a Retry token proving
  its source address, else it gets a Retry (RFC 9000 section 8.1.2) and takes no entry;
- the table has `max_handshakes` entries in all;
- one source address holds at most `per_source` of them. Validated and unvalidated entries are
  counted apart, so a forger using a connector's address cannot use up the connector's share;
  an unvalidated source over its share gets a Retry, a validated one is dropped.

Entries live at most `timeout` seconds (the endpoint enforces it). A source whose
registrations keep being refused (a wrong secret tried over and over) is not answered at all
for a while: each of its attempts would cost a full TLS handshake.
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
    refusals_per_source: int = 20  # refused registrations before the penalty; 0 = none
    refusal_penalty: float = 10.0  # seconds a penalized source is not answered


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


REFUSAL_PERIOD = 10.0  # seconds in which `refusals_per_source` refusals earn the penalty
MAX_TRACKED_SOURCES = 4096


class Penalties:
    """Sources shut out for `duration` seconds after `strikes` strikes within REFUSAL_PERIOD
    (0 strikes = never). Both tables are bounded: past MAX_TRACKED_SOURCES the strike counts
    start over and no new penalty is recorded, so memory stays fixed under any number of
    sources."""

    def __init__(self, strikes: int, duration: float) -> None:
        self.strikes = strikes
        self.duration = duration
        self._counts: dict[str, tuple[float, int]] = {}  # source -> (window start, strikes)
        self._until: dict[str, float] = {}

    @property
    def tracked(self) -> int:
        """Sources remembered (with strikes or a penalty)."""
        return len(self._counts) + len(self._until)

    def blocked(self, source: str, now: float) -> bool:
        until = self._until.get(source)
        if until is None:
            return False
        if now < until:
            return True
        del self._until[source]
        return False

    def strike(self, source: str, now: float) -> bool:
        """Count one strike; True when it earns `source` its penalty now."""
        if not self.strikes:
            return False
        start, n = self._counts.get(source, (now, 0))
        if now - start >= REFUSAL_PERIOD:
            start, n = now, 0
        n += 1
        if n < self.strikes:
            if source not in self._counts and len(self._counts) >= MAX_TRACKED_SOURCES:
                self._counts.clear()
            self._counts[source] = (start, n)
            return False
        self._counts.pop(source, None)
        if len(self._until) >= MAX_TRACKED_SOURCES:
            self._until = {s: t for s, t in self._until.items() if t > now}
            if len(self._until) >= MAX_TRACKED_SOURCES:
                return False
        self._until[source] = now + self.duration
        return True
