"""Client identities on the edge: SOCKS5 and HTTP on-ramps accept them, revoking one ends its
flows, and the metrics and audit name them."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Iterator, Set
from pathlib import Path
from typing import Any

import pytest
from test_onramps import FakeOpener, http_exchange, read_eof, socks_open, status_of

from ramp.config import EdgeConfig
from ramp.edge import Edge
from ramp.flows.flow import Destination, Flow, FlowError, FlowResult, FlowState, Identity
from ramp.onramps.http_connect import HttpConnectServer
from ramp.onramps.registry import OnRampContext, OnRampOptions, lookup
from ramp.onramps.tcp_listener import TcpOnRamp
from ramp.policy.identities import ClientCredentials, bearer, secret_text
from ramp.store.db import Store
from ramp.testing.loopback import run_on_loop as run
from ramp.wire import socks5
from ramp.wire.socks5 import Method, Rep


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "data") as s:
        yield s


def _credentials(store: Store) -> ClientCredentials:
    clients = store.list_clients()
    return ClientCredentials(store.verify_client, any(c.status == "active" for c in clients))


@contextlib.asynccontextmanager
async def serving_with(
    kind: str, opener: FakeOpener, credentials: ClientCredentials, **config: Any
) -> AsyncIterator[TcpOnRamp]:
    """Built through the registry, as the edge builds it: the credentials come in the context."""
    ctx = OnRampContext(EdgeConfig(**config), opener, credentials=credentials)
    server = lookup(kind).build(ctx, OnRampOptions(type=kind, listen="127.0.0.1:0"))
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.close()


def _basic(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


CONNECT = b"CONNECT 192.0.2.1:443 HTTP/1.1\r\nHost: 192.0.2.1:443\r\n"


def test_socks5_client_identity_with_its_secret(store: Store) -> None:
    store.create_client("alice.phone")
    password = secret_text(store.client_secret("alice.phone")).encode()

    async def main() -> None:
        opener = FakeOpener()
        async with serving_with("socks5", opener, _credentials(store)) as server:
            _, writer, rep = await socks_open(
                server.port, "192.0.2.1", 22, auth=(b"alice.phone", password)
            )
            assert rep == Rep.SUCCEEDED
            writer.close()
            await opener.wait_finished()
        assert opener.finished[0].identity == Identity("alice.phone")

    run(main)


@pytest.mark.parametrize("users", [{}, {"bob": "pw"}], ids=["no-users", "with-users"])
def test_socks5_anonymous_is_refused_once_a_client_exists(store: Store, users: dict) -> None:
    store.create_client("alice")

    async def main() -> None:
        opener = FakeOpener()
        async with serving_with("socks5", opener, _credentials(store), users=users) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(socks5.build_greeting([Method.NO_AUTH]))
            assert await reader.readexactly(2) == b"\x05\xff"
            writer.close()
            await opener.wait_bad()
        assert opener.bad == [("socks5", "no_acceptable_method")]

    run(main)


@pytest.mark.parametrize("who", ["wrong-secret", "revoked", "unknown"])
def test_socks5_wrong_client_credentials_like_wrong_users(store: Store, who: str) -> None:
    store.create_client("alice")
    store.create_client("carol")
    good = secret_text(store.client_secret("alice")).encode()
    creds = {
        "wrong-secret": (b"alice", secret_text(b"\x00" * 32).encode()),
        "revoked": (b"carol", secret_text(store.client_secret("carol")).encode()),
        "unknown": (b"mallory", good),
    }[who]
    store.revoke_client("carol")

    async def main() -> None:
        opener = FakeOpener()
        async with serving_with("socks5", opener, _credentials(store)) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(socks5.build_greeting([Method.USERNAME_PASSWORD]))
            assert await reader.readexactly(2) == b"\x05\x02"
            writer.write(socks5.build_auth_request(*creds))
            assert await reader.readexactly(2) == b"\x01\x01"
            assert await read_eof(reader) == b""
            writer.close()
            await opener.wait_bad()
        assert opener.bad == [("socks5", "auth_failed")]
        assert opener.opened == []

    run(main)


def test_socks5_config_users_still_work_beside_clients(store: Store) -> None:
    store.create_client("alice")

    async def main() -> None:
        opener = FakeOpener()
        async with serving_with(
            "socks5", opener, _credentials(store), users={"bob": "pw"}
        ) as server:
            _, writer, rep = await socks_open(server.port, "192.0.2.1", 22, auth=(b"bob", b"pw"))
            assert rep == Rep.SUCCEEDED
            writer.close()
            await opener.wait_finished()
        assert opener.finished[0].user == "bob"

    run(main)


def test_only_revoked_clients_leave_anonymous_access_as_configured(store: Store) -> None:
    store.create_client("alice")
    store.revoke_client("alice")

    async def main() -> None:
        opener = FakeOpener()
        async with serving_with("socks5", opener, _credentials(store)) as server:
            _, writer, rep = await socks_open(server.port, "192.0.2.1", 22)
            assert rep == Rep.SUCCEEDED
            writer.close()
            await opener.wait_finished()
        assert opener.finished[0].user is None

    run(main)


def test_http_client_identity_basic_and_bearer(store: Store) -> None:
    store.create_client("alice.laptop")
    secret = store.client_secret("alice.laptop")

    async def main() -> None:
        opener = FakeOpener()
        async with serving_with("http", opener, _credentials(store)) as server:
            assert isinstance(server, HttpConnectServer)
            head, _, writer = await http_exchange(server.port, CONNECT + b"\r\n")
            assert status_of(head) == 407
            assert b'Proxy-Authenticate: Basic realm="ramp"' in head
            writer.close()
            assert opener.bad == []

            for value in (
                _basic("alice.laptop", secret_text(secret)),
                b"Bearer " + bearer("alice.laptop", secret).encode(),
            ):
                req = CONNECT + b"Proxy-Authorization: " + value + b"\r\n\r\n"
                head, _, writer = await http_exchange(server.port, req)
                assert status_of(head) == 200, value
                writer.close()
            await opener.wait_finished(2)
        assert [f.user for f in opener.finished] == ["alice.laptop", "alice.laptop"]

    run(main)


@pytest.mark.parametrize(
    "value",
    [
        b"Bearer alice." + secret_text(b"\x00" * 32).encode(),
        b"Bearer " + b"x" * 50,
        b"Bearer",
        _basic("alice", secret_text(b"\x00" * 32)),
    ],
)
def test_http_wrong_client_credentials_like_wrong_users(store: Store, value: bytes) -> None:
    store.create_client("alice")

    async def main() -> None:
        opener = FakeOpener()
        async with serving_with("http", opener, _credentials(store)) as server:
            req = CONNECT + b"Proxy-Authorization: " + value + b"\r\n\r\n"
            head, _, writer = await http_exchange(server.port, req)
            assert status_of(head) == 407
            writer.close()
            await opener.wait_bad()
        assert opener.bad == [("http", "auth_failed")]
        assert opener.opened == []

    run(main)


# -- the edge: revocation, metrics, audit ---------------------------------------------------------


@pytest.fixture
def edge(tmp_path: Path) -> Iterator[Edge]:
    e = Edge(EdgeConfig(data_dir=tmp_path / "edge", audit_log=str(tmp_path / "audit.log")))
    try:
        yield e
    finally:
        e.audit.close()
        e.store.close()


def _open_flow(edge: Edge, user: str, stopped: list[tuple[int, FlowResult, str]]) -> Flow:
    flow = Flow(
        onramp="socks5",
        source=("192.0.2.9", 40000),
        destination=Destination("198.51.100.1", 80),
        identity=Identity(user),
    )
    edge.table.admit(flow)
    flow.advance(FlowState.ESTABLISHED)

    def stop(result: FlowResult, reason: str) -> None:
        flow.fail(result, reason)
        stopped.append((flow.id, result, reason))
        edge.flow_finished(flow)

    flow.stop = stop
    return flow


def test_revoking_a_client_ends_its_flows_and_tells_the_callbacks(edge: Edge) -> None:
    edge.store.create_client("alice")
    edge.store.create_client("bob")
    edge.reload_store()
    assert edge.credentials.active and edge.revoked_clients == frozenset()
    told: list[Set[str]] = []
    edge.on_revoked(told.append)
    stopped: list[tuple[int, FlowResult, str]] = []
    alice, bob = _open_flow(edge, "alice", stopped), _open_flow(edge, "bob", stopped)

    edge.store.revoke_client("alice")
    edge.reload_store()
    assert stopped == [(alice.id, FlowResult.NOT_PERMITTED, "client alice revoked")]
    assert told == [{"alice"}]
    assert edge.revoked_clients == {"alice"}
    assert alice not in edge.table and bob in edge.table
    value = edge.metrics.registry.get_sample_value
    assert value("ramp_client_flows_revoked_total") == 1
    assert value("ramp_client_flows_total", {"client": "alice", "result": "not_permitted"}) == 1

    edge.store.create_client("carol")  # another change: alice's revocation is not news again
    edge.reload_store()
    assert told == [{"alice"}] and len(stopped) == 1
    edge.store.revoke_client("bob")
    edge.store.revoke_client("carol")
    edge.reload_store()
    assert told == [{"alice"}, {"bob", "carol"}]
    assert not edge.credentials.active


def test_revocations_before_the_edge_started_end_nothing_and_are_refused(edge: Edge) -> None:
    edge.store.create_client("alice")
    edge.store.revoke_client("alice")
    told: list[Set[str]] = []
    edge.on_revoked(told.append)
    edge.reload_store()
    assert told == [] and edge.revoked_clients == {"alice"}
    assert "alice" in edge.pipeline.revoked  # a flow still opening under that name is refused


def test_a_revoked_client_flow_still_opening_is_refused(edge: Edge) -> None:
    edge.store.create_client("alice")
    edge.reload_store()
    edge.store.revoke_client("alice")
    edge.reload_store()
    flow = Flow(
        onramp="socks5",
        source=("192.0.2.9", 40000),
        destination=Destination("198.51.100.1", 80),
        identity=Identity("alice"),
    )

    async def main() -> None:
        with pytest.raises(FlowError, match="client alice revoked") as info:
            await edge.open_tcp(flow)
        assert info.value.result is FlowResult.NOT_PERMITTED

    asyncio.run(main())


def test_client_flows_are_counted_by_client_and_audited(edge: Edge, tmp_path: Path) -> None:
    edge.store.create_client("alice")
    edge.reload_store()
    for user in ("alice", "bob-config-user", None):
        flow = Flow(
            onramp="http",
            source=("192.0.2.9", 40000),
            destination=Destination("198.51.100.1", 80),
            identity=Identity(user) if user else None,
        )
        flow.result = FlowResult.OK
        edge.flow_finished(flow)
    value = edge.metrics.registry.get_sample_value
    assert value("ramp_client_flows_total", {"client": "alice", "result": "ok"}) == 1
    labels = {
        s.labels["client"]
        for m in edge.metrics.registry.collect()
        if m.name == "ramp_client_flows"
        for s in m.samples
    }
    assert labels == {"alice"}  # only store clients become label values
    edge.audit.close()
    records = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert [r["identity"] for r in records] == ["alice", "bob-config-user", None]
