"""Guard the HTTP proxy on-ramp: answer a health URL itself, keep CONNECT to safe ports.

A `connect_request` hook sees each HTTP proxy request (CONNECT or an absolute-form GET, ...)
before a flow is opened for it. This one:

- answers `GET <health_url>` itself with `200 ok`, so a load balancer or monitoring can check
  the whole proxy path (listener, authentication) without any origin behind it;
- refuses requests to `blocked_ports` (by default the SMTP ports 25, 465 and 587: a proxy
  must not become a spam relay);
- with `connect_ports`, allows CONNECT only to those ports (Squid's classic `SSL_ports`
  rule: tunnels for TLS, not arbitrary TCP through an HTTP proxy). Plain HTTP requests
  (absolute-form) are not affected by it.

Configure it in the edge's YAML:

    hooks:
      - path: examples/hooks/http_guard.py
        options:
          health_url: http://edge.internal/health   # default; null turns it off
          blocked_ports: [25, 465, 587]              # default
          connect_ports: [443, 8443]                 # optional; default: any port

`connect_request` hooks run only for the HTTP on-ramp, after proxy authentication and
before the built-in policy: the health answer needs valid proxy credentials when users are
configured, but no policy rule. SOCKS5 flows never reach this hook; to block a port for
every on-ramp, use a policy rule.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from ramp.flows.flow import Flow
from ramp.policy.hooks import Deny, ProxyRequest, Reply

_health: tuple[str, str] | None = None  # (host, path) of the health URL
_blocked: frozenset[int] = frozenset()
_connect_ports: frozenset[int] | None = None


def _ports(value: Any, what: str) -> frozenset[int]:
    if not isinstance(value, list | tuple) or not all(
        isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in value
    ):
        raise ValueError(f"{what} must be a list of port numbers (1-65535)")
    return frozenset(value)


def _health_target(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"health_url must be an http:// URL, not {url!r}")
    return parts.hostname.lower(), parts.path or "/"


def setup(options: dict[str, Any]) -> None:
    global _health, _blocked, _connect_ports
    unknown = set(options) - {"health_url", "blocked_ports", "connect_ports"}
    if unknown:
        raise ValueError(f"unknown options: {', '.join(sorted(unknown))}")
    url = options.get("health_url", "http://edge.internal/health")
    _health = _health_target(str(url)) if url else None
    _blocked = _ports(options.get("blocked_ports", [25, 465, 587]), "blocked_ports")
    connect = options.get("connect_ports")
    _connect_ports = _ports(connect, "connect_ports") if connect is not None else None


def _is_health(request: ProxyRequest) -> bool:
    if _health is None or request.method != "GET":
        return False
    try:
        parts = urlsplit(request.target)
        host = (parts.hostname or "").lower()
    except ValueError:  # the on-ramp parsed it already; a strange port is not a health check
        return False
    return parts.scheme == "http" and (host, parts.path or "/") == _health


def connect_request(flow: Flow, request: ProxyRequest) -> Reply | Deny | None:
    if _is_health(request):
        return Reply(200, "ok", (("Cache-Control", "no-store"),))
    port = flow.destination.port
    if port in _blocked:
        return Deny(f"port {port} is blocked on this proxy")
    if request.method == "CONNECT" and _connect_ports is not None and port not in _connect_ports:
        allowed = ", ".join(str(p) for p in sorted(_connect_ports))
        return Deny(f"CONNECT to port {port} is not allowed (only to {allowed})")
    return None
