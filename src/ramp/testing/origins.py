"""Origin servers for the test network, run as one process inside the private namespace.

    python -m ramp.testing.origins --root DIR --http 198.51.100.10:80 --echo 198.51.100.10:7 \\
        --udp-echo 198.51.100.10:7 ...

- `--http`: HTTP/1.1 static files from `--root` and its subdirectories (GET and HEAD,
  keep-alive, origin-form and absolute-form request targets; files go out with sendfile, typed
  by suffix: .html, .png, ... else application/octet-stream). `/` answers a short text.
- `--echo`: echoes every byte; end of input is passed on as end of output (half-close).
- `--hello-echo`: first writes "HOST PORT\\n" (the peer as the origin sees it), then echoes, so a
  test can tell which process on the other side opened the connection.
- `--half-close`: reads until end of input, then answers `half_close_reply(data)` and closes.
- `--udp-echo`: UDP; sends every datagram (up to 65,535 bytes) back to where it came from.

Each flag may be repeated. "ready" is printed on stdout once every listener is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ramp.config import parse_hostport

INDEX_BODY = b"ramp lab origin\n"
HALF_CLOSE_TAIL = bytes(range(256)) * 1024  # 256 KiB after the summary line
MAX_HALF_CLOSE_INPUT = 256 * 2**20
MAX_HEAD = 64 * 1024
BACKLOG = 4096  # hundreds of flows may dial at once; a full backlog would delay SYNs by 1 s
UDP_MAX = 65535
UDP_BUFFER = 8 * 2**20  # bursts of a benchmark must not overflow the echo's socket
SO_SNDBUFFORCE = 32  # Linux; not exported by the socket module
SO_RCVBUFFORCE = 33
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript",
    ".css": "text/css",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}


def half_close_reply(data: bytes) -> bytes:
    """What the half-close server answers to `data` (a test computes it to compare)."""
    line = f"got {len(data)} sha256={hashlib.sha256(data).hexdigest()}\n".encode()
    return line + HALF_CLOSE_TAIL


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        await writer.drain()
    except OSError:
        pass
    finally:
        await _close(writer)


async def _hello_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    peer = writer.get_extra_info("peername")
    writer.write(f"{peer[0]} {peer[1]}\n".encode())
    await _echo(reader, writer)


async def _half_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        chunks: list[bytes] = []
        total = 0
        while data := await reader.read(65536):
            total += len(data)
            if total > MAX_HALF_CLOSE_INPUT:
                return
            chunks.append(data)
        writer.write(half_close_reply(b"".join(chunks)))
        await writer.drain()
    except OSError:
        pass
    finally:
        await _close(writer)


def _http_handler(root: Path) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await _http_one(root, reader, writer):
                pass
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            await _close(writer)

    return handle


async def _http_one(root: Path, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Serve one request; True to keep the connection for another."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return False
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        await _respond(writer, 400, b"bad request line\n", keep=False)
        return False
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or "0")
    if length:
        await reader.readexactly(length)
    conn = headers.get("connection", "").lower()
    keep = conn != "close" if version == "HTTP/1.1" else conn == "keep-alive"
    if method not in ("GET", "HEAD"):
        await _respond(writer, 405, b"only GET and HEAD\n", keep=keep)
        return keep
    path = unquote(urlsplit(target).path if "://" in target else target.split("?")[0])
    name = path.lstrip("/")
    if not name:
        await _respond(writer, 200, INDEX_BODY, keep=keep, head_only=method == "HEAD")
        return keep
    segments = name.split("/")
    file = root.joinpath(*segments)
    # No empty or dot segments: nothing outside `root` (no "..") and no hidden files.
    if any(not seg or seg.startswith(".") for seg in segments) or not file.is_file():
        await _respond(writer, 404, b"not found\n", keep=keep)
        return keep
    size = file.stat().st_size
    writer.write(_status_head(200, size, keep, _content_type(file)))
    await writer.drain()
    if method == "GET":
        with file.open("rb") as f:
            await asyncio.get_running_loop().sendfile(writer.transport, f)
    return keep


def _content_type(file: Path) -> str:
    # A browser renders HTML and images only when they are labelled as such; the random
    # payloads of the download tests stay application/octet-stream.
    return _CONTENT_TYPES.get(file.suffix.lower(), "application/octet-stream")


def _status_head(status: int, length: int, keep: bool, ctype: str) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
    return (
        f"HTTP/1.1 {status} {reason.get(status, 'Error')}\r\n"
        f"Content-Length: {length}\r\nContent-Type: {ctype}\r\n"
        f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n"
    ).encode()


async def _respond(
    writer: asyncio.StreamWriter, status: int, body: bytes, *, keep: bool, head_only: bool = False
) -> None:
    writer.write(_status_head(status, len(body), keep, "text/plain"))
    if not head_only:
        writer.write(body)
    await writer.drain()


def udp_echo_socket(listen: str) -> socket.socket:
    """A bound UDP socket with large buffers (forced past rmem_max: the lab runs as root)."""
    host, port = parse_hostport(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    for forced, plain in (
        (SO_RCVBUFFORCE, socket.SO_RCVBUF),
        (SO_SNDBUFFORCE, socket.SO_SNDBUF),
    ):
        try:
            sock.setsockopt(socket.SOL_SOCKET, forced, UDP_BUFFER)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, UDP_BUFFER)
    sock.bind((host, port))
    return sock


def udp_echo_forever(sock: socket.socket) -> None:
    """Blocking loop, one thread per socket: no event loop between a datagram and its echo."""
    buf = bytearray(UDP_MAX)
    view = memoryview(buf)
    while True:
        try:
            n, peer = sock.recvfrom_into(buf)
            sock.sendto(view[:n], peer)
        except OSError:
            continue


async def _serve(specs: list[tuple[Handler, str]], udp_echo: Sequence[str] = ()) -> None:
    for listen in udp_echo:
        sock = udp_echo_socket(listen)
        threading.Thread(target=udp_echo_forever, args=(sock,), daemon=True).start()
    servers = []
    for handler, listen in specs:
        host, port = parse_hostport(listen)
        servers.append(
            await asyncio.start_server(
                handler, host, port, backlog=BACKLOG, reuse_address=True, limit=MAX_HEAD
            )
        )
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ramp.testing.origins", description=__doc__)
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="directory --http serves")
    for flag in ("http", "echo", "hello-echo", "half-close", "udp-echo"):
        parser.add_argument(f"--{flag}", action="append", default=[], metavar="HOST:PORT")
    args = parser.parse_args(argv)
    specs: list[tuple[Handler, str]] = []
    specs += [(_http_handler(args.root), a) for a in args.http]
    specs += [(_echo, a) for a in args.echo]
    specs += [(_hello_echo, a) for a in args.hello_echo]
    specs += [(_half_close, a) for a in args.half_close]
    if not specs and not args.udp_echo:
        parser.error("nothing to serve")
    try:
        asyncio.run(_serve(specs, args.udp_echo))
    except OSError as e:
        print(f"origins: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
