"""How a flow's failure reads over HTTP (CONNECT over HTTP/1.1 and HTTP/3, connect-udp): a
status code, a few words, and an RFC 9209 Proxy-Status error type; and back again, for a
client whose flows go through an HTTP proxy.
"""

from __future__ import annotations

import re

from ramp.flows.flow import FlowResult

# (status, words for the body, RFC 9209 Proxy-Status error type)
FAILURES: dict[FlowResult, tuple[int, str, str]] = {
    FlowResult.NOT_PERMITTED: (403, "not permitted by policy", "http_request_denied"),
    FlowResult.NET_UNREACHABLE: (502, "network unreachable", "destination_ip_unroutable"),
    FlowResult.HOST_UNREACHABLE: (502, "host unreachable", "destination_unavailable"),
    FlowResult.REFUSED: (502, "connection refused", "connection_refused"),
    FlowResult.TIMEOUT: (504, "connection timed out", "connection_timeout"),
    FlowResult.ERROR: (502, "proxy error", "proxy_internal_error"),
    FlowResult.RESET: (502, "connection reset", "connection_terminated"),
    FlowResult.BAD_DESTINATION: (400, "not a valid host name", "destination_not_found"),
    FlowResult.BUSY: (503, "too many flows", "connection_limit_reached"),
}

_RESULT_OF_ERROR = {error: result for result, (_, _, error) in FAILURES.items()}
_RESULT_OF_ERROR.update(
    {
        "destination_ip_prohibited": FlowResult.NOT_PERMITTED,
        "dns_error": FlowResult.HOST_UNREACHABLE,
        "dns_timeout": FlowResult.HOST_UNREACHABLE,
        "connection_read_timeout": FlowResult.TIMEOUT,
        "connection_write_timeout": FlowResult.TIMEOUT,
    }
)
_ERROR_RE = re.compile(r";\s*error=([A-Za-z0-9_]+)")


def failure(result: FlowResult) -> tuple[int, str, str]:
    return FAILURES.get(result, FAILURES[FlowResult.ERROR])


def proxy_status(error: str, details: str = "") -> str:
    """A Proxy-Status field value naming this proxy ("ramp")."""
    if details:
        quoted = details.replace("\\", "\\\\").replace('"', '\\"')
        return f'ramp; error={error}; details="{quoted}"'
    return f"ramp; error={error}"


def result_of(status: int, proxy_status_value: str | None) -> FlowResult:
    """What a proxy's refusal means for the flow: by its Proxy-Status error type when it
    names one we know, else by the status code."""
    if proxy_status_value:
        found = _ERROR_RE.search(proxy_status_value)
        if found is not None and found.group(1) in _RESULT_OF_ERROR:
            return _RESULT_OF_ERROR[found.group(1)]
    if status in (403, 407):
        return FlowResult.NOT_PERMITTED
    if status == 503:
        return FlowResult.BUSY
    if status == 504:
        return FlowResult.TIMEOUT
    if status == 400:
        return FlowResult.BAD_DESTINATION
    return FlowResult.ERROR
