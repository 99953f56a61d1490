"""Pieces both ends of a tunnel connection share: the control stream, the window routing,
and the mapping between flow results and the protocol's connect codes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ramp.flows.flow import FlowResult
from ramp.wire.tunnel import (
    CloseCode,
    ConnectCode,
    Frame,
    FrameDecoder,
    ProtocolError,
    Window,
    encode_frame,
)

if TYPE_CHECKING:
    from ramp.quic.endpoint import TunnelConnection
    from ramp.tunnel.bridge import StreamBridge

log = logging.getLogger("ramp.tunnel")

RESULT_TO_CODE = {
    FlowResult.OK: ConnectCode.OK,
    FlowResult.REFUSED: ConnectCode.REFUSED,
    FlowResult.NET_UNREACHABLE: ConnectCode.NET_UNREACHABLE,
    FlowResult.HOST_UNREACHABLE: ConnectCode.HOST_UNREACHABLE,
    FlowResult.TIMEOUT: ConnectCode.TIMEOUT,
    FlowResult.NOT_PERMITTED: ConnectCode.NOT_PERMITTED,
    FlowResult.ERROR: ConnectCode.ERROR,
    FlowResult.RESET: ConnectCode.ERROR,
}
CODE_TO_RESULT = {
    code: result for result, code in RESULT_TO_CODE.items() if result is not FlowResult.RESET
}


class ControlStream:
    """The connection's first bidirectional stream: registration, then WINDOW frames."""

    def __init__(
        self,
        conn: TunnelConnection,
        stream_id: int,
        on_frame: Callable[[Frame], None],
        on_error: Callable[[str], None],
    ) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self._on_frame = on_frame
        self._on_error = on_error
        self._decoder = FrameDecoder()

    def send(self, frame: Frame) -> None:
        self.conn.send(self.stream_id, encode_frame(frame))

    def send_window(self, stream_id: int, increment: int) -> None:
        self.send(Window(stream_id, increment))

    # StreamHandler
    def stream_data(self, data: bytes, fin: bool) -> None:
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as e:
            self._on_error(f"control stream: {e}")
            self.conn.close_with(CloseCode.PROTOCOL_ERROR, str(e))
            return
        for frame in frames:
            if self.conn.closed:
                return
            self._on_frame(frame)
        if fin:
            self._on_error("control stream closed by peer")
            self.conn.close_with(CloseCode.PROTOCOL_ERROR, "control stream closed")

    def stream_reset(self, code: int) -> None:
        self._on_error(f"control stream reset ({code})")
        self.conn.close_with(CloseCode.PROTOCOL_ERROR, "control stream reset")

    def stop_sending(self, code: int) -> None:
        self.stream_reset(code)

    def connection_lost(self) -> None:
        pass


def route_window(bridges: dict[int, StreamBridge], frame: Window) -> None:
    bridge = bridges.get(frame.stream_id)
    if bridge is not None:  # a window for a finished flow is harmless
        bridge.add_credit(frame.increment)
