"""The tunnel protocol codec: round trips, strictness, and damaged input."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ramp.testing.mutate import mutated
from ramp.wire.tunnel import (
    MAX_FRAME_PAYLOAD,
    ConnectCode,
    ConnectResult,
    ConnectTcp,
    FrameDecoder,
    ProtocolError,
    Redial,
    Register,
    Registered,
    RegisterError,
    RegisterRefused,
    SessionClose,
    SessionCloseReason,
    SessionError,
    SessionRefused,
    SessionRegister,
    SessionRegistered,
    StreamDatagram,
    Successor,
    Unregister,
    Window,
    encode_frame,
    encode_session_control,
    parse_datagram,
    parse_frame,
    payload_prefix,
)
from ramp.wire.varint import MAX_VARINT, VarintError, decode_varint, encode_varint

text = st.text(max_size=40)
uuids = st.uuids()
windows = st.integers(min_value=0, max_value=1 << 32)

frames = st.one_of(
    st.builds(
        Register,
        tunnel_id=uuids,
        connector_id=uuids,
        conn_index=st.integers(0, 255),
        secret=st.binary(max_size=256),
        version=st.integers(0, 1 << 20),
        client_info=text,
    ),
    st.builds(Registered, tunnel_name=text, edge_id=text),
    st.builds(RegisterRefused, code=st.sampled_from(RegisterError), message=text),
    st.just(Unregister()),
    st.builds(Successor, edge_id=text),
    st.builds(Redial, initial_cid=st.binary(min_size=8, max_size=20)),
    st.builds(Window, stream_id=st.integers(0, MAX_VARINT), increment=st.integers(1, 1 << 32)),
    st.builds(
        ConnectTcp,
        flow_id=st.integers(0, MAX_VARINT),
        host=st.text(min_size=1, max_size=60),
        port=st.integers(1, 65535),
        window=windows,
        metadata=st.dictionaries(st.text(max_size=16), text, max_size=16),
    ),
    st.builds(ConnectResult, code=st.sampled_from(ConnectCode), window=windows, message=text),
)


@given(st.integers(0, MAX_VARINT))
def test_varint_round_trip(n: int) -> None:
    raw = encode_varint(n)
    assert decode_varint(raw) == (n, len(raw))
    assert decode_varint(raw[:-1]) is None


def test_varint_range() -> None:
    with pytest.raises(VarintError):
        encode_varint(MAX_VARINT + 1)
    with pytest.raises(VarintError):
        encode_varint(-1)
    # RFC 9000 appendix A.1 examples
    assert decode_varint(bytes.fromhex("c2197c5eff14e88c")) == (151288809941952652, 8)
    assert decode_varint(bytes.fromhex("9d7f3e7d")) == (494878333, 4)
    assert decode_varint(bytes.fromhex("7bbd")) == (15293, 2)


@given(frames)
def test_frame_round_trip(frame) -> None:  # type: ignore[no-untyped-def]
    raw = encode_frame(frame)
    assert parse_frame(raw) == (frame, len(raw))
    # every strict prefix is "need more", never a wrong frame
    for cut in range(len(raw)):
        got = parse_frame(raw[:cut])
        assert got is None


@given(st.lists(frames, max_size=8), st.data())
def test_decoder_any_chunking(fs, data) -> None:  # type: ignore[no-untyped-def]
    raw = b"".join(encode_frame(f) for f in fs)
    dec = FrameDecoder()
    out = []
    pos = 0
    while pos < len(raw):
        n = data.draw(st.integers(1, max(1, len(raw) - pos)))
        out += dec.feed(raw[pos : pos + n])
        pos += n
    assert out == fs
    assert dec.pending == 0


@settings(max_examples=500)
@given(
    mutated(
        st.lists(frames, min_size=1, max_size=4).map(lambda fs: b"".join(map(encode_frame, fs)))
    )
)
def test_damaged_frames_decode_or_raise_protocol_error(raw: bytes) -> None:
    """Frames that survive damage are well-formed frames (they re-encode and parse back to
    themselves); anything else is a ProtocolError, never another exception."""
    dec = FrameDecoder()
    try:
        out = dec.feed(raw)
    except ProtocolError:
        return
    for frame in out:
        again = encode_frame(frame)
        assert parse_frame(again) == (frame, len(again))
    assert dec.pending <= len(raw)


def test_strictness() -> None:
    reg = Register(uuid.uuid4(), uuid.uuid4(), 0, b"s")
    raw = bytearray(encode_frame(reg))
    # a payload with a trailing byte inside its declared length
    raw[1] += 1
    raw.append(0)
    with pytest.raises(ProtocolError, match="trailing"):
        parse_frame(bytes(raw))
    with pytest.raises(ProtocolError, match="unknown frame type"):
        parse_frame(encode_varint(0x3F) + b"\x00")
    with pytest.raises(ProtocolError, match="too large"):
        parse_frame(encode_varint(0x10) + encode_varint(MAX_FRAME_PAYLOAD + 1))
    with pytest.raises(ProtocolError, match="window increment of zero"):
        parse_frame(bytes.fromhex("05020100"))
    bad_port = (
        ConnectTcp(1, "h", 80, 0)
        .payload()
        .replace(b"\x01h" + encode_varint(80), b"\x01h" + encode_varint(70000))
    )
    with pytest.raises(ProtocolError, match="port too large"):
        parse_frame(encode_varint(0x10) + encode_varint(len(bad_port)) + bad_port)


def test_decoder_bounds_partial_frames() -> None:
    dec = FrameDecoder(limit=100)
    header = encode_varint(0x10) + encode_varint(MAX_FRAME_PAYLOAD)
    dec.feed(header)
    with pytest.raises(ProtocolError, match="buffer limit"):
        dec.feed(b"x" * 200)


@given(frames, st.binary(max_size=64), st.data())
def test_feed_one_leaves_payload_alone(frame, payload: bytes, data) -> None:  # type: ignore[no-untyped-def]
    """A header frame followed by raw payload in any chunking: the payload is never parsed."""
    raw = encode_frame(frame) + payload
    dec = FrameDecoder()
    got = None
    pos = 0
    while got is None:
        n = data.draw(st.integers(1, len(raw) - pos))
        got = dec.feed_one(raw[pos : pos + n])
        pos += n
    assert got == frame
    assert dec.take_rest() + raw[pos:] == payload


session_controls = st.one_of(
    st.builds(
        SessionRegister,
        session_id=st.integers(0, MAX_VARINT),
        flow_id=st.integers(0, MAX_VARINT),
        host=st.text(min_size=1, max_size=60),
        port=st.integers(1, 65535),
        idle_timeout_ms=st.integers(0, 24 * 3600 * 1000),
        metadata=st.dictionaries(st.text(max_size=16), text, max_size=16),
    ),
    st.builds(SessionRegistered, session_id=st.integers(0, MAX_VARINT)),
    st.builds(
        SessionRefused,
        session_id=st.integers(0, MAX_VARINT),
        code=st.sampled_from(SessionError),
        message=text,
    ),
    st.builds(
        SessionClose,
        session_id=st.integers(0, MAX_VARINT),
        reason=st.sampled_from(SessionCloseReason),
    ),
)


@given(session_controls)
def test_session_control_round_trip(msg) -> None:  # type: ignore[no-untyped-def]
    assert parse_datagram(encode_session_control(msg)) == msg


@given(st.integers(0, MAX_VARINT), st.binary(max_size=2000))
def test_payload_datagram_round_trip(sid: int, payload: bytes) -> None:
    assert parse_datagram(payload_prefix(sid) + payload) == (sid, payload)


datagrams = st.one_of(
    session_controls.map(encode_session_control),
    st.builds(
        lambda sid, p: payload_prefix(sid) + p, st.integers(0, MAX_VARINT), st.binary(max_size=64)
    ),
)


@settings(max_examples=500)
@given(mutated(datagrams))
def test_damaged_datagrams_parse_or_raise_protocol_error(raw: bytes) -> None:
    try:
        msg = parse_datagram(raw)
    except ProtocolError:
        return
    if isinstance(msg, tuple):
        sid, payload = msg
        assert raw.endswith(payload)
        assert parse_datagram(payload_prefix(sid) + payload) == msg
    else:
        assert parse_datagram(encode_session_control(msg)) == msg


@given(st.binary(min_size=1, max_size=70000))
def test_stream_datagram_frames(data: bytes) -> None:
    raw = encode_frame(StreamDatagram(data))
    assert parse_frame(raw) == (StreamDatagram(data), len(raw))


def test_payload_too_large_is_refused() -> None:
    with pytest.raises(ProtocolError, match="too large"):
        parse_datagram(payload_prefix(1) + b"x" * 65536)


@pytest.mark.parametrize("length", [0, 7, 21])
def test_redial_refuses_ids_an_initial_cannot_carry(length: int) -> None:
    raw = encode_frame(Redial(b"\x01" * 8))
    bad = raw[:1] + encode_varint(1 + length) + encode_varint(length) + b"\x01" * length
    with pytest.raises(ProtocolError):
        parse_frame(bad)
