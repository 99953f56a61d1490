"""Steer every port of a prefix to one socket with a BPF sk_lookup program (Linux 5.9+).

The design of cloudflare/tubular and of the "socket lookup with BPF" talk
(reference: socket-lookup-bpf-any-port.txt): a BPF_PROG_TYPE_SK_LOOKUP program attached to the
network namespace with a BPF link runs when the kernel looks for a listening TCP socket or an
unconnected UDP socket for a local packet. It matches the packet's destination against maps
and, on a match, hands the packet to the socket held in a SOCKMAP. The socket itself is bound
anywhere (127.0.0.1:0 by default); `getsockname()` on an accepted connection, or
IP_ORIGDSTADDR on a datagram, still says which address and port the client dialled.

Maps (their names show in `bpftool map`):
- `ramp_prefixes`: LPM trie, key {u32 prefix length, 4 or 16 address bytes}, value u32
  (unused); the prefixes this program claims (one address family per program).
- `ramp_ports`: array of one {u32 first, u32 last}: the port range, host byte order.
- `ramp_sockets`: SOCKMAP of one: the listening socket.

Nothing is pinned: the kernel frees program, maps and link when the last descriptor closes,
so an edge that dies (even SIGKILL) leaves no steering behind.

The program is built here, in Python, with `ramp.net.bpf`; `python -m ramp.net.sk_lookup
[tcp|udp] [ipv4|ipv6]` prints its instructions and bytecode (map descriptors as 0), the same
bytes on every machine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import struct
import sys
from collections.abc import Sequence

from ramp.net import bpf
from ramp.net.bpf import (
    BPF_JEQ,
    BPF_JGT,
    BPF_JLT,
    BPF_JNE,
    BPF_W,
    R0,
    R1,
    R2,
    R3,
    R6,
    R7,
    R8,
    R10,
    Assembler,
    alu64_imm,
    call,
    exit_insn,
    jmp_imm,
    jmp_reg,
    ld_map_fd,
    ldx_mem,
    mov64_imm,
    mov64_reg,
    st_mem,
    stx_mem,
)

log = logging.getLogger(__name__)

PROG_NAME = "ramp_anyport"
MAX_PREFIXES = 64

# struct bpf_sk_lookup (include/uapi/linux/bpf.h): offsets of the fields the program reads
CTX_FAMILY = 8
CTX_PROTOCOL = 12
CTX_LOCAL_IP4 = 40
CTX_LOCAL_IP6 = 44
CTX_LOCAL_PORT = 60
CTX_SIZE = 68  # through ingress_ifindex

AF_INET = 2
AF_INET6 = 10


def program(
    prefixes_fd: int, ports_fd: int, sockets_fd: int, protocol: int, family: int = AF_INET
) -> Assembler:
    """The sk_lookup program: packets of `family` and `protocol` to a claimed prefix and port
    go to the socket in the socket map; everything else goes on to the kernel's usual lookup."""
    words = 1 if family == AF_INET else 4  # the address, in 32-bit words
    key = -4 * (words + 1)  # the LPM key on the stack: {u32 prefix length, the address}
    ports_key, socket_key = key - 4, key - 8
    a = Assembler()
    a.emit(mov64_reg(R6, R1))  # r6 = ctx, kept across helper calls
    a.emit(ldx_mem(BPF_W, R2, R6, CTX_FAMILY))
    a.emit(jmp_imm(BPF_JNE, R2, family, "pass"))
    a.emit(ldx_mem(BPF_W, R2, R6, CTX_PROTOCOL))
    a.emit(jmp_imm(BPF_JNE, R2, protocol, "pass"))
    # the destination address, in network byte order as the LPM trie compares it
    local = CTX_LOCAL_IP4 if family == AF_INET else CTX_LOCAL_IP6
    for i in range(words):
        a.emit(ldx_mem(BPF_W, R2, R6, local + 4 * i))
        a.emit(stx_mem(BPF_W, R10, R2, key + 4 + 4 * i))
    a.emit(st_mem(BPF_W, R10, key, 32 * words))
    a.emit(ld_map_fd(R1, prefixes_fd))
    a.emit(mov64_reg(R2, R10), alu64_imm(bpf.BPF_ADD, R2, key))
    a.emit(call(bpf.BPF_FUNC_map_lookup_elem))
    a.emit(jmp_imm(BPF_JEQ, R0, 0, "pass"))
    # the port range
    a.emit(st_mem(BPF_W, R10, ports_key, 0))
    a.emit(ld_map_fd(R1, ports_fd))
    a.emit(mov64_reg(R2, R10), alu64_imm(bpf.BPF_ADD, R2, ports_key))
    a.emit(call(bpf.BPF_FUNC_map_lookup_elem))
    a.emit(jmp_imm(BPF_JEQ, R0, 0, "pass"))
    a.emit(ldx_mem(BPF_W, R7, R6, CTX_LOCAL_PORT))
    a.emit(ldx_mem(BPF_W, R2, R0, 0))
    a.emit(jmp_reg(BPF_JLT, R7, R2, "pass"))
    a.emit(ldx_mem(BPF_W, R2, R0, 4))
    a.emit(jmp_reg(BPF_JGT, R7, R2, "pass"))
    # the socket: a referenced pointer that must be released whatever sk_assign says
    a.emit(st_mem(BPF_W, R10, socket_key, 0))
    a.emit(ld_map_fd(R1, sockets_fd))
    a.emit(mov64_reg(R2, R10), alu64_imm(bpf.BPF_ADD, R2, socket_key))
    a.emit(call(bpf.BPF_FUNC_map_lookup_elem))
    a.emit(jmp_imm(BPF_JEQ, R0, 0, "pass"))
    a.emit(mov64_reg(R8, R0))
    a.emit(mov64_reg(R1, R6), mov64_reg(R2, R8), mov64_imm(R3, 0))
    a.emit(call(bpf.BPF_FUNC_sk_assign))
    a.emit(mov64_reg(R1, R8))
    a.emit(call(bpf.BPF_FUNC_sk_release))
    a.label("pass")
    a.emit(mov64_imm(R0, bpf.SK_PASS))
    a.emit(exit_insn())
    return a


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def lpm_key(network: Network) -> bytes:
    return struct.pack("<I", network.prefixlen) + network.network_address.packed


def lookup_context(protocol: int, local: tuple[str, int], remote: tuple[str, int]) -> bytes:
    """A struct bpf_sk_lookup as BPF_PROG_TEST_RUN takes it (tests, diagnostics)."""
    v6 = ":" in local[0]
    family = socket.AF_INET6 if v6 else socket.AF_INET
    ctx = bytearray(CTX_SIZE)
    struct.pack_into("<II", ctx, CTX_FAMILY, AF_INET6 if v6 else AF_INET, protocol)
    if v6:
        ctx[20:36] = socket.inet_pton(family, remote[0])
        ctx[CTX_LOCAL_IP6 : CTX_LOCAL_IP6 + 16] = socket.inet_pton(family, local[0])
    else:
        ctx[16:20] = socket.inet_pton(family, remote[0])
        ctx[CTX_LOCAL_IP4 : CTX_LOCAL_IP4 + 4] = socket.inet_pton(family, local[0])
    struct.pack_into(">H", ctx, 36, remote[1])
    struct.pack_into("<I", ctx, CTX_LOCAL_PORT, local[1])
    return bytes(ctx)


class SkLookup:
    """The program, its maps and its link for one socket; `close()` detaches and frees all.

    steer = SkLookup(sock, [ip_network("203.0.113.0/24")], (1, 65535))
    ...
    steer.close()
    """

    def __init__(
        self,
        sock: socket.socket,
        prefixes: Sequence[Network],
        ports: tuple[int, int],
        netns_path: str = "/proc/self/ns/net",
        *,
        attach: bool = True,
    ) -> None:
        """`attach=False` loads the program without attaching it (to test-run it)."""
        if sock.type == socket.SOCK_STREAM:
            protocol = socket.IPPROTO_TCP
        elif sock.type == socket.SOCK_DGRAM:
            protocol = socket.IPPROTO_UDP
        else:
            raise ValueError(f"sk_lookup steers TCP or UDP sockets, not {sock.type!r}")
        if len(prefixes) > MAX_PREFIXES:
            raise ValueError(f"at most {MAX_PREFIXES} prefixes per listener")
        versions = {p.version for p in prefixes}
        if len(versions) != 1:
            raise ValueError("the prefixes of one listener are all IPv4 or all IPv6")
        family = AF_INET6 if versions == {6} else AF_INET
        if (sock.family == socket.AF_INET6) != (family == AF_INET6):
            raise ValueError("an IPv6 prefix needs an IPv6 socket, an IPv4 one an IPv4 socket")
        self.protocol = protocol
        self._fds: list[int] = []
        try:
            self.prefixes_fd = self._keep(
                bpf.map_create(
                    bpf.BPF_MAP_TYPE_LPM_TRIE,
                    4 + (16 if family == AF_INET6 else 4),
                    4,
                    MAX_PREFIXES,
                    "ramp_prefixes",
                    bpf.BPF_F_NO_PREALLOC,
                )
            )
            self.ports_fd = self._keep(
                bpf.map_create(bpf.BPF_MAP_TYPE_ARRAY, 4, 8, 1, "ramp_ports")
            )
            self.sockets_fd = self._keep(
                bpf.map_create(bpf.BPF_MAP_TYPE_SOCKMAP, 4, 8, 1, "ramp_sockets")
            )
            for network in prefixes:
                bpf.map_update(self.prefixes_fd, lpm_key(network), struct.pack("<I", 1))
            bpf.map_update(self.ports_fd, struct.pack("<I", 0), struct.pack("<II", *ports))
            bpf.map_update(self.sockets_fd, struct.pack("<I", 0), struct.pack("<Q", sock.fileno()))
            code = program(self.prefixes_fd, self.ports_fd, self.sockets_fd, protocol, family)
            self.prog_fd = self._keep(
                bpf.prog_load(
                    bpf.BPF_PROG_TYPE_SK_LOOKUP,
                    code.resolved(),
                    PROG_NAME,
                    expected_attach_type=bpf.BPF_SK_LOOKUP,
                )
            )
            self.prog_id = bpf.obj_id(self.prog_fd)
            self.link_id = 0
            if attach:
                netns = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    link_fd = bpf.link_create(self.prog_fd, netns, bpf.BPF_SK_LOOKUP)
                finally:
                    os.close(netns)
                self.link_id = bpf.obj_id(self._keep(link_fd))
        except BaseException:
            self.close()
            raise

    def _keep(self, fd: int) -> int:
        os.set_inheritable(fd, False)
        self._fds.append(fd)
        return fd

    def close(self) -> None:
        """Detach (closing the link) and free the program and maps. Idempotent."""
        fds, self._fds = self._fds, []
        for fd in reversed(fds):
            with contextlib.suppress(OSError):
                os.close(fd)


def main(argv: list[str] | None = None) -> None:
    """Print the program's instructions and its bytecode in hex."""
    args = sys.argv[1:] if argv is None else argv
    proto = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}[args[0] if args else "tcp"]
    family = AF_INET6 if args[1:] == ["ipv6"] else AF_INET
    insns = program(0, 0, 0, proto, family).resolved()
    for pc, insn in enumerate(insns):
        print(
            f"{pc:3d}: code={insn.code:#04x} dst=r{insn.dst} src=r{insn.src} "
            f"off={insn.off} imm={insn.imm}"
        )
    print(b"".join(i.encode() for i in insns).hex())


if __name__ == "__main__":
    main()
