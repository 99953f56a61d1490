"""UDP sessions through the tunnel, edge and connector in one process on loopback."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from ramp.flows.flow import Destination, Flow, FlowError
from ramp.policy.rules import Rule
from ramp.store.db import Store
from ramp.testing.loopback import run, tunnel, udp_echo_origin
from ramp.testing.wait import DEADLINE, until
from ramp.tunnel.resolver import Resolver
from ramp.tunnel.sessions_connector import ConnectorSessions
from ramp.wire.tunnel import (
    SessionRefused,
    SessionRegister,
    SessionRegistered,
    encode_session_control,
    parse_datagram,
    payload_prefix,
)


def udp_flow(port: int) -> Flow:
    return Flow(
        onramp="test",
        source=("127.0.0.1", 1),
        destination=Destination("127.0.0.1", port),
        protocol="udp",
    )


async def open_session(edge, port: int):  # type: ignore[no-untyped-def]
    got: asyncio.Queue[bytes] = asyncio.Queue()
    closed: list[str] = []
    session = await edge.open_udp(udp_flow(port), got.put_nowait, closed.append)
    return session, got, closed


def test_echo_small_and_large_datagrams(tmp_path: Path) -> None:
    """Sizes up to 65,507 bytes arrive intact: big ones take the stream fallback."""

    async def main() -> None:
        transport, port = await udp_echo_origin()
        async with tunnel(tmp_path) as t:
            session, got, _ = await open_session(t.edge, port)
            sizes = [1, 2, 100, 1000, 1150, 1200, 1400, 1472, 1500, 4000, 9000, 30000, 65507]
            for size in sizes:
                payload = os.urandom(size)
                session.send(payload)
                assert await asyncio.wait_for(got.get(), 5) == payload, size
            # a burst, in order of arrival not guaranteed: compare as sets
            burst = {os.urandom(64) for _ in range(500)}
            for p in burst:
                session.send(p)
            back = {await asyncio.wait_for(got.get(), 5) for _ in range(len(burst))}
            assert back == burst
            session.close()
        transport.close()

    run(main())


def test_idle_timeout_closes_both_sides_and_reopens(tmp_path: Path) -> None:
    async def main() -> None:
        transport, port = await udp_echo_origin()
        async with tunnel(tmp_path, udp_idle_timeout=1.0) as t:
            t.connector.client.sessions.idle_timeout = 1.0  # type: ignore[union-attr]
            session, got, closed = await open_session(t.edge, port)
            session.send(b"x")
            assert await asyncio.wait_for(got.get(), 5) == b"x"
            await until(lambda: closed, what="the edge's idle timeout")
            assert "idle" in closed[0]
            assert not t.edge.sessions.sessions  # type: ignore[union-attr]
            await until(
                lambda: not t.connector.client.sessions.sessions,  # type: ignore[union-attr]
                what="the connector to close its side",
            )
            session2, got2, _ = await open_session(t.edge, port)
            session2.send(b"again")
            assert await asyncio.wait_for(got2.get(), 5) == b"again"
        transport.close()

    run(main())


def test_session_moves_when_its_connection_dies(tmp_path: Path) -> None:
    async def main() -> None:
        transport, port = await udp_echo_origin()
        async with tunnel(tmp_path, ha=2) as t:
            session, got, closed = await open_session(t.edge, port)
            session.send(b"one")
            assert await asyncio.wait_for(got.get(), 5) == b"one"
            conn = session.conn
            conn.quic.close(error_code=0, reason_phrase="test kill")
            conn.transmit()
            # datagrams sent while the session moves may be lost: repeat until one is echoed
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DEADLINE
            while True:
                session.send(b"two")
                try:
                    assert await asyncio.wait_for(got.get(), 0.5) == b"two"
                    break
                except TimeoutError:
                    assert loop.time() < deadline, "session did not move"
            assert session.conn is not conn
            assert not closed
        transport.close()

    run(main())


def test_session_moves_off_a_draining_connection_without_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connector restart: the old connection drains; the session registers on another
    connection while datagrams still take the old path, then switches; nothing is lost."""
    from ramp.tunnel import sessions_edge

    monkeypatch.setattr(sessions_edge, "MOVE_LINGER", 0.2)

    async def main() -> None:
        transport, port = await udp_echo_origin()
        async with tunnel(tmp_path, ha=2) as t:
            session, got, closed = await open_session(t.edge, port)
            session.send(b"first")
            assert await asyncio.wait_for(got.get(), 5) == b"first"
            old = session.conn
            old.draining = True  # what an UNREGISTER from the connector does, then:
            t.edge.sessions.connection_draining(old)  # type: ignore[union-attr]
            sent = [f"{i}".encode() for i in range(200)]
            for payload in sent:
                session.send(payload)
                await asyncio.sleep(0.002)
            back = {await asyncio.wait_for(got.get(), 5) for _ in sent}
            assert back == set(sent)  # every one echoed, across the switch
            await until(lambda: session.conn is not old, what="the session to move")
            await until(lambda: session.id not in old.sessions, what="its old path to close")
            assert t.edge.metrics.registry.get_sample_value("ramp_udp_sessions_moved_total") == 1
            session.send(b"after")
            assert await asyncio.wait_for(got.get(), 5) == b"after"
            assert not closed
        transport.close()

    run(main())


def test_unrouted_udp_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with tunnel(tmp_path) as t:
            flow = Flow(
                onramp="test",
                source=("127.0.0.1", 1),
                destination=Destination("192.0.2.1", 53),
                protocol="udp",
            )
            with pytest.raises(FlowError) as e:
                await t.edge.open_udp(flow, lambda d: None, lambda r: None)
            assert e.value.result.value == "not_permitted"

    run(main())


class FakeConn:
    def __init__(self) -> None:
        self.edge_id = "edge-a"
        self.closed = False
        self.sent: list[bytes] = []

    def send_datagram(self, data: bytes) -> bool:
        self.sent.append(data)
        return True


def test_connector_answers_repeats_once_and_enforces_its_limit() -> None:
    async def main() -> None:
        transport, port = await udp_echo_origin()
        ends = []
        drops: list[str] = []
        bad: list[str] = []
        sessions = ConnectorSessions(
            resolver=Resolver("127.0.0.1:1"),
            limit=1,
            idle_timeout=30,
            on_end=ends.append,
            metrics_datagram=lambda d, n: None,
            metrics_drop=drops.append,
            metrics_active=lambda n: None,
            bad_input=bad.append,
        )
        conn = FakeConn()
        reg = encode_session_control(SessionRegister(7, 1, "127.0.0.1", port, 0))
        sessions.datagram(conn, reg)  # type: ignore[arg-type]
        await until(lambda: conn.sent, what="the registration to be answered")
        sessions.datagram(conn, reg)  # a repeat: answered again, not doubled
        assert len(sessions.sessions) == 1
        answers = [parse_datagram(d) for d in conn.sent]
        assert answers == [SessionRegistered(7), SessionRegistered(7)]
        # over the limit
        sessions.datagram(conn, encode_session_control(SessionRegister(8, 2, "127.0.0.1", port, 0)))  # type: ignore[arg-type]
        refused = parse_datagram(conn.sent[-1])
        assert isinstance(refused, SessionRefused) and refused.code.name == "TOO_MANY_SESSIONS"
        assert "too_many_sessions" in drops
        # payload round trip through the origin socket
        conn.sent.clear()
        sessions.datagram(conn, payload_prefix(7) + b"ping")  # type: ignore[arg-type]
        await until(lambda: conn.sent, what="the echo from the origin")
        assert parse_datagram(conn.sent[0]) == (7, b"ping")
        # garbage and unknown sessions are counted, not fatal
        sessions.datagram(conn, b"\x07\x01")  # type: ignore[arg-type]
        sessions.datagram(conn, payload_prefix(99) + b"x")  # type: ignore[arg-type]
        assert bad and "unknown_session" in drops
        sessions.close()
        assert len(ends) == 1
        transport.close()

    run(main())


def test_direct_udp_egress(tmp_path: Path) -> None:
    """With direct egress on, a destination outside every route is reached by the edge."""

    async def main() -> None:
        transport, port = await udp_echo_origin()
        async with tunnel(tmp_path, allow_direct_egress=True) as t:
            with Store(tmp_path) as store:
                store.delete_route("127.0.0.0/8")
                # the origin is on loopback: direct egress reaches it only when a rule says so
                store.add_rule(Rule("loopback-origins", "allow", to="127.0.0.0/8"), 1)
            t.edge.reload_store()
            session, got, _ = await open_session(t.edge, port)
            assert str(session.flow.route) == "direct"
            session.send(b"direct")
            assert await asyncio.wait_for(got.get(), 5) == b"direct"
            session.close()
            assert '"tunnel":"direct"' in (tmp_path / "audit.log").read_text()
        transport.close()

    run(main())


def test_malformed_and_unknown_datagrams_at_the_edge_are_counted(tmp_path: Path) -> None:
    async def main() -> None:
        transport, port = await udp_echo_origin()
        async with tunnel(tmp_path, ha=1) as t:
            session, got, _ = await open_session(t.edge, port)
            conn = next(iter(t.connector.client.live))
            conn.send_datagram(b"\x3f")  # a kind with no session id
            conn.send_datagram(b"\x09\x01junk")  # unknown kind
            conn.send_datagram(payload_prefix(424242) + b"nobody")  # unknown session

            def counts() -> tuple[float | None, float | None]:
                registry = t.edge.metrics.registry
                return (
                    registry.get_sample_value(
                        "ramp_bad_input_total", {"onramp": "tunnel", "reason": "malformed_datagram"}
                    ),
                    registry.get_sample_value(
                        "ramp_udp_drops_total", {"reason": "unknown_session"}
                    ),
                )

            await until(lambda: sum(c or 0 for c in counts()) >= 3, what="three counted datagrams")
            assert counts() == (2, 1)
            session.send(b"still fine")
            assert await asyncio.wait_for(got.get(), 5) == b"still fine"
        transport.close()

    run(main())
