"""Hypothesis strategies that damage valid encodings.

Random bytes rarely get past a parser's first type or length check, so a fuzz test fed only
random bytes exercises one branch. Starting from a valid encoding (made by the codec's own
builder) and changing a little of it reaches the field parsers behind those checks: a
flipped bit in a length, a truncated address, a spliced-in count.
"""

from __future__ import annotations

from hypothesis import strategies as st

# Values that sit on the edges of length and type fields: zero, one, sign and varint-prefix
# boundaries, all ones.
_INTERESTING_8 = (0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x3F, 0x40, 0x7F, 0x80, 0xC0, 0xFE, 0xFF)
_INTERESTING_16 = (0x0000, 0x0001, 0x00FF, 0x0100, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF)
HEAD = 24  # bytes at the front that hold most codecs' type and length fields
_KINDS = ("flip", "set", "set16", "truncate", "insert", "delete", "duplicate")


@st.composite
def _mutate(draw: st.DrawFn, valid: st.SearchStrategy[bytes], max_mutations: int) -> bytes:
    data = bytearray(draw(valid))
    for _ in range(draw(st.integers(1, max_mutations))):
        kind = draw(st.sampled_from(_KINDS))
        n = len(data)
        if kind == "insert" or n == 0:
            at = draw(st.integers(0, n))
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
            continue
        # Headers, with their type and length fields, sit at the front: aim there half the time.
        at = draw(st.integers(0, min(n, HEAD) - 1) | st.integers(0, n - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[at] = draw(st.sampled_from(_INTERESTING_8) | st.integers(0, 255))
        elif kind == "set16":
            value = draw(st.sampled_from(_INTERESTING_16))
            data[at : at + 2] = value.to_bytes(2, "big")
        elif kind == "truncate":
            del data[at:]
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        else:  # duplicate: a field repeated, lengths now disagree with what follows
            end = min(n, at + draw(st.integers(1, 16)))
            data[at:at] = data[at:end]
    return bytes(data)


def mutated(valid: st.SearchStrategy[bytes], max_mutations: int = 3) -> st.SearchStrategy[bytes]:
    """Encodings drawn from `valid`, each changed by 1..max_mutations edits."""
    return _mutate(valid, max_mutations)
