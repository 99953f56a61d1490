"""The TCP forward on-ramp: every connection to the listener goes to one fixed destination.

Like `cloudflared access tcp`, it lets clients that know no proxy (ssh, database clients) reach a
private service: `{type: forward, listen: 127.0.0.1:2222, to: 198.51.100.10:22}`. Flows are
anonymous (no handshake to carry credentials); policy can still match them by on-ramp and
source address.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from pydantic import Field, field_validator

from ramp.flows.flow import Destination
from ramp.onramps.registry import OnRampContext, OnRampOptions, register
from ramp.onramps.tcp_listener import FlowPlan, TcpOnRamp

log = logging.getLogger(__name__)


def _split(value: str) -> tuple[str, int]:
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        port_s = rest[1:] if sep and rest.startswith(":") else ""
    else:
        host, _, port_s = value.rpartition(":")
    if not host or not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise ValueError(f"expected HOST:PORT with a port 1-65535, got {value!r}")
    return host, int(port_s)


class ForwardOptions(OnRampOptions):
    to: str = Field(description="The fixed destination HOST:PORT (an address or a name).")

    @field_validator("to")
    @classmethod
    def _check_to(cls, v: str) -> str:
        _split(v)
        return v


class ForwardServer(TcpOnRamp):
    onramp = "forward"

    def __init__(
        self,
        config: object,
        opener: object,
        options: ForwardOptions,
        accept_error: Callable[[str, str], None] | None = None,
    ) -> None:
        super().__init__(config, opener, options, accept_error=accept_error)  # type: ignore[arg-type]
        self.destination = Destination(*_split(options.to))
        if getattr(config, "users", None):
            log.warning(
                "forward on-ramp %s -> %s takes no credentials: its flows are anonymous; "
                "limit it with policy rules (--onramp forward, --from CIDR)",
                options.listen,
                options.to,
            )

    async def _handshake(self, sock: socket.socket, peer: tuple[str, int]) -> FlowPlan | None:
        return FlowPlan(
            destination=self.destination,
            identity=None,
            ok_reply=b"",
            error_reply=lambda result: b"",
            busy_reply=b"",
        )


def _build(ctx: OnRampContext, options: ForwardOptions) -> ForwardServer:
    server = ForwardServer(ctx.config, ctx.opener, options, accept_error=ctx.accept_error)
    server.proxy_header_seen = ctx.proxy_header
    return server


register("forward", ForwardOptions, _build, "every connection goes to one fixed destination")
