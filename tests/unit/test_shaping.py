"""
Unit tests for L{echotw.shaping}: the per-connection stream shaper, the
UDP delay queue and what UDP replies go through, all on a L{Clock}.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from itertools import accumulate
from random import Random
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from echotw.ratelimit import TokenBuckets
from echotw.shaping import (
    BURST_SECONDS,
    DatagramDelay,
    DatagramImpairment,
    StreamShaper,
)


class Recorder:
    """
    Collects what a shaper delivers, with the clock's time of each.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.chunks: list[tuple[float, bytes]] = []

    def __call__(self, data: bytes) -> None:
        self.chunks.append((self.clock.seconds(), data))

    @property
    def data(self) -> bytes:
        return b"".join(chunk for _, chunk in self.chunks)


def shaper(**kwargs: Any) -> tuple[StreamShaper, Recorder, Clock]:
    clock = Clock()
    recorder = Recorder(clock)
    return StreamShaper(clock, recorder, random=Random(5), **kwargs), recorder, clock


def advanceBy(clock: Clock, seconds: float, step: float = 0.01) -> None:
    """Move the clock forward in small steps, as a reactor would."""
    for _ in range(round(seconds / step)):
        clock.advance(step)


class StreamShaperDelayTests(SynchronousTestCase):
    def test_nothingBeforeTheDelay(self) -> None:
        """A chunk is delivered no sooner than the delay after it was put."""
        s, out, clock = shaper(delay=0.2)
        s.put(b"abc")
        clock.advance(0.199)
        self.assertEqual(out.chunks, [])
        self.assertEqual(s.pendingBytes, 3)
        clock.advance(0.001)
        self.assertEqual(out.chunks, [(0.2, b"abc")])
        self.assertEqual(s.pendingBytes, 0)

    def test_eachChunkItsOwnTime(self) -> None:
        """Chunks put at different times leave at their own times."""
        s, out, clock = shaper(delay=1.0)
        s.put(b"a")
        clock.advance(0.5)
        s.put(b"b")
        clock.advance(0.5)
        self.assertEqual(out.data, b"a")
        clock.advance(0.5)
        self.assertEqual(out.chunks, [(1.0, b"a"), (1.5, b"b")])

    def test_dueTogetherLeaveTogether(self) -> None:
        """Chunks due at the same moment are joined into one delivery."""
        s, out, clock = shaper(delay=0.1)
        for piece in (b"x", b"y", b"z"):
            s.put(piece)
        clock.advance(0.1)
        self.assertEqual(out.chunks, [(0.1, b"xyz")])

    def test_noDelayNoLimitDeliversAtOnce(self) -> None:
        """With nothing to wait for, put delivers synchronously, no timer."""
        s, out, clock = shaper()
        s.put(b"now")
        self.assertEqual(out.data, b"now")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_jitterNeverReorders(self) -> None:
        """With jitter larger than the gap between chunks, they still come
        out in order, byte-exact, each no sooner than delay after it came
        and no later than delay plus jitter after the latest before it."""
        s, out, clock = shaper(delay=0.05, jitter=0.5)
        sent = []
        putAt = []
        for i in range(300):
            chunk = i.to_bytes(2, "big") + os.urandom(i % 7)
            sent.append(chunk)
            putAt.append(clock.seconds())
            s.put(chunk)
            clock.advance(0.003)
        advanceBy(clock, 1.0, 0.001)
        self.assertEqual(out.data, b"".join(sent))
        ends = list(accumulate(map(len, sent)))
        released = 0
        for at, data in out.chunks:
            # The last byte of this delivery belongs to the chunk put at
            # putAt[index]; it may not leave before its delay.
            released += len(data)
            index = bisect_left(ends, released)
            self.assertGreaterEqual(at + 1e-9, putAt[index] + 0.05)
        self.assertLessEqual(out.chunks[-1][0], putAt[-1] + 0.05 + 0.5 + 0.002)

    def test_jitterSpreads(self) -> None:
        """Jitter makes release times vary between delay and delay + jitter."""
        times = []
        for seed in range(20):
            clock = Clock()
            recorder = Recorder(clock)
            s = StreamShaper(clock, recorder, delay=0.1, jitter=0.2, random=Random(seed))
            s.put(b"x")
            advanceBy(clock, 0.4, 0.001)
            times.append(recorder.chunks[0][0])
        self.assertGreaterEqual(min(times), 0.1 - 1e-9)
        self.assertLessEqual(max(times), 0.3 + 0.002)
        self.assertGreater(max(times) - min(times), 0.05)

    def test_oneTimerForAThousandChunks(self) -> None:
        """1,000 chunks waiting cost one pending timer, not one each."""
        s, out, clock = shaper(delay=1.0, jitter=0.1)
        for i in range(1000):
            s.put(b"%d," % i)
            clock.advance(0.0005)
            self.assertLessEqual(len(clock.getDelayedCalls()), 1)
        self.assertEqual((len(s), out.chunks), (1000, []))
        advanceBy(clock, 2.0)
        self.assertEqual(out.data, b"".join(b"%d," % i for i in range(1000)))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_timersPerConnection(self) -> None:
        """Many delayed connections: one pending timer each at most."""
        clock = Clock()
        shapers = [StreamShaper(clock, lambda data: None, delay=0.5) for _ in range(200)]
        for _ in range(20):
            for s in shapers:
                s.put(b"chunk")
            clock.advance(0.01)
        self.assertEqual(len(clock.getDelayedCalls()), 200)

    def test_cancel(self) -> None:
        """Cancel drops what waits and its timer: nothing is delivered."""
        s, out, clock = shaper(delay=0.2)
        s.put(b"gone")
        s.cancel()
        self.assertEqual((s.pendingBytes, len(s), clock.getDelayedCalls()), (0, 0, []))
        clock.advance(1)
        self.assertEqual(out.chunks, [])


class StreamShaperBandwidthTests(SynchronousTestCase):
    def test_rateHolds(self) -> None:
        """100 kB at 10 kB/s take about ten seconds, byte-exact, and no
        second carries much more than the rate."""
        s, out, clock = shaper(rate=10_000)
        payload = os.urandom(100_000)
        for i in range(0, len(payload), 4096):
            s.put(payload[i : i + 4096])
        advanceBy(clock, 9.8)
        self.assertLess(len(out.data), len(payload))
        advanceBy(clock, 0.4)
        self.assertEqual(out.data, payload)
        for second in range(10):
            sent = sum(len(d) for at, d in out.chunks if second <= at < second + 1)
            self.assertLessEqual(sent, 10_000 + 10_000 * BURST_SECONDS + 1)

    def test_piecesBoundTheWakeUps(self) -> None:
        """A throttled stream wakes about 1 / BURST_SECONDS times a second,
        whatever its chunk sizes, with one timer pending."""
        s, out, clock = shaper(rate=1000)
        s.put(os.urandom(65536))
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        advanceBy(clock, 5.0, 0.001)
        self.assertLessEqual(abs(len(out.data) - (5000 + 1000 * BURST_SECONDS)), 60)
        self.assertLessEqual(len(out.chunks), 5 / BURST_SECONDS + 2)
        self.assertEqual(len(clock.getDelayedCalls()), 1)

    def test_idleBucketDoesNotHoard(self) -> None:
        """A stream idle for a minute may burst two pieces, not a minute's worth."""
        s, out, clock = shaper(rate=10_000)
        clock.advance(60)
        s.put(b"x" * 50_000)
        self.assertEqual(len(out.data), 2 * 10_000 * BURST_SECONDS)

    def test_delayThenBandwidth(self) -> None:
        """A chunk waits for its delay, then leaves at the rate."""
        s, out, clock = shaper(delay=0.5, rate=1000)
        s.put(b"y" * 1000)
        advanceBy(clock, 0.49, 0.001)
        self.assertEqual(out.chunks, [])
        advanceBy(clock, 0.51, 0.001)
        self.assertGreater(len(out.data), 400)
        self.assertLess(len(out.data), 1000)
        advanceBy(clock, 0.6, 0.001)
        self.assertEqual(out.data, b"y" * 1000)

    def test_tinyRate(self) -> None:
        """At a byte a second, one byte leaves a second."""
        s, out, clock = shaper(rate=1)
        s.put(b"abcd")
        self.assertEqual(out.data, b"a")
        clock.advance(0.99)
        self.assertEqual(out.data, b"a")
        clock.advance(0.01)
        clock.advance(1)
        self.assertEqual(out.data, b"abc")


class DatagramDelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sent: list[tuple[float, bytes, Any, Any]] = []

    def send(self, datagram: bytes, address: Any, source: Any) -> None:
        self.sent.append((self.clock.seconds(), datagram, address, source))

    def test_eachDatagramItsDelay(self) -> None:
        """Each datagram is sent to its address after the delay, not sooner."""
        queue = DatagramDelay(self.clock, delay=0.3)
        self.assertTrue(queue.hold(self.send, b"one", ("h", 1), "s"))
        self.clock.advance(0.1)
        queue.hold(self.send, b"two", ("h", 2), "s")
        self.clock.advance(0.199)
        self.assertEqual(self.sent, [])
        self.clock.advance(0.001)
        self.clock.advance(0.1)
        self.assertEqual(
            [(round(at, 6), d, a) for at, d, a, _ in self.sent],
            [(0.3, b"one", ("h", 1)), (0.4, b"two", ("h", 2))],
        )
        self.assertEqual((len(queue), queue.pendingBytes), (0, 0))

    def test_jitterReordersAndOneTimer(self) -> None:
        """With jitter each datagram leaves at its own time (so some
        overtake others); one timer is pending however many wait."""
        queue = DatagramDelay(self.clock, delay=0.1, jitter=0.5, random=Random(3))
        for i in range(1000):
            queue.hold(self.send, b"%d" % i, ("h", 1))
            self.assertEqual(len(self.clock.getDelayedCalls()), 1)
            self.clock.advance(0.0001)
        advanceBy(self.clock, 1.0, 0.001)
        order = [int(d) for _, d, _, _ in self.sent]
        self.assertEqual(sorted(order), list(range(1000)))
        self.assertNotEqual(order, list(range(1000)))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bounded(self) -> None:
        """Beyond its datagram or byte bound the queue refuses more."""
        queue = DatagramDelay(self.clock, delay=1, maxDatagrams=3, maxBytes=100)
        results = [queue.hold(self.send, b"x" * 10, ("h", 1)) for _ in range(5)]
        self.assertEqual(results, [True, True, True, False, False])
        self.clock.advance(1)
        self.assertTrue(queue.hold(self.send, b"x" * 100, ("h", 1)))
        self.assertFalse(queue.hold(self.send, b"x", ("h", 1)))

    def test_discard(self) -> None:
        """Discarding one sender's datagrams keeps the others' on time."""
        queue = DatagramDelay(self.clock, delay=0.5)
        other: list[bytes] = []
        queue.hold(self.send, b"mine", ("h", 1))
        queue.hold(lambda d, a, s: other.append(d), b"theirs", ("h", 1))
        self.assertEqual(queue.discard(self.send), 1)
        self.assertEqual(queue.pendingBytes, len(b"theirs"))
        self.clock.advance(0.5)
        self.assertEqual((self.sent, other), ([], [b"theirs"]))


class DatagramImpairmentTests(SynchronousTestCase):
    def test_lossShare(self) -> None:
        """About the share asked for is dropped, as impairment-loss."""
        impairment = DatagramImpairment(Clock(), loss=0.3, random=Random(1))
        verdicts = [impairment.judge(b"x", "s") for _ in range(10_000)]
        self.assertEqual(set(verdicts), {None, "impairment-loss"})
        self.assertLessEqual(abs(verdicts.count("impairment-loss") / 10_000 - 0.3), 0.03)

    def test_nothingOnByDefault(self) -> None:
        """Without loss or bandwidth every reply passes, none is delayed."""
        impairment = DatagramImpairment(Clock())
        self.assertIsNone(impairment.judge(b"x" * 1000, "s"))
        self.assertIsNone(impairment.delay)

    def test_bandwidthPerSource(self) -> None:
        """Replies to one source beyond its byte rate are dropped; another
        source has its own allowance; in time the rate holds."""
        clock = Clock()
        impairment = DatagramImpairment(clock, bandwidth=10_000)
        verdicts = [impairment.judge(b"x" * 1000, "a") for _ in range(5)]
        self.assertEqual(verdicts[0], None)
        self.assertEqual(verdicts[1:], ["impairment-bandwidth"] * 4)
        self.assertIsNone(impairment.judge(b"x" * 1000, "b"))
        passed = 0
        for _ in range(1000):
            clock.advance(0.01)
            passed += impairment.judge(b"x" * 1000, "a") is None
        # 10 kB/s for 10 s, 1 kB datagrams checked every 10 ms.
        self.assertLessEqual(passed, 101)
        self.assertGreaterEqual(passed, 85)

    def test_delayQueue(self) -> None:
        """Delay or jitter give one shared delay queue."""
        impairment = DatagramImpairment(Clock(), jitter=0.1)
        self.assertIsInstance(impairment.delay, DatagramDelay)


class ByteCostTests(SynchronousTestCase):
    def test_costAboveBurstPassesWhenFull(self) -> None:
        """A cost larger than the burst passes once the bucket is full and
        leaves it in debt: the average rate still holds."""
        clock = Clock()
        buckets = TokenBuckets(100, 10, clock)
        self.assertTrue(buckets.allow("s", 50))
        clock.advance(0.3)
        self.assertFalse(buckets.allow("s", 50))
        clock.advance(0.3)
        self.assertTrue(buckets.allow("s", 50))

    def test_defaultCostIsOne(self) -> None:
        """Without a cost, one token per event as before."""
        buckets = TokenBuckets(1, 2, Clock())
        self.assertEqual([buckets.allow("s") for _ in range(3)], [True, True, False])
