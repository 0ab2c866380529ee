"""
The bytes C{echotw-probe} sends (L{Pattern}) and how it checks what comes
back (L{StreamCheck}, L{DatagramCheck}).  Nothing here does I/O: the Twisted
protocols feed it bytes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

BLOCK = 65536
"""Bytes computed at a time; even, so the top-bit rhythm runs across blocks."""

_LOW_BITS = int.from_bytes(b"\x7f" * BLOCK, "little")
_ODD_TOP_BITS = int.from_bytes(b"\x00\x80" * (BLOCK // 2), "little")
_STREAMS = 2**32


class Pattern:
    """
    The byte stream number C{stream} of run C{seed}, readable at any offset.

    The last C{keep} blocks computed are kept: a connection's sender and
    verifier share one pattern, and while less than a block is in flight
    the verifier reads the block the sender just computed.

    Each connection (or UDP flow) sends its own stream: a seeded pseudo-random
    byte sequence that can be computed at any offset, so the probe keeps no copy
    of what it sent.  Two streams differ, so bytes crossing from one connection
    into another are caught like any other corruption.

    Every byte at an even offset has its top bit clear and every byte at an odd
    offset has it set.  Two neighbouring bytes therefore always differ, so a
    dropped or duplicated byte is caught at exactly the offset where the echo
    first departs from what was sent, not some way after it (with plain random
    bytes, a byte dropped from a run of equal bytes shows only at the run's
    end).  The other seven bits are random.
    """

    def __init__(self, seed: int, stream: int, keep: int = 2) -> None:
        if not 0 <= stream < _STREAMS:
            raise ValueError(f"stream must be in [0, {_STREAMS})")
        self._base = (seed << 64) | (stream << 32)
        self._random = random.Random()
        self._keep = keep
        self._blocks: dict[int, bytes] = {}

    def _block(self, index: int) -> bytes:
        block = self._blocks.get(index)
        if block is None:
            self._random.seed(self._base | index)
            bits = self._random.getrandbits(BLOCK * 8)
            block = ((bits & _LOW_BITS) | _ODD_TOP_BITS).to_bytes(BLOCK, "little")
            if len(self._blocks) >= self._keep:
                del self._blocks[next(iter(self._blocks))]
            self._blocks[index] = block
        return block

    def read(self, offset: int, length: int) -> bytes:
        """
        The C{length} bytes of the stream from C{offset}.
        """
        index, start = divmod(offset, BLOCK)
        if start + length <= BLOCK:
            return self._block(index)[start : start + length]
        pieces = []
        while length > 0:
            piece = self._block(index)[start : start + length]
            pieces.append(piece)
            length -= len(piece)
            index += 1
            start = 0
        return b"".join(pieces)


def firstDifference(a: bytes, b: bytes) -> int:
    """
    The index of the first byte where C{a} and C{b} differ, or the length of
    the shorter one if it is a prefix of the other (then C{-1} if they are
    equal).  Compares 4 KiB at a time, so a mismatch deep in a big chunk is
    found quickly.
    """
    shorter = min(len(a), len(b))
    step = 4096
    for start in range(0, shorter, step):
        if a[start : start + step] != b[start : start + step]:
            for i in range(start, min(start + step, shorter)):
                if a[i] != b[i]:
                    return i
    return -1 if len(a) == len(b) else shorter


@dataclass(frozen=True)
class Mismatch:
    """
    Where an echo first departed from what was sent.

    @ivar offset: the byte offset in the stream (for a datagram, in the
        datagram) of the first byte that is wrong or missing.
    @ivar expected: up to 8 bytes that should have been there.
    @ivar received: up to 8 bytes that were there instead (empty when the
        bytes were missing).
    @ivar detail: what went wrong, in words.
    @ivar datagram: the sequence number of the datagram, for UDP.
    """

    offset: int
    expected: bytes
    received: bytes
    detail: str
    datagram: int | None = None

    def describe(self) -> str:
        where = f"byte offset {self.offset}"
        if self.datagram is not None:
            where = f"datagram {self.datagram}, {where}"
        if self.expected and self.received:
            return (
                f"{where}: {self.detail}: expected {self.expected.hex(' ')}, "
                f"received {self.received.hex(' ')}"
            )
        return f"{where}: {self.detail}"


SHOWN = 8
"""Bytes of context a mismatch keeps from each side."""


class StreamCheck:
    """
    Both ends of one connection's check: the bytes to send next and the
    verification of the echo, which must be those same bytes in the same
    order, however they are split into chunks.
    """

    def __init__(self, seed: int, stream: int) -> None:
        self._pattern = Pattern(seed, stream)
        self.sent = 0
        self.verified = 0
        self.mismatch: Mismatch | None = None

    def nextBytes(self, length: int) -> bytes:
        """
        The next C{length} bytes to send; from now on they are expected back.
        """
        data = self._pattern.read(self.sent, length)
        self.sent += length
        return data

    def received(self, data: bytes) -> Mismatch | None:
        """
        Check echoed bytes.  The first mismatch is returned once and kept in
        L{mismatch}; everything after it is ignored, since the stream can no
        longer be lined up with what was sent.
        """
        if self.mismatch is not None:
            return None
        outstanding = self.sent - self.verified
        checked = data[:outstanding]
        expected = self._pattern.read(self.verified, len(checked))
        if checked != expected:
            at = firstDifference(checked, expected)
            self.mismatch = Mismatch(
                self.verified + at,
                expected[at : at + SHOWN],
                checked[at : at + SHOWN],
                "different byte",
            )
        elif len(data) > outstanding:
            self.mismatch = Mismatch(
                self.sent,
                b"",
                data[outstanding : outstanding + SHOWN],
                f"{len(data) - outstanding} more bytes came back than were sent",
            )
        else:
            self.verified += len(data)
        return self.mismatch

    def closed(self) -> Mismatch | None:
        """
        The peer closed the connection: any bytes sent and not echoed are
        missing, from the first one on.
        """
        if self.mismatch is None and self.verified < self.sent:
            self.mismatch = Mismatch(
                self.verified,
                b"",
                b"",
                f"missing: the peer closed the connection after echoing "
                f"{self.verified} of {self.sent} bytes",
            )
            return self.mismatch
        return None


HEADER = 8
"""A datagram starts with its sequence number, 8 bytes big-endian."""


class DatagramCheck:
    """
    One UDP flow's datagrams: each carries its sequence number then the
    flow's stream at C{sequence * payload size}, so a reply is matched to
    the datagram it echoes and checked byte for byte.  What a reply turns
    out to be is told apart: an echo, a reordered echo (one sent before a
    datagram whose echo already came back), a duplicate, a late one (after
    its datagram was counted lost), or a corrupt one.

    Memory follows the datagrams in flight, not those sent: every sequence
    number below C{_floor} is settled (echoed or lost).
    """

    OK = "ok"
    REORDERED = "reordered"
    DUPLICATE = "duplicate"
    LATE = "late"
    CORRUPT = "corrupt"
    TRUNCATED = "truncated"

    def __init__(self, seed: int, stream: int, size: int) -> None:
        if size <= HEADER:
            raise ValueError(f"a datagram needs more than {HEADER} bytes")
        self._pattern = Pattern(seed, stream)
        self._payload = size - HEADER
        self.size = size
        self.sent = 0
        self._floor = 0
        self._answered: set[int] = set()
        self._lost: set[int] = set()
        self._lateAnswered: set[int] = set()
        self._highest = -1

    def _expected(self, sequence: int) -> bytes:
        return sequence.to_bytes(HEADER, "big") + self._pattern.read(
            sequence * self._payload, self._payload
        )

    def _settle(self) -> None:
        while self._floor in self._answered or self._floor in self._lost:
            self._answered.discard(self._floor)
            self._floor += 1

    def _isAnswered(self, sequence: int) -> bool:
        return (sequence < self._floor and sequence not in self._lost) or sequence in self._answered

    def nextDatagram(self) -> tuple[int, bytes]:
        """
        The next datagram to send and its sequence number.
        """
        sequence = self.sent
        self.sent += 1
        return sequence, self._expected(sequence)

    def lost(self, sequence: int) -> None:
        """
        C{sequence} was not echoed in time; a later echo of it is late.
        """
        self._lost.add(sequence)
        self._settle()

    def received(self, data: bytes) -> tuple[str, int | None, Mismatch | None]:
        """
        Classify a reply: C{(kind, sequence, mismatch)}.  A corrupt reply, a
        truncated one or a duplicate comes with a mismatch.  A corrupt reply
        settles no datagram (its sequence is C{None}; the mismatch names the
        number it carries), since that number may be what was damaged: the
        datagram it was meant to echo is counted lost unless an intact echo
        follows.  A truncated reply (the start of a datagram still in
        flight, sequence number included, and nothing else) settles that
        datagram: it came back, short, which is a mismatch and not a loss.
        """
        sequence = int.from_bytes(data[:HEADER], "big")
        if len(data) < HEADER or sequence >= self.sent:
            return (
                self.CORRUPT,
                None,
                Mismatch(
                    0, b"", data[:SHOWN], f"a {len(data)}-byte reply that matches no datagram sent"
                ),
            )
        expected = self._expected(sequence)
        if data != expected:
            at = firstDifference(data, expected)
            if at in (len(data), len(expected)):
                detail = f"{len(data)} bytes came back of {len(expected)}"
            else:
                detail = "different byte"
            mismatch = Mismatch(
                at, expected[at : at + SHOWN], data[at : at + SHOWN], detail, sequence
            )
            inFlight = not self._isAnswered(sequence) and sequence not in self._lost
            if at == len(data) and inFlight:
                self._answered.add(sequence)
                self._settle()
                self._highest = max(self._highest, sequence)
                return self.TRUNCATED, sequence, mismatch
            # Not settled: the sequence number itself may be what was damaged.
            return self.CORRUPT, None, mismatch
        duplicate = (self.DUPLICATE, sequence, Mismatch(0, b"", b"", "came back twice", sequence))
        if sequence in self._lost:
            if sequence in self._lateAnswered:
                return duplicate
            self._lateAnswered.add(sequence)
            return self.LATE, sequence, None
        if self._isAnswered(sequence):
            return duplicate
        self._answered.add(sequence)
        self._settle()
        overtaken = sequence < self._highest
        self._highest = max(self._highest, sequence)
        return (self.REORDERED if overtaken else self.OK), sequence, None
