"""The restart channel (messages with descriptors over SOCK_SEQPACKET, state in a memfd) and
the restart coordination socket, without a successor process."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ramp.restart.channel import (
    Channel,
    ChannelClosed,
    ChannelError,
    decode,
    encode,
    pair,
    read_state,
    state_memfd,
)
from ramp.restart.coordinator import RestartRefused, RestartServer, request_restart
from ramp.restart.successor import Predecessor
from ramp.testing.mutate import mutated

bodies = st.dictionaries(
    st.text(max_size=10).filter(lambda k: k != "kind"),
    st.one_of(st.integers(), st.text(max_size=20), st.lists(st.integers(), max_size=4)),
    max_size=5,
)


@given(st.text(min_size=1, max_size=20), bodies)
def test_messages_round_trip(kind: str, body: dict[str, object]) -> None:
    msg = decode(encode(kind, body), [])
    assert (msg.kind, msg.body) == (kind, body)


@given(mutated(st.builds(encode, st.just("listening"), bodies)))
def test_damaged_messages_decode_or_raise_channel_error(raw: bytes) -> None:
    try:
        msg = decode(raw, [])
    except ChannelError:
        return
    assert isinstance(msg.kind, str)


def test_a_malformed_message_closes_its_descriptors() -> None:
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(ChannelError):
        decode(b"[1, 2]", [r])
    with pytest.raises(OSError):
        os.fstat(r)


def test_state_travels_in_a_memfd() -> None:
    state = {"sockets": [{"name": "socks5", "kind": "tcp"}], "big": "x" * 200_000}
    fd = state_memfd(state)
    try:
        assert read_state(fd) == state
    finally:
        os.close(fd)
    bad = os.memfd_create("bad")
    os.write(bad, b"not json")
    with pytest.raises(ChannelError):
        read_state(bad)
    os.close(bad)


def test_descriptors_and_messages_cross_the_pair() -> None:
    async def run() -> None:
        ours, theirs = pair()
        a, b = Channel(ours), Channel(theirs)
        listener = socket.create_server(("127.0.0.1", 0))
        a.send("hello", {"pid": 7}, [listener.fileno()])
        msg = await b.expect("hello", 5)
        assert msg.body == {"pid": 7} and len(msg.fds) == 1
        got = socket.socket(fileno=msg.fds[0])
        assert got.getsockname() == listener.getsockname()  # the same socket, not a copy
        got.close()
        a.send("failed", {"error": "bad config"})
        with pytest.raises(ChannelError, match="bad config"):
            await b.expect("ready", 5)
        a.send("serving")
        with pytest.raises(ChannelError, match="expected 'ready'"):
            await b.expect("ready", 5)
        with pytest.raises(TimeoutError):
            await b.expect("ready", 0.05)
        a.close()
        with pytest.raises(ChannelClosed):
            await b.receive(5)
        b.close()
        listener.close()

    asyncio.run(run())


def test_a_descriptor_that_is_no_channel_is_refused() -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with pytest.raises(ChannelError):
        Channel.from_fd(sock.fileno())
    sock.close()


def test_the_restart_socket_answers_one_restart_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "restart.sock"
    outcomes: list[str] = []

    async def run() -> None:
        release = asyncio.Event()

        async def restart(progress):  # type: ignore[no-untyped-def]
            progress("starting")
            await release.wait()
            return 4242

        server = RestartServer(path, restart, outcomes.append)
        await server.start()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        loop = asyncio.get_running_loop()
        seen: list[str] = []
        first = loop.run_in_executor(None, request_restart, path, 10.0, seen.append)
        while not seen:
            await asyncio.sleep(0.01)
        second = await loop.run_in_executor(None, request_restart, path, 10.0, seen.append)
        assert second == {"ok": False, "error": "a restart is already in progress"}
        release.set()
        assert await first == {"ok": True, "pid": 4242}
        assert seen == ["starting"]

        async def refuse(progress):  # type: ignore[no-untyped-def]
            raise RestartRefused("draining")

        server._restart = refuse
        assert await loop.run_in_executor(None, request_restart, path, 10.0, seen.append) == {
            "ok": False,
            "error": "draining",
        }

        async def fail(progress):  # type: ignore[no-untyped-def]
            raise RuntimeError("the successor exited with status 2")

        server._restart = fail
        answer = await loop.run_in_executor(None, request_restart, path, 10.0, seen.append)
        assert answer["ok"] is False and "status 2" in answer["error"]

        for garbage in (b"\xff\xfe\n", b'{"op": "stop"}\n', b"[]\n"):
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(garbage)
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 5)
            assert json.loads(line)["ok"] is False
            assert await reader.read() == b""  # and closed
            writer.close()
        await server.close()
        assert not path.exists()

    asyncio.run(run())
    assert outcomes == ["busy", "ok", "busy", "failed", *["bad_request"] * 3]


def test_a_handoff_that_names_more_descriptors_than_it_carries_is_refused() -> None:
    async def run() -> None:
        ours, theirs = pair()
        sender = Channel(ours)
        layout = {"sockets": [{"name": "socks5", "kind": "tcp"}], "groups": {}, "state": {}}
        memfd = state_memfd(layout)
        sender.send("hello", {"pid": 1}, [memfd, 2])  # the socket itself is missing
        os.close(memfd)
        env = {"RAMP_HANDOFF_FD": str(theirs.detach())}
        with pytest.raises(ChannelError, match="descriptors where the layout names 1"):
            await Predecessor.from_environment(env, timeout=5)
        sender.close()

    asyncio.run(run())
