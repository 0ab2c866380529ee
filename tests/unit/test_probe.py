"""
Unit tests for C{echotw-probe}'s pure parts: the byte pattern and its
verifiers, percentiles, the report and its exit status, option parsing and
the PROXY headers.  No network, no reactor.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import random
import tempfile
from contextlib import redirect_stderr
from ipaddress import ip_address

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

import echotw.probe
from echotw.files import MAX_TLS_FILE_BYTES
from echotw.probe import command
from echotw.probe.options import ProbeOptions, duration, size
from echotw.probe.pattern import (
    BLOCK,
    HEADER,
    DatagramCheck,
    Mismatch,
    Pattern,
    StreamCheck,
    firstDifference,
)
from echotw.probe.proxyheader import V2_SIGNATURE, v1Header, v2Header
from echotw.probe.stats import ProbeRun, RoundTrips, Thresholds, percentile

SEEDS = st.integers(min_value=0, max_value=2**64 - 1)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """
    C{data} split at C{points} (any integers; taken modulo the length).
    """
    if not data:
        return []
    edges = sorted({0, len(data), *(p % len(data) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@st.composite
def sentStreams(draw: st.DrawFn) -> tuple[StreamCheck, bytes]:
    """
    A check that has sent some messages of assorted sizes, and the bytes
    it sent.
    """
    check = StreamCheck(draw(SEEDS), draw(st.integers(0, 2**32 - 1)))
    sizes = draw(st.lists(st.integers(1, 3 * BLOCK), min_size=1, max_size=4))
    return check, b"".join(check.nextBytes(n) for n in sizes)


def feed(check: StreamCheck, chunks: list[bytes]) -> Mismatch | None:
    found = None
    for chunk in chunks:
        found = check.received(chunk) or found
    return found


class PatternTests(SynchronousTestCase):
    @given(SEEDS, st.integers(0, 2**32 - 1), st.integers(0, 4 * BLOCK), st.integers(0, 2 * BLOCK))
    @settings(max_examples=50, deadline=None)
    def test_readAnywhere(self, seed: int, stream: int, offset: int, length: int) -> None:
        """Reading at any offset gives the same bytes as reading from the
        start, across block boundaries."""
        whole = Pattern(seed, stream).read(0, offset + length)
        self.assertEqual(Pattern(seed, stream).read(offset, length), whole[offset:])

    @given(SEEDS, st.integers(0, 2**32 - 1), st.integers(0, 3 * BLOCK))
    @settings(max_examples=30, deadline=None)
    def test_neighboursDiffer(self, seed: int, stream: int, offset: int) -> None:
        """Bytes at even offsets have the top bit clear, at odd offsets set,
        so no two neighbouring bytes are equal."""
        data = Pattern(seed, stream).read(offset, 600)
        for i, byte in enumerate(data):
            self.assertEqual(byte >> 7, (offset + i) % 2)

    def test_streamsDiffer(self) -> None:
        """Two connections of a run, and two runs, send different bytes."""
        self.assertNotEqual(Pattern(1, 0).read(0, 64), Pattern(1, 1).read(0, 64))
        self.assertNotEqual(Pattern(1, 0).read(0, 64), Pattern(2, 0).read(0, 64))
        self.assertEqual(Pattern(1, 0).read(0, 64), Pattern(1, 0).read(0, 64))

    def test_badStream(self) -> None:
        """Stream numbers outside 32 bits are refused rather than wrapped."""
        self.assertRaises(ValueError, Pattern, 1, 2**32)

    @given(st.binary(max_size=10000), st.binary(max_size=10000))
    def test_firstDifference(self, a: bytes, b: bytes) -> None:
        """firstDifference agrees with a byte-by-byte scan."""
        naive = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if naive is None:
            naive = -1 if len(a) == len(b) else min(len(a), len(b))
        self.assertEqual(firstDifference(a, b), naive)
        self.assertEqual(firstDifference(a + b"x" * 5000, a + b"y" + b"x" * 4999), len(a))


class StreamCheckTests(SynchronousTestCase):
    @given(sentStreams(), st.lists(st.integers(0, 10**6), max_size=30))
    @settings(max_examples=60, deadline=None)
    def test_anyChunkingVerifies(self, sent: tuple[StreamCheck, bytes], points: list[int]) -> None:
        """A correct echo verifies however it is split into chunks."""
        check, data = sent
        self.assertIsNone(feed(check, cut(data, points)))
        self.assertEqual(check.verified, len(data))
        self.assertIsNone(check.closed())

    @given(
        sentStreams(),
        st.integers(0, 10**6),
        st.integers(1, 255),
        st.lists(st.integers(0, 10**6), max_size=10),
    )
    @settings(max_examples=60, deadline=None)
    def test_flippedByte(
        self, sent: tuple[StreamCheck, bytes], where: int, xor: int, points: list[int]
    ) -> None:
        """Any single changed byte is reported at its offset, whatever the
        chunking."""
        check, data = sent
        at = where % len(data)
        echoed = data[:at] + bytes([data[at] ^ xor]) + data[at + 1 :]
        mismatch = feed(check, cut(echoed, points))
        assert mismatch is not None
        self.assertEqual(mismatch.offset, at)
        self.assertEqual(mismatch.expected[0], data[at])
        self.assertEqual(mismatch.received[0], data[at] ^ xor)

    @given(sentStreams(), st.integers(0, 10**6), st.lists(st.integers(0, 10**6), max_size=10))
    @settings(max_examples=60, deadline=None)
    def test_droppedByte(
        self, sent: tuple[StreamCheck, bytes], where: int, points: list[int]
    ) -> None:
        """A dropped byte is reported at exactly its offset (at the close, as
        missing, if it was the last)."""
        check, data = sent
        at = where % len(data)
        mismatch = feed(check, cut(data[:at] + data[at + 1 :], points))
        if at == len(data) - 1:
            self.assertIsNone(mismatch)
            mismatch = check.closed()
            assert mismatch is not None
            self.assertIn("missing", mismatch.detail)
        assert mismatch is not None
        self.assertEqual(mismatch.offset, at)

    @given(sentStreams(), st.integers(0, 10**6), st.lists(st.integers(0, 10**6), max_size=10))
    @settings(max_examples=60, deadline=None)
    def test_duplicatedByte(
        self, sent: tuple[StreamCheck, bytes], where: int, points: list[int]
    ) -> None:
        """A byte that comes back twice is reported where the extra copy
        stands: right after the original."""
        check, data = sent
        at = where % len(data)
        mismatch = feed(check, cut(data[: at + 1] + data[at:], points))
        assert mismatch is not None
        self.assertEqual(mismatch.offset, at + 1)

    @given(sentStreams(), st.integers(0, 10**6), st.integers(1, 5000), st.integers(1, 5000))
    @settings(max_examples=60, deadline=None)
    def test_reorderedChunks(
        self, sent: tuple[StreamCheck, bytes], where: int, first: int, second: int
    ) -> None:
        """Two swapped stretches are reported at the first byte that differs
        from what was sent, never later than the swap's end."""
        check, data = sent
        a = where % len(data)
        b = min(a + first, len(data))
        c = min(b + second, len(data))
        echoed = data[:a] + data[b:c] + data[a:b] + data[c:]
        mismatch = feed(check, [echoed])
        if echoed == data:
            self.assertIsNone(mismatch)
            return
        assert mismatch is not None
        self.assertEqual(mismatch.offset, firstDifference(echoed, data))
        self.assertTrue(a <= mismatch.offset < c)

    def test_extraBytes(self) -> None:
        """Bytes beyond what was sent are a mismatch at the end of what was
        sent."""
        check = StreamCheck(7, 0)
        data = check.nextBytes(100)
        mismatch = check.received(data + b"xyz")
        assert mismatch is not None
        self.assertEqual(mismatch.offset, 100)
        self.assertIn("3 more bytes", mismatch.detail)

    def test_firstMismatchKept(self) -> None:
        """After a mismatch nothing more is checked and the first is kept."""
        check = StreamCheck(7, 0)
        data = check.nextBytes(10)
        first = check.received(b"\x00" + data[1:])
        self.assertIsNotNone(first)
        self.assertIsNone(check.received(data))
        self.assertIs(check.mismatch, first)
        self.assertIsNone(check.closed())

    def test_otherConnectionsBytes(self) -> None:
        """Bytes from another connection's stream do not verify."""
        mine, other = StreamCheck(7, 0), StreamCheck(7, 1)
        mine.nextBytes(64)
        self.assertIsNotNone(mine.received(other.nextBytes(64)))

    def test_describe(self) -> None:
        """A mismatch names the offset and the bytes on both sides."""
        check = StreamCheck(7, 0)
        data = check.nextBytes(5000)
        mismatch = check.received(data[:4096] + bytes([data[4096] ^ 1]) + data[4097:])
        assert mismatch is not None
        text = mismatch.describe()
        self.assertIn("byte offset 4096", text)
        self.assertIn(f"expected {data[4096]:02x}", text)
        self.assertIn(f"received {data[4096] ^ 1:02x}", text)


class DatagramCheckTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.check = DatagramCheck(5, 0, 100)
        self.sent = [self.check.nextDatagram() for _ in range(5)]

    def test_echo(self) -> None:
        """Each datagram carries its sequence number and verifies."""
        for sequence, data in self.sent:
            self.assertEqual(len(data), 100)
            self.assertEqual(self.check.received(data), ("ok", sequence, None))

    def test_duplicate(self) -> None:
        """A second copy of a datagram is a duplicate, with a mismatch."""
        self.check.received(self.sent[1][1])
        kind, sequence, mismatch = self.check.received(self.sent[1][1])
        self.assertEqual((kind, sequence), ("duplicate", 1))
        self.assertIsNotNone(mismatch)

    def test_duplicateAfterSettled(self) -> None:
        """A duplicate is recognised after the window has moved past it."""
        for _, data in self.sent:
            self.check.received(data)
        self.assertEqual(self.check.received(self.sent[0][1])[0], "duplicate")

    def test_reordered(self) -> None:
        """An echo that arrives after a later datagram's is reordered, and
        still verified."""
        self.check.received(self.sent[2][1])
        self.assertEqual(self.check.received(self.sent[1][1])[:2], ("reordered", 1))
        self.assertEqual(self.check.received(self.sent[3][1])[:2], ("ok", 3))

    def test_late(self) -> None:
        """An echo of a datagram already counted lost is late; a second one
        is a duplicate."""
        self.check.lost(0)
        self.assertEqual(self.check.received(self.sent[0][1])[:2], ("late", 0))
        self.assertEqual(self.check.received(self.sent[0][1])[0], "duplicate")

    def test_corruptPayload(self) -> None:
        """A changed payload byte is corrupt at its offset, naming the
        datagram; an intact echo may still follow."""
        data = bytearray(self.sent[3][1])
        data[50] ^= 0x10
        kind, sequence, mismatch = self.check.received(bytes(data))
        assert mismatch is not None
        self.assertEqual(
            (kind, sequence, mismatch.offset, mismatch.datagram), ("corrupt", None, 50, 3)
        )
        self.assertIn("datagram 3, byte offset 50", mismatch.describe())
        self.assertEqual(self.check.received(self.sent[3][1])[:2], ("ok", 3))

    def test_corruptHeader(self) -> None:
        """A changed sequence number is corrupt too, even when it names
        another datagram sent, and settles neither."""
        data = bytearray(self.sent[1][1])
        data[7] ^= 0x02  # sequence 1 -> 3
        kind, sequence, _ = self.check.received(bytes(data))
        self.assertEqual((kind, sequence), ("corrupt", None))
        data[0] ^= 0x80  # a sequence number never sent
        self.assertEqual(self.check.received(bytes(data))[:2], ("corrupt", None))
        self.assertEqual(self.check.received(self.sent[3][1])[:2], ("ok", 3))
        self.assertEqual(self.check.received(self.sent[1][1])[:2], ("reordered", 1))

    @given(st.integers(min_value=HEADER, max_value=99))
    def test_truncated(self, length: int) -> None:
        """A shortened echo of a datagram in flight, cut anywhere after its
        sequence number, settles that datagram as truncated (it came back,
        so it is not lost) and says how much came back; a whole copy after
        it is a duplicate."""
        check = DatagramCheck(5, 0, 100)
        sent = [check.nextDatagram() for _ in range(3)]
        kind, sequence, mismatch = check.received(sent[1][1][:length])
        assert mismatch is not None
        self.assertEqual((kind, sequence, mismatch.datagram), ("truncated", 1, 1))
        self.assertEqual(mismatch.offset, length)
        self.assertIn(f"{length} bytes came back of 100", mismatch.detail)
        self.assertEqual(check.received(sent[1][1])[:2], ("duplicate", 1))
        self.assertEqual(check.received(sent[0][1])[:2], ("reordered", 0))

    def test_truncatedUnsettled(self) -> None:
        """A shortened reply that cannot be pinned on a datagram in flight
        settles nothing: too short to carry a sequence number, or the echo
        of one already lost."""
        self.assertEqual(self.check.received(b"abc")[:2], ("corrupt", None))
        self.check.lost(2)
        self.assertEqual(self.check.received(self.sent[2][1][:60])[:2], ("corrupt", None))

    def test_tooSmall(self) -> None:
        """A datagram must have room for the pattern after its header."""
        self.assertRaises(ValueError, DatagramCheck, 1, 0, HEADER)


class PercentileTests(SynchronousTestCase):
    @given(
        st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=300),
        st.integers(1, 100),
    )
    def test_nearestRank(self, values: list[float], percent: int) -> None:
        """The p-th percentile is a value with at least p % of the values at
        or below it and fewer than p % strictly below it."""
        ordered = sorted(values)
        result = percentile(ordered, percent)
        self.assertIn(result, values)
        n = len(values)
        self.assertGreaterEqual(sum(v <= result for v in values) * 100, percent * n)
        self.assertLess(sum(v < result for v in values) * 100, percent * n)

    def test_examples(self) -> None:
        """Nearest rank on ten values; p100 is the maximum."""
        values = [float(v) for v in range(1, 11)]
        self.assertEqual(percentile(values, 50), 5.0)
        self.assertEqual(percentile(values, 90), 9.0)
        self.assertEqual(percentile(values, 99), 10.0)
        self.assertEqual(percentile(values, 100), 10.0)
        self.assertEqual(percentile(list(map(float, range(1, 101))), 7), 7.0)
        self.assertRaises(ValueError, percentile, [], 50)
        self.assertRaises(ValueError, percentile, values, 0)

    def test_roundTripsSample(self) -> None:
        """Beyond the limit, count, min and max stay exact and percentiles
        come from a bounded sample."""
        trips = RoundTrips(limit=100, sampler=random.Random(1))
        for i in range(1000):
            trips.add(i / 1000)
        self.assertEqual((trips.count, trips.minimum, trips.maximum), (1000, 0.0, 0.999))
        self.assertFalse(trips.exact)
        [p50] = trips.percentiles(50)
        self.assertTrue(0.3 < p50 < 0.7, p50)


class ReportTests(SynchronousTestCase):
    def run_(self) -> ProbeRun:
        """
        A run that lasts 2 s.
        """
        clock = Clock()
        run = ProbeRun(clock.seconds)
        clock.advance(2)
        return run

    def test_elapsedEndsWithTheLastOutcome(self) -> None:
        """A run whose connections all concluded ends with the last outcome,
        not with the closes after it; an interrupted one ends when it is
        stopped."""
        for allConcluded, elapsed in ((True, 3.0), (False, 8.0)):
            clock = Clock()
            run = ProbeRun(clock.seconds)
            clock.advance(2)
            run.sent(100)
            run.echoed(0.5, 100)
            run.concluded()
            clock.advance(1)
            run.concluded()
            clock.advance(5)  # a TLS close waiting for its answer
            run.finish(allConcluded=allConcluded)
            result = run.report("tls", "h:7", 2, 100, 1, Thresholds())
            self.assertEqual(result.elapsed, elapsed)

    def test_clean(self) -> None:
        """Everything verified: exit 0, and the JSON has the promised keys."""
        run = self.run_()
        for rtt in (0.001, 0.002, 0.003):
            run.sent(100)
            run.echoed(rtt, 100)
        run.finish()
        result = run.report("tcp", "127.0.0.1:7", 1, 100, 42, Thresholds())
        self.assertEqual(result.exitCode, 0)
        document = json.loads(json.dumps(result.asJSON()))
        for key in (
            "verified_bytes",
            "mismatches",
            "lost",
            "rtt_p50_ms",
            "rtt_p90_ms",
            "rtt_p99_ms",
            "rtt_max_ms",
            "throughput_bytes_per_s",
        ):
            self.assertIn(key, document)
        self.assertEqual(document["verified_bytes"], 300)
        self.assertEqual(document["rtt_p50_ms"], 2.0)
        self.assertEqual(document["throughput_bytes_per_s"], 150.0)
        self.assertIn("result: ok (exit 0)", result.lines())

    def test_rttThreshold(self) -> None:
        """A p99 above --max-rtt-p99 exits 1 and says so."""
        run = self.run_()
        run.sent(100)
        run.echoed(0.5, 100)
        result = run.report("tcp", "x:7", 1, 100, 42, Thresholds(maxRTTp99=0.1))
        self.assertEqual(result.exitCode, 1)
        self.assertIn("rtt p99 500.000 ms > 100.000 ms", result.lines()[-1])

    def test_loss(self) -> None:
        """Any loss exceeds the default --max-loss of 0; a higher limit
        allows it."""
        run = self.run_()
        for _ in range(4):
            run.sent(100)
        for _ in range(3):
            run.echoed(0.01, 100)
        run.lost()
        self.assertEqual(run.report("udp", "x:7", 1, 100, 1, Thresholds()).exitCode, 1)
        allowed = run.report("udp", "x:7", 1, 100, 1, Thresholds(maxLoss=0.25))
        self.assertEqual(allowed.exitCode, 0)
        self.assertEqual(allowed.asJSON()["loss"], 0.25)

    def test_mismatchBeatsThreshold(self) -> None:
        """A mismatch exits 2 even when a threshold is also exceeded, and
        the report names the connection and offset."""
        run = self.run_()
        run.sent(100)
        run.echoed(0.5, 100)
        run.mismatch(3, Mismatch(4096, b"\x01", b"\x02", "different byte"))
        result = run.report("tcp", "x:7", 4, 100, 1, Thresholds(maxRTTp99=0.1))
        self.assertEqual(result.exitCode, 2)
        self.assertIn("connection 3, byte offset 4096", "\n".join(result.lines()))
        self.assertEqual(result.asJSON()["first_mismatch"]["offset"], 4096)

    def test_failure(self) -> None:
        """A failed connection exits 2, without round trips."""
        run = self.run_()
        run.failed(0, "connection refused")
        result = run.report("tcp", "x:7", 1, 100, 1, Thresholds(maxRTTp99=0.1))
        self.assertEqual(result.exitCode, 2)
        self.assertIsNone(result.asJSON()["rtt_p99_ms"])
        self.assertIn("FAILED connection 0: connection refused", result.lines())


def parse(*args: str) -> ProbeOptions:
    options = ProbeOptions()
    options.parseOptions(list(args))
    return options


class OptionTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """Ten messages of 1024 bytes on one TCP connection, 5 s timeout."""
        config = parse("example.net", "7")["config"]
        self.assertEqual(
            (config.host, config.port, config.transport, config.count, config.size),
            ("example.net", 7, "tcp", 10, 1024),
        )
        self.assertEqual((config.connections, config.interval, config.timeout), (1, 0.0, 5.0))
        self.assertIsNone(config.duration)
        self.assertEqual(config.thresholds, Thresholds())

    def test_durationLiftsCount(self) -> None:
        """--duration alone sends for that long; with --count, whichever
        ends first."""
        self.assertIsNone(parse("-d", "2", "h", "7")["config"].count)
        self.assertEqual(parse("-d", "2", "-c", "5", "h", "7")["config"].count, 5)

    def test_durations(self) -> None:
        """Durations take seconds or a unit."""
        for text, seconds in [
            ("0.2", 0.2),
            ("200ms", 0.2),
            ("5s", 5.0),
            ("1m", 60.0),
            ("1h", 3600.0),
            ("1e-3", 0.001),
            (".5", 0.5),
            ("0", 0.0),
        ]:
            self.assertAlmostEqual(duration(text), seconds)
        for text in ["", "-1", "abc", "1d", "nan", "inf", "1e999", "5 ms s", "1e300", "525601m"]:
            self.assertRaises(ValueError, duration, text)
        self.assertEqual(duration("525600m"), 365 * 24 * 3600)

    @given(st.integers(0, 10**9))
    def test_millisecondsAgree(self, n: int) -> None:
        """N ms is N/1000 s."""
        self.assertTrue(math.isclose(duration(f"{n}ms"), duration(str(n / 1000))))

    def test_sizes(self) -> None:
        """Sizes take decimal k and M."""
        self.assertEqual([size("1"), size("64k"), size("1M")], [1, 64000, 1000000])
        for text in ["0", "-5", "1.5k", "1G", "100M", "k"]:
            self.assertRaises(ValueError, size, text)

    def assertUsageError(self, message: str, *args: str) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            parse(*args)
        self.assertIn(message, str(caught.exception))
        self.assertNotIn("\n", str(caught.exception))

    def test_badValuesNameTheOption(self) -> None:
        """A bad value is refused on one line naming the option and value."""
        self.assertUsageError("--count: invalid value '0': must be at least 1", "-c", "0", "h", "7")
        self.assertUsageError("--interval: invalid value 'soon'", "--interval", "soon", "h", "7")
        self.assertUsageError(
            "--timeout: invalid value '0': must be more than 0", "--timeout", "0", "h", "7"
        )
        self.assertUsageError("--max-loss: invalid value '2'", "--udp", "--max-loss", "2", "h", "7")
        self.assertUsageError("--size: invalid value '0'", "--size", "0", "h", "7")

    def test_numbersAsTyped(self) -> None:
        """Numbers are ASCII digits without separators, as typed on purpose:
        Arabic-Indic or fullwidth digits and C{1_0}, which Python would
        read, are refused like any other bad value."""
        self.assertUsageError("--connections: invalid value '\u0663'", "-C", "\u0663", "h", "7")
        self.assertUsageError("--connections: invalid value '1_0'", "-C", "1_0", "h", "7")
        self.assertUsageError("--seed: invalid value '\uff11'", "--seed", "\uff11", "h", "7")
        self.assertUsageError("PORT '\u0669' is not a number", "h", "\u0669")
        self.assertUsageError(
            "--max-loss: invalid value '\u0660.\u0665'",
            "-u",
            "--max-loss",
            "\u0660.\u0665",
            "h",
            "7",
        )

    def test_hostNames(self) -> None:
        """A host name that name resolution could never take (an empty
        label, a label over 63 characters) is refused at once."""
        self.assertUsageError("HOST 'a..b' is not a valid host name", "a..b", "7")
        self.assertUsageError("is not a valid host name", "x" * 64 + ".example", "7")
        self.assertEqual(parse("echo.example", "7")["config"].host, "echo.example")

    def test_arguments(self) -> None:
        """HOST and PORT are required, the port checked; options after them
        are pointed out."""
        self.assertUsageError("expected HOST PORT, got 1", "h")
        self.assertUsageError("PORT '0' must be between 1 and 65535", "h", "0")
        self.assertUsageError("PORT 'echo' is not a number", "h", "echo")
        self.assertUsageError("options go before HOST PORT", "h", "7", "--udp")
        self.assertEqual(parse("[::1]", "7")["config"].host, "::1")
        self.assertEqual(parse("::1", "7")["config"].target, "[::1]:7")

    def test_conflicts(self) -> None:
        """Options that make no sense together are refused."""
        self.assertUsageError("--tls cannot be used with --udp", "--udp", "--tls", "h", "7")
        self.assertUsageError("--proxy-v1 cannot be used with --udp", "-u", "--proxy-v1", "h", "7")
        self.assertUsageError("--max-loss applies to --udp only", "--max-loss", "0.1", "h", "7")
        self.assertUsageError("--ca needs --tls", "--ca", "x.pem", "h", "7")
        self.assertUsageError("--sni needs --tls", "--sni", "a.example", "h", "7")
        self.assertUsageError("choose one", "--proxy-v1", "--proxy-v2", "h", "7")
        self.assertUsageError("cannot be combined with --tls", "--tls", "--proxy-v2", "h", "7")
        self.assertUsageError("more than 8 with --udp", "-u", "-s", "8", "h", "7")
        self.assertUsageError("at most 65507 with --udp", "-u", "-s", "65508", "h", "7")
        self.assertUsageError("--connections must be at most", "-C", "10001", "h", "7")

    def test_badServerName(self) -> None:
        """An --sni that is neither a DNS name nor an IP address is refused
        at start-up on one line naming --sni, with or without --ca and
        --insecure, rather than failing each connection or with a
        traceback."""
        for name in ["a..b", "x" * 64 + ".example", "", "local host", "[::1]"]:
            for extra in [(), ("--insecure",), ("--ca", "ca.pem")]:
                self.assertUsageError(
                    f"--sni {name!r} is not a DNS name or an IP address",
                    "--tls", *extra, "--sni", name, "h", "7",
                )  # fmt: skip
        for name in ["echo.example", "b\u00fccher.example", "under_score.test", "127.0.0.1", "::1"]:
            self.assertEqual(parse("--tls", "-k", "--sni", name, "h", "7")["sni"], name)

    def test_websocket(self) -> None:
        """--websocket probes ws:// (wss:// with --tls) at --path, with an
        optional --origin; the target reads as the URL; the upgrade's Host
        is --sni's name when given."""
        config = parse("--websocket", "::1", "8080")["config"]
        self.assertEqual((config.transport, config.path, config.origin), ("ws", "/", None))
        self.assertEqual(config.target, "ws://[::1]:8080/")
        config = parse(
            "-w", "--tls", "--insecure", "--sni", "echo.example", "--path", "/e?x=1",
            "--origin", "https://page.example", "h", "443",
        )["config"]  # fmt: skip
        self.assertEqual(
            (config.transport, config.tls, config.websocket, config.target, config.serverName),
            ("wss", True, True, "wss://h:443/e?x=1", "echo.example"),
        )
        self.assertEqual(config.origin, "https://page.example")
        self.assertFalse(parse("h", "7")["config"].websocket)

    def test_websocketConflicts(self) -> None:
        """--path and --origin need --websocket and a usable value;
        --websocket is not for --udp."""
        self.assertUsageError("--path needs --websocket", "--path", "/x", "h", "7")
        self.assertUsageError("--origin needs --websocket", "--origin", "http://o", "h", "7")
        self.assertUsageError("--websocket cannot be used with --udp", "-u", "-w", "h", "7")
        for path in ("echo", "/a b", "/\x7f", "/é", ""):
            self.assertUsageError("must start with /", "-w", "--path", path, "h", "7")
        self.assertUsageError("--origin 'a\\nb' must be", "-w", "--origin", "a\nb", "h", "7")

    def test_udp(self) -> None:
        """--udp with a loss threshold."""
        config = parse("-u", "--max-loss", "0.05", "-s", "9", "h", "7")["config"]
        self.assertEqual((config.transport, config.size), ("udp", 9))
        self.assertEqual(config.thresholds.maxLoss, 0.05)

    def test_caFile(self) -> None:
        """--ca must name a readable file with a PEM certificate in it."""
        self.assertUsageError(
            "--ca '/nonexistent/ca.pem'", "--tls", "--ca", "/nonexistent/ca.pem", "h", "7"
        )
        descriptor, path = tempfile.mkstemp(suffix=".pem")
        self.addCleanup(os.unlink, path)
        with os.fdopen(descriptor, "w") as f:
            f.write("not a certificate\n")
        self.assertUsageError("no PEM certificate", "--tls", "--ca", path, "h", "7")
        # A device is refused the same way without being read (test_tlsfiles);
        # an oversized file shows it here without risking a read that never ends.
        with open(path, "r+b") as f:
            f.truncate(MAX_TLS_FILE_BYTES + 1)
        self.assertUsageError(
            f"--ca {path!r}: {MAX_TLS_FILE_BYTES + 1} bytes, more than",
            *("--tls", "--ca", path, "h", "7"),
        )
        self.assertUsageError("contradict", "--tls", "--ca", path, "--insecure", "h", "7")

    def test_seed(self) -> None:
        """--seed repeats a run; without it each run has its own."""
        self.assertEqual(parse("--seed", "99", "h", "7")["config"].seed, 99)
        seeds = {parse("h", "7")["config"].seed for _ in range(5)}
        self.assertGreater(len(seeds), 1)

    def test_mainUsageError(self) -> None:
        """The command exits 2 with one line on standard error."""
        err = io.StringIO()
        with redirect_stderr(err), self.assertRaises(SystemExit) as caught:
            command.main(["--count", "many", "h", "7"])
        self.assertEqual(caught.exception.code, 2)
        self.assertEqual(
            err.getvalue(),
            "echotw-probe: error: --count: invalid value 'many': not a whole number (see --help)\n",
        )

    def test_exports(self) -> None:
        """echotw.probe.main is the command's entry point."""
        self.assertIs(echotw.probe.main, command.main)


class ProxyHeaderTests(SynchronousTestCase):
    def test_v1(self) -> None:
        """A v1 header names the client and the destination; Twisted's
        parser reads it back."""
        header = v1Header(IPv4Address("TCP", "127.0.0.1", 5000), IPv4Address("TCP", "10.0.0.1", 7))
        self.assertEqual(header, b"PROXY TCP4 127.0.0.1 10.0.0.1 5000 7\r\n")
        info = V1Parser.parse(header.rstrip(b"\r\n"))
        self.assertEqual((info.source.host, info.source.port), ("127.0.0.1", 5000))
        six = v1Header(IPv6Address("TCP", "::1", 5000), IPv6Address("TCP", "::2", 7))
        self.assertEqual(six, b"PROXY TCP6 ::1 ::2 5000 7\r\n")

    def test_v2(self) -> None:
        """A v2 header carries both addresses in binary; Twisted's parser
        reads them back, for IPv4 and IPv6."""
        for kind, source, destination in [
            (IPv4Address, "192.0.2.1", "127.0.0.1"),
            (IPv6Address, "2001:db8::1", "::1"),
        ]:
            header = v2Header(kind("TCP", source, 40000), kind("TCP", destination, 7))
            self.assertTrue(header.startswith(V2_SIGNATURE))
            info = V2Parser.parse(header)
            assert info.source is not None and info.destination is not None
            self.assertEqual(ip_address(info.source.host), ip_address(source))
            self.assertEqual(ip_address(info.destination.host), ip_address(destination))
            self.assertEqual((info.source.port, info.destination.port), (40000, 7))

    def test_otherAddresses(self) -> None:
        """Anything but two IP addresses of one family is UNKNOWN (v1) or
        LOCAL (v2)."""
        unix = UNIXAddress(b"/tmp/s")
        ip = IPv4Address("TCP", "127.0.0.1", 7)
        self.assertEqual(v1Header(unix, ip), b"PROXY UNKNOWN\r\n")
        self.assertEqual(v2Header(unix, ip), V2_SIGNATURE + b"\x20\x00\x00\x00")
