"""
Tests for L{echotw.ratelimit}, per-source token buckets and the per-second
budget, and for L{echotw.throttlelog.LogThrottle}, the log throttle.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from echotw.ratelimit import PerSecondBudget, TokenBuckets
from echotw.throttlelog import LogThrottle


class TokenBucketsTests(SynchronousTestCase):
    """
    L{TokenBuckets} is a token bucket per source with bounded memory.
    """

    def test_refill(self) -> None:
        """Tokens come back at C{rate} per second, up to C{burst}."""
        clock = Clock()
        limiter = TokenBuckets(rate=2, burst=3, clock=clock)
        self.assertEqual([limiter.allow("s") for _ in range(4)], [True, True, True, False])
        clock.advance(0.5)
        self.assertEqual([limiter.allow("s") for _ in range(2)], [True, False])
        clock.advance(100)
        self.assertEqual([limiter.allow("s") for _ in range(4)], [True, True, True, False])

    def test_idleBucketsPruned(self) -> None:
        """Buckets that have refilled are forgotten; spent ones are kept."""
        clock = Clock()
        limiter = TokenBuckets(rate=1, burst=2, clock=clock, pruneInterval=1)
        limiter.allow("idle")
        limiter.allow("busy")
        limiter.allow("busy")
        clock.advance(1)
        limiter.allow("new")
        self.assertEqual(set(limiter._buckets), {"busy", "new"})

    def test_fullTableFailsClosed(self) -> None:
        """When C{maxSources} sources are tracked, new ones are refused until pruning frees room."""
        clock = Clock()
        limiter = TokenBuckets(rate=1, burst=5, clock=clock, maxSources=3, pruneInterval=1)
        for source in "abc":
            self.assertTrue(limiter.allow(source))
        self.assertFalse(limiter.allow("d"))
        self.assertTrue(limiter.allow("a"))
        self.assertEqual(len(limiter), 3)
        clock.advance(10)
        self.assertTrue(limiter.allow("d"))
        self.assertEqual(len(limiter), 1)

    def test_badArguments(self) -> None:
        """A negative rate or a burst below one is refused."""
        self.assertRaises(ValueError, TokenBuckets, rate=-1, burst=1, clock=Clock())
        self.assertRaises(ValueError, TokenBuckets, rate=1, burst=0.5, clock=Clock())


class LogThrottleTests(SynchronousTestCase):
    def test_oncePerIntervalPerKey(self) -> None:
        """A key is admitted once per interval; what is held back is counted
        and reported with its next admission."""
        clock = Clock()
        throttle = LogThrottle(1.0, clock)
        self.assertEqual(throttle.admit("a"), 0)
        self.assertIsNone(throttle.admit("a"))
        self.assertIsNone(throttle.admit("a"))
        self.assertEqual(throttle.admit("b"), 0)
        clock.advance(1.0)
        self.assertEqual(throttle.admit("a"), 2)
        self.assertIsNone(throttle.admit("a"))

    def test_boundedKeys(self) -> None:
        """Past maxKeys, new keys are not admitted until old ones expire."""
        clock = Clock()
        throttle = LogThrottle(1.0, clock, maxKeys=2)
        self.assertEqual(throttle.admit(1), 0)
        self.assertEqual(throttle.admit(2), 0)
        self.assertIsNone(throttle.admit(3))
        clock.advance(1.5)
        self.assertEqual(throttle.admit(3), 0)
        self.assertEqual(len(throttle._last), 1)


class LogThrottleCapTests(SynchronousTestCase):
    """
    The cap over all keys: at most C{perSecond} lines a window, the rest
    only counted, and the count handed to C{summary} once the next window
    begins.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.reports: list[tuple[object, int, object]] = []
        self.summaries: list[int] = []
        self.throttle = LogThrottle(
            1.0,
            self.clock,
            report=lambda *args: self.reports.append(args),
            perSecond=3,
            summary=self.summaries.append,
        )

    def test_capOverAllKeys(self) -> None:
        """Ten keys at once: three lines, seven counted; the count comes
        out once, with the first event of the next window."""
        admitted = [self.throttle.admit(key) for key in range(10)]
        self.assertEqual(admitted, [0, 0, 0] + [None] * 7)
        self.assertEqual(self.summaries, [])
        self.clock.advance(1.0)
        self.assertEqual(self.throttle.admit(99), 0)
        self.assertEqual(self.summaries, [7])
        self.clock.advance(1.0)
        self.throttle.flush()
        self.assertEqual(self.summaries, [7])

    def test_flushHandsOverTheSummary(self) -> None:
        """Without further events, L{LogThrottle.flush} or
        L{LogThrottle.summarize} brings out the count once its window
        has ended; keys refused by the cap are not tracked."""
        for key in range(5):
            self.throttle.admit(key)
        self.assertEqual(len(self.throttle), 3)
        self.throttle.summarize()
        self.clock.advance(0.5)
        self.throttle.flush()
        self.assertEqual(self.summaries, [])
        self.clock.advance(0.5)
        self.throttle.summarize()
        self.assertEqual(self.summaries, [2])

    def test_heldCountWaitsForTheNextLine(self) -> None:
        """A key due for a line when the cap is spent keeps its held count
        for its next line; only the event itself goes to the summary."""
        throttle = LogThrottle(1.0, self.clock, perSecond=3, summary=self.summaries.append)
        self.assertEqual(throttle.admit("a"), 0)
        self.assertIsNone(throttle.admit("a"))
        self.clock.advance(1.0)
        self.assertEqual([throttle.admit(key) for key in "bcd"], [0, 0, 0])
        self.assertIsNone(throttle.admit("a"))
        self.clock.advance(1.0)
        self.assertEqual(throttle.admit("a"), 1)
        self.assertEqual(self.summaries, [1])

    def test_reportsCountAgainstTheCap(self) -> None:
        """Closing reports of quiet keys are lines too: past the cap, what
        a key held goes to the summary, and the key is forgotten."""
        self.throttle.interval = 0.5
        for key in "ab":
            for _ in range(3):
                self.throttle.admit(key)
        self.clock.advance(0.5)
        self.throttle.flush()
        self.assertEqual(self.reports, [("a", 2, None)])
        self.assertEqual(len(self.throttle), 0)
        self.clock.advance(0.5)
        self.throttle.flush()
        self.assertEqual(self.summaries, [2])

    def test_fullTableCounted(self) -> None:
        """Events of new keys while C{maxKeys} are tracked are counted in
        the summary, so none is lost from the log's accounting."""
        throttle = LogThrottle(10.0, self.clock, 2, perSecond=0, summary=self.summaries.append)
        self.assertEqual([throttle.admit(key) for key in range(5)], [0, 0, None, None, None])
        self.clock.advance(1.0)
        throttle.summarize()
        self.assertEqual(self.summaries, [3])

    def test_noCapByDefault(self) -> None:
        """A plain throttle has no cap: one line per key, however many."""
        throttle = LogThrottle(1.0, self.clock)
        self.assertEqual({throttle.admit(key) for key in range(1000)}, {0})
        self.assertEqual(throttle.perSecond, 0)


class PerSecondBudgetTests(SynchronousTestCase):
    def test_budgetPerWindow(self) -> None:
        """Up to the limit per second; the overflow is reported once, when
        the next window starts."""
        clock = Clock()
        budget = PerSecondBudget(2, clock)
        self.assertEqual(
            [budget.take() for _ in range(5)], [(True, 0), (True, 0)] + [(False, 0)] * 3
        )
        clock.advance(1.0)
        self.assertEqual(budget.take(), (True, 3))
        self.assertEqual(budget.take(), (True, 0))

    def test_eventsAndSkips(self) -> None:
        """A line refused stands for its C{events}; skipped events join the
        count, and L{PerSecondBudget.roll} hands it back once the window
        ends."""
        clock = Clock()
        budget = PerSecondBudget(1, clock)
        self.assertEqual(budget.take(5), (True, 0))
        self.assertEqual(budget.take(5), (False, 0))
        budget.skip(2)
        self.assertEqual(budget.roll(), 0)
        clock.advance(1.0)
        self.assertEqual(budget.roll(), 7)
        self.assertEqual(budget.roll(), 0)

    def test_unlimited(self) -> None:
        """A limit of 0 allows everything."""
        budget = PerSecondBudget(0, Clock())
        self.assertEqual({budget.take() for _ in range(1000)}, {(True, 0)})
