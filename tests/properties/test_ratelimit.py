"""
Property-based tests of L{echotw.ratelimit.TokenBuckets} and
L{echotw.throttlelog.LogThrottle} driven by a L{Clock} through generated
sequences of steps, against small reference models and the guarantees they
make.

Times are multiples of 1/8 s and rates powers of two, so the floating-point
arithmetic of the code under test is exact and the models can use
L{Fraction}s without tolerances.
"""

from __future__ import annotations

from collections import defaultdict
from fractions import Fraction
from itertools import pairwise
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from echotw.ratelimit import TokenBuckets
from echotw.throttlelog import LogThrottle
from tests.support.properties import PROPERTIES

EIGHTH = Fraction(1, 8)
SOURCES = "abcdef"

Step = tuple[int, str]
"""Advance the clock this many eighths of a second, then an event from a source."""

steps = st.lists(
    st.tuples(
        st.one_of(st.just(0), st.integers(0, 8), st.integers(0, 80)), st.sampled_from(SOURCES)
    ),
    max_size=120,
)


class BucketModel:
    """
    The reference token bucket: per source, the tokens it had when last seen
    and when that was; never forgets a source for what it may do.  Which
    sources count against C{maxSources} is tracked apart: those whose
    buckets have not been pruned full, pruned at most once per interval.
    """

    def __init__(
        self, rate: Fraction, burst: int, maxSources: int, pruneInterval: Fraction
    ) -> None:
        self.rate, self.burst = rate, burst
        self.maxSources, self.pruneInterval = maxSources, pruneInterval
        self.state: dict[str, tuple[Fraction, Fraction]] = {}
        self.tracked: set[str] = set()
        self.lastPrune = Fraction(0)

    def tokens(self, source: str, now: Fraction) -> Fraction:
        tokens, at = self.state.get(source, (Fraction(self.burst), now))
        return min(Fraction(self.burst), tokens + (now - at) * self.rate)

    def allow(self, source: str, now: Fraction) -> bool:
        if not self.rate:
            return True
        if now - self.lastPrune >= self.pruneInterval:
            self.lastPrune = now
            self.tracked = {s for s in self.tracked if self.tokens(s, now) < self.burst}
        if source not in self.tracked:
            if len(self.tracked) >= self.maxSources:
                return False
            self.tracked.add(source)
        tokens = self.tokens(source, now)
        allowed = tokens >= 1
        self.state[source] = (tokens - 1 if allowed else tokens, now)
        return allowed


class TokenBucketsPropertyTests(SynchronousTestCase):
    """
    L{TokenBuckets} against L{BucketModel}, and the bound every token
    bucket keeps.
    """

    @PROPERTIES
    @given(
        steps,
        st.sampled_from([Fraction(0), Fraction(1, 4), Fraction(1, 2), Fraction(1), Fraction(4)]),
        st.integers(1, 5),
        st.integers(1, 4),
        st.sampled_from([EIGHTH, Fraction(1), Fraction(2)]),
    )
    def test_matchesModel(
        self, sequence: list[Step], rate: Fraction, burst: int, maxSources: int, prune: Fraction
    ) -> None:
        """Every answer equals the model's, and the sources tracked are
        the model's: pruning forgets only full buckets, so it never changes
        an answer, and a full table refuses only new sources."""
        clock = Clock()
        buckets = TokenBuckets(float(rate), burst, clock, maxSources, float(prune))
        model = BucketModel(rate, burst, maxSources, prune)
        now = Fraction(0)
        for i, (eighths, source) in enumerate(sequence):
            clock.advance(eighths / 8)
            now += eighths * EIGHTH
            self.assertEqual(buckets.allow(source), model.allow(source, now), (i, source))
            self.assertEqual(len(buckets), len(model.tracked) if rate else 0)
            self.assertLessEqual(len(buckets), maxSources)

    @PROPERTIES
    @given(
        steps,
        st.sampled_from([Fraction(1, 4), Fraction(1), Fraction(4)]),
        st.integers(1, 5),
        st.sampled_from([EIGHTH, Fraction(1)]),
    )
    def test_neverMoreThanBurstPlusRate(
        self, sequence: list[Step], rate: Fraction, burst: int, prune: Fraction
    ) -> None:
        """From one source, the events allowed between any two moments
        never exceed C{burst + rate * elapsed}, and with room in the table
        a source that waited long enough to earn a token is allowed."""
        clock = Clock()
        buckets = TokenBuckets(
            float(rate), burst, clock, maxSources=len(SOURCES), pruneInterval=float(prune)
        )
        allowedAt: dict[str, list[Fraction]] = defaultdict(list)
        lastAllowed: dict[str, Fraction] = {}
        now = Fraction(0)
        for eighths, source in sequence:
            clock.advance(eighths / 8)
            now += eighths * EIGHTH
            allowed = buckets.allow(source)
            if source not in lastAllowed or (now - lastAllowed[source]) * rate >= 1:
                self.assertTrue(allowed, (source, now))
            if allowed:
                allowedAt[source].append(now)
                lastAllowed[source] = now
        for times in allowedAt.values():
            for i, first in enumerate(times):
                for j in range(i, len(times)):
                    self.assertLessEqual(j - i + 1, burst + rate * (times[j] - first))

    def test_unlimitedTracksNothing(self) -> None:
        """A rate of 0 allows everything and keeps no state."""
        buckets = TokenBuckets(0, 1, Clock(), maxSources=1)
        self.assertTrue(all(buckets.allow(s) for s in SOURCES * 10))
        self.assertEqual(len(buckets), 0)


class ThrottleModel:
    """
    The reference log throttle: per key, when its last line was logged and
    what was held back since; forgets keys an interval after their line,
    at most once per interval, handing held counts to C{report}.  Over all
    keys, at most C{perSecond} lines (admitted or reported) in a window of
    one second that begins at the first event or flush after the last one
    ended; the events past it, and those of new keys while the table is
    full, are summed and the sum handed over as the next window begins.
    """

    def __init__(
        self, interval: Fraction, maxKeys: int, reporting: bool, perSecond: int = 0
    ) -> None:
        self.interval, self.maxKeys, self.reporting = interval, maxKeys, reporting
        self.perSecond = perSecond
        self.keys: dict[str, list[Any]] = {}
        self.lastPrune = Fraction(0)
        self.reports: list[tuple[str, int, Any]] = []
        self.windowEnd = Fraction(0)
        self.used = self.over = 0
        self.summaries: list[int] = []

    def roll(self, now: Fraction) -> None:
        if now >= self.windowEnd:
            if self.over:
                self.summaries.append(self.over)
            self.windowEnd, self.used, self.over = now + 1, 0, 0

    def line(self, events: int) -> bool:
        if self.perSecond and self.used >= self.perSecond:
            self.over += events
            return False
        self.used += 1
        return True

    def flush(self, now: Fraction) -> None:
        self.roll(now)
        self.prune(now, None)

    def prune(self, now: Fraction, key: str | None) -> None:
        self.lastPrune = now
        for k, (at, held, last) in list(self.keys.items()):
            if k == key or at > now - self.interval:
                continue
            if not held:
                del self.keys[k]
            elif self.reporting:
                del self.keys[k]
                if self.line(held):
                    self.reports.append((k, held, last))

    def admit(self, key: str, detail: int, now: Fraction) -> int | None:
        self.roll(now)
        if now - self.lastPrune >= self.interval:
            self.prune(now, key)
        if key in self.keys and now - self.keys[key][0] < self.interval:
            at, held, _ = self.keys[key]
            self.keys[key] = [at, held + 1, detail]
            return None
        if key not in self.keys and len(self.keys) >= self.maxKeys:
            self.over += 1
            return None
        if not self.line(1):
            return None
        held = self.keys[key][1] if key in self.keys else 0
        self.keys[key] = [now, 0, detail]
        return int(held)


burstySteps = st.lists(
    st.tuples(
        st.one_of(st.just(0), st.just(0), st.integers(0, 8), st.integers(0, 80)),
        st.sampled_from(SOURCES),
    ),
    min_size=10,
    max_size=120,
)
"""
Like C{steps}, longer and with more events at one moment: enough to spend
a small cap while sources still hold events back, and windows after it.
"""


class LogThrottlePropertyTests(SynchronousTestCase):
    """
    L{LogThrottle} against L{ThrottleModel}, and the accounting it promises:
    one line per key per interval, at most C{perSecond} lines a window over
    all keys, and every event a line or counted exactly once in a held
    count, a report or a summary.
    """

    @settings(PROPERTIES, max_examples=300)
    @given(
        burstySteps,
        st.sampled_from([EIGHTH, Fraction(1), Fraction(3, 2)]),
        st.integers(1, 4),
        st.booleans(),
        st.sets(st.integers(0, 60)),
        st.integers(0, 3),
    )
    def test_matchesModel(
        self,
        sequence: list[Step],
        interval: Fraction,
        maxKeys: int,
        reporting: bool,
        flushes: set[int],
        perSecond: int,
    ) -> None:
        """Every answer, report and summary equals the model's, with
        flushes between some of the events."""
        clock = Clock()
        reports: list[tuple[str, int, Any]] = []
        summaries: list[int] = []
        report = (lambda *args: reports.append(args)) if reporting else None
        throttle = LogThrottle(float(interval), clock, maxKeys, report, perSecond, summaries.append)
        model = ThrottleModel(interval, maxKeys, reporting, perSecond)
        now = Fraction(0)
        for i, (eighths, key) in enumerate(sequence):
            clock.advance(eighths / 8)
            now += eighths * EIGHTH
            if i in flushes:
                throttle.flush()
                model.flush(now)
                self.assertEqual((reports, summaries), (model.reports, model.summaries))
            self.assertEqual(throttle.admit(key, i), model.admit(key, i, now), (i, key))
            self.assertEqual((reports, summaries), (model.reports, model.summaries))
            self.assertLessEqual(len(throttle), maxKeys)

    @PROPERTIES
    @given(
        burstySteps,
        st.sampled_from([EIGHTH, Fraction(1), Fraction(3, 2)]),
        st.booleans(),
        st.integers(0, 2),
        st.integers(1, len(SOURCES)),
    )
    def test_everyEventAccountedOnce(
        self,
        sequence: list[Step],
        interval: Fraction,
        reporting: bool,
        perSecond: int,
        maxKeys: int,
    ) -> None:
        """A key's lines are at least an interval apart, and each of its
        events is either a line or counted exactly once in a later line's
        held count, a report (with the detail of the latest event held
        back) or a summary; with neither cap nor a full table, each key's
        count adds up by itself."""
        clock = Clock()
        events: dict[str, int] = defaultdict(int)
        counted: dict[str, int] = defaultdict(int)
        lines: dict[str, list[Fraction]] = defaultdict(list)
        latestHeld: dict[str, object] = {}
        summaries: list[int] = []
        now = Fraction(0)

        def reported(key: str, held: int, detail: object) -> None:
            counted[key] += held
            self.assertEqual(detail, latestHeld[key])

        throttle = LogThrottle(
            float(interval),
            clock,
            maxKeys,
            reported if reporting else None,
            perSecond,
            summaries.append,
        )

        def admit(key: str, detail: object) -> bool:
            events[key] += 1
            held = throttle.admit(key, detail)
            if held is None:
                # Held for its key's next line if that key had a line less
                # than an interval ago; else past the cap or a full table.
                if lines[key] and now - lines[key][-1] < interval:
                    latestHeld[key] = detail
                return False
            counted[key] += 1 + held
            lines[key].append(now)
            return True

        def later(interval: Fraction) -> None:
            nonlocal now
            clock.advance(float(interval))
            now += interval

        for i, (eighths, key) in enumerate(sequence):
            later(eighths * EIGHTH)
            admit(key, i)
        # Bring out what is held: a flush (when reporting), or else one
        # more event per key until each gets its line, a window or more
        # apart; then a last flush for the last summary.
        if reporting:
            later(interval + 1)
            throttle.flush()
            self.assertEqual(len(throttle), 0)
        else:
            pending = set(events)
            for _ in range(2 * len(SOURCES)):
                later(interval + 1)
                pending = {key for key in sorted(pending) if not admit(key, "last")}
            self.assertEqual(pending, set())
        later(Fraction(1))
        throttle.flush()
        self.assertEqual(sum(counted.values()) + sum(summaries), sum(events.values()))
        if not summaries:
            self.assertEqual(dict(counted), dict(events))
        for times in lines.values():
            self.assertTrue(all(b - a >= interval for a, b in pairwise(times)))

    @PROPERTIES
    @given(
        burstySteps,
        st.sampled_from([EIGHTH, Fraction(1), Fraction(3, 2)]),
        st.integers(1, 3),
        st.sets(st.integers(0, 60)),
    )
    def test_capHolds(
        self, sequence: list[Step], interval: Fraction, perSecond: int, flushes: set[int]
    ) -> None:
        """However the events come, lines (admitted or reported) at one
        moment never exceed C{perSecond}, nor C{2 * perSecond} in any
        second; summaries come at least a second apart."""
        clock = Clock()
        lines: list[Fraction] = []
        summaries: list[Fraction] = []
        now = Fraction(0)
        throttle = LogThrottle(
            float(interval),
            clock,
            report=lambda *args: lines.append(now),
            perSecond=perSecond,
            summary=lambda unlogged: summaries.append(now),
        )
        for i, (eighths, key) in enumerate(sequence):
            clock.advance(eighths / 8)
            now += eighths * EIGHTH
            if i in flushes:
                throttle.flush()
            if throttle.admit(key) is not None:
                lines.append(now)
        for first in lines:
            self.assertLessEqual(lines.count(first), perSecond)
            self.assertLessEqual(sum(first <= t < first + 1 for t in lines), 2 * perSecond)
        self.assertTrue(all(b - a >= 1 for a, b in pairwise(summaries)))
