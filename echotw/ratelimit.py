# -*- test-case-name: tests.unit.test_ratelimit,tests.properties.test_ratelimit -*-
"""
Limits over time: token buckets per source for rates, which keep bounded
memory whatever a flood of (possibly forged) source addresses does, and a
per-second budget of log lines (the log throttle of L{echotw.throttlelog}
builds on it).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime


def defaultClock() -> IReactorTime:
    from twisted.internet import reactor

    clock: IReactorTime = reactor
    return clock


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


class TokenBuckets:
    """
    A token bucket per source: up to C{burst} events (UDP replies, new
    connections) at once, refilled at C{rate} per second.  A C{rate} of 0
    means no limit.

    Memory is bounded whatever a flood of forged addresses does: a bucket
    that has refilled is the same as no bucket, so those are pruned (at most
    once per C{pruneInterval} seconds, keeping a datagram's cost constant),
    and at most C{maxSources} buckets exist.  A new source arriving when the
    table is full is refused until pruning makes room: failing closed keeps
    the limit for sources already tracked (a forged flood cannot evict the
    victim's bucket and so reset it).

    Share one between listeners to make C{rate} hold per source for the
    whole server.
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        clock: IReactorTime | None = None,
        maxSources: int = 65536,
        pruneInterval: float = 1.0,
    ) -> None:
        if rate < 0 or (rate and burst < 1):
            raise ValueError("rate must be 0 or more and burst at least 1")
        self.rate = rate
        self.burst = burst
        self.clock = clock if clock is not None else defaultClock()
        self.maxSources = maxSources
        self.pruneInterval = pruneInterval
        self._buckets: dict[Any, _Bucket] = {}
        self._lastPrune = self.clock.seconds()

    def __len__(self) -> int:
        """Sources currently tracked."""
        return len(self._buckets)

    def allow(self, source: Any, cost: float = 1.0) -> bool:
        """
        Spend C{cost} of C{source}'s tokens (one event by default, or bytes);
        C{False} if it has too few.  A cost above C{burst} passes once the
        bucket is full and leaves it in debt, so that anything passes in time
        and the rate still holds on average.
        """
        if not self.rate:
            return True
        now = self.clock.seconds()
        if now - self._lastPrune >= self.pruneInterval:
            self.prune(now)
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self.maxSources:
                return False
            bucket = self._buckets[source] = _Bucket(self.burst, now)
        else:
            tokens = bucket.tokens + (now - bucket.updated) * self.rate
            bucket.tokens = tokens if tokens < self.burst else self.burst
            bucket.updated = now
        if bucket.tokens < (cost if cost < self.burst else self.burst):
            return False
        bucket.tokens -= cost
        return True

    def prune(self, now: float | None = None) -> None:
        """
        Forget the sources whose buckets have refilled.
        """
        if now is None:
            now = self.clock.seconds()
        self._lastPrune = now
        rate, burst = self.rate, self.burst
        full = [
            source
            for source, bucket in self._buckets.items()
            if bucket.tokens + (now - bucket.updated) * rate >= burst
        ]
        for source in full:
            del self._buckets[source]


class PerSecondBudget:
    """
    Up to C{limit} lines in each one-second window (0: no limit); the events
    of the rest are counted, and the count is handed back once, when the
    next window begins (a window begins at the first call after the last
    one ended).
    """

    def __init__(self, limit: int, clock: IReactorTime) -> None:
        self.limit = limit
        self.clock = clock
        self._windowEnd = 0.0
        self._used = 0
        self._over = 0

    def take(self, events: int = 1) -> tuple[bool, int]:
        """
        C{(allowed, overLastWindow)}: whether a line (standing for
        C{events}) fits the budget, and how many events did not fit in the
        window that just ended (0 otherwise).
        """
        # roll(), less the call while the window lasts (every connection).
        overLastWindow = 0 if self.clock.seconds() < self._windowEnd else self.roll()
        if not self.limit or self._used < self.limit:
            self._used += 1
            return True, overLastWindow
        self._over += events
        return False, overLastWindow

    def skip(self, events: int = 1) -> None:
        """
        Count events not logged for another reason with those over the
        budget in this window.
        """
        self._over += events

    def roll(self) -> int:
        """
        Begin a new window if the last one has ended, and hand back how
        many events did not fit in it (0 otherwise).
        """
        now = self.clock.seconds()
        if now < self._windowEnd:
            return 0
        over, self._over = self._over, 0
        self._windowEnd = now + 1.0
        self._used = 0
        return over
