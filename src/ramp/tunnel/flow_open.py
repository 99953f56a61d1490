"""The edge's stream handler while a flow waits for CONNECT_RESULT: the asyncio face of the
FlowOpen machine (flow_state.py), resolving a future with the answer."""

from __future__ import annotations

import asyncio

from ramp.flows.flow import FlowError, FlowResult
from ramp.tunnel import flow_state as fs
from ramp.tunnel.flow_state import FlowOpen
from ramp.wire.tunnel import ConnectResult


class ConnectionGone(Exception):
    """The tunnel connection died before the connector answered: try another one."""


class PendingFlow:
    """Stream handler while the edge waits for CONNECT_RESULT."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.state = FlowOpen()
        self.result: asyncio.Future[ConnectResult] = asyncio.get_running_loop().create_future()

    @property
    def extra(self) -> list[bytes]:
        return self.state.extra

    @property
    def fin(self) -> bool:
        return self.state.fin

    @property
    def reset_code(self) -> int | None:
        return self.state.reset_code

    @property
    def lost(self) -> bool:
        return self.state.lost

    def stream_data(self, data: bytes, fin: bool) -> None:
        self._resolve(self.state.stream_data(data, fin))

    def stream_reset(self, code: int) -> None:
        self._resolve(self.state.stream_reset(code))

    def stop_sending(self, code: int) -> None:
        self._resolve(self.state.stop_sending(code))

    def connection_lost(self) -> None:
        self._resolve(self.state.connection_lost())

    def _resolve(self, events: list[fs.OpenEvent]) -> None:
        for event in events:
            if self.result.done():
                return  # the waiter gave up already (timeout): nothing to tell
            if isinstance(event, fs.Answered):
                self.result.set_result(event.result)
            elif isinstance(event, fs.OpenFailed):
                self.result.set_exception(FlowError(FlowResult.ERROR, event.reason))
            elif isinstance(event, fs.OpenLost):
                self.result.set_exception(ConnectionGone())
