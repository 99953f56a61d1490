"""Connection ids that say which socket of a steering group serves a connection (sans-I/O).

The server picks the connection ids its peer puts in every packet; a QUIC server that restarts
without dropping connections puts a cookie in them, a socket "slot", so that the kernel's
SO_REUSEPORT program (ramp.net.reuseport) sends each packet to the process that holds the
connection while new connections go to the newest one (the udpgrm idea).

Layout of the first 8 bytes of a connection id (the rest, if longer, is random):

    bytes 0..5  random
    bytes 6..7  big-endian u16: slot << 10 | check

`check` is 10 bits of a keyed mix of the random bytes and the slot, so a peer that does not
know the key cannot choose a slot: a forged or random id carries a valid cookie once in 1,024
tries and then a slot it did not choose. The mix is 32-bit multiply/xor-shift arithmetic that
the kernel's programs compute as well (eBPF and classic BPF: `mix` is their specification);
it is a check against blind forgery and chance, not a cryptographic MAC.
"""

from __future__ import annotations

import os
import struct

MAX_SLOTS = 64  # slot numbers fit the 6 bits above the check
COOKIE_LENGTH = 8  # bytes of a connection id the cookie occupies
KEY_LENGTH = 8
CHECK_BITS = 10
CHECK_MASK = (1 << CHECK_BITS) - 1
# odd multipliers of the mix (from murmur3's finaliser and xxhash32)
MUL1 = 0x85EBCA6B
MUL2 = 0xC2B2AE35
MUL3 = 0x27D4EB2F
_U32 = 0xFFFFFFFF


def key_words(key: bytes) -> tuple[int, int]:
    """The key as the two 32-bit words the mix uses (what the BPF programs get as immediates)."""
    if len(key) != KEY_LENGTH:
        raise ValueError(f"cookie key must be {KEY_LENGTH} bytes, not {len(key)}")
    k0, k1 = struct.unpack("!II", key)
    return k0, k1


def mix(w0: int, w1: int, k0: int, k1: int) -> int:
    """The 10-bit check of random word `w0` (bytes 0..3) and `w1` (bytes 4..5 | slot << 16)."""
    h = ((w0 ^ k0) * MUL1) & _U32
    h ^= h >> 16
    h = ((h ^ w1 ^ k1) * MUL2) & _U32
    h ^= h >> 15
    h = (h * MUL3) & _U32
    return h >> (32 - CHECK_BITS)


class CidCookies:
    """Issues connection ids carrying a slot and reads the slot back from a packet's id."""

    def __init__(self, key: bytes, cid_length: int = COOKIE_LENGTH) -> None:
        if not COOKIE_LENGTH <= cid_length <= 20:
            raise ValueError(f"connection ids with a cookie are 8 to 20 bytes, not {cid_length}")
        self.key = bytes(key)
        self.cid_length = cid_length
        self._k0, self._k1 = key_words(self.key)

    @classmethod
    def generate(cls, cid_length: int = COOKIE_LENGTH) -> CidCookies:
        return cls(os.urandom(KEY_LENGTH), cid_length)

    def _check(self, cid: bytes, slot: int) -> int:
        w0, low = struct.unpack_from("!IH", cid)
        return mix(w0, low | slot << 16, self._k0, self._k1)

    def issue(self, slot: int) -> bytes:
        """A fresh random connection id that carries `slot`."""
        if not 0 <= slot < MAX_SLOTS:
            raise ValueError(f"slot {slot} is not in 0..{MAX_SLOTS - 1}")
        cid = bytearray(os.urandom(self.cid_length))
        struct.pack_into("!H", cid, 6, slot << CHECK_BITS | self._check(cid, slot))
        return bytes(cid)

    def slot_of(self, cid: bytes) -> int | None:
        """The slot a connection id carries; None when it has no valid cookie."""
        if len(cid) < COOKIE_LENGTH:
            return None
        (field,) = struct.unpack_from("!H", cid, 6)
        slot = field >> CHECK_BITS
        if field & CHECK_MASK != self._check(cid, slot):
            return None
        return slot
