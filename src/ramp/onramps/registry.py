"""The on-ramp registry: each way into the edge is a type name, an options model and a builder.

An on-ramp module registers itself when imported (`register(...)` at its bottom), and every
module of this package is imported on the first lookup, so adding a new on-ramp is adding one
module: no core file lists them. Third-party on-ramps can register from any module a hook or
the config imports.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ramp.onramps.proxy_protocol import ProxyProtocolOptions


class OnRampOptions(BaseModel):
    """What every on-ramp entry of the config has; a type adds its own keys by subclassing."""

    model_config = ConfigDict(extra="forbid")
    # False for on-ramps that are no TCP listener of the shared kind (DNS, MASQUE over UDP)
    takes_proxy_protocol: ClassVar[bool] = True

    type: str = Field(description="The on-ramp type (socks5, http, dns, forward, ...).")
    listen: str = Field(description="HOST:PORT to listen on.")
    vnet: str | None = Field(
        None,
        description="Virtual network of this on-ramp's flows (an identity's own assignment "
        "wins); default: the 'default' network.",
    )
    proxy_protocol: ProxyProtocolOptions | None = Field(
        None,
        description="TCP on-ramps (socks5, http, forward): accept PROXY protocol v1/v2 headers "
        "from load balancers in front of the edge; the flow's source is then the header's "
        "client address. See docs/proxy-protocol.md.",
    )

    @model_validator(mode="after")
    def _proxy_protocol_where_it_works(self) -> OnRampOptions:
        if self.proxy_protocol is not None and not self.takes_proxy_protocol:
            raise ValueError(f"a {self.type} on-ramp takes no proxy_protocol option")
        return self

    def conflicts_with(self, other: OnRampOptions) -> str | None:
        """Why `other` cannot run in the same edge as this on-ramp, or None (a type that
        claims addresses and ports the sockets API cannot check says so here)."""
        return None


class OnRampServer(Protocol):
    async def start(self, host: str, port: int) -> None: ...

    async def close(self) -> None: ...

    @property
    def port(self) -> int: ...


@dataclass(frozen=True, slots=True)
class OnRampContext:
    """What an on-ramp gets from the role: the role's config and the flow path."""

    config: Any  # EdgeConfig
    opener: Any  # FlowOpener
    dns_outcome: Callable[[str], None] | None = None
    # (on-ramp type, errno name) for each failed accept(2): the role counts them
    accept_error: Callable[[str, str], None] | None = None
    udp_associations: Any = None  # socks5_udp.AssociationLimits, shared by SOCKS5 listeners
    # (certificate chain PEM, key PEM) of the role, for on-ramps that speak TLS
    tls: tuple[bytes, bytes] | None = None
    # ramp.policy.identities.ClientCredentials: the store's client identities, kept current by
    # the role; on-ramps that authenticate accept them (None: config users only)
    credentials: Any = None
    # the reason for each datagram an on-ramp dropped: the role counts them
    datagram_dropped: Callable[[str], None] | None = None
    # the edge's IP packets to and from connectors (ramp.tunnel.packets_edge.EdgePackets)
    packets: Any = None
    # the role's prometheus registry, for on-ramps with metrics of their own
    registry: Any = None
    # (on-ramp type, version, kind) for each PROXY protocol header a TCP on-ramp accepted
    proxy_header: Callable[[str, str, str], None] | None = None
    # the steering group and slot of a QUIC listener by name (ramp.net.reuseport), so its
    # connections stay with this process when a successor joins the port
    steering: Callable[[str], Any] | None = None


Builder = Callable[[OnRampContext, Any], OnRampServer]


@dataclass(frozen=True, slots=True)
class OnRampType:
    name: str
    options: type[OnRampOptions]
    build: Builder
    summary: str


_TYPES: dict[str, OnRampType] = {}
_discovered = False


def register(
    name: str, options: type[OnRampOptions], build: Builder, summary: str = ""
) -> OnRampType:
    spec = OnRampType(name, options, build, summary)
    _TYPES[name] = spec
    return spec


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    import ramp.onramps as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "registry":
            importlib.import_module(f"{package.__name__}.{info.name}")


def lookup(name: str) -> OnRampType:
    _discover()
    spec = _TYPES.get(name)
    if spec is None:
        raise KeyError(f"unknown on-ramp type {name!r} (known: {', '.join(known())})")
    return spec


def known() -> list[str]:
    _discover()
    return sorted(_TYPES)


def check_conflicts(entries: list[OnRampOptions]) -> None:
    """Raise ValueError naming the first two on-ramps that cannot run side by side."""
    for i, a in enumerate(entries):
        for b in entries[i + 1 :]:
            why = a.conflicts_with(b) or b.conflicts_with(a)
            if why:
                raise ValueError(why)


def parse_entry(entry: Any) -> OnRampOptions:
    """A config entry validated by its type's own options model."""
    if isinstance(entry, OnRampOptions):
        return entry
    if not isinstance(entry, dict):
        raise ValueError("an on-ramp entry is a mapping with at least 'type' and 'listen'")
    kind = entry.get("type")
    if not isinstance(kind, str):
        raise ValueError("an on-ramp entry needs a 'type'")
    try:
        spec = lookup(kind)
    except KeyError as e:
        raise ValueError(str(e.args[0])) from None
    return spec.options.model_validate(entry)
