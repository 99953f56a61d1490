"""MASQUE framing: round trips, limits, and damaged input never crashing the decoders."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ramp.testing.mutate import mutated
from ramp.wire.masque import (
    CAPSULE_DATAGRAM,
    CapsuleDecoder,
    ConnectRequest,
    MasqueError,
    RequestRefused,
    UdpRequest,
    UdpTarget,
    UdpTemplate,
    decode_context,
    decode_quic_datagram,
    encode_capsule,
    encode_context,
    encode_quic_datagram,
    parse_request,
)
from ramp.wire.varint import MAX_VARINT

capsules = st.lists(
    st.tuples(st.integers(0, MAX_VARINT), st.binary(max_size=2000)), min_size=1, max_size=6
)


@given(capsules, st.integers(1, 64))
def test_capsules_round_trip_however_the_stream_is_cut(
    items: list[tuple[int, bytes]], chunk: int
) -> None:
    wire = b"".join(encode_capsule(t, v) for t, v in items)
    decoder = CapsuleDecoder()
    got = []
    for i in range(0, len(wire), chunk):
        got += decoder.feed(wire[i : i + chunk])
    decoder.end()
    assert [(c.type, c.value) for c in got] == items


def test_an_oversized_capsule_is_refused_before_it_is_buffered() -> None:
    decoder = CapsuleDecoder(limit=1000)
    with pytest.raises(MasqueError, match="1001 bytes"):
        decoder.feed(encode_capsule(CAPSULE_DATAGRAM, b"x" * 1001)[:8])


def test_a_stream_ending_inside_a_capsule_is_an_error() -> None:
    decoder = CapsuleDecoder()
    assert decoder.feed(encode_capsule(CAPSULE_DATAGRAM, b"abc")[:-1]) == []
    with pytest.raises(MasqueError, match="inside a capsule"):
        decoder.end()


@given(st.integers(0, MAX_VARINT // 4).map(lambda q: q * 4), st.integers(0, 1000), st.binary())
def test_quic_datagrams_round_trip(stream_id: int, context_id: int, payload: bytes) -> None:
    wire = encode_quic_datagram(stream_id, context_id, payload)
    assert decode_quic_datagram(wire) == (stream_id, context_id, payload)
    assert decode_context(encode_context(context_id, payload)) == (context_id, payload)


valid_capsule_streams = capsules.map(lambda items: b"".join(encode_capsule(*i) for i in items))


@given(mutated(valid_capsule_streams, max_mutations=4))
def test_damaged_capsule_streams_decode_or_fail_cleanly(wire: bytes) -> None:
    decoder = CapsuleDecoder(limit=4096)
    try:
        for capsule in decoder.feed(wire):
            assert len(capsule.value) <= 4096
        decoder.end()
    except MasqueError:
        pass


valid_datagrams = st.builds(
    encode_quic_datagram,
    st.integers(0, 1 << 20).map(lambda q: q * 4),
    st.integers(0, 100),
    st.binary(max_size=64),
)


@given(mutated(valid_datagrams, max_mutations=3))
def test_damaged_quic_datagrams_decode_or_fail_cleanly(wire: bytes) -> None:
    try:
        stream_id, context_id, _ = decode_quic_datagram(wire)
    except MasqueError:
        return
    assert stream_id % 4 == 0 and context_id >= 0


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("/.well-known/masque/udp/192.0.2.6/443/", UdpTarget("192.0.2.6", 443)),
        ("/.well-known/masque/udp/dns.corp/53/", UdpTarget("dns.corp", 53)),
        ("/.well-known/masque/udp/2001%3Adb8%3A%3A42/53/", UdpTarget("2001:db8::42", 53)),
        ("/.well-known/masque/udp/2001%3adb8%3a%3a42/53/?x=1", UdpTarget("2001:db8::42", 53)),
        ("/other/udp/192.0.2.6/443/", None),
        ("/.well-known/masque/udp/192.0.2.6/", None),
    ],
)
def test_the_default_template_names_the_target(path: str, target: UdpTarget | None) -> None:
    assert UdpTemplate().match(path) == target


@pytest.mark.parametrize(
    "path",
    [
        "/.well-known/masque/udp/192.0.2.6/0/",
        "/.well-known/masque/udp/192.0.2.6/65536/",
        "/.well-known/masque/udp/192.0.2.6/http/",
        "/.well-known/masque/udp/192.0.2.6/\u00b2/",  # a digit to str, not to int()
        "/.well-known/masque/udp//53/",
        "/.well-known/masque/udp/2001%3Azz/53/",
    ],
)
def test_a_bad_target_in_the_template_is_an_error(path: str) -> None:
    with pytest.raises(MasqueError):
        UdpTemplate().match(path)


def test_templates_need_both_variables_as_path_segments() -> None:
    assert UdpTemplate("https://edge.example/p/{target_host}/{target_port}/").path == (
        "/p/{target_host}/{target_port}/"
    )
    with pytest.raises(ValueError, match="target_host"):  # query variables: not supported
        UdpTemplate("https://edge.example/masque?h={target_host}&p={target_port}")
    with pytest.raises(ValueError, match="target_host"):
        UdpTemplate("/masque/{target_port}/")


@given(
    st.one_of(
        st.ip_addresses().map(str),
        st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}", fullmatch=True),
    ),
    st.integers(1, 65535),
)
def test_expand_and_match_round_trip(host: str, port: int) -> None:
    template = UdpTemplate("https://edge.example/proxy/{target_host}/{target_port}/udp")
    got = template.match(template.expand(host, port))
    assert got is not None and got.port == port
    assert got.host == (str(__import__("ipaddress").ip_address(host)) if ":" in host else host)


# -- proxy requests ---------------------------------------------------------------------------

hosts = st.one_of(
    st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}", fullmatch=True),
    st.ip_addresses(v=4).map(str),
)
ports = st.integers(1, 65535)
AUTH = (b"proxy-authorization", b"Bearer a.b")


def _connect(host: str, port: int) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"CONNECT"), (b":authority", f"{host}:{port}".encode()), AUTH]


def _udp(host: str, port: int) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"CONNECT"),
        (b":protocol", b"connect-udp"),
        (b":scheme", b"https"),
        (b":authority", b"edge"),
        (b":path", UdpTemplate().expand(host, port).encode()),
        AUTH,
    ]


@given(hosts, ports)
def test_connect_requests_name_their_target(host: str, port: int) -> None:
    assert parse_request(_connect(host, port), UdpTemplate()) == ConnectRequest(
        host, port, b"Bearer a.b"
    )


@given(hosts, ports)
def test_connect_udp_requests_name_their_target(host: str, port: int) -> None:
    req = parse_request(_udp(host, port), UdpTemplate())
    assert isinstance(req, UdpRequest)
    assert (req.host, req.port, req.authorization) == (host, port, b"Bearer a.b")


@st.composite
def damaged_requests(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    """A valid request with one header's name or value damaged, dropped or doubled."""
    headers = draw(st.sampled_from([_connect, _udp]))(draw(hosts), draw(ports))
    i = draw(st.integers(0, len(headers) - 1))
    name, value = headers[i]
    kind = draw(st.sampled_from(["value", "name", "drop", "double"]))
    if kind == "value":
        headers[i] = (name, draw(mutated(st.just(value))))
    elif kind == "name":
        headers[i] = (draw(mutated(st.just(name))), value)
    elif kind == "drop":
        del headers[i]
    else:
        headers.insert(i, (name, draw(st.binary(max_size=40))))
    return headers


@given(damaged_requests())
def test_damaged_requests_parse_or_are_refused_with_a_status(
    headers: list[tuple[bytes, bytes]],
) -> None:
    try:
        req = parse_request(headers, UdpTemplate())
    except RequestRefused as e:
        assert 400 <= e.status < 600 and e.error
    else:
        assert isinstance(req, ConnectRequest | UdpRequest) and 0 < req.port <= 65535
