"""The eBPF assembler, and the sk_lookup program run by the kernel (BPF_PROG_TEST_RUN)."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ramp.net import bpf
from ramp.net.bpf import (
    BPF_JEQ,
    BPF_W,
    R0,
    R1,
    R2,
    Assembler,
    Insn,
    decode,
    exit_insn,
    ja,
    jmp_imm,
    ldx_mem,
    mov64_imm,
)
from ramp.net.sk_lookup import SkLookup, lookup_context, program
from ramp.net.sk_lookup import main as sk_lookup_main
from ramp.onramps.anyport_map import PortMap
from ramp.onramps.registry import parse_entry

SO_COOKIE = 57  # include/uapi/asm-generic/socket.h

regs = st.integers(0, 10)
insns = st.builds(
    Insn,
    code=st.integers(0, 255),
    dst=regs,
    src=regs,
    off=st.integers(-(1 << 15), (1 << 15) - 1),
    imm=st.integers(-(1 << 31), (1 << 31) - 1),
)


@given(st.lists(insns, max_size=50))
def test_encoding_round_trips(program_: list[Insn]) -> None:
    a = Assembler()
    a.emit(program_)
    code = a.assemble()
    assert len(code) == 8 * len(program_)
    assert decode(code) == program_


@given(st.lists(st.booleans(), min_size=1, max_size=40), st.data())
def test_jumps_land_on_their_labels(is_jump: list[bool], data: st.DataObject) -> None:
    """Each jump's offset, counted from the next instruction as the kernel does, reaches
    the instruction its label was placed before."""
    a = Assembler()
    n = len(is_jump)
    targets = {f"l{i}": data.draw(st.integers(0, n)) for i in range(n)}
    by_position: dict[int, list[str]] = {}
    for name, pos in targets.items():
        by_position.setdefault(pos, []).append(name)
    jumps: list[tuple[int, str]] = []
    for pc, jump in enumerate(is_jump):
        for name in by_position.get(pc, []):
            a.label(name)
        if jump:
            name = f"l{pc}"
            jumps.append((pc, name))
            a.emit(jmp_imm(BPF_JEQ, R1, pc, name) if pc % 2 else ja(name))
        else:
            a.emit(mov64_imm(R0, pc))
    for name in by_position.get(n, []):
        a.label(name)
    out = decode(a.assemble())
    for pc, name in jumps:
        assert pc + 1 + out[pc].off == targets[name]


def test_bad_programs_are_refused_before_the_kernel_sees_them() -> None:
    a = Assembler()
    a.emit(ja("nowhere"))
    with pytest.raises(ValueError, match="undefined label 'nowhere'"):
        a.assemble()
    a = Assembler()
    a.label("x")
    with pytest.raises(ValueError, match="defined twice"):
        a.label("x")
    with pytest.raises(ValueError, match="bad register"):
        Insn(0xB7, dst=11).encode()


def test_the_program_is_the_same_bytes_every_time() -> None:
    """Built from the repository alone: the same inputs give the same bytecode."""
    one = program(3, 4, 5, socket.IPPROTO_TCP).assemble()
    two = program(3, 4, 5, socket.IPPROTO_TCP).assemble()
    assert one == two
    assert program(3, 4, 5, socket.IPPROTO_UDP).assemble() != one
    # it ends by passing every packet on (SK_PASS), assigned or not
    last = decode(one)[-2:]
    assert last == [mov64_imm(R0, bpf.SK_PASS), exit_insn()]


# --- in the kernel --------------------------------------------------------------------------


def test_a_refused_program_shows_the_verifier_log() -> None:
    a = Assembler()
    a.emit(ldx_mem(BPF_W, R0, R2, 0))  # r2 is not initialised: the verifier says so
    a.emit(exit_insn())
    with pytest.raises(bpf.BpfError) as info:
        bpf.prog_load(
            bpf.BPF_PROG_TYPE_SK_LOOKUP,
            a.resolved(),
            "ramp_bad",
            expected_attach_type=bpf.BPF_SK_LOOKUP,
        )
    assert "verifier log" in str(info.value)
    assert "R2 !read_ok" in info.value.log


@pytest.fixture
def steered() -> Iterator[tuple[socket.socket, SkLookup]]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    # loaded with its maps but not attached: only test-run, it steers nothing of this host
    steer = SkLookup(sock, [ipaddress.IPv4Network("203.0.113.64/26")], (1000, 2000), attach=False)
    try:
        yield sock, steer
    finally:
        steer.close()
        sock.close()


@pytest.mark.parametrize(
    ("protocol", "local", "chosen"),
    [
        (socket.IPPROTO_TCP, ("203.0.113.70", 1000), True),
        (socket.IPPROTO_TCP, ("203.0.113.127", 2000), True),
        (socket.IPPROTO_TCP, ("203.0.113.63", 1500), False),  # below the prefix
        (socket.IPPROTO_TCP, ("203.0.113.128", 1500), False),  # above it
        (socket.IPPROTO_TCP, ("203.0.113.70", 999), False),  # below the ports
        (socket.IPPROTO_TCP, ("203.0.113.70", 2001), False),  # above them
        (socket.IPPROTO_UDP, ("203.0.113.70", 1500), False),  # the other protocol
    ],
)
def test_the_program_picks_the_socket_only_for_its_prefix_and_ports(
    steered: tuple[socket.socket, SkLookup],
    protocol: int,
    local: tuple[str, int],
    chosen: bool,
) -> None:
    sock, steer = steered
    cookie = struct.unpack("<Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
    retval, ctx = bpf.prog_test_run(
        steer.prog_fd, lookup_context(protocol, local, ("198.51.100.7", 40000))
    )
    assert retval == bpf.SK_PASS  # what is not ours goes on to the kernel's own lookup
    selected = struct.unpack_from("<Q", ctx)[0]
    assert selected == (cookie if chosen else 0)


def test_ipv6_packets_are_left_alone(steered: tuple[socket.socket, SkLookup]) -> None:
    _, steer = steered
    ctx = bytearray(lookup_context(socket.IPPROTO_TCP, ("203.0.113.70", 1500), ("1.2.3.4", 1)))
    struct.pack_into("<I", ctx, 8, socket.AF_INET6)
    retval, out = bpf.prog_test_run(steer.prog_fd, bytes(ctx))
    assert (retval, struct.unpack_from("<Q", out)[0]) == (bpf.SK_PASS, 0)


@pytest.fixture
def steered6() -> Iterator[tuple[socket.socket, SkLookup]]:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.bind(("::1", 0))
    steer = SkLookup(sock, [ipaddress.IPv6Network("2001:db8:1::/64")], (53, 53), attach=False)
    try:
        yield sock, steer
    finally:
        steer.close()
        sock.close()


@pytest.mark.parametrize(
    ("local", "chosen"),
    [
        (("2001:db8:1::1", 53), True),
        (("2001:db8:1:0:ffff:ffff:ffff:ffff", 53), True),
        (("2001:db8:1::1", 54), False),
        (("2001:db8:2::1", 53), False),
        (("2001:db8:0:ffff:ffff:ffff:ffff:ffff", 53), False),
    ],
)
def test_the_ipv6_program_picks_the_socket_only_for_its_prefix_and_ports(
    steered6: tuple[socket.socket, SkLookup], local: tuple[str, int], chosen: bool
) -> None:
    sock, steer = steered6
    cookie = struct.unpack("<Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
    retval, ctx = bpf.prog_test_run(
        steer.prog_fd, lookup_context(socket.IPPROTO_UDP, local, ("2001:db8:9::9", 40000))
    )
    assert retval == bpf.SK_PASS
    assert struct.unpack_from("<Q", ctx)[0] == (cookie if chosen else 0)


@settings(max_examples=25, deadline=None)
@given(
    prefixlen=st.integers(8, 32),
    base=st.integers(0, (1 << 32) - 1),
    first=st.integers(1, 65535),
    span=st.integers(0, 3000),
    probes=st.lists(
        st.tuples(st.integers(0, (1 << 32) - 1), st.integers(1, 65535)), min_size=1, max_size=8
    ),
    near=st.lists(st.tuples(st.integers(-2, 2), st.integers(-2, 2)), max_size=4),
)
def test_the_kernel_runs_the_program_as_the_python_mapping_says(
    prefixlen: int,
    base: int,
    first: int,
    span: int,
    probes: list[tuple[int, int]],
    near: list[tuple[int, int]],
) -> None:
    """For any prefix and port range, the program picks the socket exactly for the
    addresses and ports `PortMap.claims` says the on-ramp answers on (edges included)."""
    network = ipaddress.IPv4Network((base, prefixlen), strict=False)
    last = min(first + span, 65535)
    options = parse_entry(
        {
            "type": "anyport",
            "prefix": str(network),
            "ports": f"{first}-{last}",
            "to": "198.51.100.10:80",
        }
    )
    mapping = PortMap.from_options(options)
    lo, hi = int(network.network_address), int(network.broadcast_address)
    # the edges of the prefix and of the range, give or take one or two
    probes = probes + [((lo if i < 0 else hi) + i, (first if j < 0 else last) + j) for i, j in near]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        cookie = struct.unpack("<Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
        steer = SkLookup(sock, [network], (first, last), attach=False)
        try:
            for addr, port in probes:
                if not (0 <= addr < 1 << 32 and 1 <= port <= 65535):
                    continue
                address = str(ipaddress.IPv4Address(addr))
                _, ctx = bpf.prog_test_run(
                    steer.prog_fd,
                    lookup_context(socket.IPPROTO_TCP, (address, port), ("192.0.2.9", 1)),
                )
                chosen = struct.unpack_from("<Q", ctx)[0] == cookie
                assert chosen == mapping.claims(address, port), (address, port)
        finally:
            steer.close()


@pytest.mark.parametrize(
    ("args", "protocol", "family"), [(["tcp"], 6, 2), (["udp", "ipv6"], 17, 10)]
)
def test_the_printed_bytecode_is_the_program(
    capsys: pytest.CaptureFixture[str], args: list[str], protocol: int, family: int
) -> None:
    """`python -m ramp.net.sk_lookup` prints what the edge loads (map descriptors as 0)."""
    sk_lookup_main(args)
    out = capsys.readouterr().out.splitlines()
    assert bytes.fromhex(out[-1]) == program(0, 0, 0, protocol, family).assemble()
    assert len(out) == 1 + len(decode(bytes.fromhex(out[-1])))
