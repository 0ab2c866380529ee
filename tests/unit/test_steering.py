"""
Tests for L{echotw.workers.steering}: the classic BPF program, run through a small
interpreter of the instructions it uses, agrees with the Python mapping,
and the mapping keeps one source on one worker.
"""

from __future__ import annotations

import random
import socket
import struct

from twisted.trial.unittest import SynchronousTestCase

from echotw.rules.addresses import ipFromText
from echotw.workers.steering import (
    SKF_NET_OFF,
    Instruction,
    packProgram,
    sourceIndex,
    steeringProgram,
)

MASK = 0xFFFFFFFF


class BPFError(Exception):
    """The program did something the kernel's verifier or run time refuses."""


def run(program: list[Instruction], header: bytes) -> int:
    """
    Run a classic BPF program the way a reuseport group does, with
    C{header} as the packet's IP header (reachable only through
    C{SKF_NET_OFF}); return the accumulator it returns.  Only the opcodes a
    steering program needs are known, and jumps must go forward.
    """
    a = x = 0
    pc = 0
    for _ in range(4096):
        if pc >= len(program):
            raise BPFError("ran off the end")
        code, jt, jf, k = program[pc]
        pc += 1
        cls = code & 0x07
        if cls == 0x00:  # BPF_LD
            mode, size = code & 0xE0, code & 0x18
            if mode == 0x00:  # BPF_IMM
                a = k
                continue
            if mode != 0x20:
                raise BPFError(f"load mode {mode:#x}")
            offset = k - (SKF_NET_OFF & MASK)
            width = {0x00: 4, 0x08: 2, 0x10: 1}[size]
            if not 0 <= offset <= len(header) - width:
                raise BPFError(f"load outside the IP header at {offset}")
            a = int.from_bytes(header[offset : offset + width], "big")
        elif cls == 0x04:  # BPF_ALU
            operand = x if code & 0x08 else k
            op = code & 0xF0
            if op == 0x20:
                a = (a * operand) & MASK
            elif op == 0x50:
                a &= operand
            elif op == 0x70:
                a >>= operand
            elif op == 0xA0:
                a ^= operand
            else:
                raise BPFError(f"ALU op {op:#x}")
        elif cls == 0x05:  # BPF_JMP
            op = code & 0xF0
            if op == 0x00:
                pc += k
            elif op == 0x10 and not code & 0x08:
                pc += jt if a == k else jf
            else:
                raise BPFError(f"jump {op:#x}")
        elif cls == 0x06:  # BPF_RET
            return a if code & 0x18 == 0x10 else k
        elif cls == 0x07:  # BPF_MISC
            if code & 0xF8 == 0x00:
                x = a
            else:
                raise BPFError(f"misc {code:#x}")
        else:
            raise BPFError(f"class {cls:#x}")
    raise BPFError("did not return")


def ipv4Header(source: str) -> bytes:
    return struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 60, 1, 0, 64, 6, 0, socket.inet_aton(source), bytes(4)
    )


def ipv6Header(source: str) -> bytes:
    return struct.pack(
        "!IHBB16s16s", 6 << 28, 40, 6, 64, socket.inet_pton(socket.AF_INET6, source), bytes(16)
    )


def cases(seed: int, count: int = 400) -> list[tuple[int, int, int]]:
    """
    C{count} random C{(address bits, workers, IPv6 prefix)} triples, the
    same on every run.
    """
    rng = random.Random(seed)
    return [(rng.getrandbits(128), rng.randint(1, 64), rng.randint(1, 128)) for _ in range(count)]


def v4(bits: int) -> str:
    return socket.inet_ntoa((bits & MASK).to_bytes(4, "big"))


def v6(bits: int) -> str:
    return socket.inet_ntop(socket.AF_INET6, bits.to_bytes(16, "big"))


class SteeringProgramTests(SynchronousTestCase):
    def test_ipv4MatchesPython(self) -> None:
        """For IPv4 packets the program returns sourceIndex of the source."""
        for bits, count, prefix in cases(4):
            index = run(steeringProgram(count, prefix), ipv4Header(v4(bits)))
            self.assertEqual(ipFromText(v4(bits)), (4, bits & MASK))
            self.assertEqual(index, sourceIndex(4, bits & MASK, count, prefix))
            self.assertLess(index, count)

    def test_ipv6MatchesPython(self) -> None:
        """For IPv6 packets the program returns sourceIndex of the source's prefix."""
        for bits, count, prefix in cases(6):
            index = run(steeringProgram(count, prefix), ipv6Header(v6(bits)))
            self.assertEqual(index, sourceIndex(6, bits, count, prefix))
            self.assertLess(index, count)

    def test_onePrefixOneWorker(self) -> None:
        """Two IPv6 sources in the same prefix go to the same worker."""
        rng = random.Random(7)
        for bits, count, prefix in cases(8):
            other = bits ^ (rng.getrandbits(128) & ((1 << (128 - prefix)) - 1))
            program = steeringProgram(count, prefix)
            self.assertEqual(
                run(program, ipv6Header(v6(bits))), run(program, ipv6Header(v6(other)))
            )

    def test_prefixBitsCount(self) -> None:
        """Sources differing inside the prefix spread over the workers."""
        program = steeringProgram(4, 48)
        seen = {run(program, ipv6Header(f"2001:db8:{n:x}::1")) for n in range(64)}
        self.assertEqual(seen, {0, 1, 2, 3})

    def test_neighboursSpread(self) -> None:
        """Consecutive IPv4 addresses spread evenly: 240 of them over 2, 3,
        4 and 8 workers give each worker within a third of its share."""
        for count in (2, 3, 4, 8):
            program = steeringProgram(count)
            hits = [0] * count
            for n in range(2, 242):
                hits[run(program, ipv4Header(f"10.0.0.{n}"))] += 1
            share = 240 / count
            for h in hits:
                self.assertTrue(share * 2 / 3 <= h <= share * 4 / 3, (count, hits))

    def test_packed(self) -> None:
        """Each instruction packs into the kernel's 8-byte struct sock_filter."""
        program = steeringProgram(3, 64)
        packed = packProgram(program)
        self.assertEqual(len(packed), 8 * len(program))
        self.assertEqual(struct.unpack_from("=HBBI", packed, 8 * 3), program[3])

    def test_tooManyWorkers(self) -> None:
        """The scaled hash has 16 bits: more sockets than that is refused."""
        with self.assertRaises(ValueError):
            steeringProgram(0x10000)
