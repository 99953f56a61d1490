"""Every private qh3 name ramp relies on still exists: a qh3 upgrade that renames one fails here,
by name, instead of somewhere deep in a running tunnel."""

from __future__ import annotations

import asyncio
import importlib

import pytest
from qh3.asyncio.protocol import QuicConnectionProtocol
from qh3.asyncio.server import QuicServer
from qh3.h3.connection import H3Connection
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection

from ramp.quic import qh3compat


def _client() -> QuicConnection:
    quic = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=["x"]))
    quic.connect(("127.0.0.1", 4433), now=0.0)  # creates the Rust core
    return quic


def _owners() -> dict[str, object]:
    quic = _client()
    core = quic._core
    assert core is not None, "QuicConnection._core stays None after connect()"
    loop = asyncio.new_event_loop()
    try:

        async def make() -> tuple[object, object]:
            proto = QuicConnectionProtocol(QuicConnection(configuration=QuicConfiguration()))
            server = QuicServer(configuration=QuicConfiguration(is_client=False))
            return proto, server

        proto, server = loop.run_until_complete(make())
    finally:
        loop.close()
    return {
        "H3Connection": H3Connection,
        "QuicConnection": quic,
        "QuicConnectionCore": core,
        "QuicConnectionProtocol": proto,
        "QuicServer": server,
    }


@pytest.mark.parametrize(("owner", "name"), qh3compat.PRIVATE_NAMES)
def test_private_name_exists(owner: str, name: str) -> None:
    if owner.startswith("qh3."):
        module = importlib.import_module(owner)
        assert hasattr(module, name), f"{owner}.{name} is gone: update ramp/quic/qh3compat.py"
        return
    obj = _owners()[owner]
    assert hasattr(obj, name), f"qh3 {owner}.{name} is gone: update ramp/quic/qh3compat.py"


def test_accessors_on_a_live_connection() -> None:
    quic = _client()
    assert qh3compat.is_client(quic) is True
    assert qh3compat.is_closing(quic) is False
    assert isinstance(qh3compat.can_open_bidi_stream(quic), bool)
    room = qh3compat.datagram_room(quic)
    assert room is not None
    budget, path_max, remote = room
    assert budget > 0 and path_max >= 1200 and remote is None
    sid = quic.get_next_available_stream_id()
    assert qh3compat.stream_can_send(quic, sid) in (True, False)
    quic.close(error_code=0)
    assert qh3compat.is_closing(quic) is True
    assert qh3compat.datagram_room(quic) is None


def test_header_parser() -> None:
    quic = _client()
    packet = quic.datagrams_to_send(now=0.0)[0][0]
    version, _ptype, _plen, dcid, _scid = qh3compat.pull_quic_header(packet, 8)[:5]
    assert version is not None and len(dcid) >= 8
    with pytest.raises(ValueError):
        qh3compat.pull_quic_header(b"\xc0", 8)


def test_no_private_qh3_names_elsewhere() -> None:
    """The compat module is the only file that reaches into qh3's privates."""
    import pathlib
    import re

    root = pathlib.Path(qh3compat.__file__).resolve().parents[1]
    pattern = re.compile(
        r"qh3\.\w*\._|from qh3[.\w]* import _|\._quic\b|\._core\b|_close_event|"
        r"_remote_max_|_stream_can_send|\._protocols\b|_loop_time|_transmit_soon|"
        r"_connection_id_\w+_handler|_pull_quic_header"
    )
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "qh3compat.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
