"""
What each probe connection or UDP flow sends and when: the run's L{Plan},
one flow's view of it (L{Flow}), the L{Schedule} that sends its messages,
and the one L{Deadline} it keeps for its oldest message in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from echotw.probe.stats import ProbeRun


@dataclass(frozen=True)
class Plan:
    """
    What each connection or flow sends.

    @ivar size: bytes per message (per datagram with UDP).
    @ivar count: messages per connection, or C{None} for as many as
        C{stopAt} allows.
    @ivar interval: seconds between the starts of two messages; 0 means
        each message is sent as soon as the previous one came back.
    @ivar timeout: seconds a message may take to come back.
    @ivar seed: the run's seed; connection N sends stream N of it.
    @ivar stopAt: when to stop sending new messages, on the clock the
        protocols are given, or C{None}.
    """

    size: int
    count: int | None
    interval: float
    timeout: float
    seed: int
    stopAt: float | None = None


@dataclass(frozen=True)
class Flow:
    """
    What one connection or UDP flow works with: its number (which picks
    its stream), the plan, the tally it reports to, the reactor's timers
    and the clock round trips are measured on.
    """

    index: int
    plan: Plan
    run: ProbeRun
    clock: IReactorTime
    now: Callable[[], float]


class Schedule:
    """
    When the next message goes out.  Without an interval, each message is
    sent once the previous one is settled (came back, or was lost), which
    measures round trips without queueing.  With one, messages go out on a
    fixed timetable whether or not earlier ones came back, as C{ping -i}
    does, so a slow path shows as growing round trips, not a slower rate.
    """

    def __init__(self, flow: Flow, send: Callable[[], None], exhausted: Callable[[], None]) -> None:
        self._plan = flow.plan
        self._clock = flow.clock
        self._now = flow.now
        self._send = send
        self._onExhausted = exhausted
        self._call: IDelayedCall | None = None
        self._started = 0.0
        self.sent = 0
        self.exhausted = False

    def _mayStart(self, at: float) -> bool:
        count, stopAt = self._plan.count, self._plan.stopAt
        return (count is None or self.sent < count) and (stopAt is None or at < stopAt)

    def start(self) -> None:
        self._started = self._now()
        self._next()

    def _next(self) -> None:
        self._call = None
        if self.exhausted:
            return
        if not self._mayStart(self._now()):
            self.stop()
            return
        self.sent += 1
        self._send()
        interval = self._plan.interval
        if self.exhausted or not interval:
            return
        due = self._started + self.sent * interval
        if not self._mayStart(due):
            self.stop()
            return
        self._call = self._clock.callLater(max(0.0, due - self._now()), self._next)

    def settled(self) -> None:
        """
        Nothing is in flight any more: without an interval, send the next
        message now.
        """
        if not self._plan.interval:
            self._next()

    def stop(self) -> None:
        """
        Send nothing more.
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if not self.exhausted:
            self.exhausted = True
            self._onExhausted()


class Deadline:
    """
    The one timer a connection or flow keeps, for its oldest message in
    flight: re-armed as that message changes, never one timer per message.
    """

    def __init__(self, flow: Flow, expired: Callable[[], None]) -> None:
        self._clock = flow.clock
        self._now = flow.now
        self._timeout = flow.plan.timeout
        self._expired = expired
        self._call: IDelayedCall | None = None

    def arm(self, oldest: float | None) -> None:
        """
        Expire C{timeout} after C{oldest} (when the oldest message in flight
        was sent), or not at all for C{None}.
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if oldest is not None:
            delay = max(0.0, oldest + self._timeout - self._now())
            self._call = self._clock.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._call = None
        self._expired()
