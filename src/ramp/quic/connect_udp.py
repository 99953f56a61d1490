"""Both ends of a connect-udp request stream (RFC 9298) carry UDP payloads the same way: as
HTTP Datagrams with context id 0 in QUIC DATAGRAM frames when the peer takes them and the
payload fits the path, else as DATAGRAM capsules on the stream (RFC 9297). The edge's request
handler and the client's session both subclass `UdpStream`.
"""

from __future__ import annotations

from collections.abc import Callable

from ramp.quic.h3 import H3_MESSAGE_ERROR, H3Peer, Headers
from ramp.wire import masque

# a frame's quarter stream id and context id, upper bound, besides the payload
_DATAGRAM_HEADER = 8


class UdpStream:
    """A connect-udp request stream's UDP payloads, both ways. `bad(reason)` counts malformed
    input, `drop(reason)` a datagram dropped; subclasses take `udp_received(payload)`,
    `stream_ended()` (the peer's FIN) and `stream_broken(why)` (a malformed capsule: the
    stream has been reset)."""

    def __init__(
        self,
        peer: H3Peer,
        stream_id: int,
        *,
        bad: Callable[[str], None],
        drop: Callable[[str], None],
    ) -> None:
        self.peer = peer
        self.stream_id = stream_id
        self.decoder = masque.CapsuleDecoder()
        self.done = False
        self._bad = bad
        self._drop = drop

    # -- hooks ----------------------------------------------------------------------------

    def udp_received(self, payload: bytes) -> None: ...

    def stream_ended(self) -> None: ...

    def stream_broken(self, why: str) -> None: ...

    def capsule(self, capsule: masque.Capsule) -> bool:
        """A capsule other than DATAGRAM (connect-ip's own): True when it was taken."""
        return False

    # -- sending --------------------------------------------------------------------------

    def send_udp(self, payload: bytes) -> bool:
        """Send one UDP payload; False when it was dropped."""
        if self.done:
            return False
        body = masque.encode_context(masque.CONTEXT_UDP, payload)
        peer = self.peer
        if peer.takes_datagrams() and len(body) + _DATAGRAM_HEADER <= peer.datagram_limit():
            return peer.send_http_datagram(self.stream_id, body)
        self.oversize(body)
        return True

    def oversize(self, payload: bytes) -> None:
        """Too big for a DATAGRAM frame (or no datagrams negotiated): a capsule instead."""
        if not self.done:
            self.peer.send_data(
                self.stream_id, masque.encode_capsule(masque.CAPSULE_DATAGRAM, payload)
            )

    # -- receiving (the stream's Request events) ------------------------------------------

    def headers(self, headers: Headers, ended: bool) -> None:
        if ended:
            self.data(b"", True)

    def data(self, data: bytes, ended: bool) -> None:
        if self.done:
            return
        try:
            capsules = self.decoder.feed(data) if data else []
            if ended:
                self.decoder.end()
        except masque.MasqueError as e:
            self._bad("malformed_capsule")
            self.peer.reset_request(self.stream_id, H3_MESSAGE_ERROR)
            self.stream_broken(str(e))
            return
        for capsule in capsules:
            if capsule.type == masque.CAPSULE_DATAGRAM:
                self.datagram(capsule.value)
            elif not self.capsule(capsule):  # RFC 9297 section 3.2: unknown types are skipped
                self._bad("unknown_capsule")
            if self.done:
                return
        if ended:
            self.stream_ended()

    def datagram(self, payload: bytes) -> None:
        try:
            context_id, data = masque.decode_context(payload)
        except masque.MasqueError:
            self._bad("malformed_datagram")
            return
        if context_id != masque.CONTEXT_UDP:
            self._drop("unknown_context")
            return
        if not self.done:
            self.udp_received(data)
