"""
Tests for L{echotw.ratelimit}: per-source token buckets and the log throttle.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from echotw.ratelimit import LogThrottle, PerSecondBudget, TokenBuckets


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

    def test_unlimited(self) -> None:
        """A limit of 0 allows everything."""
        budget = PerSecondBudget(0, Clock())
        self.assertEqual({budget.take() for _ in range(1000)}, {(True, 0)})
