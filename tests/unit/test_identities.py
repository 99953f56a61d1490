"""Client credentials (one format for bearer, SOCKS5 and Basic) and the client token."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ramp.client_token import ClientToken, decode_client_token, encode_client_token
from ramp.policy.identities import (
    ClientCredentials,
    bearer,
    parse_secret_text,
    secret_text,
    split_bearer,
)
from ramp.testing.mutate import mutated
from ramp.token_codec import TokenError
from ramp.tunnel.token import Token

FP = "ab" * 32
SECRETS = {"alice": b"\x01" * 32, "bob.laptop": bytes(range(32))}
names = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)


def verify(name: str, secret: bytes) -> bool:
    return SECRETS.get(name) == secret


CREDS = ClientCredentials(verify, active=True)


# -- credentials --------------------------------------------------------------------------------


def test_secret_text_is_unpadded_base64url() -> None:
    text = secret_text(bytes(range(32)))
    assert len(text) == 43 and "=" not in text
    assert base64.urlsafe_b64decode(text + "=") == bytes(range(32))
    assert parse_secret_text(text) == bytes(range(32))
    assert parse_secret_text(text + "=") is None  # one spelling per secret
    assert parse_secret_text(text[:-1]) is None


def test_bearer_splits_on_the_last_dot() -> None:
    value = bearer("bob.laptop", SECRETS["bob.laptop"])
    assert value == "bob.laptop." + secret_text(SECRETS["bob.laptop"])
    assert split_bearer(value) == ("bob.laptop", SECRETS["bob.laptop"])
    assert CREDS.check_bearer(value) == "bob.laptop"
    assert CREDS.check_bearer("Bearer " + value) == "bob.laptop"
    assert CREDS.check_bearer(b"bearer  " + value.encode()) == "bob.laptop"


def test_password_forms() -> None:
    text = secret_text(SECRETS["alice"])
    assert CREDS.check_password("alice", text) == "alice"
    assert CREDS.check_password(b"alice", text.encode()) == "alice"
    assert CREDS.check_password("bob.laptop", text) is None  # someone else's secret
    assert CREDS.check_password("alice", text[:-1] + "A") is None


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Bearer",
        "Bearer ",
        "alice",
        "alice.",
        ".AAAA",
        "Basic YWxpY2U6eA==",
        "alice." + "A" * 44,
        "alice." + "A" * 42 + "=",
        "ali ce." + secret_text(b"\x01" * 32),
        "alice." + secret_text(b"\x02" * 32),
        b"\xff\xfe." + secret_text(b"\x01" * 32).encode(),
    ],
)
def test_bad_bearer_values_are_none(value: str | bytes) -> None:
    assert CREDS.check_bearer(value) is None


def test_a_failing_verifier_refuses_and_does_not_raise() -> None:
    def broken(name: str, secret: bytes) -> bool:
        raise RuntimeError("store unreadable")

    creds = ClientCredentials(broken)
    assert creds.check_bearer(bearer("alice", SECRETS["alice"])) is None
    assert creds.check_password("alice", secret_text(SECRETS["alice"])) is None


valid_bearers = st.sampled_from(
    [bearer(n, s) for n, s in SECRETS.items()] + ["Bearer " + bearer("alice", SECRETS["alice"])]
)


@given(st.one_of(st.text(), st.binary()))
def test_random_input_never_crashes(value: str | bytes) -> None:
    assert CREDS.check_bearer(value) in (None, *SECRETS)
    assert CREDS.check_password(value, value) in (None, *SECRETS)


@given(mutated(valid_bearers.map(str.encode)))
def test_mutated_credentials_never_crash(data: bytes) -> None:
    got = CREDS.check_bearer(data)
    # only a credential that still names a client and its secret gets through
    if got is not None:
        parts = split_bearer(data.decode("ascii"))
        assert parts is not None and verify(*parts)
    name, _, password = data.partition(b".")
    CREDS.check_password(name, password)


# -- the client token ---------------------------------------------------------------------------


def _token() -> ClientToken:
    return ClientToken(
        "bob.laptop", SECRETS["bob.laptop"], ["192.0.2.1:443", "[2001:db8::1]:443"], FP
    )


def _raw(text: str) -> dict[str, object]:
    return json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))


def test_client_token_fields_and_bearer() -> None:
    tok = _token()
    text = encode_client_token(tok.name, tok.secret, tok.edges, tok.ca_fingerprint)
    assert text == tok.encode() and "=" not in text
    raw = _raw(text)
    assert list(raw) == ["v", "k", "n", "s", "e", "f", "c"]
    assert raw["k"] == "client" and raw["n"] == "bob.laptop" and raw["f"] == FP
    assert raw["e"] == ["192.0.2.1:443", "[2001:db8::1]:443"]
    assert decode_client_token(text) == tok
    assert tok.bearer == bearer("bob.laptop", SECRETS["bob.laptop"])
    assert CREDS.check_bearer("Bearer " + decode_client_token(text).bearer) == "bob.laptop"


def test_the_wrong_kind_of_token_says_so() -> None:
    tunnel = Token("0f1e2d3c-4b5a-4978-8796-a5b4c3d2e1f0", b"x" * 32, ["192.0.2.1:7844"], FP)
    with pytest.raises(TokenError, match=r"this is a connector token .* not a client token"):
        decode_client_token(tunnel.encode())
    with pytest.raises(TokenError, match=r"this is a client token .* not a connector token"):
        Token.decode(_token().encode())


@pytest.mark.parametrize("cut", [1, 2, 3, 10, 40])
def test_a_truncated_client_token_says_so(cut: int) -> None:
    with pytest.raises(TokenError, match="altered or truncated"):
        decode_client_token(_token().encode()[:-cut])


def test_a_client_token_made_wrong_is_refused() -> None:
    for bad in (
        ClientToken("bob", b"x" * 16, ["192.0.2.1:443"], FP),  # not a client secret's length
        ClientToken("b b", b"x" * 32, ["192.0.2.1:443"], FP),
        ClientToken("bob", b"x" * 32, ["192.0.2.1"], FP),
        ClientToken("bob", b"x" * 32, ["192.0.2.1:443"], "nothex"),
    ):
        with pytest.raises(TokenError, match="not a ramp"):
            decode_client_token(bad.encode())


hostports = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.integers(0, 65535)).map(lambda t: f"{t[0]}:{t[1]}"),
    st.tuples(st.ip_addresses(v=6), st.integers(0, 65535)).map(lambda t: f"[{t[0]}]:{t[1]}"),
)
client_tokens = st.builds(
    ClientToken,
    name=names,
    secret=st.binary(min_size=32, max_size=32),
    edges=st.lists(hostports, max_size=8),
    ca_fingerprint=st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
)


@given(client_tokens)
def test_client_token_round_trip(tok: ClientToken) -> None:
    assert decode_client_token(tok.encode()) == tok
    assert split_bearer(tok.bearer) == (tok.name, tok.secret)


@given(mutated(client_tokens.map(ClientToken.encode).map(str.encode)))
def test_damaged_client_tokens_are_refused_or_decode(data: bytes) -> None:
    try:
        tok = decode_client_token(data.decode("latin-1"))
    except TokenError as e:
        assert str(e)
        return
    assert decode_client_token(tok.encode()) == tok
