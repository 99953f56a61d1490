"""Two QUIC servers on one port, one steering group: new connections go to the working
server, and a connection made before the switch keeps reaching the server that holds it."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
from qh3.quic.configuration import QuicConfiguration

from ramp.net.reuseport import SteeringGroup
from ramp.quic.admission import HandshakeLimits
from ramp.quic.endpoint import StreamHandler, TunnelConnection, TunnelServer, dial, serve
from ramp.store.db import Store
from ramp.testing.loopback import run
from ramp.testing.wait import until
from ramp.tunnel.connector_side import EDGE_SERVER_NAME
from ramp.tunnel.edge_side import server_configuration
from ramp.wire.tunnel import ALPN


class _Echo:
    def __init__(self, conn: TunnelConnection, stream_id: int) -> None:
        self.conn, self.stream_id = conn, stream_id

    def stream_data(self, data: bytes, fin: bool) -> None:
        self.conn.send(self.stream_id, data, fin)

    def stream_reset(self, code: int) -> None:
        pass

    def stop_sending(self, code: int) -> None:
        pass

    def connection_lost(self) -> None:
        pass


class EchoConnection(TunnelConnection):
    def peer_stream_opened(self, stream_id: int) -> StreamHandler | None:
        return _Echo(self, stream_id)


class _Collect:
    def __init__(self) -> None:
        self.data = b""

    def stream_data(self, data: bytes, fin: bool) -> None:
        self.data += data

    def stream_reset(self, code: int) -> None:
        pass

    def stop_sending(self, code: int) -> None:
        pass

    def connection_lost(self) -> None:
        pass


async def _echo(conn: TunnelConnection, payload: bytes) -> None:
    handler = _Collect()
    conn.send(conn.open_stream(handler), payload)
    await until(lambda: handler.data == payload, what=f"the echo of {payload!r}")


def _connections(server: TunnelServer) -> int:
    return len(server.all_protocols())


@pytest.mark.parametrize("mechanism", ["ebpf", "cbpf"])
@pytest.mark.parametrize("retry", [False, True])
def test_a_switch_of_working_server_keeps_old_connections(
    tmp_path: Path, mechanism: str, retry: bool
) -> None:
    identity = Store(tmp_path).edge_identity()
    server_config = server_configuration(
        identity.leaf_cert_pem + identity.ca_cert_pem, identity.leaf_key_pem, 30.0
    )
    client_config = QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN],
        server_name=EDGE_SERVER_NAME,
        verify_mode=ssl.CERT_NONE,
    )
    drops: list[str] = []
    events: list[str] = []
    # with Retry, new connections move to server 1 the moment server 0 sends its Retry: the
    # client's next Initial, addressed to the Retry's connection id, must still reach server 0
    # (only it can check the token)
    limits = HandshakeLimits(retry_threshold=0 if retry else 1024)

    group = SteeringGroup.create(mechanism=mechanism)

    def on_event(slot: int, event: str) -> None:
        events.append(event)
        if event == "retry_sent" and slot == 0:
            group.set_working([1])

    async def main() -> None:
        assert group.mechanism == mechanism
        servers: list[TunnelServer] = []
        transports: list[Any] = []
        clients: list[TunnelConnection] = []
        try:
            port = 0
            for slot in (0, 1):
                transport, server = await serve(
                    "127.0.0.1",
                    port,
                    configuration=server_config,
                    create_protocol=EchoConnection,
                    on_drop=drops.append,
                    on_event=lambda event, slot=slot: on_event(slot, event),
                    limits=limits,
                    steering=(group, slot),
                )
                port = transport.get_extra_info("sockname")[1]
                servers.append(server)
                transports.append(transport)
            group.set_working([0])

            def connect() -> Any:
                return dial(
                    "127.0.0.1",
                    port,
                    configuration=client_config,
                    create_protocol=lambda quic: EchoConnection(quic),
                )

            first = await connect()
            clients.append(first)
            await _echo(first, b"before the switch")
            assert (_connections(servers[0]), _connections(servers[1])) == (1, 0)

            group.set_working([1])
            second = await connect()
            clients.append(second)
            await _echo(second, b"new connection")
            assert (_connections(servers[0]), _connections(servers[1])) == (1, 1)
            # the first connection's packets still reach the server that holds it
            for i in range(20):
                await _echo(first, b"after the switch %d" % i)
            assert "unknown_connection" not in drops
            if retry:
                assert "retry_sent" in events, events
                assert not [e for e in events if e.startswith("token_invalid")], events
        finally:
            for c in clients:
                c.close()
                c.udp_transport.close()  # type: ignore[attr-defined]
            for t in transports:
                t.close()
            group.close()

    run(main())
