from __future__ import annotations

import base64
import json
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ramp.testing.mutate import mutated
from ramp.tunnel.token import Token, TokenError, _checksum

FP = "ab" * 32


def _token(**kw: object) -> Token:
    args: dict[str, object] = {
        "tunnel_id": str(uuid.UUID(int=7, version=4)),
        "secret": bytes(range(32)),
        "edges": ["192.0.2.1:7844", "[2001:db8::1]:7844", "edge.example:443"],
        "ca_fingerprint": FP,
    }
    args.update(kw)
    return Token(**args)  # type: ignore[arg-type]


def _raw(token: str) -> dict[str, object]:
    return json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))


def _pack(obj: object) -> str:
    data = json.dumps(obj, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_round_trip_and_format() -> None:
    tok = _token()
    s = tok.encode()
    assert "=" not in s and "\n" not in s
    assert Token.decode(s) == tok
    raw = _raw(s)
    assert list(raw) == ["v", "t", "s", "e", "f", "c"]
    assert raw["v"] == 1 and raw["t"] == tok.tunnel_id and raw["f"] == FP
    assert isinstance(raw["c"], str) and len(raw["c"]) == 8


def test_whitespace_from_copy_paste_is_ignored() -> None:
    s = _token().encode()
    assert Token.decode(f"  {s[:20]}\n{s[20:]}\n") == _token()


def test_not_base64() -> None:
    with pytest.raises(TokenError, match="not base64"):
        Token.decode("abc$def")


def test_not_a_ramp_token() -> None:
    with pytest.raises(TokenError, match="not a ramp token"):
        Token.decode(_pack([1, 2, 3]))
    with pytest.raises(TokenError, match="not a ramp token"):
        Token.decode("aGVsbG8gd29ybGQ")  # "hello world"
    with pytest.raises(TokenError, match="empty token"):
        Token.decode("")


def test_tampered_field_is_a_checksum_mismatch() -> None:
    raw = _raw(_token().encode())
    raw["e"] = ["203.0.113.9:7844"]
    with pytest.raises(TokenError, match="checksum mismatch: the token was altered or truncated"):
        Token.decode(_pack(raw))


@pytest.mark.parametrize("cut", [1, 2, 3, 10, 40])
def test_truncated_token_says_so(cut: int) -> None:
    s = _token().encode()
    with pytest.raises(TokenError, match="altered or truncated"):
        Token.decode(s[:-cut])


def test_unsupported_version() -> None:
    raw = _raw(_token().encode())
    raw["v"] = 2
    with pytest.raises(TokenError, match="unsupported token version 2"):
        Token.decode(_pack(raw))


def test_bad_fields_are_refused_even_with_a_valid_checksum() -> None:
    good = Token("t1", b"x" * 32, ["192.0.2.1:7844"], FP)
    for bad in (
        Token("t1", b"x" * 8, ["192.0.2.1:7844"], FP),  # secret too short
        Token("t1", b"x" * 32, ["192.0.2.1"], FP),  # edge without port
        Token("t1", b"x" * 32, ["192.0.2.1:7844"], "nothex"),
        Token("", b"x" * 32, ["192.0.2.1:7844"], FP),
    ):
        with pytest.raises(TokenError, match="not a ramp token"):
            Token.decode(bad.encode())
    assert Token.decode(good.encode()) == good


hostports = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.integers(0, 65535)).map(lambda t: f"{t[0]}:{t[1]}"),
    st.tuples(st.ip_addresses(v=6), st.integers(0, 65535)).map(lambda t: f"[{t[0]}]:{t[1]}"),
    st.tuples(st.from_regex(r"[a-z][a-z0-9.-]{0,30}", fullmatch=True), st.integers(0, 65535)).map(
        lambda t: f"{t[0]}:{t[1]}"
    ),
)
tokens = st.builds(
    Token,
    tunnel_id=st.uuids(version=4).map(str),
    secret=st.binary(min_size=16, max_size=64),
    edges=st.lists(hostports, max_size=8),
    ca_fingerprint=st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
)


@given(tokens)
def test_round_trip_property(tok: Token) -> None:
    assert Token.decode(tok.encode()) == tok


def token_json(tok: Token) -> bytes:
    text = tok.encode()
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def check_decoded(text: str) -> None:
    """The documented outcome for any text: a TokenError saying what is wrong, or a token
    that encodes back to something that decodes to itself."""
    try:
        tok = Token.decode(text)
    except TokenError as e:
        assert str(e)
        return
    assert Token.decode(tok.encode()) == tok


@given(mutated(tokens.map(Token.encode).map(str.encode)))
def test_damaged_token_text_is_refused_or_decodes(data: bytes) -> None:
    check_decoded(data.decode("latin-1"))


@given(mutated(tokens.map(token_json)))
def test_damaged_token_json_is_refused_or_decodes(raw: bytes) -> None:
    """Damage under the base64: reaches the JSON and checksum checks."""
    check_decoded(base64.urlsafe_b64encode(raw).decode())


def damaged_text(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return mutated(valid.map(str.encode)).map(lambda b: b.decode("latin-1"))


@st.composite
def tokens_with_a_damaged_field(draw: st.DrawFn) -> str:
    """A token one of whose fields was damaged and whose checksum was then recomputed, as if
    it had been made wrong: this reaches the field checks behind the checksum."""
    obj = json.loads(token_json(draw(tokens)))
    del obj["c"]
    key = draw(st.sampled_from(["t", "s", "e", "f", "v"]))
    value = obj[key]
    if key == "e" and value and draw(st.booleans()):
        i = draw(st.integers(0, len(value) - 1))
        value[i] = draw(damaged_text(st.just(value[i])))
    elif isinstance(value, str):
        value = draw(damaged_text(st.just(value)))
    else:  # any JSON value in the place of a list or a number
        value = json.loads(draw(mutated(st.just(json.dumps(value).encode())).filter(_is_json)))
    obj[key] = value
    obj["c"] = _checksum(obj)
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode()


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return True


@given(tokens_with_a_damaged_field())
def test_damaged_fields_with_a_matching_checksum_are_refused_or_decode(text: str) -> None:
    check_decoded(text)


@given(tokens, st.data())
def test_any_single_character_change_is_caught(tok: Token, data: st.DataObject) -> None:
    s = tok.encode()
    i = data.draw(st.integers(0, len(s) - 1))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    ch = data.draw(st.sampled_from(alphabet).filter(lambda c: c != s[i]))
    try:
        decoded = Token.decode(s[:i] + ch + s[i + 1 :])
    except TokenError:
        return
    # Only a change in the unused low bits of the last character can leave the bytes intact.
    assert i == len(s) - 1
    assert decoded == tok
