"""Origins for the benchmarks, run inside a lab namespace:

    python -m bench.servers HOST BASE_PORT

BASE_PORT+0  source: reads an 8-byte big-endian count, sends that many bytes, closes.
BASE_PORT+1  ping:   reads one byte, writes it back, closes.
BASE_PORT+2  hold:   accepts and keeps the connection open until the client closes.
BASE_PORT+3  echo:   writes back what it reads until the client closes.
"""

from __future__ import annotations

import asyncio
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

CHUNK = b"\0" * (1 << 20)


async def source(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        (count,) = struct.unpack("!Q", await r.readexactly(8))
        view = memoryview(CHUNK)
        while count > 0:
            n = min(count, len(CHUNK))
            w.write(view[:n])
            count -= n
            await w.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        w.close()


async def ping(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        w.write(await r.readexactly(1))
        await w.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        w.close()


async def hold(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        await r.read()
    except ConnectionError:
        pass
    finally:
        w.close()


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except ConnectionError:
        pass
    finally:
        w.close()


def start_in(ns: Any, host: str, base: int) -> None:
    """Run these origins in lab namespace `ns` (a Netns) and wait until they listen."""
    proc = ns.popen(
        [sys.executable, "-m", "bench.servers", host, str(base)],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        raise RuntimeError("bench origin did not start")


async def main(host: str, base: int) -> None:
    servers = [
        await asyncio.start_server(handler, host, base + i, backlog=4096)
        for i, handler in enumerate((source, ping, hold, echo))
    ]
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
