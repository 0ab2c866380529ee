# -*- test-case-name: tests.unit.test_steering -*-
"""
Steering connections to workers by their source address: a classic BPF
program for a C{SO_REUSEPORT} group (C{SO_ATTACH_REUSEPORT_CBPF}), and the
same mapping in Python.  Nothing here touches a socket but
L{attachSteering}; the program is plain data, tested by running it through
an interpreter.
"""

from __future__ import annotations

import ctypes
import socket
import struct

Instruction = tuple[int, int, int, int]
"""One classic BPF instruction: C{(code, jump if true, jump if false, k)}."""

HASH_MULTIPLIER = 0x9E3779B1
"""2**32 divided by the golden ratio: Knuth's multiplicative hash."""

SO_ATTACH_REUSEPORT_CBPF = getattr(socket, "SO_ATTACH_REUSEPORT_CBPF", 51)
"""Linux 4.5's socket option (Python's socket module may not name it)."""

SKF_NET_OFF = -0x100000
"""Loads at this offset plus N read byte N of the network (IP) header."""

# Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
LD_W_ABS = 0x20
LD_B_ABS = 0x30
LD_IMM = 0x00
ALU_AND_K = 0x54
ALU_XOR_X = 0xAC
ALU_MUL_K = 0x24
ALU_RSH_K = 0x74
JMP_JA = 0x05
JMP_JEQ_K = 0x15
RET_A = 0x16
MISC_TAX = 0x07

_MASK32 = 0xFFFFFFFF


def _net(offset: int) -> int:
    """C{k} for a load of the IP header's byte C{offset}, as an unsigned word."""
    return (SKF_NET_OFF + offset) & _MASK32


def _words(version: int, value: int, ipv6Prefix: int) -> list[int]:
    """The 32-bit words of an address that steer it (see the module docstring)."""
    if version == 4:
        return [value]
    words = []
    for i in range(4):
        bits = min(32, ipv6Prefix - 32 * i)
        if bits <= 0:
            break
        word = (value >> (96 - 32 * i)) & _MASK32
        words.append(word & (_MASK32 << (32 - bits)) & _MASK32)
    return words


def sourceIndex(version: int, value: int, workers: int, ipv6Prefix: int = 64) -> int:
    """
    The worker a client's connections go to: what L{steeringProgram}
    computes in the kernel, for a source address given as C{(version,
    integer)} (see L{echotw.rules.addresses.ipFromText}).

    The mapping (L{sourceIndex}): the words of the source address that count
    are folded into a 32-bit hash C{h = (h ^ word) * 0x9E3779B1} (starting
    from 0), and the index is C{((h >> 16) * workers) >> 16}, the top bits of a
    Fibonacci hash scaled to the number of workers, which spreads neighbouring
    addresses evenly.  The words are the IPv4 source address, or the first
    C{ipv6Prefix} bits of an IPv6 source, as four words with the bits past the
    prefix cleared, omitting the words wholly past it, so every client of one
    prefix gets the same index, just as L{echotw.rules.addresses.sourceKey} counts
    them as one source.  A client with an IPv4-mapped address on a dual-stack
    listener sends IPv4 packets, so the program sees, and steers, its IPv4
    address.
    """
    h = 0
    for word in _words(version, value, ipv6Prefix):
        h = ((h ^ word) * HASH_MULTIPLIER) & _MASK32
    return (((h >> 16) * workers) & _MASK32) >> 16


def steeringProgram(workers: int, ipv6Prefix: int = 64) -> list[Instruction]:
    """
    The classic BPF program returning L{sourceIndex} of a packet's source
    address, for a group of C{workers} sockets.  It reads only the IP
    header, through C{SKF_NET_OFF} (the kernel hands reuseport programs the
    packet past its TCP header).

    When a TCP handshake completes on a port served by a group of
    C{SO_REUSEPORT} listening sockets, Linux runs the group's program on the
    client's SYN and uses the number it returns as an index into the group's
    sockets, in the order they started listening (an index out of range falls
    back to the kernel's own hash).  With worker M holding socket M of every
    group, a program that maps one source to one number sends all of that
    source's connections, on every listener, to one worker, which can then
    enforce C{--max-per-ip} and C{--rate} exactly.
    """
    if not 1 <= workers <= 0xFFFF:
        raise ValueError(f"cannot steer to {workers} sockets")
    v6: list[Instruction] = []
    for i, word in enumerate(_words(6, (1 << 128) - 1, ipv6Prefix)):
        v6.append((LD_W_ABS, 0, 0, _net(8 + 4 * i)))
        if word != _MASK32:
            v6.append((ALU_AND_K, 0, 0, word))
        if i:
            v6.append((ALU_XOR_X, 0, 0, 0))
        v6.append((ALU_MUL_K, 0, 0, HASH_MULTIPLIER))
        v6.append((MISC_TAX, 0, 0, 0))
    v4: list[Instruction] = [
        (LD_W_ABS, 0, 0, _net(12)),
        (ALU_MUL_K, 0, 0, HASH_MULTIPLIER),
        (JMP_JA, 0, 0, len(v6)),
    ]
    head: list[Instruction] = [
        (LD_B_ABS, 0, 0, _net(0)),
        (ALU_RSH_K, 0, 0, 4),
        (JMP_JEQ_K, len(v4), 0, 6),
    ]
    tail: list[Instruction] = [
        (ALU_RSH_K, 0, 0, 16),
        (ALU_MUL_K, 0, 0, workers),
        (ALU_RSH_K, 0, 0, 16),
        (RET_A, 0, 0, 0),
    ]
    return head + v4 + v6 + tail


def packProgram(program: list[Instruction]) -> bytes:
    """
    The program as the kernel's C{struct sock_filter} array.
    """
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


def attachSteering(sock: socket.socket, program: list[Instruction]) -> None:
    """
    Attach C{program} to the C{SO_REUSEPORT} group C{sock} belongs to.

    @raise OSError: where the kernel lacks C{SO_ATTACH_REUSEPORT_CBPF}.
    """
    packed = packProgram(program)
    filters = ctypes.create_string_buffer(packed, len(packed))
    # struct sock_fprog: the instruction count, then a pointer to them; the
    # buffer is alive until setsockopt returns, which copies the program.
    fprog = struct.pack("@HP", len(program), ctypes.addressof(filters))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
