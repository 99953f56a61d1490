"""The flow table: owns every flow of a role from accept to end.

Admission is bounded (past the limit a flow gets a clear error and a counter moves), each source
address and each identity may hold only its share of the table (so one client cannot fill it
for everyone), and the end
of every flow, whatever kind and however it ends, is reported from here and only here: the
reporters (metrics, the audit log, `flow_end` hooks) see each flow exactly once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ramp.flows.client_shares import ClientShares
from ramp.flows.flow import Flow, FlowError, FlowResult, FlowState

log = logging.getLogger(__name__)

Reporter = Callable[[Flow], None]


class FlowTable:
    def __init__(
        self,
        limit: int,
        reporters: list[Reporter] | None = None,
        on_reject: Callable[[str], None] | None = None,
        on_count: Callable[[int], None] | None = None,
        *,
        per_source: int = 0,
        per_identity: int = 0,
    ) -> None:
        self.limit = limit
        # 0 = no share (the connector's table: its flows all come from the edge)
        self.shares: ClientShares[str] = ClientShares(per_source, per_identity)
        self.reporters: list[Reporter] = list(reporters or ())
        self._on_reject = on_reject
        self._on_count = on_count
        self._flows: dict[int, Flow] = {}
        self.ended = 0

    def __len__(self) -> int:
        return len(self._flows)

    def __iter__(self) -> Iterator[Flow]:
        return iter(list(self._flows.values()))

    def __contains__(self, flow: Flow) -> bool:
        return flow.id in self._flows

    def get(self, flow_id: int) -> Flow | None:
        return self._flows.get(flow_id)

    def admit(self, flow: Flow) -> None:
        """Take `flow` into the table, or refuse it (FlowError) when the table is full or its
        source or identity holds its whole share."""
        if flow.id in self._flows:
            return
        if len(self._flows) >= self.limit:
            self._refuse(flow, "flow_table_full", f"at the limit of {self.limit} concurrent flows")
        why = self.shares.try_take(flow.source[0], flow.user)
        if why is not None:
            over = self.shares.over(why, flow.source[0], flow.user)
            self._refuse(flow, why, f"{over} flows open (its share of the edge)")
        self._flows[flow.id] = flow
        if self._on_count is not None:
            self._on_count(len(self._flows))

    @contextmanager
    def reporting_failures(self, flow: Flow) -> Iterator[None]:
        """Around the opening of `flow`: one that fails (or is cancelled) is marked with its
        result and ended here, once; its opener only sees the exception."""
        try:
            yield
        except FlowError as e:
            flow.fail(e.result, e.reason)
            self.end(flow)
            raise
        except BaseException:
            flow.fail(FlowResult.ERROR, "cancelled while opening")
            self.end(flow)
            raise

    def end(self, flow: Flow) -> None:
        """Report `flow` as finished, once; later calls for the same flow do nothing."""
        if flow.state is FlowState.ENDED:
            return
        if self._flows.pop(flow.id, None) is not None:
            self.shares.release(flow.source[0], flow.user)
            if self._on_count is not None:
                self._on_count(len(self._flows))
        self._report(flow)

    def _refuse(self, flow: Flow, reason: str, message: str) -> None:
        """Refuse `flow` (FlowError, BUSY): reported like any other, so the audit and metrics
        see the flow and why it never started."""
        if self._on_reject is not None:
            self._on_reject(reason)
        error = FlowError(FlowResult.BUSY, message)
        flow.fail(error.result, error.reason)
        self._report(flow)
        raise error

    def _report(self, flow: Flow) -> None:
        flow.state = FlowState.ENDED
        flow.stop = None
        if flow.ended is None:
            flow.ended = time.monotonic()
        if flow.result is None:
            flow.result = FlowResult.OK
        self.ended += 1
        for report in self.reporters:
            try:
                report(flow)
            except Exception:
                log.exception("reporting the end of flow %d failed", flow.id)
