"""A legitimate client, attackers and a resource gauge, for attacks on a lab's edge and connector.

    lab.add_client_address()                     # the legitimate client's own source address
    usage = ProcessUsage(lab.edge)
    start = usage.sample()
    legit = LegitClient(lab)                     # SOCKS5, HTTP proxy and UDP, until stopped
    legit.start()
    ...                                          # the attack, from CLIENT_ADDR
    legit.wait_requests(3)                       # it kept fetching while the attack was on
    summary = legit.stop()
    assert summary.all_ok, summary.describe()
    usage.wait_back_to(start)

- `LegitClient(lab, source=CLIENT_ADDR2, kinds=KINDS, deadline=30.0, pause=0.05)`: one
  thread per kind in C, each fetching in a loop until `stop()`; every request has `deadline`
  seconds (an upper bound for a stuck request, not an expectation of speed).
  - "socks5": SOCKS5 CONNECT to the HTTP origin, GET of the small payload file, size and sha256
    checked.
  - "http": the same file through the HTTP proxy, alternately by CONNECT and absolute-form GET.
  - "udp": a SOCKS5 UDP ASSOCIATE and one datagram to the origin's UDP echo, sent again each
    second (as a DNS client would) until the echo comes back intact.
  - "dns-tcp" (`DNS_TCP`, only when asked for): app.corp.example over TCP from the edge's DNS
    listener on port 53, which must answer 198.51.100.10 (a DNS route of the zone).
  `start()`, `wait_requests(n, timeout)` (every kind finished `n` more requests), `outcomes()`
  and `stop() -> Summary`.
- `Summary`: per kind a `KindSummary` (ok and failed counts, the failures' reasons, latency
  p50/p99 in seconds); `all_ok`, `describe()`. `percentile(values, p)` is nearest-rank.
- The attacker, from `source` (default `ATTACKER`, the lab's first client address):
  `flood(lab, asks, leave=False) -> Counter` sends every `Ask(via, host, port)` (a SOCKS5 or
  HTTP CONNECT) at once and counts the answers ("rep 0x04", "http 403 REASON", "closed",
  ...; `answers()` drops the reasons); with `leave` each client hangs up right after its
  request. `FloodInBackground(lab, asks)` is the same in a thread (`join()` for the counts).
  `SlowHandshakes(lab, count)` holds `count` connections that send a first byte and nothing
  more, opening a new one for each the edge ends, until `stop()`; it counts `attempts`,
  `open` (held now) and `outcomes` ("closed", "reset", "connect: ERROR"; `closed_by_edge`).
- `ProcessUsage(proc)`: `sample() -> Usage` (open descriptors from /proc/PID/fd, VmRSS in KiB)
  and `wait_back_to(start, fd_slack=..., rss_slack_kib=..., timeout=...)`, which waits until
  both are back within the slack of `start` and raises TimeoutError naming what stayed up.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
from dns.rdatatype import A

from ramp.testing.clients import (
    REP_SUCCEEDED,
    ProxyError,
    http_connect,
    http_forward_get,
    parse_status,
    recv_until_eof,
    socks5_connect,
    socks5_greeting,
    socks5_request,
    socks5_udp_associate,
    udp_unwrap,
    udp_wrap,
)
from ramp.testing.lab import (
    APP_NAME,
    CLIENT_ADDR,
    CLIENT_ADDR2,
    EDGE_PUBLIC_ADDR,
    HTTP_PORT,
    HTTP_PROXY_PORT,
    ORIGIN,
    SOCKS_PORT,
    UDP_ECHO_PORT,
    FileInfo,
    Lab,
    LabProcess,
    wait_until,
)
from ramp.testing.wait import DEADLINE

KINDS = ("socks5", "http", "udp")
DNS_TCP = "dns-tcp"  # not in KINDS: needs the edge's DNS listener and a routed zone
ATTACKER = CLIENT_ADDR  # the lab's first client address; the legitimate client has its own
UDP_RESEND = 1.0  # seconds between copies of an unanswered datagram


# --- outcomes and their summary ---------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One request of the legitimate client."""

    kind: str
    ok: bool
    seconds: float
    reason: str = ""  # why it failed


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (`p` in 0..100) of `values`; NaN when there are none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class KindSummary:
    ok: int
    failed: int
    failures: tuple[str, ...]  # reasons, in order
    p50: float  # seconds, of the successful requests
    p99: float


@dataclass(frozen=True)
class Summary:
    kinds: dict[str, KindSummary] = field(default_factory=dict)

    @classmethod
    def of(cls, outcomes: Iterable[Outcome], kinds: Sequence[str] = KINDS) -> Summary:
        by_kind: dict[str, list[Outcome]] = {k: [] for k in kinds}
        for o in outcomes:
            by_kind.setdefault(o.kind, []).append(o)
        result = {}
        for kind, items in by_kind.items():
            good = [o.seconds for o in items if o.ok]
            bad = tuple(o.reason for o in items if not o.ok)
            result[kind] = KindSummary(
                len(good), len(bad), bad, percentile(good, 50), percentile(good, 99)
            )
        return cls(result)

    @property
    def all_ok(self) -> bool:
        """Every kind made at least one request and none failed."""
        return bool(self.kinds) and all(s.ok > 0 and s.failed == 0 for s in self.kinds.values())

    def describe(self) -> str:
        lines = []
        for kind, s in self.kinds.items():
            lines.append(
                f"{kind}: {s.ok} ok, {s.failed} failed, "
                f"p50 {s.p50 * 1000:.1f} ms, p99 {s.p99 * 1000:.1f} ms"
            )
            lines.extend(f"  failed: {reason}" for reason in s.failures[:10])
        return "\n".join(lines)


# --- the legitimate client --------------------------------------------------------------------


def _file_info(path: Path) -> FileInfo:
    data = path.read_bytes()
    return FileInfo(path.name, len(data), hashlib.sha256(data).hexdigest())


def _check_body(response: bytes, want: FileInfo) -> None:
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        raise ProxyError(f"no complete response head: {response[:80]!r}")
    status = parse_status(head + sep)
    if status != 200:
        raise ProxyError(f"origin answered {status}")
    if len(body) != want.size or hashlib.sha256(body).hexdigest() != want.sha256:
        raise ProxyError(f"body of {len(body)} bytes does not match {want.name}")


class LegitClient:
    """Fetches through the edge from `source` in C until stopped; see the module docstring."""

    def __init__(
        self,
        lab: Lab,
        *,
        source: str = CLIENT_ADDR2,
        kinds: Sequence[str] = KINDS,
        deadline: float = DEADLINE,
        pause: float = 0.05,
    ) -> None:
        unknown = set(kinds) - {*KINDS, DNS_TCP}
        if unknown:
            raise ValueError(f"unknown kinds {sorted(unknown)}; known: {(*KINDS, DNS_TCP)}")
        self.lab = lab
        self.source = source
        self.kinds = tuple(kinds)
        self.deadline = deadline
        self.pause = pause
        self.file = lab.payload.small if lab.payload else _file_info(lab.workdir / "www/small.bin")
        self._outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # running

    def start(self) -> LegitClient:
        if self._threads:
            raise RuntimeError("already started")
        for kind in self.kinds:
            # The whole loop runs inside C, so every socket it makes belongs there.
            t = threading.Thread(
                target=self.lab.client.call, args=(self._loop, kind), name=f"legit-{kind}"
            )
            t.daemon = True
            t.start()
            self._threads.append(t)
        return self

    def __enter__(self) -> LegitClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> Summary:
        """Finish the requests under way (each within its deadline) and summarise all."""
        self._stop.set()
        for t in self._threads:
            t.join(self.deadline + 10)
        return self.summary()

    def outcomes(self) -> list[Outcome]:
        with self._lock:
            return list(self._outcomes)

    def summary(self) -> Summary:
        return Summary.of(self.outcomes(), self.kinds)

    def counts(self) -> dict[str, int]:
        found = dict.fromkeys(self.kinds, 0)
        for o in self.outcomes():
            found[o.kind] += 1
        return found

    def wait_requests(self, n: int = 1, timeout: float = 4 * DEADLINE) -> None:
        """Until every kind finished `n` more requests than when this was called."""
        before = self.counts()

        def done() -> bool:
            if not any(t.is_alive() for t in self._threads):
                raise RuntimeError("the legitimate client is not running")
            now = self.counts()
            return all(now[k] - before[k] >= n for k in self.kinds)

        wait_until(
            done,
            timeout,
            interval=0.05,
            what=lambda: f"{n} more legitimate requests of each kind ({self.counts()})",
        )

    def _loop(self, kind: str) -> None:
        request = {
            "socks5": self._socks5,
            "http": self._http,
            "udp": self._udp,
            DNS_TCP: self._dns_tcp,
        }[kind]
        turn = 0
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                request(t0 + self.deadline, turn)
            except Exception as e:  # every failure is an outcome the summary shows
                outcome = Outcome(kind, False, time.monotonic() - t0, f"{type(e).__name__}: {e}")
            else:
                outcome = Outcome(kind, True, time.monotonic() - t0)
            with self._lock:
                self._outcomes.append(outcome)
            turn += 1
            self._stop.wait(self.pause)

    # one request of each kind

    def _tcp(self, port: int, end: float) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.1, end - time.monotonic()))
            sock.bind((self.source, 0))
            sock.connect((EDGE_PUBLIC_ADDR, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def _get(self) -> bytes:
        return (
            f"GET /{self.file.name} HTTP/1.1\r\nHost: {ORIGIN}\r\nConnection: close\r\n\r\n"
        ).encode()

    def _socks5(self, end: float, turn: int) -> None:
        with self._tcp(SOCKS_PORT, end) as sock:
            rep = socks5_connect(sock, ORIGIN, HTTP_PORT)
            if rep != REP_SUCCEEDED:
                raise ProxyError(f"SOCKS5 CONNECT answered REP {rep:#x}")
            sock.sendall(self._get())
            _check_body(recv_until_eof(sock), self.file)

    def _http(self, end: float, turn: int) -> None:
        with self._tcp(HTTP_PROXY_PORT, end) as sock:
            if turn % 2 == 0:
                status, _ = http_connect(sock, ORIGIN, HTTP_PORT)
                if status != 200:
                    raise ProxyError(f"CONNECT answered {status}")
                sock.sendall(self._get())
                _check_body(recv_until_eof(sock), self.file)
            else:
                status, head = http_forward_get(sock, ORIGIN, HTTP_PORT, f"/{self.file.name}")
                _check_body(head + recv_until_eof(sock), self.file)

    def _udp(self, end: float, turn: int) -> None:
        with (
            self._tcp(SOCKS_PORT, end) as ctrl,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
        ):
            udp.bind((self.source, 0))
            relay = socks5_udp_associate(ctrl, *udp.getsockname())
            udp.connect(relay)
            data = os.urandom(64)
            packet = udp_wrap(ORIGIN, UDP_ECHO_PORT, data)
            while (left := end - time.monotonic()) > 0:
                udp.send(packet)
                udp.settimeout(min(UDP_RESEND, left))
                try:
                    if udp_unwrap(udp.recv(70000)) == (ORIGIN, UDP_ECHO_PORT, data):
                        return
                except TimeoutError:
                    continue
            raise TimeoutError("no echo of the datagram")

    def _dns_tcp(self, end: float, turn: int) -> None:
        query = dns.message.make_query(APP_NAME, "A")
        answer = dns.query.tcp(
            query, EDGE_PUBLIC_ADDR, timeout=max(0.1, end - time.monotonic()), source=self.source
        )
        found = [r.address for rrset in answer.answer for r in rrset if r.rdtype == A]
        if found != [ORIGIN]:
            raise ProxyError(f"{APP_NAME} answered {dns.rcode.to_text(answer.rcode())} {found}")


# --- the attacker ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Ask:
    """One attacking request: CONNECT to host:port by SOCKS5 or through the HTTP proxy."""

    via: str  # "socks5" or "http"
    host: str
    port: int


def _request_bytes(ask: Ask) -> bytes:
    if ask.via == "socks5":
        return socks5_greeting(None) + socks5_request(ask.host, ask.port)
    host = f"[{ask.host}]" if ":" in ask.host else ask.host
    return f"CONNECT {host}:{ask.port} HTTP/1.1\r\nHost: {host}:{ask.port}\r\n\r\n".encode()


async def _read_answer(loop: asyncio.AbstractEventLoop, sock: socket.socket, via: str) -> str:
    """ "rep 0x04", "http 403 ...reason...", or "closed"."""
    data = b""
    want = 12 if via == "socks5" else 0  # method reply + an IPv4 reply
    while True:
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            break
        data += chunk
        if via == "socks5" and len(data) >= want:
            return f"rep {data[3]:#04x}"
        if via == "http" and b"\r\n\r\n" in data:
            head, _, body = data.partition(b"\r\n\r\n")
            status = head.split(b" ", 2)[1].decode()
            # the reason the edge gives is in the body: read what the head announces
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            while len(body) < length and (chunk := await loop.sock_recv(sock, 4096)):
                body += chunk
            return f"http {status} {body.decode(errors='replace').strip()}"
    if via == "socks5" and len(data) >= 4:
        return f"rep {data[3]:#04x}"
    return "closed"


async def _ask(ask: Ask, *, source: str, leave: bool, timeout: float) -> str:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.bind((source, 0))
        port = SOCKS_PORT if ask.via == "socks5" else HTTP_PROXY_PORT
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (EDGE_PUBLIC_ADDR, port))
            await loop.sock_sendall(sock, _request_bytes(ask))
            if leave:
                return "left"
            return await _read_answer(loop, sock, ask.via)
    except TimeoutError:
        return "no answer"
    except OSError as e:
        return f"error {e.strerror or e}"
    finally:
        sock.close()


def flood(
    lab: Lab,
    asks: Sequence[Ask],
    *,
    source: str = ATTACKER,
    leave: bool = False,
    timeout: float = 2 * DEADLINE,
) -> Counter[str]:
    """All `asks` at once from `source` in C; what each got, counted ("rep 0x04", "http 403
    REASON", "closed", "no answer", "left"). With `leave` each client closes right after
    sending its request."""

    async def run() -> list[str]:
        return await asyncio.gather(
            *(_ask(a, source=source, leave=leave, timeout=timeout) for a in asks)
        )

    return Counter(lab.client.call(asyncio.run, run()))


def answers(got: Counter[str]) -> Counter[str]:
    """`got` by reply code alone ("http 502"), without the reason text of each."""
    found: Counter[str] = Counter()
    for answer, n in got.items():
        found[" ".join(answer.split()[:2])] += n
    return found


class FloodInBackground:
    """`flood` in a thread, so the test can watch the edge while the answers are pending."""

    def __init__(self, lab: Lab, asks: Sequence[Ask], **kwargs: object) -> None:
        self.result: Counter[str] | None = None
        self._thread = threading.Thread(target=self._run, args=(lab, asks, kwargs), daemon=True)
        self._thread.start()

    def _run(self, lab: Lab, asks: Sequence[Ask], kwargs: dict[str, object]) -> None:
        self.result = flood(lab, asks, **kwargs)  # type: ignore[arg-type]

    def join(self, timeout: float = 4 * DEADLINE) -> Counter[str]:
        self._thread.join(timeout)
        assert self.result is not None, "the attacker's requests did not finish"
        return self.result


class SlowHandshakes:
    """`count` connections to the edge (by default its proxy listeners, in turn) that send a
    first byte and then nothing; each one the edge ends is opened again after a pause, until
    `stop`. `targets` are (port, first bytes) on the edge's client-facing address."""

    RECONNECT_PAUSE = 0.2  # the attacker's pacing: a tighter loop only measures its own CPU

    # (port, first bytes): half a SOCKS5 greeting, the start of an HTTP request line
    PROXIES = ((SOCKS_PORT, b"\x05"), (HTTP_PROXY_PORT, b"CONNECT "))

    def __init__(
        self,
        lab: Lab,
        count: int,
        *,
        source: str = ATTACKER,
        targets: Sequence[tuple[int, bytes]] = PROXIES,
    ) -> None:
        self.lab = lab
        self.count = count
        self.source = source
        self.targets = tuple(targets)
        self.open = 0  # connections held now
        self.attempts = 0
        self.outcomes: Counter[str] = Counter()  # "closed", "reset", "connect: ERROR"
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=lab.client.call, args=(asyncio.run, self._run()), daemon=True
        )
        self._thread.start()

    @property
    def closed_by_edge(self) -> int:
        return self.outcomes["closed"] + self.outcomes["reset"]

    async def _one(self, index: int) -> None:
        port, first = self.targets[index % len(self.targets)]
        while not self._stop.is_set():
            self.attempts += 1
            outcome = await self._hold(port, first)
            if outcome is None:
                return
            self.outcomes[outcome] += 1
            await asyncio.sleep(self.RECONNECT_PAUSE)

    async def _hold(self, port: int, first: bytes) -> str | None:
        """One connection until the edge ends it (how) or `stop` (None)."""
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setblocking(False)
            try:
                sock.bind((self.source, 0))
                async with asyncio.timeout(DEADLINE):
                    await loop.sock_connect(sock, (EDGE_PUBLIC_ADDR, port))
                await loop.sock_sendall(sock, first)
            except (OSError, TimeoutError) as e:
                return f"connect: {type(e).__name__}"
            self.open += 1
            try:
                while not self._stop.is_set():
                    try:
                        async with asyncio.timeout(0.5):
                            if not await loop.sock_recv(sock, 4096):
                                return "closed"
                    except TimeoutError:
                        continue
                    except OSError:
                        return "reset"
                return None
            finally:
                self.open -= 1

    async def _run(self) -> None:
        await asyncio.gather(*(self._one(i) for i in range(self.count)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2 * DEADLINE)


# --- descriptors and memory -------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    fds: int
    rss_kib: int


class ProcessUsage:
    """Open descriptors and resident memory of one lab process."""

    def __init__(self, proc: LabProcess) -> None:
        self.proc = proc

    def sample(self) -> Usage:
        self.proc.check_alive()
        pid = self.proc.pid
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        rss = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
        return Usage(fds, rss)

    def wait_back_to(
        self,
        start: Usage,
        *,
        fd_slack: int = 8,
        rss_slack_kib: int = 16 * 1024,
        timeout: float = DEADLINE,
    ) -> Usage:
        """Until descriptors and RSS are within the slack of `start`; returns that sample.

        The slack is for what a process legitimately keeps (a pooled connection, allocator
        arenas grown for the attack's flows: about 5 MiB after 500 flows in the lab); an
        attack's leftovers are hundreds of descriptors, tens of megabytes.
        """
        last: list[Usage] = []

        def back() -> Usage | None:
            now = self.sample()
            last[:] = [now]
            ok = now.fds <= start.fds + fd_slack and now.rss_kib <= start.rss_kib + rss_slack_kib
            return now if ok else None

        return wait_until(
            back,
            timeout,
            interval=0.2,
            what=lambda: (
                f"{self.proc.role} back to {start.fds} fds / {start.rss_kib} KiB "
                f"(+{fd_slack} / +{rss_slack_kib} KiB); now {last[0] if last else '?'}"
            ),
        )
