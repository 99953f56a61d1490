"""The one place that touches qh3's private names.

qh3 keeps several things we need behind underscores: the packet-header parser, the GRO/GSO
transport, the connection's Rust core (congestion window, stream limits, path MTU), and the
asyncio protocol's and server's internals. A qh3 upgrade may rename any of them without notice;
keeping every such access here, listed in `PRIVATE_NAMES` and checked by
tests/unit/test_qh3compat.py, turns that into one failing test instead of a broken tunnel.
Nothing outside this module may use a qh3 name starting with `_`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import qh3.quic.connection as _qh3_connection
import qh3.quic.tls_bridge as _tls_bridge
from qh3._hazmat import QuicConnectionCore as _QuicConnectionCore
from qh3._hazmat import pull_quic_header as _pull_quic_header
from qh3.asyncio.protocol import QuicConnectionProtocol
from qh3.asyncio.server import QuicServer
from qh3.h3.connection import H3Connection, Setting
from qh3.quic.connection import QuicConnection
from qh3.quic.packet import QuicTransportParameters

try:  # optimised GRO/GSO transport; present in qh3 >= 1.4
    from qh3.asyncio._transport import create_optimized_datagram_transport
except ImportError:  # pragma: no cover - older qh3
    create_optimized_datagram_transport = None  # type: ignore[assignment]

# (owner, private attribute) pairs this module relies on; owners are where the attribute is
# found: a class for methods, "instance" names for attributes set in __init__
PRIVATE_NAMES: tuple[tuple[str, str], ...] = (
    ("qh3._hazmat", "pull_quic_header"),
    ("qh3.asyncio._transport", "create_optimized_datagram_transport"),
    ("qh3._hazmat", "QuicConnectionCore"),
    ("qh3.quic.connection", "QuicConnectionCore"),
    ("qh3.quic.tls_bridge", "QuicTransportParameters"),
    ("QuicConnection", "_create_core"),
    ("QuicConnection", "_create_tls"),
    ("QuicConnection", "_core"),
    ("QuicConnection", "_close_event"),
    ("QuicConnection", "_remote_max_datagram_frame_size"),
    ("QuicConnection", "_is_client"),
    ("QuicConnection", "_stream_can_send"),
    ("QuicConnection", "_log_packets"),
    ("QuicConnection", "_quic_logger"),
    ("QuicConnectionCore", "stream_limits"),
    ("QuicConnectionCore", "congestion_window"),
    ("QuicConnectionCore", "bytes_in_flight"),
    ("QuicConnectionCore", "active_path"),
    ("QuicConnectionCore", "smoothed_rtt"),
    ("QuicConnectionProtocol", "_quic"),
    ("QuicConnectionProtocol", "_loop"),
    ("QuicConnectionProtocol", "_loop_time"),
    ("QuicConnectionProtocol", "_closed"),
    ("QuicConnectionProtocol", "_transmit_soon"),
    ("QuicConnectionProtocol", "_connection_id_issued_handler"),
    ("QuicConnectionProtocol", "_connection_id_retired_handler"),
    ("QuicConnectionProtocol", "_connection_terminated_handler"),
    ("QuicConnectionProtocol", "_timer"),
    ("QuicConnectionProtocol", "_transmit_task"),
    ("QuicServer", "_protocols"),
    ("QuicServer", "_configuration"),
    ("QuicServer", "_transport"),
    ("QuicServer", "_create_protocol"),
    ("QuicServer", "_connection_id_issued"),
    ("QuicServer", "_connection_id_retired"),
    ("QuicServer", "_connection_terminated"),
    ("H3Connection", "_get_local_settings"),
)

# index of the path's maximum datagram size in the core's `active_path` tuple
_PATH_MAX_DATAGRAM = 5


def pull_quic_header(data: bytes, connection_id_length: int) -> tuple[Any, ...]:
    """(version, packet type, packet length, destination cid, source cid, ...); ValueError
    for a malformed header."""
    return _pull_quic_header(data, 0, connection_id_length)


# -- QuicConnection internals -----------------------------------------------------------------

QH3_MAX_STREAMS_BIDI = 100  # what qh3 advertises on its own (a literal in _create_core)


def _core_parameter(name: str) -> int:
    """Position of `name` in the Rust core's constructor (qh3 passes them all positionally)."""
    signature = _QuicConnectionCore.__text_signature__ or ""
    names = [p.strip() for p in signature.strip("()").split(",")]
    return names.index(name)


_LOCAL_MAX_STREAMS_BIDI = _core_parameter("local_max_streams_bidi")


@contextmanager
def _advertising(limit: int) -> Iterator[None]:
    """While inside, qh3 advertises `limit` bidirectional streams instead of its fixed 100.

    qh3 has no setting for it: the number is a literal both where `_create_core` builds the
    Rust core (the limit enforced and raised with MAX_STREAMS) and where the TLS bridge builds
    the transport parameters (the initial limit the peer learns). Their constructors are
    swapped only for the duration of one synchronous call, so nothing else sees the change.
    """

    def make_core(*args: Any) -> Any:
        values = list(args)
        values[_LOCAL_MAX_STREAMS_BIDI] = limit
        return _QuicConnectionCore(*values)

    def make_parameters(*args: Any, **kw: Any) -> QuicTransportParameters:
        return QuicTransportParameters(*args, **{**kw, "initial_max_streams_bidi": limit})

    _qh3_connection.QuicConnectionCore = make_core  # type: ignore[assignment,misc]
    _tls_bridge.QuicTransportParameters = make_parameters  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        _qh3_connection.QuicConnectionCore = _QuicConnectionCore  # type: ignore[misc]
        _tls_bridge.QuicTransportParameters = QuicTransportParameters  # type: ignore[misc]


class LimitedConnection(QuicConnection):
    """A QuicConnection that lets its peer open `max_streams_bidi` bidirectional streams at
    once instead of qh3's fixed 100, and that does not parse what it sends for a log it has
    not got. `host_cid`, when given, is the connection id it issues first (qh3 draws one at
    random): a steering cookie (ramp.quic.cookies) that keeps the peer's packets on this
    process's socket."""

    def __init__(
        self,
        *args: Any,
        max_streams_bidi: int = QH3_MAX_STREAMS_BIDI,
        host_cid: bytes | None = None,
        **kw: Any,
    ):
        self.max_streams_bidi = max_streams_bidi
        super().__init__(*args, **kw)
        if host_cid is not None:
            # qh3 reads it only when it builds the core and the TLS bridge (first datagram)
            self.host_cid = host_cid

    def _create_core(self, *args: Any, **kw: Any) -> None:
        with _advertising(self.max_streams_bidi):
            super()._create_core(*args, **kw)

    def _create_tls(self, *args: Any, **kw: Any) -> Any:
        with _advertising(self.max_streams_bidi):
            bridge = super()._create_tls(*args, **kw)
        serialize = bridge.serialize_transport_parameters
        limit = self.max_streams_bidi

        def serialize_limited() -> bytes:  # again after a version change
            with _advertising(limit):
                return bytes(serialize())

        bridge.serialize_transport_parameters = serialize_limited
        return bridge

    def _log_packets(self, event: str, data: bytes) -> None:
        # qh3 walks every packet header of every datagram sent before it finds out there is
        # no logger: 6 % of a busy edge's CPU (py-spy, bulk through the MASQUE endpoint)
        if self._quic_logger is not None:
            super()._log_packets(event, data)


def set_initial_destination(quic: QuicConnection, cid: bytes) -> None:
    """A client connection's Initial packets carry `cid` as their destination id (qh3 picks
    a random one in the constructor and offers no way to choose it)."""
    if not is_client(quic) or quic._core is not None:
        raise ValueError("only a client connection that has not connected yet")
    if not 8 <= len(cid) <= 20:
        raise ValueError(f"an Initial's destination id is 8 to 20 bytes, not {len(cid)}")
    quic._original_destination_connection_id = cid


def free_bidi_streams(quic: QuicConnection) -> int:
    """How many more bidirectional streams the peer's MAX_STREAMS lets us open now."""
    core = quic._core
    if core is None:
        return 0
    limit, _, opened, _ = core.stream_limits
    return max(0, int(limit) - int(opened))


def bidi_stream_limit(quic: QuicConnection) -> int:
    """The peer's current (cumulative) limit on bidirectional streams we may open; it rises
    with each MAX_STREAMS frame the peer sends."""
    core = quic._core
    return 0 if core is None else int(core.stream_limits[0])


def is_client(quic: QuicConnection) -> bool:
    return bool(quic._is_client)


def is_closing(quic: QuicConnection) -> bool:
    """Whether close() was called or the peer closed: nothing more may be queued."""
    return quic._close_event is not None


def can_open_bidi_stream(quic: QuicConnection) -> bool:
    """Whether the peer's MAX_STREAMS leaves room for another bidirectional stream."""
    core = quic._core
    if core is None:
        return False
    # (peer's cumulative bidi limit, uni limit, bidi streams we opened, uni opened)
    limit, _, opened, _ = core.stream_limits
    return bool(opened < limit)


def datagram_room(quic: QuicConnection) -> tuple[int, int, int | None] | None:
    """(congestion budget in bytes, path's max datagram size, peer's max DATAGRAM frame size),
    or None while the connection has no core or is closing."""
    core = quic._core
    if core is None or quic._close_event is not None:
        return None
    budget = core.congestion_window - core.bytes_in_flight
    return budget, core.active_path[_PATH_MAX_DATAGRAM], quic._remote_max_datagram_frame_size


def smoothed_rtt(quic: QuicConnection) -> float | None:
    """The connection's smoothed round-trip time in seconds (None before a sample)."""
    core = quic._core
    if core is None:
        return None
    rtt = core.smoothed_rtt
    return float(rtt) if rtt is not None else None


def stream_can_send(quic: QuicConnection, stream_id: int) -> bool:
    return bool(quic._stream_can_send(stream_id))


# -- asyncio protocol and server internals ----------------------------------------------------


class ConnectionProtocol(QuicConnectionProtocol):
    """qh3's asyncio connection protocol with public names for the internals we use."""

    @property
    def quic(self) -> QuicConnection:
        return self._quic

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def loop_time(self) -> float:
        return self._loop_time()

    def transmit_soon(self) -> None:
        self._transmit_soon()

    def mark_closed(self) -> None:
        """Wake wait_closed() (qh3 only does so itself on a ConnectionTerminated event)."""
        self._closed.set()


class Server(QuicServer):
    """qh3's server with public names for its connection table and a connection factory."""

    # bidirectional streams each accepted connection lets its peer open at once
    max_streams_bidi = QH3_MAX_STREAMS_BIDI

    @property
    def configuration(self) -> Any:
        return self._configuration

    @property
    def udp_transport(self) -> asyncio.DatagramTransport:
        return self._transport

    def lookup(self, cid: bytes) -> QuicConnectionProtocol | None:
        return self._protocols.get(cid)

    def all_protocols(self) -> set[QuicConnectionProtocol]:
        return set(self._protocols.values())

    def new_protocol(
        self,
        dcid: bytes,
        on_created: Callable[[QuicConnectionProtocol], None],
        *,
        original_dcid: bytes | None = None,
        retry_scid: bytes | None = None,
        max_datagram_size: int | None = None,
        host_cid: bytes | None = None,
    ) -> QuicConnectionProtocol:
        """Create the connection for a new client's first packet, wired into the server's
        connection-id table the way QuicServer.datagram_received does. After a Retry, `dcid`
        is the Retry's source cid and `original_dcid` the client's first choice: both go into
        the transport parameters, which the client checks. `max_datagram_size` overrides the
        configuration's for this connection; `host_cid` is the connection id it issues first."""
        configuration = self._configuration
        if max_datagram_size is not None and max_datagram_size != configuration.max_datagram_size:
            configuration = dataclasses.replace(configuration, max_datagram_size=max_datagram_size)
        connection = LimitedConnection(
            configuration=configuration,
            original_destination_connection_id=original_dcid or dcid,
            retry_source_connection_id=retry_scid,
            max_streams_bidi=self.max_streams_bidi,
            host_cid=host_cid,
        )
        protocol = self._create_protocol(connection, stream_handler=None)
        protocol.connection_made(self._transport)
        protocol._connection_id_issued_handler = partial(
            self._connection_id_issued, protocol=protocol
        )
        protocol._connection_id_retired_handler = partial(
            self._connection_id_retired, protocol=protocol
        )
        protocol._connection_terminated_handler = partial(
            self._connection_terminated, protocol=protocol
        )
        on_created(protocol)
        self._protocols[dcid] = protocol
        self._protocols[connection.host_cid] = protocol
        return protocol

    def forget(self, protocol: QuicConnectionProtocol) -> None:
        """Drop a connection without a word to its peer: out of the connection-id table, its
        timers stopped. Its packets then look like an unknown connection's."""
        QuicServer._connection_terminated(self, protocol)
        for handle in (protocol._timer, protocol._transmit_task):
            if handle is not None:
                handle.cancel()
        protocol._timer = None
        protocol._transmit_task = None

    def _connection_id_retired(self, cid: bytes, protocol: QuicConnectionProtocol) -> None:
        # qh3 asserts the cid is still ours; after a terminated connection it may not be
        if self._protocols.get(cid) is protocol:
            del self._protocols[cid]

    def _connection_terminated(self, protocol: QuicConnectionProtocol) -> None:
        self.connection_terminated(protocol)
        super()._connection_terminated(protocol)

    def connection_terminated(self, protocol: QuicConnectionProtocol) -> None:
        """A connection ended (for subclasses)."""


# -- HTTP/3 -------------------------------------------------------------------------------------


class ExtendedConnectH3(H3Connection):
    """qh3's HTTP/3 connection advertising extended CONNECT (RFC 9220) as well as HTTP
    Datagrams: qh3 sends SETTINGS_H3_DATAGRAM itself but has no switch for
    SETTINGS_ENABLE_CONNECT_PROTOCOL, without which no client may send `:protocol`."""

    def _get_local_settings(self) -> dict[int, int]:
        settings = super()._get_local_settings()
        settings[Setting.ENABLE_CONNECT_PROTOCOL] = 1
        return settings
