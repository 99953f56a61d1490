"""A minimal connect-ip client for the edge's integration tests: aioquic's HTTP/3 (a stack that
is not ours) in a thread inside the client namespace, and a TUN device there carrying the
session's packets, so real programs (curl, dig) in that namespace reach private addresses
through the edge with nothing but routes. `ramp client run --tun` is the real client; this one
only exists so the edge's side is tested against an independent implementation."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3Connection
from aioquic.h3.events import DatagramReceived, DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent

from ramp.net import tun
from ramp.net.netns import Netns
from ramp.wire import connect_ip as cip
from ramp.wire import masque

TUN_MTU = 1280


class _Client(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.h3 = H3Connection(self._quic, enable_webtransport=True)  # H3_DATAGRAM on
        self.on_event: Any = None

    def quic_event_received(self, event: QuicEvent) -> None:
        for ev in self.h3.handle_event(event):
            if self.on_event is not None:
                self.on_event(ev)


@dataclass
class Bridge:
    """What the session got; `addresses` and `routes` follow the edge's capsules."""

    status: int = 0
    addresses: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)
    routes: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)
    updates: int = 0
    up: int = 0
    down: int = 0
    error: BaseException | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    tun_name: str = "rampt0"
    _stop: asyncio.Event | None = None
    _loop: asyncio.AbstractEventLoop | None = None

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)


async def _run(bridge: Bridge, host: str, port: int, bearer: str, path: str) -> None:
    bridge._loop = asyncio.get_running_loop()
    bridge._stop = asyncio.Event()
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=["h3"],
        verify_mode=ssl.CERT_NONE,
        max_datagram_frame_size=65536,
        max_datagram_size=1452,  # what the edge answers a large Initial with
    )
    async with connect(host, port, configuration=config, create_protocol=_Client) as c:
        assert isinstance(c, _Client)
        sid = c._quic.get_next_available_stream_id()
        decoder = masque.CapsuleDecoder()
        dev: tun.TunDevice | None = None
        got_status = asyncio.Event()

        def deliver(packet: bytes) -> None:
            if dev is not None and dev.write(packet):
                bridge.down += 1

        def capsules(data: bytes) -> None:
            for cap in decoder.feed(data):
                parsed = cip.parse_capsule(cap.type, cap.value)
                if isinstance(parsed, cip.AddressAssign):
                    bridge.addresses = [e.prefix for e in parsed.addresses]
                    bridge.updates += 1
                elif isinstance(parsed, cip.RouteAdvertisement):
                    bridge.routes = parsed.networks()
                    bridge.updates += 1
                elif cap.type == masque.CAPSULE_DATAGRAM and cap.value[:1] == b"\x00":
                    deliver(cap.value[1:])
            if dev is not None:
                apply()

        def on_event(ev: H3Event) -> None:
            if isinstance(ev, HeadersReceived) and ev.stream_id == sid:
                bridge.status = int(dict(ev.headers)[b":status"])
                got_status.set()
            elif isinstance(ev, DataReceived) and ev.stream_id == sid:
                capsules(ev.data)
            elif isinstance(ev, DatagramReceived) and ev.stream_id == sid and ev.data[:1] == b"\0":
                deliver(ev.data[1:])

        def apply() -> None:
            assert dev is not None
            tun.set_addresses(dev.name, [str(a) for a in bridge.addresses])
            tun.set_routes(dev.name, [str(r) for r in bridge.routes])

        c.on_event = on_event
        headers = [
            (b":method", b"CONNECT"),
            (b":protocol", b"connect-ip"),
            (b":scheme", b"https"),
            (b":authority", host.encode()),
            (b":path", path.encode()),
            (b"capsule-protocol", b"?1"),
            (b"proxy-authorization", f"Bearer {bearer}".encode()),
        ]
        c.h3.send_headers(sid, headers)
        c.transmit()
        await asyncio.wait_for(got_status.wait(), 20)
        if bridge.status != 200:
            bridge.ready.set()
            return
        for _ in range(400):
            if bridge.addresses and bridge.routes:
                break
            await asyncio.sleep(0.05)
        dev = tun.open_tun(bridge.tun_name, TUN_MTU)
        try:
            apply()

            def from_tun() -> None:
                assert dev is not None
                for _ in range(64):
                    packet = dev.read()
                    if packet is None:
                        break
                    bridge.up += 1
                    c.h3.send_datagram(sid, b"\x00" + packet)
                c.transmit()

            bridge._loop.add_reader(dev.fd, from_tun)
            bridge.ready.set()
            await bridge._stop.wait()
            bridge._loop.remove_reader(dev.fd)
        finally:
            dev.close()


@contextlib.contextmanager
def ip_bridge(
    ns: Netns,
    host: str,
    port: int,
    bearer: str,
    path: str = "/.well-known/masque/ip/*/*/",
    timeout: float = 30.0,
) -> Iterator[Bridge]:
    """A connect-ip session from namespace `ns` with its TUN device up there, until exit."""
    bridge = Bridge()

    def thread() -> None:
        try:
            ns.call(lambda: asyncio.run(_run(bridge, host, port, bearer, path)))
        except BaseException as e:
            bridge.error = e
        finally:
            bridge.ready.set()

    t = threading.Thread(target=thread, name="ip-bridge", daemon=True)
    t.start()
    try:
        if not bridge.ready.wait(timeout):
            raise TimeoutError("the connect-ip session did not come up")
        if bridge.error is not None:
            raise bridge.error
        yield bridge
    finally:
        bridge.stop()
        t.join(10)
