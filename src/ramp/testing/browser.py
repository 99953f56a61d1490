"""A real browser for the integration tests: headless Chromium loading a page through a proxy.

    files = gallery_page(30)                  # index.html + 30 PNGs, for an origin's root
    result = load_page(f"http://{ORIGIN}/gallery/index.html", f"socks5://{SOCKS_PROXY}",
                       screenshot=tmp_path / "shot.png", netns=lab.client.name)
    assert result.loaded == result.total == 30

The page counts its own images once `window.onload` has fired (complete and decoded, not just
answered), so the verdict is the browser's, not an HTTP status. Chromium runs with a throwaway
profile and HOME and with everything off that would phone home; run it in a namespace whose
only way out is the proxy (`netns`) and check that with `watch_egress`.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ramp.net.netns import Netns

WINDOW = (1280, 1024)
RESULT_ID = "result"

# The binary behind Debian's /usr/bin/chromium launcher first: the launcher adds flags from
# /etc/chromium.d (remote extensions on, Google API keys in the environment) that only widen
# what the browser may contact.
CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser")

# Features that contact Google or others on their own schedule, for what the switches of
# `chromium_args` miss.
_DISABLED_FEATURES = (
    "AutofillServerCommunication",
    "CertificateTransparencyComponentUpdater",
    "DialMediaRouteProvider",
    "InterestFeedContentSuggestions",
    "MediaRouter",
    "NetworkTimeServiceQuerying",
    "OptimizationHints",
    "PrivacySandboxSettings4",
    "SafeBrowsingBetterTelemetry",
    "Translate",
)

_GOOGLE_SERVICE_NAMES = (
    "*.google.com",
    "*.googleapis.com",
    "*.gstatic.com",
    "*.gvt1.com",
    "*.googleusercontent.com",
)

_ENV_DROP = re.compile(
    r"(?i)^(.*_proxy|google_.*|chrome_.*|chromium_.*|dbus_.*|display|wayland_.*)$"
)


class BrowserError(RuntimeError):
    """Chromium is missing, timed out, failed, or the page did not report; with its stderr."""


@dataclass(frozen=True)
class PageResult:
    """What the page said about itself: images loaded of images on it (and which failed)."""

    loaded: int
    total: int
    dom: str
    screenshot: Path
    failed: tuple[str, ...] = ()


# --- the page --------------------------------------------------------------------------------


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A valid truecolour PNG of one colour (stdlib only)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + bytes(rgb) * width  # filter type 0 ("None") per scanline
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(row * height, 9))
        + chunk(b"IEND", b"")
    )


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR; ValueError if `data` does not start like a PNG."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError(f"not a PNG: {data[:24]!r}")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _colour(i: int) -> tuple[int, int, int]:
    # Distinct for every i below 2**18: the index spread over the three channels.
    return (40 + (i * 37) % 200, 40 + (i * 91) % 200, (i * 7) % 256)


_SCRIPT = """
window.onload = function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll("img.g"));
  var failed = imgs.filter(function (img) { return !(img.complete && img.naturalWidth > 0); });
  var loaded = imgs.length - failed.length;
  var out = document.getElementById("%(id)s");
  out.textContent = "loaded " + loaded + "/" + imgs.length;
  out.setAttribute("data-loaded", String(loaded));
  out.setAttribute("data-total", String(imgs.length));
  out.setAttribute("data-failed", failed.map(function (img) {
    return img.getAttribute("src");
  }).join(" "));
  document.title = "loaded " + loaded + "/" + imgs.length;
};
"""


def gallery_page(n: int) -> dict[str, bytes]:
    """`index.html` showing `n` distinct PNGs (img-000.png, ...), and those PNGs.

    Write the files into a directory the origin serves. Until onload the result element says
    "pending": a DOM dumped before every image settled cannot pass for a verdict.
    """
    files: dict[str, bytes] = {}
    tags = []
    for i in range(n):
        name = f"img-{i:03d}.png"
        width, height = 40 + i % 17, 30 + (i * 5) % 23  # sizes differ too, not only colours
        files[name] = png(width, height, _colour(i))
        tags.append(
            f'<img class="g" src="{html.escape(name)}" width="{width}" height="{height}" '
            f'alt="image {i}">'
        )
    files["index.html"] = (
        '<!doctype html>\n<html><head><meta charset="utf-8"><title>pending</title>\n'
        f"<script>{_SCRIPT % {'id': RESULT_ID}}</script></head>\n<body>\n"
        f'<h1>ramp gallery: {n} images</h1>\n<p id="{RESULT_ID}">pending</p>\n'
        + "\n".join(tags)
        + "\n</body></html>\n"
    ).encode()
    return files


def write_files(directory: Path, files: dict[str, bytes]) -> Path:
    """Write `files` (name -> content) into `directory`, made if missing; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def parse_result(dom: str) -> tuple[int, int, tuple[str, ...]] | None:
    """(loaded, total, failed srcs) from the result element, None if the page never reported."""
    m = re.search(rf'<p id="{RESULT_ID}"([^>]*)>', dom)
    if m is None:
        return None
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', m.group(1)))
    if "data-loaded" not in attrs or "data-total" not in attrs:
        return None
    failed = tuple(html.unescape(attrs.get("data-failed", "")).split())
    return int(attrs["data-loaded"]), int(attrs["data-total"]), failed


# --- the browser -----------------------------------------------------------------------------


def find_chromium() -> str:
    for candidate in CHROMIUM_CANDIDATES:
        path = shutil.which(candidate)
        if path:
            return path
    raise BrowserError(
        f"no Chromium found (tried {', '.join(CHROMIUM_CANDIDATES)}); "
        "Debian: apt-get install --no-install-recommends chromium"
    )


def chromium_args(proxy: str, profile: Path, *, timeout: float) -> list[str]:
    """The flags of every run: headless, isolated, every request through `proxy`."""
    return [
        "--headless=new",
        "--no-sandbox",  # the tests run as root, which Chromium's sandbox refuses
        "--disable-gpu",
        "--disable-dev-shm-usage",  # containers have small /dev/shm
        f"--user-data-dir={profile}",
        "--no-first-run",
        "--no-default-browser-check",
        "--password-store=basic",  # no keyring over D-Bus
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        "--disable-domain-reliability",
        "--disable-client-side-phishing-detection",
        "--disable-breakpad",
        "--no-pings",
        "--metrics-recording-only",
        "--disable-quic",
        "--dns-prefetch-disable",
        f"--disable-features={','.join(_DISABLED_FEATURES)}",
        f"--proxy-server={proxy}",
        # Chromium bypasses proxies for loopback by default; "<-loopback>" takes that away, so
        # the page goes through the proxy whatever its host. Google's service names (sign-in,
        # update checks that the flags above do not all stop) are sent "direct" instead, where
        # the resolver rule below fails them before any packet: not even the proxy sees them.
        f"--proxy-bypass-list=<-loopback>;{';'.join(_GOOGLE_SERVICE_NAMES)}",
        # SOCKS5 in Chromium hands names to the proxy; a name it would resolve itself
        # (prefetch, a "direct" host) fails here instead of asking a resolver.
        f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {_proxy_host(proxy)}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--hide-scrollbars",
        "--mute-audio",
        # Stops the load (onload or not) after this long so the dump still comes out;
        # the page's own "pending" then says that it never finished.
        f"--timeout={int(timeout * 1000 * 0.8)}",
    ]


def _proxy_host(proxy: str) -> str:
    host = urlsplit(proxy if "://" in proxy else f"socks5://{proxy}").hostname
    if not host:
        raise BrowserError(f"no host in proxy {proxy!r}")
    return f"[{host}]" if ":" in host else host


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _ENV_DROP.match(k)}
    # Chromium writes NSS databases and caches under HOME / XDG dirs: keep them throwaway.
    env["HOME"] = str(home)
    env["XDG_CONFIG_HOME"] = str(home / ".config")
    env["XDG_CACHE_HOME"] = str(home / ".cache")
    return env


def _run_chromium(
    argv: Sequence[str], *, env: dict[str, str], timeout: float, workdir: Path, what: str
) -> tuple[str, str]:
    """Run `argv` in its own process group; (stdout, stderr). Kills the group on timeout."""
    out_path, err_path = workdir / f"{what}.stdout", workdir / f"{what}.stderr"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                cwd=workdir,
                start_new_session=True,
            )
        except FileNotFoundError as e:
            raise BrowserError(f"cannot start {argv[0]}: {e}") from e
        try:
            returncode = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            # Renderer and utility processes share the group; none may outlive the run.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    if returncode is None:
        raise BrowserError(
            f"chromium ({what}) did not finish within {timeout} s; killed\n{_tail(stderr)}"
        )
    if returncode != 0:
        raise BrowserError(f"chromium ({what}) exited {returncode}\n{_tail(stderr)}")
    return stdout, stderr


def _tail(text: str, lines: int = 30) -> str:
    # Chromium's D-Bus complaints fill stderr on a machine without a session bus.
    useful = [line for line in text.splitlines() if "dbus" not in line.lower()]
    return "--- chromium stderr (last lines) ---\n" + "\n".join(useful[-lines:])


def load_page(
    url: str,
    proxy: str,
    *,
    screenshot: Path,
    timeout: float = 60,
    netns: str | None = None,
    chromium: str | None = None,
    extra_args: Sequence[str] = (),
) -> PageResult:
    """Load `url` in headless Chromium through `proxy` (e.g. "socks5://203.0.113.1:1080"):
    once for the DOM, once for a `WINDOW`-sized PNG screenshot at `screenshot`.

    With `netns`, Chromium runs inside that network namespace (`ip netns exec`). `timeout`
    bounds each run; `extra_args` go to Chromium after the usual flags. Raises BrowserError
    when Chromium is missing, fails or times out, or the page never reported.
    """
    binary = chromium or find_chromium()
    prefix = ["ip", "netns", "exec", netns] if netns else []
    screenshot = Path(screenshot)
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ramp-chromium-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        env = _env(work / "home")
        (work / "home").mkdir()

        def run(what: str, *extra: str) -> tuple[str, str]:
            # A fresh profile per run: the second load must not come from the first's cache.
            profile = work / f"profile-{what}"
            argv = [
                *prefix,
                binary,
                *chromium_args(proxy, profile, timeout=timeout),
                *extra_args,
                *extra,
            ]
            argv.append(url)
            return _run_chromium(argv, env=env, timeout=timeout, workdir=work, what=what)

        dom, dom_err = run("dom", "--dump-dom")
        parsed = parse_result(dom)
        if parsed is None:
            raise BrowserError(
                f"{url} never reported its images (no finished #{RESULT_ID} in the DOM)\n"
                f"--- DOM (first 2000 chars) ---\n{dom[:2000]}\n{_tail(dom_err)}"
            )
        with contextlib.suppress(FileNotFoundError):
            screenshot.unlink()
        _, shot_err = run("screenshot", f"--screenshot={screenshot}")
        if not screenshot.is_file():
            raise BrowserError(f"chromium wrote no screenshot to {screenshot}\n{_tail(shot_err)}")
    loaded, total, failed = parsed
    return PageResult(loaded, total, dom, screenshot, failed)


# --- checking that nothing else leaves -------------------------------------------------------

_EGRESS_TABLE = "ramp_egress_watch"


@dataclass
class EgressWatch:
    """TCP/UDP packets a namespace sent anywhere but loopback and the allowed endpoints."""

    ns: Netns

    def seen(self) -> list[str]:
        """The destinations ("addr proto port") caught so far, as nft lists them."""
        out = self.ns.run(["nft", "-j", "list", "table", "inet", _EGRESS_TABLE]).stdout.decode()
        found = []
        for item in json.loads(out).get("nftables", []):
            s = item.get("set")
            if s and s.get("elem"):
                for elem in s["elem"]:
                    parts = elem["concat"] if isinstance(elem, dict) else [elem]
                    found.append(" ".join(str(p) for p in parts))
        return sorted(found)

    def reset(self) -> None:
        """Forget what was seen so far."""
        for name in ("leaks4", "leaks6"):
            self.ns.run(["nft", "flush", "set", "inet", _EGRESS_TABLE, name])


def watch_egress(
    ns: Netns, allowed: Iterable[tuple[str, int]], *, gateways: Iterable[str] = ()
) -> EgressWatch:
    """Record every TCP/UDP packet `ns` sends by any interface but loopback to anything but
    the `allowed` (addr, port) endpoints.

    `gateways` become default routes (one per address family) of `ns`: without a route a
    connection to elsewhere fails before any packet exists, and nothing would be seen. Pick a
    neighbour that does not forward (the lab's namespaces have forwarding off)."""
    for gateway in gateways:
        ns.ip(*(["-6"] if ":" in gateway else []), "route", "add", "default", "via", gateway)
    allow4 = [f"ip daddr {a} th dport {p} return" for a, p in allowed if ":" not in a]
    allow6 = [f"ip6 daddr {a} th dport {p} return" for a, p in allowed if ":" in a]
    rules = "\n        ".join([*allow4, *allow6])
    ns.nft(
        f"""
table inet {_EGRESS_TABLE} {{
    set leaks4 {{ type ipv4_addr . inet_proto . inet_service; flags dynamic; }}
    set leaks6 {{ type ipv6_addr . inet_proto . inet_service; flags dynamic; }}
    chain output {{
        type filter hook output priority filter; policy accept;
        oif "lo" return
        meta l4proto != {{ tcp, udp }} return
        {rules}
        meta nfproto ipv4 add @leaks4 {{ ip daddr . meta l4proto . th dport }}
        meta nfproto ipv6 add @leaks6 {{ ip6 daddr . meta l4proto . th dport }}
    }}
}}
"""
    )
    return EgressWatch(ns)
