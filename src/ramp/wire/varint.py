"""QUIC variable-length integers (RFC 9000 section 16), the tunnel protocol's integer encoding."""

from __future__ import annotations

MAX_VARINT = (1 << 62) - 1


class VarintError(ValueError):
    """A varint could not be encoded (out of range)."""


def encode_varint(value: int) -> bytes:
    if value < 0x40:
        if value < 0:
            raise VarintError(f"varint out of range: {value}")
        return bytes((value,))
    if value < 0x4000:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 0x4000_0000:
        return (value | 0x8000_0000).to_bytes(4, "big")
    if value <= MAX_VARINT:
        return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")
    raise VarintError(f"varint out of range: {value}")


def decode_varint(buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int] | None:
    """Return (value, new position), or None when `buf` ends before the varint does."""
    if pos >= len(buf):
        return None
    first = buf[pos]
    length = 1 << (first >> 6)
    end = pos + length
    if end > len(buf):
        return None
    value = first & 0x3F
    for i in range(pos + 1, end):
        value = (value << 8) | buf[i]
    return value, end
