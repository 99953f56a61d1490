from __future__ import annotations

import asyncio
import functools
import json
import stat
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from ramp.flows.flow import Decision, Destination, Flow, FlowResult, Identity, Route
from ramp.observe.audit import AuditLog, flow_record
from ramp.observe.status import StatusServer, start_status_server
from ramp.testing.wait import until


def aio(f: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a fresh event loop (no pytest plugin needed)."""

    @functools.wraps(f)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(f(*args, **kwargs), 30))

    return run


class Ready:
    def __init__(self) -> None:
        self.state: tuple[bool, dict[str, Any]] = (False, {"connections": 0})

    def __call__(self) -> tuple[bool, dict[str, Any]]:
        return self.state


async def _request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


def _get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n".encode()


async def _server(ready: Ready | None = None) -> tuple[StatusServer, CollectorRegistry]:
    registry = CollectorRegistry()
    c = Counter("ramp_test_flows", "Flows.", ["result"], registry=registry)
    c.labels("ok").inc(3)
    server = await start_status_server("127.0.0.1:0", registry, ready or Ready())
    assert server is not None and server.port > 0
    return server, registry


@aio
async def test_off_serves_nothing() -> None:
    assert await start_status_server("off", CollectorRegistry(), Ready()) is None


@aio
async def test_metrics() -> None:
    server, _ = await _server()
    try:
        status, headers, body = await _request(server.port, _get("/metrics"))
        assert status == 200
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        assert b'ramp_test_flows_total{result="ok"} 3.0' in body
        assert int(headers["content-length"]) == len(body)
        # Scrapers that ask for OpenMetrics get it.
        status, headers, body = await _request(
            server.port, _get("/metrics?x=1", "Accept: application/openmetrics-text\r\n")
        )
        assert status == 200
        assert headers["content-type"].startswith("application/openmetrics-text")
        assert body.rstrip().endswith(b"# EOF")
    finally:
        await server.close()


@aio
async def test_ready_follows_callback() -> None:
    ready = Ready()
    server, _ = await _server(ready)
    try:
        status, headers, body = await _request(server.port, _get("/ready"))
        assert status == 503
        assert headers["content-type"] == "application/json"
        assert json.loads(body) == {"ready": False, "connections": 0}
        ready.state = (True, {"connections": 4})
        status, _, body = await _request(server.port, _get("/ready"))
        assert status == 200
        assert json.loads(body) == {"ready": True, "connections": 4}
    finally:
        await server.close()


@aio
async def test_ready_callback_that_raises_is_503() -> None:
    def broken() -> tuple[bool, dict[str, Any]]:
        raise RuntimeError("boom")

    server = await start_status_server("127.0.0.1:0", CollectorRegistry(), broken)
    assert server is not None
    try:
        status, _, body = await _request(server.port, _get("/ready"))
        assert status == 503
        assert json.loads(body)["ready"] is False
        assert "boom" in json.loads(body)["error"]
    finally:
        await server.close()


@aio
async def test_not_found_method_and_head() -> None:
    server, _ = await _server()
    try:
        assert (await _request(server.port, _get("/nope")))[0] == 404
        post = (
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        assert (await _request(server.port, post))[0] == 405
        head = b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        status, headers, body = await _request(server.port, head)
        assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    finally:
        await server.close()


@aio
async def test_keep_alive_serves_several_requests() -> None:
    server, _ = await _server()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n" + _get("/metrics"))
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert data.count(b"HTTP/1.1 ") == 2
        assert b"ramp_test_flows_total" in data
    finally:
        await server.close()


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b"\x16\x03\x01\x00\xa5garbage\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
        (b"GET /ready HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"a" * 5000, 413),
    ],
    ids=["tls-hello", "huge-header", "huge-body"],
)
@aio
async def test_bad_requests_get_an_error_and_server_keeps_serving(
    raw: bytes, expected: int
) -> None:
    server, _ = await _server()
    try:
        status, _, _ = await _request(server.port, raw)
        assert status == expected
        assert (await _request(server.port, _get("/metrics")))[0] == 200
    finally:
        await server.close()


@aio
async def test_silent_client_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ramp.observe.status.REQUEST_TIMEOUT_S", 0.2)
    server, _ = await _server()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metr")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        await server.close()


@aio
async def test_close_drops_open_connections() -> None:
    server, _ = await _server()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /metr")
    # the connection is being served (half a request read) when the server closes
    await until(lambda: server._conns, what="the server to accept the connection")
    await asyncio.wait_for(server.close(), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", server.port)


# -- audit log --------------------------------------------------------------------------------


def _flow() -> Flow:
    f = Flow(
        onramp="socks5",
        source=("2001:db8::5", 40000),
        destination=Destination("web.internal", 443),
        identity=Identity("alice", frozenset({"staff"})),
        id=42,
    )
    f.started_wall = 1700000000.25
    f.resolved = "198.51.100.7"
    f.route = Route("tunnel", "default", "t-1", "office", "198.51.100.0/24")
    f.decision = Decision(True, "default")
    f.result = FlowResult.REFUSED
    f.reason = "origin refused"
    f.bytes_up, f.bytes_down = 12, 3456
    f.ended = f.started + 1.23456
    return f


def test_audit_line_fields() -> None:
    assert flow_record(_flow()) == {
        "time": "2023-11-14T22:13:20.250Z",
        "flow": 42,
        "kind": "stream",
        "protocol": "tcp",
        "identity": "alice",
        "onramp": "socks5",
        "source": "[2001:db8::5]:40000",
        "destination": "web.internal:443",
        "resolved": "198.51.100.7",
        "vnet": "default",
        "offramp": "tunnel",
        "tunnel": "office",
        "rule": "default",
        "bytes_up": 12,
        "bytes_down": 3456,
        "duration": 1.235,
        "result": "refused",
        "reason": "origin refused",
    }


def test_audit_file_appends_one_private_line_per_flow(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_text('{"old":1}\n')
    path.chmod(0o644)
    log = AuditLog(path)
    log.write(_flow())
    # Line-buffered: the line is there before close.
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["identity"] == "alice"
    log.write(_flow())
    log.close()
    log.write(_flow())  # after close: dropped, no crash
    assert len(path.read_text().splitlines()) == 3

    fresh = tmp_path / "new.log"
    AuditLog(str(fresh)).close()
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600


def _records(path: Path) -> list[int]:
    """The flow ids in an audit file; every line must be a whole JSON record."""
    return [json.loads(line)["flow"] for line in path.read_text().splitlines()]


def test_audit_file_rotates_by_size_keeping_the_backups(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    line_size = len(json.dumps(flow_record(_flow()), separators=(",", ":"))) + 1
    log = AuditLog(path, max_bytes=3 * line_size, backups=2)
    for i in range(10):
        record = flow_record(_flow())
        record["flow"] = i
        log.write_record(record)
    log.close()
    # Three lines a file, the newest in FILE; the two before it kept, older ones gone.
    assert _records(path) == [9]
    assert _records(tmp_path / "audit.log.1") == [6, 7, 8]
    assert _records(tmp_path / "audit.log.2") == [3, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.log", "audit.log.1", "audit.log.2"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    # A line bigger than the limit is still written, alone in its file.
    big = AuditLog(tmp_path / "big.log", max_bytes=10, backups=1)
    big.write(_flow())
    big.write(_flow())
    big.close()
    assert _records(tmp_path / "big.log") == [42]
    assert _records(tmp_path / "big.log.1") == [42]


def test_audit_file_size_counts_what_is_there_and_zero_never_rotates(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_text("x" * 100 + "\n")
    log = AuditLog(path, max_bytes=150, backups=1)
    log.write(_flow())  # 101 bytes there already: this line goes to a new file
    log.close()
    assert (tmp_path / "audit.log.1").read_text() == "x" * 100 + "\n"
    assert _records(path) == [42]

    never = AuditLog(tmp_path / "n.log", max_bytes=0)
    for _ in range(50):
        never.write(_flow())
    never.close()
    assert len(_records(tmp_path / "n.log")) == 50
    assert not (tmp_path / "n.log.1").exists()


def test_audit_reopen_follows_an_outside_rotation(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.write(_flow())
    path.rename(tmp_path / "audit.log.0")  # what logrotate does before its SIGHUP
    log.write(_flow())  # still the open file
    log.reopen()
    log.write(_flow())
    log.close()
    assert len(_records(tmp_path / "audit.log.0")) == 2
    assert _records(path) == [42]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_audit_write_errors_never_raise_and_are_said_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("ramp.observe.audit._RETRY_OPEN_S", 0.0)
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=1, backups=1)
    log.write(_flow())

    def no_rename(*_: object) -> None:
        raise PermissionError(13, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr("ramp.observe.audit.os.replace", no_rename)
        log.write(_flow())
        log.write(_flow())
    assert _records(path) == [42] * 3  # rotation failed: lines kept in the file there is
    assert [r.getMessage() for r in caplog.records if "cannot rotate" in r.getMessage()] == [
        f"audit log {path}: cannot rotate ([Errno 13] Permission denied); "
        "dropping lines until it works"
    ]

    log.close()

    path = tmp_path / "other.log"
    log = AuditLog(path, max_bytes=1, backups=1)
    path.rename(tmp_path / "moved")
    path.mkdir()  # what is there now cannot be opened
    log.reopen()
    log.write(_flow())
    log.write(_flow())
    assert sum("cannot open" in r.getMessage() for r in caplog.records) == 1
    path.rmdir()
    log.write(_flow())  # opened again on the next line
    log.close()
    assert _records(path) == [42]
    assert not (tmp_path / "other.log.1").exists()


def test_edge_reload_reopens_its_audit_log(tmp_path: Path) -> None:
    from ramp.config import EdgeConfig
    from ramp.edge import Edge

    path = tmp_path / "audit.log"
    edge = Edge(EdgeConfig(data_dir=tmp_path / "data", audit_log=str(path)))
    try:
        edge.audit.write(_flow())
        path.rename(tmp_path / "audit.log.1")
        edge.reload_config(edge.config)
        edge.audit.write(_flow())
    finally:
        edge.audit.close()
        edge.store.close()
    assert _records(path) == [42]
    assert _records(tmp_path / "audit.log.1") == [42]


def test_connector_sighup_reopens_its_audit_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ramp.config import ConnectorConfig
    from ramp.connector import run_connector
    from ramp.tunnel.token import Token

    path = tmp_path / "connector-audit.log"
    token = Token("00000000-0000-4000-8000-000000000001", b"s" * 32, ["192.0.2.1:7844"], "0" * 64)
    config = ConnectorConfig(
        token=token.encode(), audit_log=str(path), metrics_listen="off", grace_period=0
    )

    def signals(main: Callable[[asyncio.Event], Any], reload: Callable[[], None]) -> int:
        async def run() -> int:
            stop = asyncio.Event()
            task = asyncio.ensure_future(main(stop))
            await until(path.exists, what="the connector's audit log")
            path.rename(tmp_path / "connector-audit.log.1")  # logrotate, then its SIGHUP:
            reload()
            assert path.exists()  # a new file where the log was
            stop.set()
            return int(await task)

        return asyncio.run(run())

    monkeypatch.setattr("ramp.runtime.run_until_signal", signals)
    assert run_connector(config) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_audit_dash_is_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    AuditLog("-").write(_flow())
    out, err = capsys.readouterr()
    assert out == ""
    assert json.loads(err)["tunnel"] == "office"
