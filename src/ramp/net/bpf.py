"""A small eBPF assembler and the bpf(2) calls ramp needs, through ctypes.

No compiler and no libbpf: programs are lists of `Insn` built by Python functions in the
repository, so the bytecode the kernel gets is exactly what the source says, on every machine
(`python -m ramp.net.sk_lookup` prints it). Instruction encoding and the constants follow the
kernel's include/uapi/linux/bpf.h and bpf_common.h; only what ramp's programs use is here.

    asm = Assembler()
    asm.emit(mov64_imm(R0, 1))
    asm.emit(exit_insn())
    code = asm.assemble()  # bytes for BPF_PROG_LOAD
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# --- instruction encoding (include/uapi/linux/bpf_common.h, bpf.h) ---------------------------

# classes
BPF_LD = 0x00
BPF_LDX = 0x01
BPF_ST = 0x02
BPF_STX = 0x03
BPF_ALU = 0x04
BPF_JMP = 0x05
BPF_JMP32 = 0x06
BPF_ALU64 = 0x07
# sizes
BPF_W = 0x00
BPF_H = 0x08
BPF_B = 0x10
BPF_DW = 0x18
# modes
BPF_IMM = 0x00
BPF_MEM = 0x60
# sources
BPF_K = 0x00
BPF_X = 0x08
# ALU operations
BPF_ADD = 0x00
BPF_SUB = 0x10
BPF_MUL = 0x20
BPF_OR = 0x40
BPF_AND = 0x50
BPF_LSH = 0x60
BPF_RSH = 0x70
BPF_MOD = 0x90
BPF_XOR = 0xA0
BPF_MOV = 0xB0
BPF_END = 0xD0  # byte swap; with BPF_TO_BE: host order to big-endian
BPF_TO_BE = 0x08
# jumps
BPF_JA = 0x00
BPF_JEQ = 0x10
BPF_JGT = 0x20
BPF_JGE = 0x30
BPF_JSET = 0x40
BPF_JNE = 0x50
BPF_JLT = 0xA0
BPF_JLE = 0xB0
BPF_CALL = 0x80
BPF_EXIT = 0x90

BPF_PSEUDO_MAP_FD = 1  # src_reg of a 64-bit immediate load: imm is a map's file descriptor

R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)

# helper functions (the FN(...) list of include/uapi/linux/bpf.h)
BPF_FUNC_map_lookup_elem = 1
BPF_FUNC_skb_load_bytes = 26
BPF_FUNC_sk_select_reuseport = 82
BPF_FUNC_sk_release = 86
BPF_FUNC_sk_assign = 124

_INSN = struct.Struct("<BBhi")  # code, dst_reg:4 | src_reg:4 << 4, off, imm


@dataclass(frozen=True, slots=True)
class Insn:
    """One 8-byte instruction. `label` names a jump's target; `assemble` turns it into `off`."""

    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0
    label: str | None = None

    def encode(self) -> bytes:
        if self.label is not None:
            raise ValueError(f"unresolved jump to {self.label!r}")
        if not (0 <= self.dst <= 10 and 0 <= self.src <= 10):
            raise ValueError(f"bad register in {self}")
        return _INSN.pack(self.code, self.dst | self.src << 4, self.off, self.imm)


def decode(code: bytes) -> list[Insn]:
    """The instructions of assembled bytecode (the inverse of `Assembler.assemble`)."""
    if len(code) % _INSN.size:
        raise ValueError(f"bytecode length {len(code)} is not a multiple of {_INSN.size}")
    out = []
    for i in range(0, len(code), _INSN.size):
        op, regs, off, imm = _INSN.unpack_from(code, i)
        out.append(Insn(op, regs & 0xF, regs >> 4, off, imm))
    return out


# --- instruction builders --------------------------------------------------------------------


def mov64_reg(dst: int, src: int) -> Insn:
    return Insn(BPF_ALU64 | BPF_MOV | BPF_X, dst, src)


def mov64_imm(dst: int, imm: int) -> Insn:
    return Insn(BPF_ALU64 | BPF_MOV | BPF_K, dst, imm=imm)


def alu64_imm(op: int, dst: int, imm: int) -> Insn:
    return Insn(BPF_ALU64 | op | BPF_K, dst, imm=imm)


def alu64_reg(op: int, dst: int, src: int) -> Insn:
    return Insn(BPF_ALU64 | op | BPF_X, dst, src)


def _s32(value: int) -> int:
    """A 32-bit constant as the signed immediate field holds it."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def alu32_imm(op: int, dst: int, imm: int) -> Insn:
    """32-bit arithmetic (the upper half of dst becomes zero); imm taken modulo 2**32."""
    return Insn(BPF_ALU | op | BPF_K, dst, imm=_s32(imm))


def alu32_reg(op: int, dst: int, src: int) -> Insn:
    return Insn(BPF_ALU | op | BPF_X, dst, src)


def be(dst: int, bits: int) -> Insn:
    """dst = the low `bits` of dst read as big-endian (a swap on little-endian hosts)."""
    return Insn(BPF_ALU | BPF_END | BPF_TO_BE, dst, imm=bits)


def ldx_mem(size: int, dst: int, src: int, off: int) -> Insn:
    """dst = *(size *)(src + off)"""
    return Insn(BPF_LDX | size | BPF_MEM, dst, src, off)


def stx_mem(size: int, dst: int, src: int, off: int) -> Insn:
    """*(size *)(dst + off) = src"""
    return Insn(BPF_STX | size | BPF_MEM, dst, src, off)


def st_mem(size: int, dst: int, off: int, imm: int) -> Insn:
    """*(size *)(dst + off) = imm"""
    return Insn(BPF_ST | size | BPF_MEM, dst, 0, off, imm)


def jmp_imm(op: int, dst: int, imm: int, label: str) -> Insn:
    """if dst OP imm goto label (unsigned comparisons)"""
    return Insn(BPF_JMP | op | BPF_K, dst, imm=imm, label=label)


def jmp_reg(op: int, dst: int, src: int, label: str) -> Insn:
    """if dst OP src goto label"""
    return Insn(BPF_JMP | op | BPF_X, dst, src, label=label)


def ja(label: str) -> Insn:
    return Insn(BPF_JMP | BPF_JA, label=label)


def call(helper: int) -> Insn:
    return Insn(BPF_JMP | BPF_CALL, imm=helper)


def exit_insn() -> Insn:
    return Insn(BPF_JMP | BPF_EXIT)


def ld_map_fd(dst: int, fd: int) -> list[Insn]:
    """dst = the map behind file descriptor `fd` (a two-slot 64-bit immediate load)."""
    return [Insn(BPF_LD | BPF_DW | BPF_IMM, dst, BPF_PSEUDO_MAP_FD, imm=fd), Insn(0)]


class Assembler:
    """Instructions and labels in order; `assemble` resolves the labels to jump offsets."""

    def __init__(self) -> None:
        self.insns: list[Insn] = []
        self.labels: dict[str, int] = {}

    def emit(self, *insns: Insn | Iterable[Insn]) -> None:
        for item in insns:
            if isinstance(item, Insn):
                self.insns.append(item)
            else:
                self.insns.extend(item)

    def label(self, name: str) -> None:
        if name in self.labels:
            raise ValueError(f"label {name!r} defined twice")
        self.labels[name] = len(self.insns)

    def resolved(self) -> list[Insn]:
        out = []
        for pc, insn in enumerate(self.insns):
            if insn.label is not None:
                if insn.label not in self.labels:
                    raise ValueError(f"jump to undefined label {insn.label!r}")
                off = self.labels[insn.label] - (pc + 1)
                if not -(1 << 15) <= off < 1 << 15:
                    raise ValueError(f"jump to {insn.label!r} is out of range ({off})")
                insn = Insn(insn.code, insn.dst, insn.src, off, insn.imm)
            out.append(insn)
        return out

    def assemble(self) -> bytes:
        return b"".join(insn.encode() for insn in self.resolved())


# --- the bpf(2) system call ------------------------------------------------------------------

# bpf(2) has no libc wrapper: the syscall number per architecture (arch/*/syscall tables)
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "i686": 357, "riscv64": 280}

# commands (enum bpf_cmd)
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_PROG_LOAD = 5
BPF_PROG_TEST_RUN = 10
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_LINK_CREATE = 28

# map types (enum bpf_map_type)
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_SOCKMAP = 15
BPF_MAP_TYPE_REUSEPORT_SOCKARRAY = 20
BPF_F_NO_PREALLOC = 1  # map_flags: an LPM trie must be created with it

# program and attach types (enum bpf_prog_type, enum bpf_attach_type)
BPF_PROG_TYPE_SK_REUSEPORT = 21
BPF_PROG_TYPE_SK_LOOKUP = 30
BPF_SK_LOOKUP = 36
BPF_SK_REUSEPORT_SELECT = 39

BPF_ANY = 0  # map update flag: create or replace

SK_DROP = 0
SK_PASS = 1

BPF_OBJ_NAME_LEN = 16
LOG_SIZE = 1 << 20  # verifier log buffer for a failed load

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A bpf(2) call failed; `log` holds the verifier's output for a refused program."""

    def __init__(self, err: int, what: str, log: str = "") -> None:
        text = f"{what}: {os.strerror(err)}"
        if log:
            text += f"\nverifier log:\n{log}"
        super().__init__(err, text)
        self.log = log


def _sys_bpf() -> int:
    machine = platform.machine()
    if machine not in _SYS_BPF:
        raise BpfError(errno.ENOSYS, f"bpf(2) syscall number unknown on {machine}")
    return _SYS_BPF[machine]


def bpf(
    cmd: int, attr: bytes | bytearray, what: str, log: ctypes.Array[ctypes.c_char] | None = None
) -> int:
    """bpf(cmd, attr); returns the call's result, raises BpfError with `what` on failure."""
    buf = ctypes.create_string_buffer(bytes(attr), len(attr))
    ret = _libc.syscall(_sys_bpf(), cmd, buf, len(attr))
    if ret < 0:
        err = ctypes.get_errno()
        text = log.value.decode(errors="replace").strip() if log is not None else ""
        raise BpfError(err, what, text)
    return int(ret)


def _name(name: str) -> bytes:
    raw = name.encode()[: BPF_OBJ_NAME_LEN - 1]
    return raw.ljust(BPF_OBJ_NAME_LEN, b"\0")


def map_create(
    map_type: int, key_size: int, value_size: int, max_entries: int, name: str, flags: int = 0
) -> int:
    """A new map; returns its file descriptor (close it to free the map)."""
    # map_type, key_size, value_size, max_entries, map_flags, inner_map_fd, numa_node, map_name
    attr = struct.pack("<7I", map_type, key_size, value_size, max_entries, flags, 0, 0)
    attr += _name(name)
    return bpf(BPF_MAP_CREATE, attr.ljust(72, b"\0"), f"creating BPF map {name}")


def _map_attr(
    fd: int, key: ctypes.Array[ctypes.c_char], value: ctypes.Array[ctypes.c_char] | None, flags: int
) -> bytes:
    value_ptr = ctypes.addressof(value) if value is not None else 0
    return struct.pack("<IIQQQ", fd, 0, ctypes.addressof(key), value_ptr, flags)


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    bpf(BPF_MAP_UPDATE_ELEM, _map_attr(fd, k, v, flags), "updating a BPF map")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value under `key`, None when there is none."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        bpf(BPF_MAP_LOOKUP_ELEM, _map_attr(fd, k, v, 0), "looking up a BPF map")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_delete(fd: int, key: bytes) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    bpf(BPF_MAP_DELETE_ELEM, _map_attr(fd, k, None, 0), "deleting from a BPF map")


def prog_load(
    prog_type: int,
    insns: Sequence[Insn] | bytes,
    name: str,
    *,
    expected_attach_type: int = 0,
    license: str = "Dual BSD/GPL",
) -> int:
    """Load a program; returns its file descriptor. A refused program raises BpfError whose
    message holds the verifier log (the load is retried with the log on when it fails)."""
    code = insns if isinstance(insns, bytes) else b"".join(i.encode() for i in insns)
    code_buf = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(license.encode())

    def attr(log_level: int, log: ctypes.Array[ctypes.c_char] | None) -> bytes:
        log_ptr, log_size = (ctypes.addressof(log), len(log)) if log is not None else (0, 0)
        a = struct.pack(
            "<IIQQIIQII",
            prog_type,
            len(code) // _INSN.size,
            ctypes.addressof(code_buf),
            ctypes.addressof(lic),
            log_level,
            log_size,
            log_ptr,
            0,  # kern_version
            0,  # prog_flags
        )
        a += _name(name)
        a += struct.pack("<II", 0, expected_attach_type)  # prog_ifindex, expected_attach_type
        return a.ljust(128, b"\0")

    try:
        return bpf(BPF_PROG_LOAD, attr(0, None), f"loading BPF program {name}")
    except BpfError as first:
        if first.errno not in (errno.EINVAL, errno.EACCES, errno.EPERM):
            raise
        log = ctypes.create_string_buffer(LOG_SIZE)
        try:
            return bpf(BPF_PROG_LOAD, attr(1, log), f"loading BPF program {name}", log)
        except BpfError as e:
            if not e.log:
                raise BpfError(first.errno or errno.EINVAL, f"loading BPF program {name}") from e
            raise


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """A BPF link attaching the program to `target_fd` (a network namespace for sk_lookup);
    the attachment lasts as long as the link's file descriptor is open."""
    attr = struct.pack("<IIII", prog_fd, target_fd, attach_type, 0).ljust(64, b"\0")
    return bpf(BPF_LINK_CREATE, attr, "attaching a BPF link")


def obj_id(fd: int) -> int:
    """The kernel-wide id of a program, map or link (what `bpftool ... show id N` takes)."""
    info = ctypes.create_string_buffer(256)
    attr = struct.pack("<IIQ", fd, len(info), ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr, "reading BPF object info")
    # bpf_prog_info, bpf_map_info and bpf_link_info all start with u32 type, u32 id
    return int(struct.unpack_from("<I", info.raw, 4)[0])


def prog_test_run(prog_fd: int, ctx_in: bytes) -> tuple[int, bytes]:
    """Run a loaded program once on a context (BPF_PROG_TEST_RUN): its return value and the
    context as the program left it (for sk_lookup: the selected socket's cookie first)."""
    ctx = ctypes.create_string_buffer(ctx_in, len(ctx_in))
    out = ctypes.create_string_buffer(max(len(ctx_in), 256))  # the kernel's struct may be larger
    # prog_fd, retval, data_size_in, data_size_out, data_in, data_out, repeat, duration,
    # ctx_size_in, ctx_size_out, ctx_in, ctx_out
    attr = struct.pack(
        "<IIIIQQIIIIQQ",
        prog_fd,
        0,
        0,
        0,
        0,
        0,
        1,
        0,
        len(ctx_in),
        len(out),
        ctypes.addressof(ctx),
        ctypes.addressof(out),
    ).ljust(80, b"\0")
    buf = ctypes.create_string_buffer(attr, len(attr))
    ret = _libc.syscall(_sys_bpf(), BPF_PROG_TEST_RUN, buf, len(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, "running a BPF program (test run)")
    return int(struct.unpack_from("<I", buf.raw, 4)[0]), out.raw


__all__ = [
    "Assembler",
    "BpfError",
    "Insn",
    "decode",
    "link_create",
    "map_create",
    "map_update",
    "prog_load",
]
