"""DNS at the header level in `ramp.wire.dns`, without sockets: which queries are answered,
the answers the edge makes itself, ids, TCP framing and truncation for UDP."""

from __future__ import annotations

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.tsigkeyring
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ramp.testing.mutate import mutated
from ramp.wire.dns import (
    HEADER_SIZE,
    QueryRejected,
    answer_for,
    describe,
    frame_length,
    header_reply,
    is_response,
    is_truncated,
    message_id,
    rcode_of,
    rcode_reply,
    read_query,
    tcp_frame,
    truncate,
    udp_limit,
    with_id,
)

labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?", fullmatch=True)
names = st.lists(labels, min_size=1, max_size=4).map(".".join)
rdtypes = st.sampled_from(["A", "AAAA", "TXT", "MX", "SRV", "PTR", "CNAME", "NS"])
ids = st.integers(0, 0xFFFF)

# (outcome, reason) pairs read_query may report, and whether a reply goes back
REJECTIONS = {
    (None, "short_message"): False,
    (None, "not_a_query"): False,
    ("refused", "tsig_unsupported"): True,
    ("formerr", "malformed"): True,
    ("notimp", None): True,
    ("formerr", "question_count"): True,
    ("badvers", None): True,  # a mutated OPT record with an EDNS version we do not speak
}


@st.composite
def queries(draw: st.DrawFn) -> dns.message.Message:
    q = dns.message.make_query(
        draw(names),
        draw(rdtypes),
        use_edns=draw(st.sampled_from([None, 0])),
        payload=draw(st.integers(0, 65535)),
        want_dnssec=draw(st.booleans()),
        id=draw(ids),
    )
    if not draw(st.booleans()):
        q.flags &= ~dns.flags.RD
    return q


query_wires = queries().map(lambda q: q.to_wire())


def a_records(name: str, n: int) -> list[dns.rrset.RRset]:
    """`n` A records, each its own RRset under its own name: dnspython shuffles the records of
    an RRset when rendering, and a strategy must not depend on the `random` module."""
    return [
        dns.rrset.from_text(f"r{i}.{name}", 300, "IN", "A", f"10.0.{i // 250}.{i % 250 + 1}")
        for i in range(n)
    ]


def check_reply(reply: bytes, query_wire: bytes, rcode: int) -> None:
    """What a client checks of an answer: its id, QR, the opcode and RD it sent, the rcode."""
    assert len(reply) >= HEADER_SIZE
    assert reply[:2] == query_wire[:2]
    assert is_response(reply)
    assert rcode_of(reply) == rcode
    flags = int.from_bytes(query_wire[2:4], "big")
    reply_flags = int.from_bytes(reply[2:4], "big")
    assert reply_flags & 0x7800 == flags & 0x7800  # opcode
    assert reply_flags & 0x0100 == flags & 0x0100  # RD
    dns.message.from_wire(reply)  # and it parses


# -- valid queries ------------------------------------------------------------------------


@given(queries())
def test_valid_queries_round_trip(query: dns.message.Message) -> None:
    wire = query.to_wire()
    got = read_query(wire)
    assert got == query
    assert message_id(wire) == query.id
    assert (
        describe(got)
        == f"{query.question[0].name} {dns.rdatatype.to_text(query.question[0].rdtype)}"
    )


@given(queries(), st.sampled_from([dns.rcode.REFUSED, dns.rcode.SERVFAIL, dns.rcode.FORMERR]))
def test_own_answers_keep_id_question_and_edns(query: dns.message.Message, rcode: int) -> None:
    wire = query.to_wire()
    reply = rcode_reply(query, rcode)
    check_reply(reply, wire, rcode)
    r = dns.message.from_wire(reply)
    assert r.question == query.question
    assert (r.edns >= 0) == (query.edns >= 0)
    check_reply(header_reply(wire, rcode), wire, rcode)
    assert len(header_reply(wire, rcode)) == HEADER_SIZE


@given(query_wires, ids)
def test_ids_are_rewritten_and_restored(wire: bytes, qid: int) -> None:
    rewritten = with_id(wire, qid)
    assert message_id(rewritten) == qid
    assert rewritten[2:] == wire[2:]
    assert answer_for(rewritten, wire) == wire


@given(st.binary(max_size=600))
def test_tcp_frames_round_trip(msg: bytes) -> None:
    framed = tcp_frame(msg)
    assert frame_length(framed[:2]) == len(msg)
    assert framed[2:] == msg


@given(queries())
def test_udp_limit_follows_edns(query: dns.message.Message) -> None:
    limit = udp_limit(query)
    if query.edns < 0:
        assert limit == 512
    else:
        assert limit == max(query.payload, 512)


# -- queries the edge does not pass on ----------------------------------------------------


def test_short_messages_and_responses_are_dropped() -> None:
    with pytest.raises(QueryRejected) as e:
        read_query(b"\x12\x34\x01\x00")
    assert (e.value.reply, e.value.reason) == (None, "short_message")
    response = dns.message.make_response(dns.message.make_query("a.example", "A"))
    with pytest.raises(QueryRejected) as e:
        read_query(response.to_wire())
    assert (e.value.reply, e.value.reason) == (None, "not_a_query")


def test_other_opcodes_are_notimp_without_counting_bad_input() -> None:
    q = dns.message.make_query("a.example", "SOA")
    q.set_opcode(dns.opcode.NOTIFY)
    with pytest.raises(QueryRejected) as e:
        read_query(q.to_wire())
    assert (e.value.outcome, e.value.reason) == ("notimp", None)
    assert e.value.reply is not None
    check_reply(e.value.reply, q.to_wire(), dns.rcode.NOTIMP)


def test_question_count_other_than_one_is_formerr() -> None:
    q = dns.message.make_query("a.example", "A")
    q.question = []
    with pytest.raises(QueryRejected) as e:
        read_query(q.to_wire())
    assert (e.value.outcome, e.value.reason) == ("formerr", "question_count")


def test_unknown_edns_version_is_badvers_with_version_0() -> None:
    q = dns.message.make_query("example.com", "A", use_edns=1, payload=1232)
    with pytest.raises(QueryRejected) as e:
        read_query(q.to_wire())
    assert (e.value.outcome, e.value.reason) == ("badvers", None)
    assert e.value.reply is not None
    r = dns.message.from_wire(e.value.reply)
    assert r.id == q.id and r.question == q.question
    assert r.rcode() == dns.rcode.BADVERS  # 16: the extended rcode lives in the OPT record
    assert r.edns == 0  # the version we do speak, for the client to fall back to
    assert read_query(dns.message.make_query("example.com", "A", use_edns=0).to_wire())


def test_signed_queries_are_refused() -> None:
    q = dns.message.make_query("a.example", "A")
    q.use_tsig(dns.tsigkeyring.from_text({"k.": "c2VjcmV0c2VjcmV0"}), keyname="k.")
    wire = q.to_wire()
    with pytest.raises(QueryRejected) as e:
        read_query(wire)
    assert (e.value.outcome, e.value.reason) == ("refused", "tsig_unsupported")
    assert e.value.reply is not None
    check_reply(e.value.reply, wire, dns.rcode.REFUSED)


@given(mutated(query_wires, max_mutations=4))
def test_damaged_queries_are_answered_rejected_or_dropped(wire: bytes) -> None:
    """Whatever arrives: a query with one question to answer, or a rejection from the
    documented set whose reply (if any) carries the client's id and the right rcode."""
    try:
        query = read_query(wire)
    except QueryRejected as e:
        key = (e.outcome, e.reason)
        assert key in REJECTIONS, key
        if not REJECTIONS[key]:
            assert e.reply is None
            return
        assert e.reply is not None
        if e.outcome == "badvers":  # an extended rcode: its high bits live in the OPT record
            reply = dns.message.from_wire(e.reply)
            assert reply.rcode() == dns.rcode.BADVERS and reply.id == message_id(wire)
            return
        rcode = {"refused": dns.rcode.REFUSED, "formerr": dns.rcode.FORMERR}.get(
            e.outcome or "", dns.rcode.NOTIMP
        )
        check_reply(e.reply, wire, rcode)
        return
    assert len(query.question) == 1
    assert query.opcode() == dns.opcode.QUERY
    assert not query.flags & dns.flags.QR
    assert query.id == message_id(wire)
    # every answer the edge may make for it is a valid message with the client's id
    for rcode in (dns.rcode.REFUSED, dns.rcode.SERVFAIL):
        check_reply(rcode_reply(query, rcode), wire, rcode)


# -- truncation ---------------------------------------------------------------------------


@st.composite
def answers(draw: st.DrawFn) -> tuple[dns.message.Message, bytes]:
    query = draw(queries())
    r = dns.message.make_response(query)
    name = query.question[0].name.to_text()
    r.answer.extend(a_records(name, draw(st.integers(1, 120))))
    if draw(st.booleans()):
        r.additional.extend(a_records("glue." + name, draw(st.integers(1, 40))))
    r.flags |= dns.flags.AA
    return query, r.to_wire(max_size=65535)


@given(answers(), st.integers(HEADER_SIZE + 300, 4096))
def test_truncated_answers_fit_and_say_so(
    qa: tuple[dns.message.Message, bytes], limit: int
) -> None:
    query, answer = qa
    small = truncate(answer, query, limit)
    assert len(small) <= limit
    assert small[:2] == answer[:2]
    msg = dns.message.from_wire(small)
    full = dns.message.from_wire(answer)
    assert msg.question == full.question
    if msg.answer == full.answer:
        return  # only additional records dropped: no TC needed
    assert is_truncated(small)  # the client must retry over TCP


@given(st.tuples(queries(), mutated(answers().map(lambda qa: qa[1]))), st.integers(512, 1500))
def test_truncating_damaged_answers_still_fits(
    qa: tuple[dns.message.Message, bytes], limit: int
) -> None:
    """An upstream's answer we cannot re-render still yields something that fits, with TC."""
    query, answer = qa
    if len(answer) < HEADER_SIZE:
        return  # the on-ramp turns those into SERVFAIL before truncating
    small = truncate(answer, query, limit)
    assert len(small) <= max(limit, HEADER_SIZE)
    assert small[:2] == answer[:2] or small[:2] == query.to_wire()[:2]
