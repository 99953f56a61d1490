"""A stream flow that moves to the worker holding its tunnel's connections.

With `--workers N` each edge worker holds only the tunnel connections the kernel steered to
it. A TCP flow accepted by a worker without a connection of its tunnel is handed, as the
client socket's descriptor (SCM_RIGHTS), to a worker with one (the Oxy Splicer idea): the
bytes are never copied through a second process. The first worker has done the handshake,
the policy decision and the routing; the second opens the stream, answers the client and
relays. This module is the description that travels with the descriptor.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ramp.flows.flow import Decision, Destination, Flow, FlowError, FlowResult, Identity, Route


class FlowMoved(FlowError):
    """Raised by the tunnel off-ramp: another worker (`worker`) holds the tunnel. An on-ramp
    that cannot hand its client over (a QUIC stream, a datagram flow) sees a plain failure."""

    def __init__(self, worker: int, tunnel: str) -> None:
        super().__init__(
            FlowResult.NET_UNREACHABLE,
            f"tunnel {tunnel} has connections only in worker {worker}, and this flow "
            "cannot move between workers",
        )
        self.worker = worker


def flow_to_dict(flow: Flow) -> dict[str, Any]:
    """What the receiving worker needs to go on with `flow` (JSON-able)."""
    route = flow.route
    decision = flow.decision
    return {
        "id": flow.id,
        "onramp": flow.onramp,
        "source": list(flow.source),
        "destination": [flow.destination.host, flow.destination.port],
        "identity": None
        if flow.identity is None
        else [flow.identity.name, sorted(flow.identity.groups)],
        "vnet": flow.vnet,
        "resolved": flow.resolved,
        "route": None if route is None else dataclasses.asdict(route),
        "decision": None if decision is None else dataclasses.asdict(decision),
        "annotations": dict(flow.annotations),
        "started_wall": flow.started_wall,
    }


def flow_from_dict(d: dict[str, Any]) -> Flow:
    """The flow `flow_to_dict` described, as the receiving worker's own (a new id); raises
    KeyError, TypeError or ValueError on a malformed description."""
    ident = d["identity"]
    flow = Flow(
        onramp=str(d["onramp"]),
        source=(str(d["source"][0]), int(d["source"][1])),
        destination=Destination(str(d["destination"][0]), int(d["destination"][1])),
        identity=None if ident is None else Identity(str(ident[0]), frozenset(ident[1])),
        vnet=d["vnet"],
    )
    flow.resolved = d["resolved"]
    if d["route"] is not None:
        flow.route = Route(**d["route"])
    if d["decision"] is not None:
        flow.decision = Decision(**d["decision"])
    flow.annotations.update({str(k): str(v) for k, v in d["annotations"].items()})
    flow.annotations["moved_from"] = f"worker {d.get('from', '?')} flow {d['id']}"
    flow.started_wall = float(d["started_wall"])
    return flow
