"""Network namespaces for tests and benchmarks: create, wire up, run things inside, always delete.

A thin layer over iproute2 (`ip`) and nftables (`nft`) run as subprocesses, so what a test builds
can be reproduced by hand from the commands in its error messages. Everything here needs root.

Two ways to act inside a namespace:
- `Netns.popen` / `Netns.run` start a program there (`ip netns exec`), like a user would;
- `Netns.call` / `Netns.socket` run Python in a short-lived thread that has joined the namespace
  (setns(2) only changes the calling thread), so a test can hold sockets in several namespaces
  at once. A socket keeps the namespace it was created in, whichever thread uses it later.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import secrets
import shutil
import signal
import socket as socketlib
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

NETNS_RUN_DIR = Path("/run/netns")
NETNS_ETC_DIR = Path("/etc/netns")  # `ip netns exec` bind-mounts files from here over /etc
CLONE_NEWNET = 0x40000000
DEFAULT_PREFIX = "ramp"

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(RuntimeError):
    """A namespace command failed; the message holds the command and its stderr."""


def _run(args: Sequence[str], *, input: bytes | None = None, timeout: float = 30.0) -> str:
    try:
        proc = subprocess.run(
            list(args), input=input, capture_output=True, timeout=timeout, check=False
        )
    except FileNotFoundError as e:
        raise NetnsError(f"{args[0]} not found: install iproute2 / nftables") from e
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"timed out after {timeout} s: {' '.join(args)}") from e
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise NetnsError(f"`{' '.join(args)}` failed ({proc.returncode}): {err}")
    return proc.stdout.decode(errors="replace")


def ip(*args: str) -> str:
    """Run `ip ARGS` in the current namespace and return its stdout."""
    return _run(["ip", *args])


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None when they can (probes by making one)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    name = f"{DEFAULT_PREFIX}-{os.getpid()}-probe-{secrets.token_hex(2)}"
    try:
        ip("netns", "add", name)
    except NetnsError as e:
        return f"`ip netns add` does not work here: {e}"
    try:
        _run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
    except NetnsError as e:
        return f"`ip netns exec` does not work here: {e}"
    finally:
        with contextlib.suppress(NetnsError):
            ip("netns", "del", name)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> int | None:
    """SIGTERM the process's group, then SIGKILL it after `timeout`. Returns the exit code.

    Processes are started in their own session (see `Netns.popen`), so the group holds the
    program and anything it spawned, and nothing else.
    """
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
    # Children of a program that exited on its own may still run in its group.
    _signal_group(proc, signal.SIGKILL)
    return proc.returncode


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        # The group is gone (or the leader was not a group leader): fall back to the process.
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)


class Netns:
    """One network namespace that this object created and will delete.

    Use `Netns.create`; `close` stops the processes started in it, kills any left inside,
    and deletes the namespace (its veth ends go with it).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.procs: list[subprocess.Popen[Any]] = []
        self._closed = False

    @classmethod
    def create(cls, name: str) -> Netns:
        ip("netns", "add", name)
        ns = cls(name)
        try:
            ns.ip("link", "set", "lo", "up")
        except BaseException:
            ns.close()
            raise
        return ns

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    # --- configuration -------------------------------------------------------------------

    def ip(self, *args: str) -> str:
        """`ip -n NAME ARGS`."""
        return ip("-n", self.name, *args)

    def add_address(self, dev: str, cidr: str) -> None:
        args = ["address", "add", cidr, "dev", dev]
        if ipaddress.ip_interface(cidr).version == 6:
            args.append("nodad")  # usable at once instead of after duplicate detection
        self.ip(*args)

    def link_up(self, dev: str) -> None:
        self.ip("link", "set", dev, "up")

    def add_dummy(self, dev: str, addresses: Iterable[str] = ()) -> None:
        """A dummy interface: holds addresses; packets routed out of it vanish."""
        self.ip("link", "add", dev, "type", "dummy")
        for cidr in addresses:
            self.add_address(dev, cidr)
        self.link_up(dev)

    def add_route(self, dst: str, *, via: str | None = None, dev: str | None = None) -> None:
        args = ["route", "add", dst]
        if via:
            args += ["via", via]
        if dev:
            args += ["dev", dev]
        self.ip(*args)

    def sysctl(self, key: str, value: str | int) -> None:
        self.run(["sysctl", "-q", "-w", f"{key}={value}"])

    def nft(self, ruleset: str) -> None:
        """Load an nftables ruleset (the text `nft -f` reads) into this namespace."""
        _run(["ip", "netns", "exec", self.name, "nft", "-f", "-"], input=ruleset.encode())

    def set_etc_file(self, filename: str, content: str) -> Path:
        """Give programs started here their own /etc/FILENAME (hosts, resolv.conf)."""
        path = NETNS_ETC_DIR / self.name / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        return path

    # --- running things inside -----------------------------------------------------------

    def exec_args(self, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a program inside; it is stopped on `close`. It gets its own session (group)."""
        kwargs.setdefault("start_new_session", True)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[Any] = subprocess.Popen(self.exec_args(args), **kwargs)
        self.procs.append(proc)
        return proc

    def run(
        self,
        args: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60.0,
        input: bytes | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a program inside and wait; stdout and stderr are captured as bytes."""
        proc = self.popen(
            args,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(proc, timeout=1.0)
            out, err = proc.communicate()
            raise NetnsError(
                f"timed out after {timeout} s in {self.name}: {' '.join(args)}\n"
                f"stderr: {err.decode(errors='replace')[-2000:]}"
            ) from None
        finally:
            with contextlib.suppress(ValueError):
                self.procs.remove(proc)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise NetnsError(
                f"`{' '.join(args)}` in {self.name} failed ({proc.returncode}): "
                f"{err.decode(errors='replace').strip()}"
            )
        return result

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(*args, **kwargs)` in a thread inside this namespace and return its result."""
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                self._enter_current_thread()
                box["value"] = fn(*args, **kwargs)
            except BaseException as e:
                box["error"] = e

        thread = threading.Thread(target=target, name=f"in-{self.name}", daemon=True)
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]

    def socket(
        self,
        family: int = socketlib.AF_INET,
        type: int = socketlib.SOCK_STREAM,
        proto: int = 0,
    ) -> socketlib.socket:
        """A socket that lives in this namespace (binds, connects and routes from here)."""
        return self.call(socketlib.socket, family, type, proto)

    def sockets(
        self,
        count: int,
        family: int = socketlib.AF_INET,
        type: int = socketlib.SOCK_STREAM,
    ) -> list[socketlib.socket]:
        """`count` sockets in this namespace, made in one thread switch."""
        return self.call(lambda: [socketlib.socket(family, type) for _ in range(count)])

    def _enter_current_thread(self) -> None:
        fd = os.open(NETNS_RUN_DIR / self.name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({self.name}): {os.strerror(err)}")
        finally:
            os.close(fd)

    def pids(self) -> list[int]:
        """Processes whose network namespace is this one."""
        try:
            out = ip("netns", "pids", self.name)
        except NetnsError:
            return []
        return [int(p) for p in out.split() if p.isdigit()]

    # --- teardown ------------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Stop what runs inside and delete the namespace. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        for proc in reversed(self.procs):
            stop_process(proc, timeout)
        self.procs.clear()
        _kill_inside(self.name)
        with contextlib.suppress(NetnsError):
            ip("netns", "del", self.name)
        shutil.rmtree(NETNS_ETC_DIR / self.name, ignore_errors=True)


def _kill_inside(name: str) -> None:
    """SIGKILL whatever still runs in namespace `name`: only what this module started there."""
    try:
        out = ip("netns", "pids", name)
    except NetnsError:
        return
    for pid in (int(p) for p in out.split() if p.isdigit()):
        if pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def veth(
    a: Netns,
    a_dev: str,
    b: Netns,
    b_dev: str,
    *,
    a_addresses: Iterable[str] = (),
    b_addresses: Iterable[str] = (),
    mtu: int | None = None,
) -> None:
    """A veth pair from namespace `a` to namespace `b`, addressed and up.

    Made directly inside `a` with the peer moved to `b`, so nothing ever appears in the
    namespace of the caller.
    """
    args = ["link", "add", a_dev]
    if mtu:
        args += ["mtu", str(mtu)]
    args += ["type", "veth", "peer", "name", b_dev, "netns", b.name]
    if mtu:
        args += ["mtu", str(mtu)]
    a.ip(*args)
    for ns, dev, addresses in ((a, a_dev, a_addresses), (b, b_dev, b_addresses)):
        for cidr in addresses:
            ns.add_address(dev, cidr)
        ns.link_up(dev)


class NetnsGroup:
    """Namespaces with unique names that are all deleted together, also on errors.

    Names are `PREFIX-PID-RANDOM-ROLE`, so parallel runs never collide and leftovers of a run
    that was killed can be recognised (`reap_stale`).

        with NetnsGroup() as group:
            edge = group.new("edge")
            ...
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.stem = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
        self.namespaces: list[Netns] = []

    def new(self, role: str) -> Netns:
        ns = Netns.create(f"{self.stem}-{role}")
        self.namespaces.append(ns)
        return ns

    def close(self) -> None:
        # Stop all processes first: a process in one namespace may hold sockets to another.
        for ns in reversed(self.namespaces):
            for proc in reversed(ns.procs):
                stop_process(proc)
        errors: list[BaseException] = []
        for ns in reversed(self.namespaces):
            try:
                ns.close()
            except Exception as e:  # keep deleting the others
                errors.append(e)
        self.namespaces.clear()
        if errors:
            raise errors[0]

    def __enter__(self) -> NetnsGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def namespaces(prefix: str = DEFAULT_PREFIX) -> Iterator[NetnsGroup]:
    with NetnsGroup(prefix) as group:
        yield group


def reap_stale(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Delete namespaces `PREFIX-PID-...` left by a process PID that no longer exists.

    Only names this module makes are touched, and only when their creator is dead (a run that
    was SIGKILLed cannot clean up after itself). Returns the names deleted.
    """
    reaped: list[str] = []
    if not NETNS_RUN_DIR.is_dir():
        return reaped
    for entry in sorted(NETNS_RUN_DIR.iterdir()):
        parts = entry.name.split("-")
        if len(parts) < 3 or parts[0] != prefix or not parts[1].isdigit():
            continue
        if _pid_alive(int(parts[1])):
            continue
        _kill_inside(entry.name)
        with contextlib.suppress(NetnsError):
            ip("netns", "del", entry.name)
        shutil.rmtree(NETNS_ETC_DIR / entry.name, ignore_errors=True)
        reaped.append(entry.name)
    return reaped


__all__ = [
    "Netns",
    "NetnsError",
    "NetnsGroup",
    "ip",
    "namespaces",
    "reap_stale",
    "stop_process",
    "unavailable_reason",
    "veth",
]
