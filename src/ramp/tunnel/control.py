"""Pieces both ends of a tunnel connection share: the control stream's handler, the window
routing, and the mapping between flow results and the protocol's connect codes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from ramp.flows.flow import FlowResult
from ramp.tunnel.bridge import StreamBridge
from ramp.tunnel.control_state import (
    CloseConnection,
    ConnectorControl,
    ControlAction,
    EdgeControl,
    RouteCredit,
    SendControl,
)
from ramp.wire.tunnel import ConnectCode

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
    # the edge refuses bad names before they reach a tunnel; a connector that finds one
    # answers with a code every edge already knows
    FlowResult.BAD_DESTINATION: ConnectCode.HOST_UNREACHABLE,
    FlowResult.BUSY: ConnectCode.ERROR,
}
CODE_TO_RESULT = {
    code: result
    for result, code in RESULT_TO_CODE.items()
    if result not in (FlowResult.RESET, FlowResult.BAD_DESTINATION, FlowResult.BUSY)
}


class ControlStream:
    """Stream-handler face of a control-stream state machine (control_state.py): feeds it the
    stream's events with the time, and hands its actions to the connection's `run`."""

    __slots__ = ("_machine", "_now", "_run", "stream_id")

    def __init__(
        self,
        stream_id: int,
        machine: EdgeControl | ConnectorControl,
        run: Callable[[list[ControlAction]], None],
        now: Callable[[], float],
    ) -> None:
        self.stream_id = stream_id
        self._machine = machine
        self._run = run
        self._now = now

    # StreamHandler
    def stream_data(self, data: bytes, fin: bool) -> None:
        self._run(self._machine.control_data(data, fin, self._now()))

    def stream_reset(self, code: int) -> None:
        self._run(self._machine.control_reset(code))

    def stop_sending(self, code: int) -> None:
        self.stream_reset(code)

    def connection_lost(self) -> None:
        pass  # the connection's own end reaches the machine through `terminated`


def route_window(bridges: dict[int, StreamBridge], stream_id: int, increment: int) -> None:
    bridge = bridges.get(stream_id)
    if bridge is not None:  # a window for a finished flow is harmless
        bridge.add_credit(increment)


class _ControlCarrier(Protocol):
    bridges: dict[int, StreamBridge]
    control: ControlStream | None

    def send(self, stream_id: int, data: bytes, fin: bool = False) -> None: ...

    def close_with(self, code: int, reason: str) -> None: ...


def carry_out_shared(conn: _ControlCarrier, action: ControlAction) -> bool:
    """Carry out an action both ends' control machines emit (credit routing, control frames,
    closing); False for a role's own actions, which the caller handles."""
    if isinstance(action, RouteCredit):
        route_window(conn.bridges, action.stream_id, action.increment)
    elif isinstance(action, SendControl):
        if conn.control is not None:
            conn.send(conn.control.stream_id, action.data)
    elif isinstance(action, CloseConnection):
        conn.close_with(action.code, action.reason)
    else:
        return False
    return True
