"""HTTP proxy requests in `ramp.wire.http`, without sockets: targets, credentials, the head
for the origin, and what a damaged request turns into."""

from __future__ import annotations

import base64

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ramp.testing.mutate import mutated
from ramp.wire.http import (
    CONNECT_OK,
    MAX_HEAD,
    BadBody,
    BadTarget,
    ProxyRequest,
    RequestBody,
    RequestReader,
    RequestRejected,
    auth_challenge,
    basic_credentials,
    interpret,
    parse_absolute_url,
    parse_authority,
    proxy_authorization,
    rewrite_head,
)

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9.-]{0,62}", fullmatch=True)
http_hosts = st.one_of(names, st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))
ports = st.integers(1, 65535)
paths = st.from_regex(r"(/[a-z0-9?=&]*)?", fullmatch=True)
header_names = st.sampled_from(
    [b"User-Agent", b"Accept", b"X-Trace", b"Proxy-Connection", b"Connection", b"Content-Length"]
)
header_values = st.from_regex(rb"[!-~]{1,20}", fullmatch=True)

REJECT_REASONS = {
    "bad_request",
    "header_too_large",
    "bad_target",
    "connect_with_body",
    "not_a_proxy_request",
    "cl_and_te",
}


def authority(host: str, port: int) -> bytes:
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()


def encode_request(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A request head as h11, the client side of the same parser, writes it."""
    client = h11.Connection(h11.CLIENT)
    data = client.send(h11.Request(method=method, target=target, headers=headers))
    assert data is not None
    return data


@st.composite
def valid_requests(draw: st.DrawFn) -> bytes:
    host, port = draw(http_hosts), draw(ports)
    auth = authority(host, port)
    headers = [(b"Host", auth)]
    if draw(st.booleans()):
        creds = draw(st.binary(min_size=1, max_size=16)) + b":" + draw(st.binary(max_size=16))
        headers.append((b"Proxy-Authorization", b"Basic " + base64.b64encode(creds)))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(header_names.filter(lambda n: n != b"Content-Length"))
        headers.append((name, draw(header_values)))
    if draw(st.booleans()):
        return encode_request(b"CONNECT", auth, headers)
    method = draw(st.sampled_from([b"GET", b"HEAD", b"DELETE"]))
    return encode_request(method, b"http://" + auth + draw(paths).encode(), headers)


def read(data: bytes, chunk: int = 0) -> tuple[h11.Request, bytes]:
    """Feed `data` (in `chunk`-byte pieces, or whole), then EOF if the head is still
    incomplete; the head or RequestRejected, as the on-ramp would see them."""
    reader = RequestReader()
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
    for piece in pieces:
        reader.receive_data(piece)
        head = reader.next_request()
        if head is not None:
            return head, reader.trailing
    reader.receive_data(b"")  # the client closed
    head = reader.next_request()
    assert head is not None, "after EOF the reader must decide"
    return head, reader.trailing


def response_status(reply: bytes) -> int:
    """Parse a reply with h11's client side: every reply must be valid HTTP/1.1."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=b"GET", target=b"/", headers=[(b"Host", b"x")]))
    client.receive_data(reply)
    ev = client.next_event()
    assert isinstance(ev, h11.Response), ev
    assert (b"connection", b"close") in ev.headers
    return ev.status_code


# -- targets ------------------------------------------------------------------------------


@given(host=http_hosts, port=ports, path=paths)
def test_targets_round_trip(host: str, port: int, path: str) -> None:
    assert parse_authority(authority(host, port)) == (host, port)
    url = b"http://" + authority(host, port) + path.encode()
    dest, auth, origin_form = parse_absolute_url(url)
    assert dest == (host, port)
    assert auth == authority(host, port)
    assert origin_form == (path.encode() if path.startswith("/") else b"/" + path.encode())


def test_absolute_url_defaults_to_port_80_and_drops_the_fragment() -> None:
    assert parse_absolute_url(b"http://example.test?q=1#frag") == (
        ("example.test", 80),
        b"example.test",
        b"/?q=1",
    )


@pytest.mark.parametrize(
    "target",
    [
        b"example.test",  # no port
        b"example.test:0",
        b"example.test:65536",
        b"example.test:+80",
        b"[fe80::1%eth0]:80",  # zone ids would pick an interface on the edge
        b"[::1",
        b"[::1]x",
        b"exa mple:80",
        b":80",
    ],
)
def test_bad_connect_targets_are_rejected(target: bytes) -> None:
    with pytest.raises(BadTarget):
        parse_authority(target)


@pytest.mark.parametrize(
    "url", [b"https://x/", b"ftp://x/", b"http://user:pw@x/", b"http:/x", b"http://x:99999/"]
)
def test_bad_absolute_urls_are_rejected(url: bytes) -> None:
    with pytest.raises(BadTarget):
        parse_absolute_url(url)


@given(mutated(st.builds(authority, http_hosts, ports)))
def test_damaged_connect_targets_parse_or_raise_bad_target(target: bytes) -> None:
    try:
        host, port = parse_authority(target)
    except BadTarget:
        return
    assert 1 <= port <= 65535
    # what was accepted is a destination in canonical form: it parses back to itself
    assert parse_authority(authority(host, port)) == (host, port)


@given(
    mutated(
        st.builds(
            lambda h, p, path: b"http://" + authority(h, p) + path.encode(),
            http_hosts,
            ports,
            paths,
        )
    )
)
def test_damaged_urls_parse_or_raise_bad_target(url: bytes) -> None:
    try:
        (host, port), auth, origin_form = parse_absolute_url(url)
    except BadTarget:
        return
    assert host and 1 <= port <= 65535
    assert origin_form.startswith(b"/") and b"#" not in origin_form
    assert auth in url


# -- credentials --------------------------------------------------------------------------


def basic(user: bytes, password: bytes) -> bytes:
    return b"Basic " + base64.b64encode(user + b":" + password)


@given(user=st.binary(max_size=64).filter(lambda u: b":" not in u), password=st.binary(max_size=64))
def test_basic_credentials_round_trip(user: bytes, password: bytes) -> None:
    assert basic_credentials(basic(user, password)) == (user, password)
    assert basic_credentials(b"  bAsIc " + basic(user, password)[6:] + b" ") == (user, password)


@given(mutated(st.builds(basic, st.binary(max_size=32), st.binary(max_size=32))))
def test_damaged_credentials_are_none_or_a_pair(value: bytes) -> None:
    creds = basic_credentials(value)
    if creds is not None:
        user, password = creds
        token = value.strip().partition(b" ")[2].strip()
        assert base64.b64decode(token, validate=True) == user + b":" + password


def test_other_schemes_and_missing_colon_are_not_credentials() -> None:
    assert basic_credentials(b"Bearer abc") is None
    assert basic_credentials(b"Basic " + base64.b64encode(b"no-colon")) is None
    assert basic_credentials(b"Basic !!!") is None


def test_auth_challenge_counts_only_bad_credentials() -> None:
    first = auth_challenge(None)
    assert first.reason is None  # the normal start of the exchange
    assert response_status(first.reply) == 407
    assert b'Proxy-Authenticate: Basic realm="ramp"' in first.reply
    assert b'Proxy-Authenticate: Bearer realm="ramp"' in first.reply
    assert auth_challenge(b"Basic eA==").reason == "auth_failed"


# -- whole requests -----------------------------------------------------------------------


@given(host=http_hosts, port=ports, early=st.binary(max_size=64), chunk=st.integers(0, 7))
def test_connect_request_round_trip(host: str, port: int, early: bytes, chunk: int) -> None:
    data = encode_request(b"CONNECT", authority(host, port), [(b"Host", authority(host, port))])
    head, trailing = read(data + early, chunk)
    req = interpret(head, trailing)
    assert req == ProxyRequest(host, port, True, CONNECT_OK, trailing)
    assert early.startswith(trailing)  # whatever came after the head is kept, in order


@given(
    host=http_hosts,
    port=ports,
    path=paths,
    extra=st.lists(st.tuples(header_names, header_values), max_size=4),
)
def test_absolute_form_request_is_rewritten_for_the_origin(
    host: str, port: int, path: str, extra: list[tuple[bytes, bytes]]
) -> None:
    extra = [(n, v) for n, v in extra if n != b"Content-Length"]
    headers = [(b"Host", b"wrong.example"), (b"Proxy-Authorization", b"Basic eDp5"), *extra]
    data = encode_request(b"GET", b"http://" + authority(host, port) + path.encode(), headers)
    head, trailing = read(data)
    req = interpret(head, trailing)
    assert (req.host, req.port, req.connect, req.ok_reply) == (host, port, False, b"")
    # the rewritten head is itself a valid request, to the same place, without proxy headers
    origin = h11.Connection(h11.SERVER)
    origin.receive_data(req.initial)
    ev = origin.next_event()
    assert isinstance(ev, h11.Request)
    assert ev.target == (path.encode() if path.startswith("/") else b"/" + path.encode())
    assert (b"host", authority(host, port)) in ev.headers
    assert not any(n.startswith(b"proxy-") for n, _ in ev.headers)
    assert (b"connection", b"close") in ev.headers


def test_proxy_authorization_is_read_from_the_head() -> None:
    data = encode_request(
        b"CONNECT", b"a:1", [(b"Host", b"a:1"), (b"Proxy-Authorization", b"Basic eDp5")]
    )
    head, _ = read(data)
    assert proxy_authorization(head) == b"Basic eDp5"
    assert basic_credentials(proxy_authorization(head) or b"") == (b"x", b"y")
    head, _ = read(encode_request(b"CONNECT", b"a:1", [(b"Host", b"a:1")]))
    assert proxy_authorization(head) is None


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "not_a_proxy_request"),
        (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 400, "not_a_proxy_request"),
        (b"CONNECT x HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_target"),
        (b"CONNECT x:1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n", 400, "connect_with_body"),
        (
            b"POST http://x/ HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            "cl_and_te",
        ),
        (
            b"POST http://x/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 3\r\n\r\n",
            400,
            "cl_and_te",
        ),
        (b"GET https://x/ HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_target"),
        (b"\x16\x03\x01\x00\x05hello\r\n\r\n", 400, "bad_request"),  # TLS to a plain port
        (b"GET http://x/ HTTP/1.1\r\nHost: x\r\n", 400, "bad_request"),  # closed mid-head
        (b"GET http://x/ HTTP/1.1\r\nX: " + b"a" * MAX_HEAD, 431, "header_too_large"),
    ],
)
def test_unservable_requests_get_a_response_and_a_reason(
    data: bytes, status: int, reason: str
) -> None:
    with pytest.raises(RequestRejected) as e:
        interpret(*read(data))
    assert e.value.status == status
    assert e.value.reason == reason
    assert response_status(e.value.reply) == status


def test_a_head_that_arrives_whole_is_still_bounded() -> None:
    # h11 bounds only an incomplete head: this one is complete in one read
    data = b"GET http://x/ HTTP/1.1\r\nHost: x\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n"
    with pytest.raises(RequestRejected) as e:
        read(data)
    assert e.value.status == 431


@given(mutated(valid_requests()), st.integers(0, 9))
def test_damaged_requests_are_served_or_answered(data: bytes, chunk: int) -> None:
    """Whatever arrives, the outcome is a request to serve or an HTTP error response with a
    counted reason; never an exception of another type."""
    try:
        req = interpret(*read(data, chunk))
    except RequestRejected as e:
        assert e.reason in REJECT_REASONS
        assert response_status(e.reply) == e.status
        assert 400 <= e.status < 500
        return
    assert req.host and 1 <= req.port <= 65535
    if req.connect:
        assert req.ok_reply == CONNECT_OK
    else:
        assert req.initial.split(b"\r\n\r\n")[0].endswith(b"Connection: close")


@given(
    names=st.lists(
        st.sampled_from([b"Connection", b"Proxy-Connection", b"X-A", b"Te"]), max_size=6
    ),
    value=st.sampled_from([b"close", b"keep-alive, X-A", b"Content-Length", b"te"]),
)
def test_rewrite_head_drops_hop_by_hop_keeps_framing(names: list[bytes], value: bytes) -> None:
    headers = [(b"Host", b"x"), (b"Content-Length", b"3")] + [(n, value) for n in names]
    req = h11.Request(method=b"POST", target=b"http://x/", headers=headers)
    head = rewrite_head(req, b"x:80", b"/")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST / HTTP/1.1"
    assert lines[1] == b"Host: x:80"
    assert b"Content-Length: 3" in lines
    assert lines[-3:] == [b"Connection: close", b"", b""]
    assert not any(n.lower().startswith((b"proxy-", b"te:")) for n in lines)
    assert sum(line.lower().startswith(b"connection:") for line in lines) == 1


def test_both_content_length_and_transfer_encoding_are_refused_with_words() -> None:
    data = (
        b"POST http://x/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\n\r\n"
    )
    with pytest.raises(RequestRejected) as e:
        interpret(*read(data))
    assert e.value.reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"both Content-Length and Transfer-Encoding" in e.value.reply


# -- request bodies -----------------------------------------------------------------------

PIPELINED = b"GET http://x/second HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic eDp5\r\n\r\n"


def chunked(body: bytes, sizes: list[int]) -> bytes:
    out, i = [], 0
    for n in sizes:
        if i >= len(body):
            break
        piece = body[i : i + max(n, 1)]
        out.append(b"%x\r\n%s\r\n" % (len(piece), piece))
        i += len(piece)
    if i < len(body):
        out.append(b"%x\r\n%s\r\n" % (len(body) - i, body[i:]))
    return b"".join(out) + b"0\r\nX-Trailer: t\r\nProxy-Authorization: Basic eDp5\r\n\r\n"


def forward(data: bytes, chunk: int) -> tuple[bytes, bool]:
    """What the proxy sends the origin for `data` (read in `chunk`-byte pieces, then EOF if
    the request is not complete by then): the head and body, and whether it completed."""
    reader = RequestReader()
    pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
    head = None
    while head is None:
        reader.receive_data(pieces.pop(0) if pieces else b"")
        head = reader.next_request()
    req = interpret(head, reader.trailing)
    body = RequestBody(reader, head)
    out = req.initial[: len(req.initial) - len(reader.trailing)] + body.take()
    for piece in pieces:
        if body.complete:
            break  # everything after the request is dropped, never parsed
        out += body.receive_data(piece)
    if not body.complete:
        out += body.receive_data(b"")  # the client closed
    return out, body.complete


def origin_reads(data: bytes) -> tuple[h11.Request, bytes, list[tuple[bytes, bytes]]]:
    """The request the origin parses out of what the proxy sent, then EOF."""
    origin = h11.Connection(h11.SERVER)
    origin.receive_data(data)
    origin.receive_data(b"")
    head = origin.next_event()
    assert isinstance(head, h11.Request), head
    body = b""
    while isinstance(ev := origin.next_event(), h11.Data):
        body += ev.data
    assert isinstance(ev, h11.EndOfMessage), ev
    # exactly one request, then the proxy's EOF: nothing pipelined followed it
    assert isinstance(origin.next_event(), h11.ConnectionClosed)
    return head, body, list(ev.headers.raw_items())


@given(
    body=st.binary(max_size=300),
    sizes=st.lists(st.integers(0, 64), max_size=8),
    use_chunked=st.booleans(),
    chunk=st.integers(0, 13),
)
def test_request_bodies_reach_the_origin_intact_and_alone(
    body: bytes, sizes: list[int], use_chunked: bool, chunk: int
) -> None:
    framing = (
        (b"Transfer-Encoding", b"chunked")
        if use_chunked
        else (b"Content-Length", b"%d" % len(body))
    )
    head = encode_request(
        b"POST", b"http://x/up", [(b"Host", b"x"), (b"Proxy-Authorization", b"Basic eDp5"), framing]
    )
    data = head + (chunked(body, sizes) if use_chunked else body) + PIPELINED
    sent, complete = forward(data, chunk)
    assert complete
    req, got, trailers = origin_reads(sent)
    assert (req.method, req.target, got) == (b"POST", b"/up", body)
    assert b"proxy-authorization" not in sent.lower()
    assert b"/second" not in sent
    if use_chunked:
        assert trailers == [(b"X-Trailer", b"t")]


def test_a_request_without_body_is_complete_at_once() -> None:
    sent, complete = forward(encode_request(b"GET", b"http://x/", [(b"Host", b"x")]) + PIPELINED, 0)
    assert complete
    req, got, _ = origin_reads(sent)
    assert (req.target, got) == (b"/", b"")


@pytest.mark.parametrize(
    "rest",
    [b"3\r\nab", b"zz\r\nabc\r\n0\r\n\r\n", b"3\r\nabcXX0\r\n\r\n"],
    ids=["cut", "bad-size", "bad-chunk-end"],
)
def test_a_broken_or_cut_chunked_body_raises_bad_body(rest: bytes) -> None:
    head = encode_request(
        b"POST", b"http://x/", [(b"Host", b"x"), (b"Transfer-Encoding", b"chunked")]
    )
    with pytest.raises(BadBody):
        forward(head + rest, 0)


def test_a_cut_content_length_body_raises_bad_body_at_eof() -> None:
    head = encode_request(b"POST", b"http://x/", [(b"Host", b"x"), (b"Content-Length", b"10")])
    with pytest.raises(BadBody):
        forward(head + b"abc", 0)


@given(
    mutated(
        st.just(
            encode_request(
                b"POST", b"http://x/", [(b"Host", b"x"), (b"Transfer-Encoding", b"chunked")]
            )
            + b"5\r\nhello\r\n0\r\n\r\n"
            + PIPELINED
        )
    ),
    st.integers(0, 9),
)
def test_damaged_bodies_are_forwarded_framed_or_raise_bad_body(data: bytes, chunk: int) -> None:
    """A damaged request is refused, or its body breaks (BadBody), or exactly one
    well-framed request reaches the origin, without proxy credentials."""
    try:
        sent, complete = forward(data, chunk)
    except (RequestRejected, BadBody):
        return
    assert complete
    origin_reads(sent)
    assert b"\r\nproxy-authorization:" not in sent.lower()
