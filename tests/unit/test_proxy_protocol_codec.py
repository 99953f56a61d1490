"""PROXY protocol v1/v2 codec: round trips, the specification's examples, strict rejections, and
damaged headers that never crash the parser."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ramp.testing.mutate import mutated
from ramp.wire import proxy_protocol as pp
from ramp.wire.proxy_protocol import (
    NEED_DATA,
    Command,
    Family,
    ProxyHeader,
    ProxyProtocolError,
    Transport,
)

ports = st.integers(0, 65535)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None).map(str)
addr4 = st.tuples(v4, ports)
addr6 = st.tuples(v6, ports)
tlv_types = st.sampled_from(
    [
        pp.PP2_TYPE_ALPN,
        pp.PP2_TYPE_AUTHORITY,
        pp.PP2_TYPE_NOOP,
        pp.PP2_TYPE_UNIQUE_ID,
        *range(0xE0, 0xF0),
    ]
)
tlvs = st.lists(st.tuples(tlv_types, st.binary(max_size=100)), max_size=5).map(tuple)
trailing = st.binary(max_size=64)


def _addresses() -> st.SearchStrategy[tuple[tuple[str, int], tuple[str, int]]]:
    return st.tuples(addr4, addr4) | st.tuples(addr6, addr6)


def feed_bytewise(data: bytes) -> tuple[ProxyHeader, int]:
    """Parse as a reader does that gets one byte at a time: NEED_DATA until the header is
    whole, and never a header before it."""
    for n in range(len(data) + 1):
        got = pp.parse(data[:n], max_v2_length=70000)
        if got is not NEED_DATA:
            assert isinstance(got, tuple)
            return got
    raise AssertionError("no header in the whole input")


@given(addrs=_addresses(), rest=trailing)
def test_v1_round_trip(addrs: tuple[tuple[str, int], tuple[str, int]], rest: bytes) -> None:
    src, dst = addrs
    raw = pp.encode_v1(src, dst)
    assert len(raw) <= pp.V1_MAX
    header, used = pp.parse(raw + rest)  # type: ignore[misc]
    assert used == len(raw)
    assert header.version == 1 and header.command is Command.PROXY
    assert header.source == src and header.destination == dst
    assert header.client == src
    assert header.family is (Family.INET if ":" not in src[0] else Family.INET6)


@given(
    addrs=_addresses(),
    tlvs=tlvs,
    transport=st.sampled_from([Transport.STREAM, Transport.DGRAM]),
    checksum=st.booleans(),
    rest=trailing,
)
def test_v2_round_trip(
    addrs: tuple[tuple[str, int], tuple[str, int]],
    tlvs: tuple[tuple[int, bytes], ...],
    transport: Transport,
    checksum: bool,
    rest: bytes,
) -> None:
    src, dst = addrs
    raw = pp.encode_v2(src, dst, tlvs=tlvs, transport=transport, checksum=checksum)
    header, used = pp.parse(raw + rest)  # type: ignore[misc]
    assert used == len(raw)
    assert header.version == 2 and header.command is Command.PROXY
    assert header.transport is transport
    assert header.source == src and header.destination == dst
    got = tuple(t for t in header.tlvs if t[0] != pp.PP2_TYPE_CRC32C)
    assert got == tlvs
    assert (header.tlv(pp.PP2_TYPE_CRC32C) is not None) == checksum
    assert pp.encode(header) == raw


@given(addrs=_addresses(), tlvs=tlvs)
def test_v2_any_chunking_needs_data_until_whole(
    addrs: tuple[tuple[str, int], tuple[str, int]], tlvs: tuple[tuple[int, bytes], ...]
) -> None:
    raw = pp.encode_v2(*addrs, tlvs=tlvs)
    header, used = feed_bytewise(raw + b"payload")
    assert used == len(raw)
    assert header.source == addrs[0]


@given(addrs=_addresses())
def test_v1_any_chunking_needs_data_until_whole(
    addrs: tuple[tuple[str, int], tuple[str, int]],
) -> None:
    raw = pp.encode_v1(*addrs)
    header, used = feed_bytewise(raw + b"GET / HTTP/1.1\r\n")
    assert used == len(raw) and header.destination == addrs[1]


def test_specification_examples() -> None:
    # section 2.1's examples of the longest lines and an UNKNOWN one
    longest6 = b"PROXY TCP6 ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n".replace(
        b"f...f", b"ffff:ffff:ffff:ffff:ffff:ffff"
    )
    header, used = pp.parse(longest6)  # type: ignore[misc]
    assert used == len(longest6) == 104
    assert header.source == ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)
    unknown = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"
    header, used = pp.parse(unknown)  # type: ignore[misc]
    assert used == len(unknown) and header.client is None
    header, used = pp.parse(b"PROXY UNKNOWN\r\n")  # type: ignore[misc]
    assert used == 15 and header.source is None


def test_v2_inet_bytes_as_the_specification_lays_them_out() -> None:
    raw = pp.encode_v2(("203.0.113.7", 56324), ("192.0.2.1", 443))
    assert raw[:12] == bytes.fromhex("0d0a0d0a000d0a515549540a")
    assert raw[12] == 0x21  # version 2, PROXY
    assert raw[13] == 0x11  # AF_INET, STREAM
    assert raw[14:16] == (12).to_bytes(2, "big")
    assert raw[16:20] == bytes([203, 0, 113, 7]) and raw[20:24] == bytes([192, 0, 2, 1])
    assert raw[24:26] == (56324).to_bytes(2, "big") and raw[26:28] == (443).to_bytes(2, "big")


def test_mixed_families_go_as_ipv4_mapped_ipv6() -> None:
    for raw in (
        pp.encode_v1(("203.0.113.7", 1), ("2001:db8::1", 2)),
        pp.encode_v2(("203.0.113.7", 1), ("2001:db8::1", 2)),
    ):
        header, _ = pp.parse(raw)  # type: ignore[misc]
        assert header.family is Family.INET6
        assert header.source is not None
        assert ipaddress.IPv6Address(header.source[0]).ipv4_mapped == ipaddress.IPv4Address(
            "203.0.113.7"
        )


def test_local_command_keeps_the_real_peer_and_skips_its_payload() -> None:
    body = bytes(12) + bytes((pp.PP2_TYPE_NOOP, 0, 3)) + b"abc"
    raw = pp.V2_SIGNATURE + bytes((0x20, 0x11)) + len(body).to_bytes(2, "big") + body
    header, used = pp.parse(raw + b"\x05\x01\x00")  # type: ignore[misc]
    assert used == len(raw)
    assert header.command is Command.LOCAL and header.client is None
    local = pp.encode_v2(command=Command.LOCAL)
    header, used = pp.parse(local)  # type: ignore[misc]
    assert used == 16 and header.command is Command.LOCAL


def test_unix_and_unspec_families() -> None:
    raw = pp.encode_v2(("/run/a.sock", 0), ("/run/b.sock", 0), family=Family.UNIX)
    header, used = pp.parse(raw)  # type: ignore[misc]
    assert used == 16 + 216
    assert header.source == ("/run/a.sock", 0) and header.client is None
    header, _ = pp.parse(pp.encode_v2(transport=Transport.UNSPEC))  # type: ignore[misc]
    assert header.family is Family.UNSPEC and header.client is None


def test_outbound_carries_identity_flow_id_and_authority() -> None:
    raw = pp.outbound(
        "v2",
        ("203.0.113.2", 40000),
        ("198.51.100.10", 80),
        identity="alice",
        flow_id=42,
        authority="app.corp.example",
    )
    header, _ = pp.parse(raw)  # type: ignore[misc]
    assert header.identity == "alice" and header.flow_id == 42
    assert header.tlv(pp.PP2_TYPE_AUTHORITY) == b"app.corp.example"
    assert pp.outbound("v1", ("203.0.113.2", 1), ("198.51.100.10", 2)).startswith(b"PROXY TCP4 ")
    # a source that is no IP address (an in-process client): v1 UNKNOWN, v2 UNSPEC
    assert pp.outbound("v1", ("memory", 0), ("198.51.100.10", 2)) == b"PROXY UNKNOWN\r\n"
    header, _ = pp.parse(pp.outbound("v2", ("memory", 0), ("198.51.100.10", 2), flow_id=7))  # type: ignore[misc]
    assert header.client is None and header.flow_id == 7


def test_crc32c_known_value() -> None:
    # RFC 3720 B.4: 32 bytes of zeros
    assert pp.crc32c(bytes(32)) == 0x8A9136AA
    assert pp.crc32c(b"123456789") == 0xE3069283


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"GET / HTTP/1.1\r\n", "bad_signature"),
        (b"\x05\x01\x00", "bad_signature"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "bad_v1"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "bad_v1"),
        (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "bad_v1"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bad_v1"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", "bad_v1"),
        (b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n", "bad_address"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "bad_address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "bad_address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "bad_port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "bad_port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "bad_port"),
        (b"PROXY " + b"A" * 101, "too_long"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\xff\r\n", "bad_v1"),
    ],
)
def test_bad_v1_headers(raw: bytes, reason: str) -> None:
    with pytest.raises(ProxyProtocolError) as e:
        pp.parse(raw)
    assert e.value.reason == reason


def _v2(ver_cmd: int = 0x21, fam: int = 0x11, body: bytes = bytes(12), length: int | None = None):
    n = len(body) if length is None else length
    return pp.V2_SIGNATURE + bytes((ver_cmd, fam)) + n.to_bytes(2, "big") + body


@pytest.mark.parametrize(
    "raw, reason",
    [
        (_v2(ver_cmd=0x11), "bad_version"),
        (_v2(ver_cmd=0x31), "bad_version"),
        (_v2(ver_cmd=0x22), "bad_command"),
        (_v2(fam=0x41), "bad_family"),
        (_v2(fam=0x13), "bad_family"),
        (_v2(body=bytes(8)), "bad_length"),
        (_v2(fam=0x21, body=bytes(12)), "bad_length"),
        (_v2(body=bytes(12), length=5000), "too_long"),
        (_v2(body=bytes(12) + bytes((0xE0, 0, 10)) + b"abc"), "bad_tlv"),
        (_v2(body=bytes(12) + bytes((0xE0, 0))), "bad_tlv"),
        (_v2(body=bytes(12) + bytes((pp.PP2_TYPE_CRC32C, 0, 2)) + b"ab"), "bad_tlv"),
        (_v2(body=bytes(12) + bytes((pp.PP2_TYPE_UNIQUE_ID, 0, 129)) + bytes(129)), "bad_tlv"),
        (_v2(body=bytes(12) + bytes((pp.PP2_TYPE_CRC32C, 0, 4)) + b"abcd"), "bad_crc"),
        (b"\r\n\r\n\x00\r\nQUIX\n" + bytes(4), "bad_signature"),
    ],
)
def test_bad_v2_headers(raw: bytes, reason: str) -> None:
    with pytest.raises(ProxyProtocolError) as e:
        pp.parse(raw)
    assert e.value.reason == reason


def test_v2_length_is_checked_before_the_bytes_arrive() -> None:
    # a huge announced length is refused from the 16 fixed bytes: nothing is buffered for it
    with pytest.raises(ProxyProtocolError, match="limit"):
        pp.parse(_v2(body=b"", length=0xFFFF))


def test_a_damaged_checksum_is_caught() -> None:
    raw = bytearray(pp.encode_v2(("203.0.113.7", 1), ("192.0.2.1", 2), checksum=True))
    raw[17] ^= 0x01  # the source address changed in transit
    with pytest.raises(ProxyProtocolError) as e:
        pp.parse(bytes(raw))
    assert e.value.reason == "bad_crc"


def test_cut_at_every_byte_is_need_data_never_a_header() -> None:
    for raw in (
        pp.encode_v1(("203.0.113.7", 1), ("192.0.2.1", 2)),
        pp.encode_v1(("2001:db8::7", 1), ("2001:db8::1", 2)),
        pp.encode_v2(("203.0.113.7", 1), ("192.0.2.1", 2), tlvs=((0xE0, b"alice"),)),
        pp.encode_v2(("2001:db8::7", 1), ("2001:db8::1", 2), checksum=True),
        pp.encode_v2(command=Command.LOCAL),
    ):
        for n in range(len(raw)):
            assert pp.parse(raw[:n]) is NEED_DATA, (raw, n)
        assert pp.parse(raw) is not NEED_DATA


def test_signature_state() -> None:
    assert pp.signature_state(b"") is None
    assert pp.signature_state(b"PRO") is None
    assert pp.signature_state(b"\r\n\r\n") is None
    assert pp.signature_state(b"PROXY ") is True
    assert pp.signature_state(pp.V2_SIGNATURE) is True
    assert pp.signature_state(b"POST") is False
    assert pp.signature_state(b"\x05") is False


valid_headers = st.one_of(
    st.builds(pp.encode_v1, addr4, addr4),
    st.builds(pp.encode_v1, addr6, addr6),
    st.builds(
        lambda a, b, t, c: pp.encode_v2(a, b, tlvs=t, checksum=c), addr4, addr4, tlvs, st.booleans()
    ),
    st.builds(lambda a, b, t: pp.encode_v2(a, b, tlvs=t), addr6, addr6, tlvs),
    st.builds(lambda t: pp.encode_v2(command=Command.LOCAL, tlvs=t), tlvs),
    st.just(b"PROXY UNKNOWN\r\n"),
)


@given(data=mutated(valid_headers))
def test_damaged_headers_parse_need_data_or_fail_cleanly(data: bytes) -> None:
    try:
        got = pp.parse(data)
    except ProxyProtocolError as e:
        assert e.reason
        return
    if got is NEED_DATA:
        # the promise a reader relies on: consuming all of it may not swallow payload
        assert len(data) < pp.V2_HEADER + pp.DEFAULT_MAX_V2_LENGTH
        return
    header, used = got  # type: ignore[misc]
    assert 0 < used <= len(data)
    assert header.version in (1, 2)
    if header.client is not None:
        ipaddress.ip_address(header.client[0])
        assert 0 <= header.client[1] <= 65535


@given(data=st.binary(max_size=300))
def test_random_bytes_never_crash(data: bytes) -> None:
    try:
        pp.parse(data)
    except ProxyProtocolError:
        pass
