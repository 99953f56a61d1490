"""UDP socket generations: one SO_REUSEPORT group, a program that keeps each QUIC connection
on the socket (process) that holds it, and new connections on the working sockets.

The udpgrm design (reference: udpgrm-udp-graceful-restarts.txt) without a daemon: the
sockets of one address and port form a reuseport group; each socket sits at a "slot" of a
BPF_MAP_TYPE_REUSEPORT_SOCKARRAY; the servers put their slot in every connection id they
issue (ramp.quic.cookies). A BPF_PROG_TYPE_SK_REUSEPORT program reads the destination
connection id of each datagram and:

- a valid cookie whose slot holds a socket: that socket (the connection's own process, even
  while it drains after a restart);
- anything else (Initial packets, ids without a valid cookie, a slot now empty): one of the
  working slots, chosen by the kernel's hash of the packet's addresses and ports, so every
  packet of one client lands on the same one.

Maps (their names show in `bpftool map`):
- `ramp_rp_socks`: REUSEPORT_SOCKARRAY, key u32 slot, value u64 socket descriptor;
- `ramp_rp_work`: ARRAY of u32: entry 0 the number of working slots, entries 1.. the slots.

The program is assembled in Python at load time (`program`, with ramp.net.bpf); the cookie
key goes into it as immediates. `python -m ramp.net.reuseport` prints its instructions.

When eBPF cannot be loaded the group falls back to a classic BPF program
(SO_ATTACH_REUSEPORT_CBPF, `cbpf_program`) and says so with a warning. Classic BPF has no
maps: it returns an index into the kernel's list of the group's sockets, in the order they
joined (a closed socket's place is taken by the last one). The program is rebuilt and
attached again on every change, from this process's view of that order, so it can only
honour slots whose join order this process knows: sockets it made or adopted, and those named
in a handoff. Packets without a valid cookie are spread by their connection id (not the
addresses: classic BPF cannot read them after the UDP header is pulled).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ramp.net import bpf
from ramp.net.bpf import (
    BPF_AND,
    BPF_JEQ,
    BPF_JNE,
    BPF_JSET,
    BPF_LSH,
    BPF_MOD,
    BPF_MUL,
    BPF_OR,
    BPF_RSH,
    BPF_XOR,
    R0,
    R1,
    R2,
    R3,
    R4,
    R6,
    R7,
    R8,
    R9,
    R10,
    Assembler,
    alu32_imm,
    alu32_reg,
    alu64_imm,
    be,
    call,
    exit_insn,
    ja,
    jmp_imm,
    jmp_reg,
    ld_map_fd,
    ldx_mem,
    mov64_imm,
    mov64_reg,
    st_mem,
    stx_mem,
)
from ramp.net.sockopts import set_buffers
from ramp.quic import cookies as ck
from ramp.quic.cookies import MAX_SLOTS, CidCookies

log = logging.getLogger(__name__)

SO_ATTACH_REUSEPORT_CBPF = 51  # Linux asm-generic/socket.h
SO_ATTACH_REUSEPORT_EBPF = 52
PROG_NAME = "ramp_reuseport"
UDP_HEADER = 8
CTX_HASH = 32  # struct sk_reuseport_md: u32 hash of the packet's 4-tuple
MECHANISM_ENV = "RAMP_STEERING"  # "ebpf", "cbpf" or "none": force a mechanism (tests)

__all__ = ["MAX_SLOTS", "SteeringGroup", "udp_socket"]


# bursts of a fast tunnel outrun the default 208 KiB socket buffers
UDP_BUFFER = 4 * 1024 * 1024


def udp_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A UDP socket bound to host:port with large buffers; `::` is dual-stack."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and host in ("::", ""):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        set_buffers(sock, UDP_BUFFER)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


# --- the eBPF program --------------------------------------------------------------------------

_BUF = -16  # 8 bytes of packet on the stack
_KEY = -20  # a map key
_KEY2 = -24


def _load_bytes(a: Assembler, offset_reg: int | None, offset: int, length: int) -> None:
    """r0 = bpf_skb_load_bytes(md, offset, r10 + _BUF, length): 0 or an error."""
    a.emit(mov64_reg(R1, R6))
    if offset_reg is None:
        a.emit(mov64_imm(R2, offset))
    else:
        a.emit(mov64_reg(R2, offset_reg))
    a.emit(mov64_reg(R3, R10), alu64_imm(bpf.BPF_ADD, R3, _BUF), mov64_imm(R4, length))
    a.emit(call(bpf.BPF_FUNC_skb_load_bytes))


def program(socks_fd: int, work_fd: int, key: bytes, cid_length: int = 8) -> Assembler:
    """The SK_REUSEPORT program; `key` is the cookie key (ramp.quic.cookies: `mix` is the
    arithmetic below, in 32-bit registers)."""
    k0, k1 = ck.key_words(key)
    a = Assembler()
    a.emit(mov64_reg(R6, R1))  # r6 = md, kept across helper calls
    _load_bytes(a, None, UDP_HEADER, 1)
    a.emit(jmp_imm(BPF_JNE, R0, 0, "working"))
    a.emit(ldx_mem(bpf.BPF_B, R2, R10, _BUF))
    a.emit(mov64_imm(R7, UDP_HEADER + 1))  # short header: the id follows the first byte
    a.emit(jmp_imm(BPF_JSET, R2, 0x80, "long"))
    a.emit(ja("read_cid"))
    a.label("long")  # flags, version (4), id length, id
    _load_bytes(a, None, UDP_HEADER + 5, 1)
    a.emit(jmp_imm(BPF_JNE, R0, 0, "working"))
    a.emit(ldx_mem(bpf.BPF_B, R2, R10, _BUF))
    a.emit(jmp_imm(BPF_JNE, R2, cid_length, "working"))
    a.emit(mov64_imm(R7, UDP_HEADER + 6))
    a.label("read_cid")
    _load_bytes(a, R7, 0, ck.COOKIE_LENGTH)
    a.emit(jmp_imm(BPF_JNE, R0, 0, "working"))
    a.emit(ldx_mem(bpf.BPF_W, R7, R10, _BUF), be(R7, 32))  # w0: bytes 0..3
    a.emit(ldx_mem(bpf.BPF_H, R8, R10, _BUF + 4), be(R8, 16))  # bytes 4..5
    a.emit(ldx_mem(bpf.BPF_H, R9, R10, _BUF + 6), be(R9, 16))  # slot << 10 | check
    a.emit(mov64_reg(R2, R9), alu32_imm(BPF_RSH, R2, ck.CHECK_BITS))
    a.emit(stx_mem(bpf.BPF_W, R10, R2, _KEY))  # the slot, the socket array's key
    a.emit(alu32_imm(BPF_LSH, R2, 16), alu32_reg(BPF_OR, R8, R2))  # w1
    # the check: ramp.quic.cookies.mix
    a.emit(alu32_imm(BPF_XOR, R7, k0), alu32_imm(BPF_MUL, R7, ck.MUL1))
    a.emit(mov64_reg(R2, R7), alu32_imm(BPF_RSH, R2, 16), alu32_reg(BPF_XOR, R7, R2))
    a.emit(alu32_reg(BPF_XOR, R7, R8), alu32_imm(BPF_XOR, R7, k1))
    a.emit(alu32_imm(BPF_MUL, R7, ck.MUL2))
    a.emit(mov64_reg(R2, R7), alu32_imm(BPF_RSH, R2, 15), alu32_reg(BPF_XOR, R7, R2))
    a.emit(alu32_imm(BPF_MUL, R7, ck.MUL3), alu32_imm(BPF_RSH, R7, 32 - ck.CHECK_BITS))
    a.emit(alu32_imm(BPF_AND, R9, ck.CHECK_MASK))
    a.emit(jmp_reg(BPF_JNE, R7, R9, "working"))
    # a valid cookie: its slot's socket, if the slot holds one
    a.emit(mov64_reg(R1, R6), ld_map_fd(R2, socks_fd))
    a.emit(mov64_reg(R3, R10), alu64_imm(bpf.BPF_ADD, R3, _KEY), mov64_imm(R4, 0))
    a.emit(call(bpf.BPF_FUNC_sk_select_reuseport))
    a.emit(jmp_imm(BPF_JEQ, R0, 0, "pass"))
    a.label("working")
    a.emit(st_mem(bpf.BPF_W, R10, _KEY, 0))
    a.emit(ld_map_fd(R1, work_fd), mov64_reg(R2, R10), alu64_imm(bpf.BPF_ADD, R2, _KEY))
    a.emit(call(bpf.BPF_FUNC_map_lookup_elem))
    a.emit(jmp_imm(BPF_JEQ, R0, 0, "pass"))
    a.emit(ldx_mem(bpf.BPF_W, R2, R0, 0))  # how many working slots
    a.emit(jmp_imm(BPF_JEQ, R2, 0, "pass"))
    a.emit(ldx_mem(bpf.BPF_W, R3, R6, CTX_HASH))
    a.emit(alu32_reg(BPF_MOD, R3, R2), alu32_imm(bpf.BPF_ADD, R3, 1))
    a.emit(stx_mem(bpf.BPF_W, R10, R3, _KEY))
    a.emit(ld_map_fd(R1, work_fd), mov64_reg(R2, R10), alu64_imm(bpf.BPF_ADD, R2, _KEY))
    a.emit(call(bpf.BPF_FUNC_map_lookup_elem))
    a.emit(jmp_imm(BPF_JEQ, R0, 0, "pass"))
    a.emit(ldx_mem(bpf.BPF_W, R2, R0, 0))
    a.emit(stx_mem(bpf.BPF_W, R10, R2, _KEY2))
    a.emit(mov64_reg(R1, R6), ld_map_fd(R2, socks_fd))
    a.emit(mov64_reg(R3, R10), alu64_imm(bpf.BPF_ADD, R3, _KEY2), mov64_imm(R4, 0))
    a.emit(call(bpf.BPF_FUNC_sk_select_reuseport))
    a.label("pass")  # nothing selected: the kernel's hash over all the group's sockets
    a.emit(mov64_imm(R0, bpf.SK_PASS))
    a.emit(exit_insn())
    return a


# --- the classic BPF fallback -----------------------------------------------------------------

# classic BPF opcodes (include/uapi/linux/filter.h)
_LDB_ABS, _LDH_ABS, _LDW_ABS = 0x30, 0x28, 0x20
_LD_MEM, _LDX_MEM, _ST = 0x60, 0x61, 0x02
_TAX = 0x07
_ALU_K, _ALU_X = 0x04, 0x0C
_JA, _JEQ_K, _JSET_K, _JEQ_X = 0x05, 0x15, 0x45, 0x1D
_RET_K = 0x06
_CBPF_MAX = 4096  # BPF_MAXINSNS
NO_SOCKET = 0xFFFFFFFF  # an index past the group's sockets: the kernel picks by hash


@dataclass(frozen=True, slots=True)
class _CInsn:
    code: int
    k: int = 0
    jt: int = 0
    jf: int = 0
    target: str | None = None  # JA: the label it jumps to


class _CAssembler:
    """Classic BPF with jumps to labels. Conditional jumps reach only 255 instructions, so a
    conditional jump to a label becomes a short one over unconditional jumps (32-bit reach)."""

    def __init__(self) -> None:
        self.insns: list[_CInsn] = []
        self.labels: dict[str, int] = {}

    def emit(self, code: int, k: int = 0, jt: str | None = None, jf: str | None = None) -> None:
        if jt is None and jf is None:
            self.insns.append(_CInsn(code, k & 0xFFFFFFFF))
            return
        assert jt is not None
        self.only_if(code, k)
        self.insns.append(_CInsn(_JA, target=jt))
        if jf is not None:
            self.insns.append(_CInsn(_JA, target=jf))

    def only_if(self, code: int, k: int) -> None:
        """The next instruction runs only when the condition holds."""
        self.insns.append(_CInsn(code, k & 0xFFFFFFFF, 0, 1))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.insns)

    def assemble(self) -> bytes:
        if len(self.insns) > _CBPF_MAX:
            raise ValueError("classic BPF program too long")
        out = bytearray()
        for pc, i in enumerate(self.insns):
            k = i.k
            if i.target is not None:
                k = self.labels[i.target] - (pc + 1)
                if k < 0:
                    raise ValueError(f"classic BPF jumps only forward (to {i.target!r})")
            out += struct.pack("<HBBI", i.code, i.jt, i.jf, k)
        return bytes(out)


def cbpf_program(
    key: bytes, cid_length: int, index_of: dict[int, int], working: Sequence[int]
) -> bytes:
    """The classic program: offsets are from the UDP payload. `index_of` maps slots to their
    index in the kernel's socket list, `working` are working indexes."""
    k0, k1 = ck.key_words(key)
    a = _CAssembler()
    a.emit(_LDB_ABS, 0)
    a.emit(_JSET_K, 0x80, "long", "short")
    for base, name in ((1, "short"), (6, "long")):
        a.label(name)
        if base == 6:
            a.emit(_LDB_ABS, 5)
            a.emit(_JEQ_K, cid_length, f"cookie{base}", f"working{base}")
        a.label(f"cookie{base}")
        a.emit(_LDB_ABS, base + 6)
        a.emit(_ALU_K | BPF_RSH, 2)  # the slot: the top 6 bits of byte 6
        a.emit(_ST, 0)
        a.emit(_ALU_K | BPF_LSH, 16)
        a.emit(_TAX)
        a.emit(_LDH_ABS, base + 4)
        a.emit(_ALU_X | BPF_OR)
        a.emit(_ST, 1)  # w1
        a.emit(_LDW_ABS, base)
        a.emit(_ALU_K | BPF_XOR, k0)
        a.emit(_ALU_K | BPF_MUL, ck.MUL1)
        for shift, then in ((16, (1, ck.MUL2)), (15, None)):
            a.emit(_ST, 2)
            a.emit(_ALU_K | BPF_RSH, shift)
            a.emit(_LDX_MEM, 2)
            a.emit(_ALU_X | BPF_XOR)
            if then is not None:
                a.emit(_LDX_MEM, then[0])
                a.emit(_ALU_X | BPF_XOR)
                a.emit(_ALU_K | BPF_XOR, k1)
                a.emit(_ALU_K | BPF_MUL, then[1])
        a.emit(_ALU_K | BPF_MUL, ck.MUL3)
        a.emit(_ALU_K | BPF_RSH, 32 - ck.CHECK_BITS)
        a.emit(_ST, 2)
        a.emit(_LDH_ABS, base + 6)
        a.emit(_ALU_K | BPF_AND, ck.CHECK_MASK)
        a.emit(_LDX_MEM, 2)
        a.emit(_JEQ_X, 0, f"valid{base}", f"working{base}")
        a.label(f"valid{base}")
        a.emit(_LD_MEM, 0)
        for slot, index in sorted(index_of.items()):
            a.only_if(_JEQ_K, slot)
            a.emit(_RET_K, index)
        a.label(f"working{base}")
        if len(working) <= 1:
            a.emit(_RET_K, working[0] if working else NO_SOCKET)
            continue
        # spread by the client's connection id: all its Initials carry the same one
        a.emit(_LDW_ABS, base)
        a.emit(_ALU_K | BPF_MOD, len(working))
        for i, index in enumerate(working):
            a.only_if(_JEQ_K, i)
            a.emit(_RET_K, index)
        a.emit(_RET_K, working[0])
    return a.assemble()


def _attach_cbpf(sock: socket.socket, code: bytes) -> None:
    import ctypes

    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HxxxxxxQ", len(code) // 8, ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


# --- the group ---------------------------------------------------------------------------------


class SteeringGroup:
    """The sockets of one UDP address and port across processes, by slot (see module doc)."""

    def __init__(
        self,
        mechanism: str,
        cookies: CidCookies,
        max_slots: int,
        fds: Sequence[int] = (),
        order: Sequence[int] = (),
        working: Sequence[int] = (),
    ) -> None:
        self.mechanism = mechanism
        self.cookies = cookies
        self.max_slots = max_slots
        self._fds = list(fds)  # ebpf: program, socket array, working map
        self._order = list(order)  # cbpf: slots in the kernel's join order
        self._working = list(working)
        self._sockets: dict[int, socket.socket] = {}  # the slots this process made or adopted

    @classmethod
    def create(cls, *, max_slots: int = MAX_SLOTS, mechanism: str | None = None) -> SteeringGroup:
        """A new group with a fresh cookie key; `mechanism` (or $RAMP_STEERING) forces one."""
        if not 1 <= max_slots <= MAX_SLOTS:
            raise ValueError(f"max_slots must be in 1..{MAX_SLOTS}")
        want = mechanism or os.environ.get(MECHANISM_ENV) or "ebpf"
        if want not in ("ebpf", "cbpf", "none"):
            raise ValueError(f"unknown steering mechanism {want!r}")
        cookies = CidCookies.generate()
        if want == "ebpf":
            try:
                return cls("ebpf", cookies, max_slots, cls._load(cookies, max_slots))
            except OSError as e:
                log.warning(
                    "UDP steering: eBPF reuseport program not loaded (%s); falling back to "
                    "classic BPF, which honours only the slots this process knows",
                    e,
                )
                want = "cbpf"
        if want == "cbpf":
            log.warning("UDP steering by classic BPF (SO_ATTACH_REUSEPORT_CBPF)")
        else:
            log.warning("UDP steering off: connections may land on any process's socket")
        return cls(want, cookies, max_slots)

    @staticmethod
    def _load(cookies: CidCookies, max_slots: int) -> list[int]:
        fds: list[int] = []
        try:
            fds.append(
                bpf.map_create(
                    bpf.BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, max_slots, "ramp_rp_socks"
                )
            )
            fds.append(bpf.map_create(bpf.BPF_MAP_TYPE_ARRAY, 4, 4, max_slots + 1, "ramp_rp_work"))
            code = program(fds[0], fds[1], cookies.key, cookies.cid_length).resolved()
            prog = bpf.prog_load(
                bpf.BPF_PROG_TYPE_SK_REUSEPORT,
                code,
                PROG_NAME,
                expected_attach_type=bpf.BPF_SK_REUSEPORT_SELECT,
            )
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return [prog, *fds]

    @classmethod
    def from_handoff(cls, fds: list[int], meta: dict[str, Any]) -> SteeringGroup:
        """The group a predecessor handed on (`handoff`); takes ownership of `fds`."""
        cookies = CidCookies(bytes.fromhex(meta["key"]), int(meta["cid_length"]))
        return cls(
            str(meta["mechanism"]),
            cookies,
            int(meta["max_slots"]),
            fds,
            [int(s) for s in meta.get("order", [])],
            [int(s) for s in meta.get("working", [])],
        )

    def handoff(self) -> tuple[list[int], dict[str, Any]]:
        """Descriptors (still owned by this group) and JSON-able state for a successor."""
        meta = {
            "mechanism": self.mechanism,
            "key": self.cookies.key.hex(),
            "cid_length": self.cookies.cid_length,
            "max_slots": self.max_slots,
            "order": list(self._order),
            "working": list(self._working),
        }
        return list(self._fds), meta

    @property
    def working(self) -> list[int]:
        return list(self._working)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} is not in 0..{self.max_slots - 1}")
        if slot in self._sockets:
            raise ValueError(f"slot {slot} already holds a socket of this process")

    def socket(self, host: str, port: int, slot: int) -> socket.socket:
        """A new SO_REUSEPORT UDP socket on host:port in this group, at `slot`."""
        self._check_slot(slot)
        sock = udp_socket(host, port, reuse_port=True)
        try:
            self._join(sock, slot)
        except BaseException:
            sock.close()
            raise
        return sock

    def adopt(self, sock: socket.socket, slot: int) -> None:
        """Put a given socket (systemd's: ReusePort=yes) at `slot`."""
        self._check_slot(slot)
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT):
            raise ValueError("a steered UDP socket needs SO_REUSEPORT (systemd: ReusePort=yes)")
        self._join(sock, slot)

    def _join(self, sock: socket.socket, slot: int) -> None:
        if self.mechanism == "ebpf":
            prog, socks, _ = self._fds
            bpf.map_update(socks, struct.pack("<I", slot), struct.pack("<Q", sock.fileno()))
            # every socket attaches it: the group may have lost the one that did
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, struct.pack("<i", prog))
        self._sockets[slot] = sock
        if self.mechanism == "cbpf":
            if slot in self._order:  # a predecessor's socket of this slot, now gone
                self._forget_order(slot)
            self._order.append(slot)
            self._attach_cbpf()

    def joined(self, slot: int) -> None:
        """Another process (a successor) put its socket at `slot`: with classic BPF its place
        in the kernel's join order is the last, and the program must know it."""
        if self.mechanism != "cbpf" or slot in self._sockets:
            return
        if slot in self._order:
            self._forget_order(slot)
        self._order.append(slot)
        self._attach_cbpf()

    def assume_working(self, slots: Sequence[int]) -> None:
        """Another process (the predecessor) made these the working slots: take them as this
        process's view without writing them again."""
        self._working = list(dict.fromkeys(slots))
        if self.mechanism == "cbpf":
            self._attach_cbpf()  # the program is rebuilt from this view on every change

    def set_working(self, slots: Sequence[int]) -> None:
        """New connections (Initials, ids without a valid cookie) go to these slots."""
        for slot in slots:
            if not 0 <= slot < self.max_slots:
                raise ValueError(f"slot {slot} is not in 0..{self.max_slots - 1}")
        self._working = list(dict.fromkeys(slots))
        if self.mechanism == "ebpf":
            work = self._fds[2]
            # slots first, then the count: the program never reads a slot past the count
            for i, slot in enumerate(self._working):
                bpf.map_update(work, struct.pack("<I", i + 1), struct.pack("<I", slot))
            bpf.map_update(work, struct.pack("<I", 0), struct.pack("<I", len(self._working)))
        elif self.mechanism == "cbpf":
            self._attach_cbpf()

    def release(self, slot: int) -> None:
        """`slot` leaves the group: out of the working slots and the socket array; a socket
        of this process at it is closed (close its transport first). With classic BPF, call
        it for another process's slot once that socket is closed, so the join order is kept."""
        if slot in self._working:
            self.set_working([s for s in self._working if s != slot])
        if self.mechanism == "ebpf":
            try:
                bpf.map_delete(self._fds[1], struct.pack("<I", slot))
            except bpf.BpfError as e:
                if e.errno != errno.ENOENT:  # ENOENT: the kernel emptied it when it closed
                    raise
        sock = self._sockets.pop(slot, None)
        if sock is not None:
            sock.close()
        if self.mechanism == "cbpf" and slot in self._order:
            self._forget_order(slot)
            self._attach_cbpf()

    def _forget_order(self, slot: int) -> None:
        # the kernel moves the group's last socket into the place of a closed one
        i = self._order.index(slot)
        last = self._order.pop()
        if i < len(self._order):
            self._order[i] = last

    def _attach_cbpf(self) -> None:
        if not self._sockets:
            return
        index_of = {slot: i for i, slot in enumerate(self._order)}
        working = [index_of[s] for s in self._working if s in index_of]
        code = cbpf_program(self.cookies.key, self.cookies.cid_length, index_of, working)
        _attach_cbpf(next(iter(self._sockets.values())), code)

    def detach(self) -> None:
        """Give up the program's and maps' descriptors without closing them (their owner,
        a handoff message that could not be read, closes them)."""
        self._fds = []

    def close(self) -> None:
        """Close this process's sockets and its descriptors of the program and maps."""
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []


def main(argv: list[str]) -> int:
    """Print the eBPF program's instructions and bytecode (map descriptors and key as 0)."""
    a = program(0, 0, bytes(ck.KEY_LENGTH))
    for pc, insn in enumerate(a.resolved()):
        print(f"{pc:4d}  {insn.encode().hex()}  {insn}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
