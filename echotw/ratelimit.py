"""
Per-source limits over time: token buckets for rates, and a throttle that
keeps a flood from flooding the log.  Both keep bounded memory whatever a
flood of (possibly forged) source addresses does.
"""

from __future__ import annotations

from collections.abc import Callable
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


class LogThrottle:
    """
    At most one log line per key (a source) per C{interval} seconds; what is
    held back is counted and reported with that key's next line.

    Keys not logged for an interval are forgotten, at most once per
    interval.  A key forgotten with events still held back is handed to
    C{report} (with the count and the C{detail} of its latest event), so
    the caller can log a closing line for it; without C{report} such keys
    stay until their next line.  At most C{maxKeys} are tracked.  TCP
    refusals and UDP drops share this one mechanism.

    Per key is not enough against a peer with many addresses, so there is
    also a cap over all keys: at most C{perSecond} lines (those admitted
    and those reported) in each one-second window (0: no cap).  An event
    that would be logged past the cap, a report past the cap (all the
    events it holds) and an event from a new key while C{maxKeys} are
    tracked are only counted, and the count over a window is handed to
    C{summary} once, when the next window begins: every event is a line, or
    in exactly one held count, report or summary.  The key of an event
    counted that way is left as it was, so its held count waits for its
    next line.

    Pruning and summaries happen as events come in; an owner that wants a
    flood's counts logged even when it stops calls L{flush} every interval
    (and every second, for the summary).
    """

    def __init__(
        self,
        interval: float,
        clock: IReactorTime,
        maxKeys: int = 65536,
        report: Callable[[Any, int, Any], None] | None = None,
        perSecond: int = 0,
        summary: Callable[[int], None] | None = None,
    ) -> None:
        self.interval = interval
        self.clock = clock
        self.maxKeys = maxKeys
        self.report = report
        self.summary = summary
        self._budget = PerSecondBudget(perSecond, clock)
        self._last: dict[Any, _Held] = {}
        self._lastPrune = clock.seconds()

    @property
    def perSecond(self) -> int:
        """Lines a second over all keys (0: no cap)."""
        return self._budget.limit

    def __len__(self) -> int:
        """Keys currently tracked."""
        return len(self._last)

    def admit(self, key: Any, detail: Any = None) -> int | None:
        """
        L{None} if C{key} was logged less than an interval ago (this event is
        counted instead, and C{detail} kept as its latest) or if the line
        would pass the cap (counted for the summary); otherwise the number
        of its events held back since its last line, and the caller should
        log now.
        """
        self.summarize()
        now = self.clock.seconds()
        if now - self._lastPrune >= self.interval:
            self._prune(now, key)
        state = self._last.get(key)
        if state is not None and now - state.at < self.interval:
            state.held += 1
            state.detail = detail
            return None
        if state is None and len(self._last) >= self.maxKeys:
            self._budget.skip()
            return None
        if not self._take(1):
            return None
        if state is None:
            self._last[key] = _Held(now, detail)
            return 0
        held = state.held
        state.at, state.held, state.detail = now, 0, detail
        return held

    def flush(self) -> None:
        """
        Hand the count of the last window to C{summary} if it has ended,
        and forget the keys not logged for an interval now rather than at
        the next event, handing those with events held back to C{report}.
        """
        self.summarize()
        self._prune(self.clock.seconds(), None)

    def summarize(self) -> None:
        """
        Hand the count of events not logged in the last window to
        C{summary}, if that window has ended and there were any.
        """
        self._summarize(self._budget.roll())

    def _take(self, events: int) -> bool:
        # One line standing for C{events}: within the cap, or counted.
        allowed, over = self._budget.take(events)
        self._summarize(over)
        return allowed

    def _summarize(self, over: int) -> None:
        if over and self.summary is not None:
            self.summary(over)

    def _prune(self, now: float, current: Any) -> None:
        # C{current} is about to be logged (or counted) anyway.
        self._lastPrune = now
        cutoff = now - self.interval
        report = self.report
        for key in [k for k, state in self._last.items() if state.at <= cutoff and k != current]:
            state = self._last[key]
            if not state.held:
                del self._last[key]
            elif report is not None:
                del self._last[key]
                if self._take(state.held):
                    report(key, state.held, state.detail)


def unloggedNote(held: int, whose: str = "from this source") -> str:
    """
    The end of a throttled log line's format: nothing on a first line, else
    how many were held back (the event's C{unlogged} field).
    """
    return f" ({{unlogged}} more {whose} not logged)" if held else ""


class _Held:
    __slots__ = ("at", "detail", "held")

    def __init__(self, at: float, detail: Any) -> None:
        self.at = at
        self.held = 0
        self.detail = detail


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
