"""SOCKS5 codec: build -> parse round trips, strict rejections, and damaged input."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ramp.testing.mutate import mutated
from ramp.wire import socks5
from ramp.wire.socks5 import (
    NEED_DATA,
    AddressType,
    AuthRequest,
    Command,
    Greeting,
    Method,
    Phase,
    Rep,
    Request,
    ServerHandshake,
    Socks5Error,
)

DOMAIN_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
domains = st.text(DOMAIN_CHARS, min_size=1, max_size=255).filter(
    lambda s: not _is_ip(s)  # an IP literal is encoded as an address, not a name
)
ipv4s = st.ip_addresses(v=4).map(str)
ipv6s = st.ip_addresses(v=6).map(str)
hosts = st.one_of(ipv4s, ipv6s, domains)
ports = st.integers(1, 65535)


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
    except ValueError:
        return False
    return True


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


def drive(hs: ServerHandshake, chunks: list[bytes], accept_auth: bool = True) -> list[object]:
    """Feed chunks, collect events, accept or reject credentials."""
    events: list[object] = []
    for chunk in chunks:
        hs.receive_data(chunk)
        while hs.phase not in (Phase.DONE, Phase.FAILED):
            ev = hs.next_event()
            if ev is NEED_DATA:
                break
            events.append(ev)
            if isinstance(ev, AuthRequest):
                hs.auth_reply(accept_auth)
    return events


@given(
    host=hosts,
    port=ports,
    command=st.sampled_from(list(Command)),
    extra_methods=st.lists(st.integers(0, 255), max_size=20),
    trailing=st.binary(max_size=64),
    cuts=st.lists(st.integers(0, 2000), max_size=8),
)
def test_no_auth_round_trip_any_chunking(
    host: str,
    port: int,
    command: Command,
    extra_methods: list[int],
    trailing: bytes,
    cuts: list[int],
) -> None:
    wire = (
        socks5.build_greeting([*extra_methods, Method.NO_AUTH])
        + socks5.build_request(command, host, port)
        + trailing
    )
    hs = ServerHandshake(require_auth=False)
    events = drive(hs, chunked(wire, cuts))
    assert len(events) == 2
    greeting, request = events
    assert isinstance(greeting, Greeting)
    assert greeting.method is Method.NO_AUTH
    assert isinstance(request, Request)
    assert request.command is command
    assert request.port == port
    if _is_ip(host):
        assert ipaddress.ip_address(request.host) == ipaddress.ip_address(host)
        assert request.address_type in (AddressType.IPV4, AddressType.IPV6)
    else:
        assert request.host == host
        assert request.address_type is AddressType.DOMAIN
    assert hs.phase is Phase.DONE
    assert hs.trailing_data == trailing


@given(
    user=st.binary(min_size=1, max_size=255),
    password=st.binary(max_size=255),
    host=hosts,
    port=ports,
    cuts=st.lists(st.integers(0, 1200), max_size=8),
)
def test_auth_round_trip(
    user: bytes, password: bytes, host: str, port: int, cuts: list[int]
) -> None:
    wire = (
        socks5.build_greeting([Method.NO_AUTH, Method.USERNAME_PASSWORD])
        + socks5.build_auth_request(user, password)
        + socks5.build_request(Command.CONNECT, host, port)
    )
    hs = ServerHandshake(require_auth=True)
    events = drive(hs, chunked(wire, cuts))
    assert [type(e) for e in events] == [Greeting, AuthRequest, Request]
    assert events[0].method is Method.USERNAME_PASSWORD  # type: ignore[attr-defined]
    assert events[1] == AuthRequest(user, password)


def test_rejected_credentials_stop_the_handshake() -> None:
    hs = ServerHandshake(require_auth=True)
    hs.receive_data(socks5.build_greeting([Method.USERNAME_PASSWORD]))
    assert isinstance(hs.next_event(), Greeting)
    hs.receive_data(socks5.build_auth_request(b"u", b"wrong"))
    assert isinstance(hs.next_event(), AuthRequest)
    assert hs.auth_reply(False) == b"\x01\x01"
    assert hs.phase is Phase.FAILED


@given(
    rep=st.integers(0, 255),
    host=hosts,
    port=st.integers(0, 65535),
    cuts=st.lists(st.integers(0, 300), max_size=4),
)
def test_reply_round_trip(rep: int, host: str, port: int, cuts: list[int]) -> None:
    wire = socks5.build_reply(rep, host, port)
    for i in range(len(wire)):
        assert socks5.parse_reply(wire[:i]) is None
    parsed = socks5.parse_reply(wire + b"payload")
    assert parsed is not None
    reply, used = parsed
    assert used == len(wire)
    assert reply.rep == rep and reply.port == port
    if _is_ip(host):
        assert ipaddress.ip_address(reply.host) == ipaddress.ip_address(host)
    else:
        assert reply.host == host


def test_client_side_helpers() -> None:
    assert socks5.parse_method_selection(b"\x05\x02") == Method.USERNAME_PASSWORD
    assert socks5.parse_auth_status(b"\x01\x00") is True
    assert socks5.parse_auth_status(b"\x01\x01") is False
    with pytest.raises(Socks5Error):
        socks5.parse_method_selection(b"\x04\x00")
    with pytest.raises(ValueError):
        socks5.build_greeting([])
    with pytest.raises(ValueError):
        socks5.build_request(Command.CONNECT, "bad host", 80)


def _fail(data: bytes, require_auth: bool = False) -> Socks5Error:
    hs = ServerHandshake(require_auth=require_auth)
    hs.receive_data(data)
    with pytest.raises(Socks5Error) as info:
        while True:
            ev = hs.next_event()
            assert ev is not NEED_DATA, "codec waited instead of rejecting"
            if isinstance(ev, AuthRequest):
                hs.receive_data(b"")
                hs.auth_reply(True)
    assert hs.phase is Phase.FAILED
    return info.value


GREETING = socks5.build_greeting([Method.NO_AUTH])
NO_METHOD = b"\x05\xff"


def _rep(rep: Rep) -> bytes:
    return socks5.build_reply(rep)


@pytest.mark.parametrize(
    ("data", "require_auth", "reason", "reply"),
    [
        (b"\x04\x01\x00\x50\x0a\x00\x00\x01\x00", False, "bad_version", b""),  # SOCKS4
        (b"GET / HTTP/1.1\r\n\r\n", False, "bad_version", b""),
        (b"\x05\x00", False, "no_methods", NO_METHOD),
        (b"\x05\x01\x02", False, "no_acceptable_method", NO_METHOD),
        (b"\x05\x01\x00", True, "no_acceptable_method", NO_METHOD),
        (b"\x05\x01\x02\x02\x01a\x01b", True, "bad_auth_version", b"\x01\x01"),
        (b"\x05\x01\x02\x01\x00\x01b", True, "empty_username", b"\x01\x01"),
        (GREETING + b"\x04\x01\x00\x01", False, "bad_version", _rep(Rep.GENERAL_FAILURE)),
        (GREETING + b"\x05\x09\x00\x01", False, "bad_command", _rep(Rep.COMMAND_NOT_SUPPORTED)),
        (GREETING + b"\x05\x01\x01\x01", False, "bad_reserved", _rep(Rep.GENERAL_FAILURE)),
        (
            GREETING + b"\x05\x01\x00\x02",
            False,
            "bad_address_type",
            _rep(Rep.ADDRESS_TYPE_NOT_SUPPORTED),
        ),
        (GREETING + b"\x05\x01\x00\x03\x00", False, "empty_domain", _rep(Rep.GENERAL_FAILURE)),
        (
            GREETING + b"\x05\x01\x00\x03\x03a\x00b\x00\x50",
            False,
            "bad_domain",
            _rep(Rep.GENERAL_FAILURE),
        ),
        (
            GREETING + b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x00",
            False,
            "bad_port",
            _rep(Rep.GENERAL_FAILURE),
        ),
    ],
)
def test_strict_rejections(data: bytes, require_auth: bool, reason: str, reply: bytes) -> None:
    err = _fail(data, require_auth)
    assert err.reason == reason
    assert err.reply == reply


def test_udp_associate_and_bind_parse() -> None:
    for cmd in (Command.UDP_ASSOCIATE, Command.BIND):
        hs = ServerHandshake(require_auth=False)
        # Port 0 is legal for UDP ASSOCIATE (the client may not know its port yet).
        hs.receive_data(GREETING + socks5.build_request(cmd, "0.0.0.0", 0))
        assert isinstance(hs.next_event(), Greeting)
        req = hs.next_event()
        assert isinstance(req, Request) and req.command is cmd


def test_pipelined_greeting_auth_request_payload() -> None:
    hs = ServerHandshake(require_auth=True)
    hs.receive_data(
        socks5.build_greeting([Method.USERNAME_PASSWORD])
        + socks5.build_auth_request(b"alice", b"pw")
        + socks5.build_request(Command.CONNECT, "2001:db8::1", 443)
        + b"\x16\x03\x01hello"
    )
    assert isinstance(hs.next_event(), Greeting)
    assert hs.next_event() == AuthRequest(b"alice", b"pw")
    hs.auth_reply(True)
    assert hs.next_event() == Request(Command.CONNECT, AddressType.IPV6, "2001:db8::1", 443)
    assert hs.trailing_data == b"\x16\x03\x01hello"


HANDSHAKE_REASONS = {
    "bad_version",
    "no_methods",
    "no_acceptable_method",
    "bad_auth_version",
    "empty_username",
    "bad_command",
    "bad_reserved",
    "bad_port",
    "empty_domain",
    "bad_domain",
    "bad_address_type",
}
REPLY_REASONS = {"bad_version", "bad_reserved", "empty_domain", "bad_domain", "bad_address_type"}


@st.composite
def client_handshakes(draw: st.DrawFn) -> bytes:
    """What a client sends: greeting, credentials when it offers them, request, early data."""
    auth = draw(st.booleans())
    methods = [Method.USERNAME_PASSWORD if auth else Method.NO_AUTH]
    methods += draw(st.lists(st.integers(0, 255), max_size=3))
    wire = socks5.build_greeting(draw(st.permutations(methods)))
    if auth:
        wire += socks5.build_auth_request(
            draw(st.binary(min_size=1, max_size=32)), draw(st.binary(max_size=32))
        )
    wire += socks5.build_request(draw(st.sampled_from(list(Command))), draw(hosts), draw(ports))
    return wire + draw(st.binary(max_size=16))


@given(
    require_auth=st.booleans(),
    accept=st.booleans(),
    data=mutated(client_handshakes()),
    cuts=st.lists(st.integers(0, 1000), max_size=10),
)
def test_damaged_handshakes_in_any_chunking(
    require_auth: bool, accept: bool, data: bytes, cuts: list[int]
) -> None:
    """A damaged handshake ends in a Socks5Error with a known reason and the reply RFC 1928
    prescribes, or in events a server can act on; how the bytes were split never matters."""
    results = []
    for chunks in (chunked(data, cuts), [data]):
        hs = ServerHandshake(require_auth=require_auth)
        try:
            events = drive(hs, chunks, accept_auth=accept)
            outcome: object = (
                events,
                hs.phase,
                hs.trailing_data if hs.phase is Phase.DONE else b"",
            )
        except Socks5Error as e:
            assert e.reason in HANDSHAKE_REASONS
            # greeting errors answer with a method selection (or nothing for a bad version),
            # auth errors with an auth status, request errors with a full reply
            if e.reply:
                assert e.reply[0] in (socks5.VERSION, 0x01)
            outcome = ("error", e.reason, e.reply)
        results.append(outcome)
        if outcome[0] != "error":
            events, phase, _ = outcome  # type: ignore[misc]
            if phase is Phase.DONE:
                request = events[-1]
                assert isinstance(request, Request)
                assert 0 <= request.port <= 65535
                assert request.command is not Command.CONNECT or request.port != 0
    assert results[0] == results[1]


@given(
    mutated(
        st.builds(
            lambda rep, host, port, extra: socks5.build_reply(rep, host, port) + extra,
            st.integers(0, 255),
            hosts,
            st.integers(0, 65535),
            st.binary(max_size=8),
        )
    )
)
def test_damaged_replies_parse_or_raise(data: bytes) -> None:
    try:
        parsed = socks5.parse_reply(data)
    except Socks5Error as e:
        assert e.reason in REPLY_REASONS
        return
    if parsed is not None:
        reply, used = parsed
        assert 0 < used <= len(data)
        assert 0 <= reply.port <= 65535


# -- UDP relay datagrams ----------------------------------------------------------------------

UDP_REASONS = {
    "truncated_header",
    "bad_reserved",
    "bad_address_type",
    "empty_domain",
    "bad_domain",
    "bad_port",
}


@given(host=hosts, port=ports, frag=st.integers(0, 255), data=st.binary(max_size=2000))
def test_udp_datagram_round_trip(host: str, port: int, frag: int, data: bytes) -> None:
    wire = socks5.build_udp_datagram(host, port, data, frag=frag)
    dg = socks5.parse_udp_datagram(wire)
    assert (dg.frag, dg.port, dg.data) == (frag, port, data)
    if _is_ip(host):
        assert ipaddress.ip_address(dg.host) == ipaddress.ip_address(host)
    else:
        assert dg.host == host and dg.address_type is AddressType.DOMAIN
    # What the relay sends back for a destination is byte for byte what the client wrote.
    assert socks5.build_udp_datagram(dg.host, dg.port, data, dg.address_type, frag) == wire
    # Every proper prefix of the header is a truncated header, not something else.
    header_len = len(wire) - len(data)
    for i in range(header_len):
        with pytest.raises(Socks5Error) as info:
            socks5.parse_udp_datagram(wire[:i])
        assert info.value.reason == "truncated_header"
        assert info.value.reply == b""


@given(
    ip=st.one_of(ipv4s, ipv6s),
    port=ports,
    data=st.binary(max_size=64),
)
def test_udp_domain_that_looks_like_an_ip_stays_a_domain(ip: str, port: int, data: bytes) -> None:
    wire = socks5.build_udp_datagram(ip, port, data, AddressType.DOMAIN)
    assert wire[3] == AddressType.DOMAIN
    dg = socks5.parse_udp_datagram(wire)
    assert (dg.address_type, dg.host) == (AddressType.DOMAIN, ip)
    assert socks5.build_udp_header(dg.host, dg.port, dg.address_type) + data == wire


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (b"", "truncated_header"),
        (b"\x00\x00\x00", "truncated_header"),
        (b"\x00\x00\x00\x01\x7f\x00\x00", "truncated_header"),
        (b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00", "truncated_header"),
        (b"\x00\x00\x00\x04" + bytes(15), "truncated_header"),
        (b"\x00\x00\x00\x03", "truncated_header"),
        (b"\x00\x00\x00\x03\x05abc", "truncated_header"),
        (b"\x00\x00\x00\x03\x03abc\x00", "truncated_header"),
        (b"\x00\x01\x00\x01\x7f\x00\x00\x01\x00\x35", "bad_reserved"),
        (b"\x01\x00\x00\x01\x7f\x00\x00\x01\x00\x35", "bad_reserved"),
        (b"\x00\x00\x00\x02\x7f\x00\x00\x01\x00\x35", "bad_address_type"),
        (b"\x00\x00\x00\x00\x7f\x00\x00\x01\x00\x35", "bad_address_type"),
        (b"\x00\x00\x00\x03\x00\x00\x35", "empty_domain"),
        (b"\x00\x00\x00\x03\x03a b\x00\x35", "bad_domain"),
        (b"\x00\x00\x00\x03\x03a\x00b\x00\x35", "bad_domain"),
        (b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x00data", "bad_port"),
    ],
)
def test_udp_datagram_strict_rejections(packet: bytes, reason: str) -> None:
    with pytest.raises(Socks5Error) as info:
        socks5.parse_udp_datagram(packet)
    assert info.value.reason == reason
    assert info.value.reply == b""  # UDP has no way to answer


def test_udp_datagram_empty_payload_and_fragment_number() -> None:
    dg = socks5.parse_udp_datagram(b"\x00\x00\x81\x01\xc0\x00\x02\x01\x00\x35")
    assert dg == socks5.UdpDatagram(0x81, AddressType.IPV4, "192.0.2.1", 53, b"")


def test_udp_header_builder_checks_its_arguments() -> None:
    with pytest.raises(ValueError):
        socks5.build_udp_header("app.example", 53, AddressType.IPV4)
    with pytest.raises(ValueError):
        socks5.build_udp_header("192.0.2.1", 53, AddressType.IPV6)
    with pytest.raises(ValueError):
        socks5.build_udp_header("192.0.2.1", 53, frag=256)
    with pytest.raises(ValueError):
        socks5.build_udp_header("bad host", 53)


@given(
    mutated(
        st.builds(
            lambda host, port, frag, data: socks5.build_udp_datagram(host, port, data, frag=frag),
            hosts,
            ports,
            st.integers(0, 255),
            st.binary(max_size=64),
        )
    )
)
def test_damaged_udp_datagrams_parse_or_raise(data: bytes) -> None:
    try:
        dg = socks5.parse_udp_datagram(data)
    except Socks5Error as e:
        assert e.reason in UDP_REASONS
        assert e.reply == b""
    else:
        assert 1 <= dg.port <= 65535
        assert data.endswith(dg.data)
        # what parsed is a header the relay can write back byte for byte
        header = socks5.build_udp_header(dg.host, dg.port, dg.address_type, dg.frag)
        assert header + dg.data == data
