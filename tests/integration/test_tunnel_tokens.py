"""A connector with a bad token stops and says why; the edge counts what reached it.

Exit codes: 2 when the token itself is unusable (checked before dialling anything), 3 when
the edge rejects the registration for good.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import time
import uuid
from collections.abc import Callable

import pytest

from ramp.testing.lab import HTTP_PORT, ORIGIN, Lab, wait_until
from ramp.testing.wait import DEADLINE
from ramp.tunnel.token import Token


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def garbage(lab: Lab) -> str:
    return "this is not a ramp token"


def tampered(lab: Lab) -> str:
    """One character of the secret changed, as a bad copy-paste would; checksum left alone."""
    fields = json.loads(_b64decode(lab.tokens["corp"]))
    secret = fields["s"]
    fields["s"] = secret[:5] + ("A" if secret[5] != "A" else "B") + secret[6:]
    return _b64encode(json.dumps(fields, separators=(",", ":")).encode())


def truncated(lab: Lab) -> str:
    return lab.tokens["corp"][:-10]


def unknown_tunnel(lab: Lab) -> str:
    token = Token.decode(lab.tokens["corp"])
    return dataclasses.replace(token, tunnel_id=str(uuid.uuid4())).encode()


def wrong_secret(lab: Lab) -> str:
    """Well formed, checksum right, for a real tunnel: only the secret is wrong."""
    token = Token.decode(lab.tokens["corp"])
    return dataclasses.replace(token, secret=os.urandom(len(token.secret))).encode()


def deleted_tunnel(lab: Lab) -> str:
    name = f"gone-{time.monotonic_ns()}"
    token = lab.create_tunnel(name)
    lab.delete_tunnel(name)
    # no wait: the edge reads a tunnel's status from the store when a connector registers
    return token


@pytest.mark.parametrize(
    ("make_token", "exit_code", "words", "reason"),
    [
        (garbage, 2, ["token", "not"], None),
        (tampered, 2, ["checksum"], None),
        (truncated, 2, ["truncated"], None),
        (unknown_tunnel, 3, ["unknown"], "unknown_tunnel"),
        (deleted_tunnel, 3, ["deleted"], "tunnel_deleted"),
        (wrong_secret, 3, ["secret"], "bad_proof"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_connector_with_a_bad_token_exits_and_says_why(
    shared_lab: Lab,
    make_token: Callable[[Lab], str],
    exit_code: int,
    words: list[str],
    reason: str | None,
) -> None:
    lab = shared_lab
    token = make_token(lab)
    before = lab.edge_metrics()
    edge_log_before = len(lab.edge.stderr()) if lab.edge else 0

    connector = lab.start_connector(token, wait=False)
    assert connector.wait_exit(20) == exit_code
    message = connector.stderr().lower()
    for word in words:
        assert word in message, connector.stderr()
    assert "traceback" not in message

    if reason is not None:

        def counted() -> bool:
            after = lab.edge_metrics()
            return after.value(
                "ramp_tunnel_registration_failures_total", reason=reason
            ) > before.value("ramp_tunnel_registration_failures_total", reason=reason)

        wait_until(counted, DEADLINE, what=f"the edge to count a {reason} registration failure")
        assert lab.edge is not None
        new_log = lab.edge.stderr()[edge_log_before:].lower()
        assert reason in new_log or words[0] in new_log, new_log[-2000:]

    # The real connector never noticed.
    code, sock = lab.socks5(ORIGIN, HTTP_PORT)
    sock.close()
    assert code == 0
