"""A service manager's end of sd_notify, for tests: the datagrams a role sends."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path


def parse(data: bytes) -> dict[str, str]:
    # systemd splits on newlines only
    return dict(line.split("=", 1) for line in data.decode().split("\n") if line)


class Manager:
    """The service manager's end: a datagram socket the role notifies."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(1.0)
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, deadline: float = 60.0) -> dict[str, str]:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            try:
                message = parse(self.sock.recv(4096))
            except TimeoutError:
                continue
            self.messages.append(message)
            if key in message:
                return message
        raise AssertionError(f"no {key} notification; got {self.messages}")


def reap(proc: subprocess.Popen[bytes], manager: Manager) -> str:
    """End a role started with stderr=PIPE (killed if it still runs) and the manager's
    socket; the role's stderr."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    manager.sock.close()
    return err
