"""The edge <-> connector tunnel protocol, version 1: frames and their codec (sans-I/O).

See docs/protocol.md for the specification. Every frame is

    type (varint) | length (varint) | payload (length bytes)

and payload fields are varints, fixed-size byte strings, or length-prefixed byte strings
(varint length, then bytes). Decoding is strict: unknown frame types on a control stream,
truncated or oversized payloads, trailing bytes inside a payload and out-of-range values raise
`ProtocolError`, never anything else.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field

from ramp.wire.varint import decode_varint, encode_varint

ALPN = "ramp-tunnel/1"
PROTOCOL_VERSION = 1

MAX_FRAME_PAYLOAD = 16 * 1024
MAX_HOST_LEN = 255
MAX_MESSAGE_LEN = 1024
MAX_SECRET_LEN = 256
MAX_METADATA_ITEMS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 1024
MAX_WINDOW = 1 << 32
MAX_UDP_PAYLOAD = 65535
MAX_STREAM_DATAGRAM = MAX_UDP_PAYLOAD + 32  # payload plus the datagram header


# CONNECT_TCP metadata: the origin must get a PROXY protocol header of this version ("v1" or
# "v2") first; a connector that sent one says so in CONNECT_RESULT OK's message, as
# `proxy_sent(version)`. An older connector ignores the key and says nothing, and the edge
# then fails the flow instead of passing it on without the header.
META_PROXY_PROTOCOL = "proxy-protocol"


def proxy_sent(version: str) -> str:
    return f"proxy-protocol {version} sent"


class ProtocolError(ValueError):
    """The peer sent something the protocol forbids; the message says what."""


class FrameType(enum.IntEnum):
    REGISTER = 0x01
    REGISTERED = 0x02
    REGISTER_ERROR = 0x03
    UNREGISTER = 0x04
    WINDOW = 0x05
    SUCCESSOR = 0x06
    REDIAL = 0x07
    CONNECT_TCP = 0x10
    CONNECT_RESULT = 0x11
    DATAGRAM = 0x20  # a tunnel datagram too large for a QUIC DATAGRAM frame, on a uni stream


class RegisterError(enum.IntEnum):
    """Why the edge refused a registration. Codes below 0x10 are permanent."""

    UNKNOWN_TUNNEL = 0x01
    TUNNEL_DELETED = 0x02
    BAD_PROOF = 0x03
    UNSUPPORTED_VERSION = 0x04
    BAD_REQUEST = 0x05
    OVERLOADED = 0x10  # transient: try again later

    @property
    def permanent(self) -> bool:
        return self < 0x10


class ConnectCode(enum.IntEnum):
    """The connector's answer to CONNECT_TCP."""

    OK = 0x00
    REFUSED = 0x01
    NET_UNREACHABLE = 0x02
    HOST_UNREACHABLE = 0x03
    TIMEOUT = 0x04
    NOT_PERMITTED = 0x05
    ERROR = 0x06


class StreamError(enum.IntEnum):
    """Application error codes for QUIC RESET_STREAM / STOP_SENDING on flow streams."""

    FLOW_RESET = 0x100  # the TCP peer on the other side sent RST
    FLOW_ABORT = 0x101  # the flow was cut (shutdown, timeout, internal error)
    PROTOCOL = 0x102  # the stream carried something invalid


class CloseCode(enum.IntEnum):
    """Application error codes for QUIC CONNECTION_CLOSE."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    REGISTRATION_REFUSED = 0x2
    SHUTDOWN = 0x3
    TUNNEL_DELETED = 0x4
    REGISTRATION_TIMEOUT = 0x5


# --- field helpers ---------------------------------------------------------------------------


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def varint(self, what: str, maximum: int | None = None) -> int:
        got = decode_varint(self.buf, self.pos)
        if got is None:
            raise ProtocolError(f"truncated {what}")
        value, self.pos = got
        if maximum is not None and value > maximum:
            raise ProtocolError(f"{what} too large: {value} > {maximum}")
        return value

    def fixed(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.buf):
            raise ProtocolError(f"truncated {what}")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def blob(self, what: str, maximum: int) -> bytes:
        n = self.varint(f"{what} length", maximum)
        return self.fixed(n, what)

    def text(self, what: str, maximum: int) -> str:
        raw = self.blob(what, maximum)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"{what} is not UTF-8") from e

    def destination(self) -> tuple[str, int]:
        host = self.text("host", MAX_HOST_LEN)
        if not host:
            raise ProtocolError("empty host")
        port = self.varint("port", 65535)
        if port == 0:
            raise ProtocolError("port 0")
        return host, port

    def metadata(self) -> dict[str, str]:
        n = self.varint("metadata count", MAX_METADATA_ITEMS)
        metadata = {}
        for _ in range(n):
            key = self.text("metadata key", MAX_METADATA_KEY)
            metadata[key] = self.text("metadata value", MAX_METADATA_VALUE)
        return metadata

    def end(self, what: str) -> None:
        if self.pos != len(self.buf):
            raise ProtocolError(f"{len(self.buf) - self.pos} trailing bytes in {what}")


def _blob(data: bytes) -> bytes:
    return encode_varint(len(data)) + data


def _text(value: str) -> bytes:
    return _blob(value.encode("utf-8"))


def _metadata(metadata: dict[str, str]) -> bytes:
    parts = [encode_varint(len(metadata))]
    for k, v in metadata.items():
        parts += (_text(k), _text(v))
    return b"".join(parts)


# --- frames ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Register:
    """Connector -> edge, first frame on the control stream."""

    tunnel_id: uuid.UUID
    connector_id: uuid.UUID
    conn_index: int
    secret: bytes
    version: int = PROTOCOL_VERSION
    client_info: str = ""

    def payload(self) -> bytes:
        return b"".join(
            (
                encode_varint(self.version),
                self.tunnel_id.bytes,
                self.connector_id.bytes,
                encode_varint(self.conn_index),
                _blob(self.secret),
                _text(self.client_info),
            )
        )

    @classmethod
    def parse(cls, r: _Reader) -> Register:
        version = r.varint("version")
        tunnel_id = uuid.UUID(bytes=r.fixed(16, "tunnel id"))
        connector_id = uuid.UUID(bytes=r.fixed(16, "connector id"))
        conn_index = r.varint("connection index", 255)
        secret = r.blob("secret", MAX_SECRET_LEN)
        client_info = r.text("client info", MAX_MESSAGE_LEN)
        return cls(tunnel_id, connector_id, conn_index, secret, version, client_info)


@dataclass(frozen=True, slots=True)
class Registered:
    """Edge -> connector: the registration is accepted."""

    tunnel_name: str
    edge_id: str

    def payload(self) -> bytes:
        return _text(self.tunnel_name) + _text(self.edge_id)

    @classmethod
    def parse(cls, r: _Reader) -> Registered:
        return cls(r.text("tunnel name", MAX_HOST_LEN), r.text("edge id", MAX_HOST_LEN))


@dataclass(frozen=True, slots=True)
class RegisterRefused:
    """Edge -> connector: the registration is refused; the edge then closes the connection."""

    code: RegisterError
    message: str = ""

    def payload(self) -> bytes:
        return encode_varint(self.code) + _text(self.message)

    @classmethod
    def parse(cls, r: _Reader) -> RegisterRefused:
        raw = r.varint("error code")
        try:
            code = RegisterError(raw)
        except ValueError as e:
            raise ProtocolError(f"unknown registration error code {raw}") from e
        return cls(code, r.text("message", MAX_MESSAGE_LEN))


@dataclass(frozen=True, slots=True)
class Unregister:
    """Connector -> edge: send no new flows on this connection; open ones may finish."""

    def payload(self) -> bytes:
        return b""

    @classmethod
    def parse(cls, r: _Reader) -> Unregister:
        return cls()


@dataclass(frozen=True, slots=True)
class Successor:
    """Edge -> connector: a successor process serves this edge's address now (a restart);
    dial new connections, which reach it, and keep this one until the edge closes it."""

    edge_id: str  # the successor's edge id, as its REGISTERED will say

    def payload(self) -> bytes:
        return _text(self.edge_id)

    @classmethod
    def parse(cls, r: _Reader) -> Successor:
        return cls(r.text("edge id", MAX_MESSAGE_LEN))


CAP_SUCCESSOR = "successor"  # a REGISTER's client info word "+successor": answers SUCCESSOR

REDIAL_CID_MIN, REDIAL_CID_MAX = 8, 20  # an Initial's destination id (RFC 9000 7.2: >= 8)


@dataclass(frozen=True, slots=True)
class Redial:
    """Edge -> connector: move this connection. Dial one more whose Initial packets carry
    `initial_cid` as their destination connection id (the edge's steering sends it to the
    process that should hold it), then UNREGISTER this one and close it once its flows end."""

    initial_cid: bytes

    def payload(self) -> bytes:
        return _blob(self.initial_cid)

    @classmethod
    def parse(cls, r: _Reader) -> Redial:
        cid = r.blob("initial connection id", REDIAL_CID_MAX)
        if len(cid) < REDIAL_CID_MIN:
            raise ProtocolError(f"initial connection id of {len(cid)} bytes (at least 8)")
        return cls(cid)


CAP_REDIAL = "redial"  # a REGISTER's client info word "+redial": answers REDIAL


@dataclass(frozen=True, slots=True)
class Window:
    """Either way on the control stream: the sender may send `increment` more bytes on a flow."""

    stream_id: int
    increment: int

    def payload(self) -> bytes:
        return encode_varint(self.stream_id) + encode_varint(self.increment)

    @classmethod
    def parse(cls, r: _Reader) -> Window:
        stream_id = r.varint("stream id")
        increment = r.varint("window increment", MAX_WINDOW)
        if increment == 0:
            raise ProtocolError("window increment of zero")
        return cls(stream_id, increment)


@dataclass(frozen=True, slots=True)
class ConnectTcp:
    """Edge -> connector, first frame on a flow stream: dial this destination."""

    flow_id: int
    host: str
    port: int
    window: int  # bytes the connector may send before the edge grants more
    metadata: dict[str, str] = field(default_factory=dict)

    def payload(self) -> bytes:
        return b"".join(
            (
                encode_varint(self.flow_id),
                _text(self.host),
                encode_varint(self.port),
                encode_varint(self.window),
                _metadata(self.metadata),
            )
        )

    @classmethod
    def parse(cls, r: _Reader) -> ConnectTcp:
        flow_id = r.varint("flow id")
        host, port = r.destination()
        window = r.varint("window", MAX_WINDOW)
        metadata = r.metadata()
        return cls(flow_id, host, port, window, metadata)


@dataclass(frozen=True, slots=True)
class ConnectResult:
    """Connector -> edge: the answer to CONNECT_TCP, before any payload byte."""

    code: ConnectCode
    window: int  # bytes the edge may send before the connector grants more
    message: str = ""

    def payload(self) -> bytes:
        return encode_varint(self.code) + encode_varint(self.window) + _text(self.message)

    @classmethod
    def parse(cls, r: _Reader) -> ConnectResult:
        raw = r.varint("result code")
        try:
            code = ConnectCode(raw)
        except ValueError as e:
            raise ProtocolError(f"unknown connect result code {raw}") from e
        return cls(code, r.varint("window", MAX_WINDOW), r.text("message", MAX_MESSAGE_LEN))


@dataclass(frozen=True, slots=True)
class StreamDatagram:
    """A tunnel datagram (see `encode_session_payload` and friends) sent on a stream because it
    does not fit in a QUIC DATAGRAM frame on the current path."""

    data: bytes

    def payload(self) -> bytes:
        return self.data

    @classmethod
    def parse(cls, r: _Reader) -> StreamDatagram:
        data = r.buf[r.pos :]
        r.pos = len(r.buf)
        if not data:
            raise ProtocolError("empty stream datagram")
        return cls(data)


Frame = (
    Register
    | Registered
    | RegisterRefused
    | Unregister
    | Successor
    | Redial
    | Window
    | ConnectTcp
    | ConnectResult
    | StreamDatagram
)

_TYPES: dict[type, FrameType] = {
    Register: FrameType.REGISTER,
    Registered: FrameType.REGISTERED,
    RegisterRefused: FrameType.REGISTER_ERROR,
    Unregister: FrameType.UNREGISTER,
    Successor: FrameType.SUCCESSOR,
    Redial: FrameType.REDIAL,
    Window: FrameType.WINDOW,
    ConnectTcp: FrameType.CONNECT_TCP,
    ConnectResult: FrameType.CONNECT_RESULT,
    StreamDatagram: FrameType.DATAGRAM,
}
_PARSERS = {t: cls for cls, t in _TYPES.items()}


def _max_payload(ftype: int) -> int:
    return MAX_STREAM_DATAGRAM if ftype == FrameType.DATAGRAM else MAX_FRAME_PAYLOAD


def encode_frame(frame: Frame) -> bytes:
    payload = frame.payload()
    if len(payload) > _max_payload(_TYPES[type(frame)]):
        raise ProtocolError(f"frame payload too large: {len(payload)}")
    return encode_varint(_TYPES[type(frame)]) + encode_varint(len(payload)) + payload


def parse_frame(buf: bytes | bytearray) -> tuple[Frame, int] | None:
    """Parse one frame from the start of `buf`.

    Returns (frame, bytes consumed), or None if `buf` holds only part of a frame.
    """
    got = decode_varint(buf, 0)
    if got is None:
        return None
    ftype, pos = got
    cls = _PARSERS.get(ftype)  # type: ignore[call-overload]
    if cls is None:
        raise ProtocolError(f"unknown frame type 0x{ftype:x}")
    got = decode_varint(buf, pos)
    if got is None:
        return None
    length, pos = got
    if length > _max_payload(ftype):
        raise ProtocolError(f"frame payload too large: {length}")
    end = pos + length
    if end > len(buf):
        return None
    r = _Reader(bytes(buf[pos:end]))
    frame = cls.parse(r)
    r.end(cls.__name__)
    return frame, end


class FrameDecoder:
    """Accumulates stream bytes and yields whole frames (for the control stream)."""

    def __init__(self, limit: int = 4 * MAX_FRAME_PAYLOAD) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while self._buf:
            got = parse_frame(self._buf)
            if got is None:
                break
            frame, used = got
            del self._buf[:used]
            frames.append(frame)
        if len(self._buf) > self._limit:
            raise ProtocolError("incomplete frame exceeds buffer limit")
        return frames

    def feed_one(self, data: bytes) -> Frame | None:
        """For a stream that carries one header frame and then raw payload: return the first
        frame once it is complete and leave every byte after it for `take_rest`."""
        self._buf += data
        got = parse_frame(self._buf)
        if got is None:
            if len(self._buf) > self._limit:
                raise ProtocolError("incomplete frame exceeds buffer limit")
            return None
        frame, used = got
        del self._buf[:used]
        return frame

    @property
    def pending(self) -> int:
        return len(self._buf)

    def take_rest(self) -> bytes:
        """Bytes after the last whole frame (flow streams switch to raw payload after one)."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


# --- datagrams: UDP sessions -----------------------------------------------------------------
#
# Every QUIC DATAGRAM frame (and every StreamDatagram) holds one tunnel datagram:
#
#     kind (varint) | session id (varint) | rest
#
# PAYLOAD carries one UDP payload; the others manage sessions. Session ids are chosen by the
# edge and are unique per edge process; session management datagrams may be lost, so the edge
# repeats SESSION_REGISTER until answered and the connector answers a repeat again.


class DatagramKind(enum.IntEnum):
    PAYLOAD = 0x00
    SESSION_REGISTER = 0x01
    SESSION_REGISTERED = 0x02
    SESSION_REFUSED = 0x03
    SESSION_CLOSE = 0x04
    PACKET = 0x05  # a whole IPv4/IPv6 packet (ICMP through the tunnel); no session id


class SessionError(enum.IntEnum):
    UNREACHABLE = 0x01
    CANNOT_BIND = 0x02
    TOO_MANY_SESSIONS = 0x03
    NOT_PERMITTED = 0x04
    ERROR = 0x05


class SessionCloseReason(enum.IntEnum):
    CLOSED = 0x00  # the client side ended it
    IDLE = 0x01  # idle timeout
    ERROR = 0x02  # the origin socket failed
    SHUTDOWN = 0x03  # the connector or edge is going away


@dataclass(frozen=True, slots=True)
class SessionRegister:
    session_id: int
    flow_id: int
    host: str
    port: int
    idle_timeout_ms: int
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SessionRegistered:
    session_id: int


@dataclass(frozen=True, slots=True)
class SessionRefused:
    session_id: int
    code: SessionError
    message: str = ""


@dataclass(frozen=True, slots=True)
class SessionClose:
    session_id: int
    reason: SessionCloseReason


SessionControl = SessionRegister | SessionRegistered | SessionRefused | SessionClose


def payload_prefix(session_id: int) -> bytes:
    """Header of a PAYLOAD datagram; sessions keep it and prepend it to each payload."""
    return b"\x00" + encode_varint(session_id)


def encode_session_control(msg: SessionControl) -> bytes:
    if isinstance(msg, SessionRegister):
        return b"".join(
            (
                encode_varint(DatagramKind.SESSION_REGISTER),
                encode_varint(msg.session_id),
                encode_varint(msg.flow_id),
                _text(msg.host),
                encode_varint(msg.port),
                encode_varint(msg.idle_timeout_ms),
                _metadata(msg.metadata),
            )
        )
    if isinstance(msg, SessionRegistered):
        return encode_varint(DatagramKind.SESSION_REGISTERED) + encode_varint(msg.session_id)
    if isinstance(msg, SessionRefused):
        return (
            encode_varint(DatagramKind.SESSION_REFUSED)
            + encode_varint(msg.session_id)
            + encode_varint(msg.code)
            + _text(msg.message)
        )
    return (
        encode_varint(DatagramKind.SESSION_CLOSE)
        + encode_varint(msg.session_id)
        + encode_varint(msg.reason)
    )


def parse_datagram(buf: bytes) -> tuple[int, bytes] | SessionControl:
    """A session datagram: (session id, payload) for PAYLOAD, else the control message
    (PACKET datagrams go to `parse_packet_datagram`: see `is_packet_datagram`).

    Raises ProtocolError for anything malformed."""
    got = decode_varint(buf, 0)
    if got is None:
        raise ProtocolError("empty datagram")
    kind, pos = got
    if kind == DatagramKind.PACKET:
        raise ProtocolError("a PACKET datagram among session datagrams")
    got = decode_varint(buf, pos)
    if got is None:
        raise ProtocolError("truncated session id")
    session_id, pos = got
    if kind == DatagramKind.PAYLOAD:
        if len(buf) - pos > MAX_UDP_PAYLOAD:
            raise ProtocolError("datagram payload too large")
        return session_id, buf[pos:]
    r = _Reader(bytes(buf[pos:]))
    msg: SessionControl
    if kind == DatagramKind.SESSION_REGISTER:
        flow_id = r.varint("flow id")
        host, port = r.destination()
        idle = r.varint("idle timeout", 24 * 3600 * 1000)
        metadata = r.metadata()
        msg = SessionRegister(session_id, flow_id, host, port, idle, metadata)
    elif kind == DatagramKind.SESSION_REGISTERED:
        msg = SessionRegistered(session_id)
    elif kind == DatagramKind.SESSION_REFUSED:
        raw = r.varint("session error")
        try:
            code = SessionError(raw)
        except ValueError as e:
            raise ProtocolError(f"unknown session error {raw}") from e
        msg = SessionRefused(session_id, code, r.text("message", MAX_MESSAGE_LEN))
    elif kind == DatagramKind.SESSION_CLOSE:
        raw = r.varint("close reason")
        try:
            reason = SessionCloseReason(raw)
        except ValueError as e:
            raise ProtocolError(f"unknown close reason {raw}") from e
        msg = SessionClose(session_id, reason)
    else:
        raise ProtocolError(f"unknown datagram kind 0x{kind:x}")
    r.end(type(msg).__name__)
    return msg


# --- datagrams: whole IP packets -------------------------------------------------------------
#
#     kind PACKET (varint 0x05) | vnet (text, empty = "default") | one IPv4 or IPv6 packet
#
# The edge sends a client's packet (an ICMP echo request) to a connector that announced the
# capability at registration; the connector answers with packets for the same client (echo
# replies, ICMP errors it generated or routers reported), naming the same vnet.

CAP_IP_PACKETS = "ip-packets"  # a REGISTER's client info word "+ip-packets": takes PACKET
MIN_IP_PACKET = 20  # an IPv4 header; what is shorter is no IP packet


@dataclass(frozen=True, slots=True)
class TunnelPacket:
    vnet: str
    packet: bytes


_PACKET_KIND = encode_varint(DatagramKind.PACKET)


def encode_packet_datagram(packet: bytes, vnet: str = "default") -> bytes:
    if len(packet) > MAX_UDP_PAYLOAD:
        raise ProtocolError(f"IP packet too large: {len(packet)}")
    return _PACKET_KIND + _text("" if vnet == "default" else vnet) + packet


def parse_packet_datagram(buf: bytes) -> TunnelPacket:
    r = _Reader(bytes(buf))
    if r.varint("datagram kind") != DatagramKind.PACKET:
        raise ProtocolError("not a PACKET datagram")
    vnet = r.text("vnet", MAX_HOST_LEN) or "default"
    packet = r.buf[r.pos :]
    if len(packet) < MIN_IP_PACKET:
        raise ProtocolError(f"PACKET of {len(packet)} bytes holds no IP packet")
    if len(packet) > MAX_UDP_PAYLOAD:
        raise ProtocolError("IP packet too large")
    return TunnelPacket(vnet, packet)


def is_packet_datagram(buf: bytes) -> bool:
    """Cheap dispatch: whether a tunnel datagram is of kind PACKET (a one-byte varint)."""
    return len(buf) > 0 and buf[0] == DatagramKind.PACKET


def capabilities(client_info: str) -> frozenset[str]:
    """The optional features a REGISTER's client info announces: its words that start with
    "+". Edges that predate a feature only log the text, so announcing never breaks them."""
    return frozenset(w[1:] for w in client_info.split() if w.startswith("+") and len(w) > 1)


def with_capabilities(client_info: str, caps: set[str] | frozenset[str]) -> str:
    return " ".join([client_info, *(f"+{c}" for c in sorted(caps))]).strip()
