"""Proxy credentials: with `--user NAME:PASSWORD` the edge serves only clients that give them."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest

from ramp.testing.clients import REP_SUCCEEDED, ProxyError, http_connect, socks5_connect
from ramp.testing.lab import HTTP_PORT, ORIGIN, Lab, Payload

USER, PASSWORD = "alice", "correct horse"


@pytest.fixture(scope="module")
def auth_lab(
    tmp_path_factory: pytest.TempPathFactory,
    payload: Payload,
    lab_opener: Callable[..., AbstractContextManager[Lab]],
) -> Iterator[Lab]:
    with lab_opener(
        tmp_path_factory.mktemp("lab"),
        payload,
        standard=True,
        edge_args=["--user", f"{USER}:{PASSWORD}"],
    ) as lab:
        yield lab


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_socks5_with_the_right_password(auth_lab: Lab, payload: Payload) -> None:
    with auth_lab.connect_socks() as sock:
        rep = socks5_connect(sock, ORIGIN, HTTP_PORT, user=USER, password=PASSWORD)
        assert rep == REP_SUCCEEDED
    got = auth_lab.curl_digest(
        "--proxy-user",
        f"{USER}:{PASSWORD}",
        *auth_lab.proxy_args("socks5"),
        f"http://{ORIGIN}/{payload.small.name}",
        timeout=20,
    )
    assert got.returncode == 0, got.stderr
    assert got.sha256 == payload.small.sha256


@pytest.mark.parametrize("user", [None, USER], ids=["no-credentials", "wrong-password"])
def test_socks5_without_the_right_password_is_refused(auth_lab: Lab, user: str | None) -> None:
    with auth_lab.connect_socks() as sock, pytest.raises(ProxyError):
        socks5_connect(sock, ORIGIN, HTTP_PORT, user=user, password="wrong")


@pytest.mark.parametrize(
    ("auth", "expected"),
    [(None, 407), (_basic(USER, "wrong"), 407), (_basic(USER, PASSWORD), 200)],
    ids=["no-credentials", "wrong-password", "right-password"],
)
def test_http_connect_needs_proxy_authorization(
    auth_lab: Lab, auth: str | None, expected: int
) -> None:
    with auth_lab.connect_http_proxy() as sock:
        status, _ = http_connect(sock, ORIGIN, HTTP_PORT, auth=auth)
    assert status == expected


def test_curl_through_http_proxy_with_credentials(auth_lab: Lab, payload: Payload) -> None:
    for via in ("connect", "forward"):
        got = auth_lab.curl_digest(
            "--proxy-user",
            f"{USER}:{PASSWORD}",
            *auth_lab.proxy_args(via),
            f"http://{ORIGIN}/{payload.small.name}",
            timeout=20,
        )
        assert got.returncode == 0, (via, got.stderr)
        assert got.sha256 == payload.small.sha256
