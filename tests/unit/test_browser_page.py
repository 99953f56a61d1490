"""The browser test's page and the origin serving it, without a browser or namespaces."""

from __future__ import annotations

import asyncio
import re
import struct
import zlib
from pathlib import Path

import pytest

from ramp.testing.browser import (
    RESULT_ID,
    chromium_args,
    gallery_page,
    parse_result,
    png,
    png_size,
    write_files,
)
from ramp.testing.origins import _http_handler


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk, checking each CRC as a decoder would."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, out = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        out.append((kind, body))
        pos += 12 + length
    return out


def test_png_decodes_to_the_pixels_it_was_made_of() -> None:
    data = png(3, 2, (1, 2, 3))
    chunks = _chunks(data)
    assert [k for k, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    assert png_size(data) == (3, 2)
    raw = zlib.decompress(chunks[1][1])
    assert raw == (b"\x00" + b"\x01\x02\x03" * 3) * 2


def test_png_size_refuses_what_is_not_a_png() -> None:
    with pytest.raises(ValueError):
        png_size(b"GIF89a" + b"\x00" * 30)


def test_gallery_has_n_distinct_images_all_on_the_page() -> None:
    files = gallery_page(30)
    images = {name: data for name, data in files.items() if name.endswith(".png")}
    assert len(images) == 30 and set(files) == {*images, "index.html"}
    assert len(set(images.values())) == 30
    for data in images.values():
        _chunks(data)
    page = files["index.html"].decode()
    assert sorted(re.findall(r'<img class="g" src="([^"]+)"', page)) == sorted(images)


def test_result_is_read_only_once_the_page_has_counted() -> None:
    assert parse_result(gallery_page(2)["index.html"].decode()) is None
    dom = (
        f'<p id="{RESULT_ID}" data-loaded="1" data-total="2" data-failed="img-001.png">'
        "loaded 1/2</p>"
    )
    assert parse_result(dom) == (1, 2, ("img-001.png",))


def test_every_request_goes_through_the_proxy() -> None:
    args = chromium_args("socks5://203.0.113.1:1080", Path("/p"), timeout=10)
    assert "--proxy-server=socks5://203.0.113.1:1080" in args
    bypass = next(a for a in args if a.startswith("--proxy-bypass-list="))
    assert bypass.split("=", 1)[1].split(";")[0] == "<-loopback>"
    assert "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 203.0.113.1" in args


async def _get(port: int, path: str) -> tuple[int, str, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    ctype = next(v for k, _, v in (h.partition(": ") for h in lines[1:]) if k == "Content-Type")
    return int(lines[0].split()[1]), ctype, body


def test_origin_serves_subdirectories_typed_and_nothing_outside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    files = gallery_page(1)
    write_files(root / "gallery", files)
    (root / ".hidden").write_bytes(b"no")
    (tmp_path / "secret").write_bytes(b"no")

    async def main() -> dict[str, tuple[int, str, bytes]]:
        server = await asyncio.start_server(_http_handler(root), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        paths = [
            "/gallery/index.html",
            "/gallery/img-000.png",
            "/../secret",
            "/gallery/../../secret",
            "/%2e%2e/secret",
            "/.hidden",
            "/gallery//index.html",
            "/gallery",
        ]
        try:
            return {p: await _get(port, p) for p in paths}
        finally:
            server.close()

    got = asyncio.run(asyncio.wait_for(main(), 30))
    assert got["/gallery/index.html"] == (200, "text/html; charset=utf-8", files["index.html"])
    assert got["/gallery/img-000.png"] == (200, "image/png", files["img-000.png"])
    for path in list(got)[2:]:
        assert got[path][0] == 404, path
