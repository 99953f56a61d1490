"""In-process byte-stream endpoints: order, half-close, backpressure, abort."""

from __future__ import annotations

import asyncio

from ramp.flows.endpoint import memory_pair, open_stream


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.lost: list[Exception | None] = []
        self.paused = 0
        self.resumed = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


def test_bytes_arrive_in_order_and_eof_is_half_close() -> None:
    async def main() -> None:
        a, b = memory_pair()
        ra, rb = Recorder(), Recorder()
        ta = await a.attach(lambda: ra)
        tb = await b.attach(lambda: rb)
        for i in range(100):
            ta.write(bytes([i]) * 10)  # type: ignore[attr-defined]
        ta.write_eof()  # type: ignore[attr-defined]
        tb.write(b"still open the other way")  # type: ignore[attr-defined]
        await asyncio.sleep(0)
        while not rb.eof:
            await asyncio.sleep(0)
        assert bytes(rb.data) == b"".join(bytes([i]) * 10 for i in range(100))
        while not ra.data:
            await asyncio.sleep(0)
        assert bytes(ra.data) == b"still open the other way"
        tb.close()
        while not (ra.lost and rb.lost):
            await asyncio.sleep(0)
        assert ra.lost == [None] and rb.lost == [None]

    asyncio.run(main())


def test_a_reader_that_stops_reading_pauses_the_writer() -> None:
    async def main() -> None:
        a, b = memory_pair()
        ra, rb = Recorder(), Recorder()
        ta = await a.attach(lambda: ra)
        tb = await b.attach(lambda: rb)
        ta.set_write_buffer_limits(high=1000, low=100)  # type: ignore[attr-defined]
        tb.pause_reading()  # type: ignore[attr-defined]
        for _ in range(20):
            ta.write(b"x" * 100)  # type: ignore[attr-defined]
        assert ra.paused == 1 and ta.get_write_buffer_size() == 2000  # type: ignore[attr-defined]
        tb.resume_reading()  # type: ignore[attr-defined]
        while ra.resumed == 0:
            await asyncio.sleep(0)
        assert len(rb.data) == 2000

    asyncio.run(main())


def test_abort_resets_the_peer_and_streams_work_over_an_endpoint() -> None:
    async def main() -> None:
        a, b = memory_pair()
        ra = Recorder()
        ta = await a.attach(lambda: ra)
        reader, writer = await open_stream(b)
        writer.write(b"ping")
        await writer.drain()
        while not ra.data:
            await asyncio.sleep(0)
        ta.write(b"pong")  # type: ignore[attr-defined]
        assert await reader.readexactly(4) == b"pong"
        ta.abort()  # type: ignore[attr-defined]
        while not ra.lost:
            await asyncio.sleep(0)
        try:
            await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            pass
        assert writer.transport.is_closing()

    asyncio.run(main())
