"""Steady load through an edge while it restarts: new SOCKS5 TCP flows at a fixed rate, a UDP
echo through one SOCKS5 UDP association, and a DNS query loop; every outcome counted.

Run in the client's network namespace (`python -m ramp.testing.restart_load ...`); it stops
by itself after `--duration` seconds (or at SIGTERM, sooner) and prints one JSON object: what
failed, and why.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import os
import re
import signal
import socket
import struct
import sys
import time
from typing import Any

import dns.asyncquery
import dns.exception
import dns.message
import dns.rcode

from ramp.net.sockopts import set_buffers
from ramp.testing.clients import (
    ProxyError,
    socks5_connect_async,
    socks5_udp_associate,
    udp_unwrap,
    udp_wrap,
)

FLOW_TIMEOUT = 10.0
UDP_SETTLE = 5.0  # seconds to wait for the last echoes (a busy machine lags)
DNS_TIMEOUT = 2.0
DOWNLOAD_RCVBUF = 32 * 1024
DOWNLOAD_CHUNK = 16 * 1024
DOWNLOAD_TIMEOUT = 120.0
UDP_BUFFER = 8 << 20


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.flows: collections.Counter[str] = collections.Counter()
        self.dns: collections.Counter[str] = collections.Counter()
        self.downloads: collections.Counter[str] = collections.Counter()
        self.udp_sent = 0
        self.udp_seen: set[int] = set()
        self.udp_errors: collections.Counter[str] = collections.Counter()
        self.tasks: set[asyncio.Task[None]] = set()
        self.until = 0.0  # the loop time to stop at: --duration, or SIGTERM's

    async def flow(self) -> None:
        socks_host, socks_port = _hostport(self.args.socks)
        host, port = _hostport(self.args.echo)
        writer = None
        try:
            async with asyncio.timeout(FLOW_TIMEOUT):
                reader, writer = await asyncio.open_connection(socks_host, socks_port)
                rep = await socks5_connect_async(reader, writer, host, port)
                if rep != 0:
                    self.flows[f"rep_{rep}"] += 1
                    return
                data = os.urandom(32)
                writer.write(data)
                await writer.drain()
                if await reader.readexactly(len(data)) != data:
                    self.flows["wrong_echo"] += 1
                    return
            self.flows["ok"] += 1
        except TimeoutError:
            self.flows["timeout"] += 1
        except (OSError, ProxyError, asyncio.IncompleteReadError) as e:
            self.flows[type(e).__name__] += 1
        finally:
            if writer is not None:
                writer.close()

    async def flows_at_rate(self) -> None:
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.args.rate
        next_at = loop.time()
        while next_at < self.until:
            task = asyncio.ensure_future(self.flow())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    async def udp_echo(self) -> None:
        socks_host, socks_port = _hostport(self.args.socks)
        host, port = _hostport(self.args.udp_echo)
        control = socket.create_connection((socks_host, socks_port), timeout=FLOW_TIMEOUT)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        set_buffers(udp, UDP_BUFFER)  # a busy machine must not drop the echoes here
        udp.bind(("0.0.0.0", 0))
        relay = socks5_udp_associate(control, *udp.getsockname())
        udp.connect(relay)
        udp.setblocking(False)
        loop = asyncio.get_running_loop()

        def readable() -> None:
            while True:
                try:
                    packet = udp.recv(2048)
                except BlockingIOError:
                    return
                except OSError as e:
                    self.udp_errors[type(e).__name__] += 1
                    return
                try:
                    _, _, data = udp_unwrap(packet)
                    self.udp_seen.add(struct.unpack_from("!Q", data)[0])
                except (ProxyError, struct.error):
                    self.udp_errors["malformed"] += 1

        loop.add_reader(udp.fileno(), readable)
        interval = 1.0 / self.args.udp_rate
        next_at = loop.time()
        try:
            while next_at < self.until:
                payload = struct.pack("!Q", self.udp_sent) + b"x" * 56
                try:
                    udp.send(udp_wrap(host, port, payload))
                    self.udp_sent += 1
                except OSError as e:
                    self.udp_errors[type(e).__name__] += 1
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - loop.time()))
            settle = loop.time() + UDP_SETTLE
            while len(self.udp_seen) < self.udp_sent and loop.time() < settle:
                await asyncio.sleep(0.05)
        finally:
            loop.remove_reader(udp.fileno())
            udp.close()
            control.close()

    async def download(self) -> None:
        """GET --download-path from the HTTP origin through SOCKS5, read at --download-rate
        with a small receive buffer (so the bytes really cross the edge while it restarts,
        rather than sitting in this host's buffers); its sha256 must match."""
        socks_host, socks_port = _hostport(self.args.socks)
        host, port = _hostport(self.args.http)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, DOWNLOAD_RCVBUF)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        writer = None
        try:
            async with asyncio.timeout(DOWNLOAD_TIMEOUT):
                await loop.sock_connect(sock, (socks_host, socks_port))
                reader, writer = await asyncio.open_connection(sock=sock, limit=DOWNLOAD_RCVBUF)
                if await socks5_connect_async(reader, writer, host, port) != 0:
                    self.downloads["refused"] += 1
                    return
                writer.write(
                    f"GET {self.args.download_path} HTTP/1.1\r\nHost: {host}\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))  # type: ignore[union-attr]
                digest = hashlib.sha256()
                got = 0
                started = loop.time()
                while got < length:
                    chunk = await reader.read(min(DOWNLOAD_CHUNK, length - got))
                    if not chunk:
                        break
                    digest.update(chunk)
                    got += len(chunk)
                    ahead = got / self.args.download_rate - (loop.time() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
            if got == length and digest.hexdigest() == self.args.download_sha256:
                self.downloads["ok"] += 1
            else:
                self.downloads["short" if got < length else "wrong_sha256"] += 1
        except TimeoutError:
            self.downloads["timeout"] += 1
        except (OSError, ProxyError, asyncio.IncompleteReadError, ValueError, AttributeError) as e:
            self.downloads[type(e).__name__] += 1
        finally:
            if writer is not None:
                writer.close()
            else:
                sock.close()

    async def dns_loop(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = _hostport(self.args.dns)
        while loop.time() < self.until:
            query = dns.message.make_query(self.args.dns_name, "A")
            try:
                answer = await dns.asyncquery.udp(query, host, port=port, timeout=DNS_TIMEOUT)
                rcode = dns.rcode.to_text(answer.rcode())
                self.dns["ok" if rcode == "NOERROR" and answer.answer else rcode] += 1
            except dns.exception.Timeout:
                self.dns["timeout"] += 1
            except (OSError, dns.exception.DNSException) as e:
                self.dns[type(e).__name__] += 1
            await asyncio.sleep(1.0 / self.args.dns_rate)

    def stop(self) -> None:
        self.until = min(self.until, asyncio.get_running_loop().time())

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        self.until = loop.time() + self.args.duration
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        jobs = [self.flows_at_rate(), self.udp_echo()]
        jobs += [self.download() for _ in range(self.args.downloads)]
        if self.args.dns:
            jobs.append(self.dns_loop())
        started = time.monotonic()
        results = await asyncio.gather(*jobs, return_exceptions=True)
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=FLOW_TIMEOUT + 1)
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        return {
            "seconds": round(time.monotonic() - started, 2),
            "flows": dict(self.flows),
            "flows_failed": sum(n for k, n in self.flows.items() if k != "ok"),
            "udp_sent": self.udp_sent,
            "udp_received": len(self.udp_seen),
            "udp_lost": self.udp_sent - len(self.udp_seen),
            "udp_errors": dict(self.udp_errors),
            "dns": dict(self.dns),
            "dns_failed": sum(n for k, n in self.dns.items() if k != "ok"),
            "downloads": dict(self.downloads),
            "downloads_failed": sum(n for k, n in self.downloads.items() if k != "ok"),
            "errors": errors,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socks", required=True, help="the edge's SOCKS5 HOST:PORT")
    parser.add_argument("--echo", required=True, help="a TCP echo HOST:PORT behind the tunnel")
    parser.add_argument("--udp-echo", required=True, help="a UDP echo HOST:PORT behind it")
    parser.add_argument("--dns", default="", help="the edge's DNS HOST:PORT (empty: none)")
    parser.add_argument("--dns-name", default="", help="a name the DNS listener answers")
    parser.add_argument("--rate", type=float, default=200.0, help="new TCP flows per second")
    parser.add_argument("--udp-rate", type=float, default=2000.0, help="datagrams per second")
    parser.add_argument("--dns-rate", type=float, default=20.0, help="DNS queries per second")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--downloads", type=int, default=0, help="long downloads at once")
    parser.add_argument("--http", default="", help="the HTTP origin HOST:PORT to download from")
    parser.add_argument("--download-path", default="/")
    parser.add_argument("--download-sha256", default="")
    parser.add_argument(
        "--download-rate", type=float, default=100_000, help="bytes/s of each download"
    )
    args = parser.parse_args(argv)
    if not 0 < args.duration <= 120:
        parser.error("--duration must be in (0, 120] seconds")
    result = asyncio.run(Load(args).run())
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
