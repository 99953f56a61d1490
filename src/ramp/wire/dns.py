"""DNS messages at the header level, sans I/O: which queries the edge answers, the answers it
makes itself (REFUSED, SERVFAIL, FORMERR, NOTIMP, BADVERS), query ids, and truncation for UDP.

dnspython parses and renders whole messages; this module adds what a proxy needs on top:
decisions about a query before any record is looked at, and answers built from as little of
the query as could be read (a query dnspython cannot parse still gets an answer with its id).
"""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype

HEADER = struct.Struct("!HHHHHH")
HEADER_SIZE = HEADER.size
UDP_DEFAULT_LIMIT = 512  # RFC 1035 4.2.1, without EDNS
MAX_MESSAGE = 65535

_QR = 0x8000
_OPCODE_MASK = 0x7800
_RD = 0x0100
_TC = 0x0200


class QueryRejected(Exception):
    """A query the edge does not pass on. `reply` is the answer to send (None: drop it);
    `outcome` the answer counted (refused, formerr, notimp, badvers; None when dropped);
    `reason` the bad-input label, or None when the client did nothing wrong (an opcode or
    EDNS version we don't do)."""

    def __init__(
        self, reply: bytes | None, outcome: str | None, reason: str | None, detail: str = ""
    ) -> None:
        super().__init__(detail or reason or outcome or "rejected")
        self.reply = reply
        self.outcome = outcome
        self.reason = reason


def message_id(wire: bytes) -> int:
    """The id of a message at least HEADER_SIZE bytes long."""
    return int.from_bytes(wire[:2], "big")


def with_id(wire: bytes, qid: int) -> bytes:
    """`wire` with its id replaced (ids are rewritten so clients' ids never collide)."""
    return qid.to_bytes(2, "big") + wire[2:]


def is_response(wire: bytes) -> bool:
    return len(wire) >= 3 and bool(wire[2] & (_QR >> 8))


def is_truncated(wire: bytes) -> bool:
    return len(wire) >= 3 and bool(wire[2] & (_TC >> 8))


def rcode_of(wire: bytes) -> int:
    """The header's (4-bit) rcode; EDNS extended rcodes (BADVERS) are not looked at."""
    return wire[3] & 0xF


def tcp_frame(msg: bytes) -> bytes:
    """`msg` with the two-byte length prefix of DNS over TCP (RFC 1035 4.2.2)."""
    return len(msg).to_bytes(2, "big") + msg


def frame_length(prefix: bytes) -> int:
    """The message length a two-byte TCP prefix announces."""
    (size,) = struct.unpack("!H", prefix)
    return int(size)


def header_reply(wire: bytes, rcode: int) -> bytes:
    """An answer with no sections to a query whose header is all we could read."""
    qid, flags = struct.unpack_from("!HH", wire)
    flags = _QR | (flags & (_OPCODE_MASK | _RD)) | (rcode & 0xF)
    return HEADER.pack(qid, flags, 0, 0, 0, 0)


def rcode_reply(query: dns.message.Message, rcode: int) -> bytes:
    """An answer to `query` carrying only its question (and EDNS if the query had it)."""
    try:
        r = dns.message.make_response(query)
        r.set_rcode(rcode)
        return r.to_wire(max_size=MAX_MESSAGE)
    except Exception:  # a query dnspython parses but cannot answer: the header will do
        flags = _QR | (query.flags & (_OPCODE_MASK | _RD)) | (rcode & 0xF)
        return HEADER.pack(query.id, flags, 0, 0, 0, 0)


def read_query(wire: bytes) -> dns.message.Message:
    """The query in `wire` if the edge should answer it (one question, opcode QUERY), else
    QueryRejected saying what to send and count."""
    if len(wire) < HEADER_SIZE:
        raise QueryRejected(None, None, "short_message")
    if is_response(wire):
        # Answering a response invites loops between two servers: drop it.
        raise QueryRejected(None, None, "not_a_query")
    try:
        query = dns.message.from_wire(wire)
    except dns.message.UnknownTSIGKey:
        raise QueryRejected(
            header_reply(wire, dns.rcode.REFUSED), "refused", "tsig_unsupported"
        ) from None
    except Exception as e:  # dnspython raises many types for malformed input; all are FORMERR
        raise QueryRejected(
            header_reply(wire, dns.rcode.FORMERR), "formerr", "malformed", f"malformed query: {e}"
        ) from None
    if query.opcode() != dns.opcode.QUERY:
        raise QueryRejected(rcode_reply(query, dns.rcode.NOTIMP), "notimp", None)
    if len(query.question) != 1:
        raise QueryRejected(rcode_reply(query, dns.rcode.FORMERR), "formerr", "question_count")
    if query.edns > 0:
        # RFC 6891 6.1.3: a version we don't speak gets BADVERS with our version (0) in the
        # OPT record, so the client can fall back; not bad input, just a newer client.
        raise QueryRejected(rcode_reply(query, dns.rcode.BADVERS), "badvers", None)
    return query


def describe(query: dns.message.Message) -> str:
    """`name TYPE` of the query's question, for logs."""
    if not query.question:
        return "(no question)"
    q = query.question[0]
    return f"{q.name.to_text()} {dns.rdatatype.to_text(q.rdtype)}"


def udp_limit(query: dns.message.Message) -> int:
    """The largest UDP answer the client accepts (RFC 6891 6.2.3-6.2.5)."""
    if query.edns < 0:
        return UDP_DEFAULT_LIMIT
    return min(max(query.payload, UDP_DEFAULT_LIMIT), MAX_MESSAGE)


def answer_for(answer: bytes, query_wire: bytes) -> bytes:
    """`answer` carrying the client's query id."""
    return query_wire[:2] + answer[2:]


def truncate(answer: bytes, query: dns.message.Message, limit: int) -> bytes:
    """Fit `answer` into `limit` bytes for UDP.

    Dropping additional records is fine without TC; when the answer or authority section does
    not fit, the client gets the header and question with TC set and must retry over TCP.
    """
    try:
        msg = dns.message.from_wire(answer)
        wire = msg.to_wire(max_size=limit, prefer_truncation=True)
        if not wire[2] & (_TC >> 8) and len(wire) <= limit:
            return wire
        msg.answer, msg.authority, msg.additional = [], [], []
        msg.flags |= dns.flags.TC
        wire = msg.to_wire(max_size=limit, prefer_truncation=True)
        if len(wire) <= limit:
            return wire
    except Exception:
        pass  # an answer we cannot re-render (e.g. TSIG): answer from the query instead
    (flags,) = struct.unpack_from("!H", answer, 2)
    try:
        r = dns.message.make_response(query)
        r.flags |= dns.flags.TC | (flags & (dns.flags.AA | dns.flags.RA))
        r.set_rcode(flags & 0xF)
        return r.to_wire(max_size=limit, prefer_truncation=True)
    except Exception:
        return answer[:2] + struct.pack("!H", flags | _TC) + bytes(8)
