# -*- test-case-name: tests.unit.test_throttlelog -*-
"""
Keeping a flood out of the log: L{LogThrottle} (one line per source per
interval, at most so many a second over all sources, what is held back
counted in the lines written), and the two throttles a server keeps,
L{RefusalLog} for refused TCP connections (and the PROXY and accept
problems logged with them) and L{DropLog} for each UDP listener's dropped
datagrams, both capped at L{LINES_PER_SECOND} so that no peer, however many
addresses it has, can flood the log.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from echotw.ratelimit import PerSecondBudget
from echotw.rules.addresses import clientFields, describeAddress, hostFields

LINES_PER_SECOND = 20
"""
Per-source lines (refusals, drops and their closing counts) one throttle
writes a second at most, over all sources; the rest are counted in one
summary line a second.  Fixed on purpose: a hostile peer decides how many
events there are, so this bound must not be one that can be turned off.
"""


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


def logVerifierFailure(
    log: Logger, held: int | None, verifier: object, address: IAddress, listener: str
) -> None:
    """
    Log, with its traceback, the exception a verifier raised for a client
    (call it in the C{except} block): TCP's and UDP's verifiers fail the
    same way and are found with the same query.  C{held} is what the
    caller's throttle's C{admit} returned: L{None} logs nothing.
    """
    if held is None:
        return
    log.failure(
        "Verifier {verifier!r} failed for {client}"
        + unloggedNote(held, "failures for this source"),
        verifier=verifier,
        **clientFields(address, listener),
        unlogged=held,
    )


class _Held:
    __slots__ = ("at", "detail", "held")

    def __init__(self, at: float, detail: Any) -> None:
        self.at = at
        self.held = 0
        self.detail = detail


class RefusalLog(LogThrottle):
    """
    The throttle for refused TCP connections, shared with the PROXY
    listeners and the accept-error watchers: one line per source a second,
    C{perSecond} in all, written to C{log} (its owner's logger).
    """

    def __init__(self, clock: IReactorTime, log: Logger, perSecond: int = LINES_PER_SECOND) -> None:
        super().__init__(
            1.0, clock, report=self._unlogged, perSecond=perSecond, summary=self._capped
        )
        self.log = log

    def refused(self, addr: IAddress, listener: str, reason: str, source: Any = None) -> None:
        """
        Log a refused connection, unless its source (C{source}, else its
        host) was logged less than a second ago or the cap is spent.
        """
        host, _ = describeAddress(addr)
        held = self.admit(source or host, f"refused on {listener}: {reason}")
        if held is None:
            return
        self.log.info(
            "Refused connection from {client} on {listener}: {reason}" + unloggedNote(held),
            event="refused",
            **clientFields(addr, listener),
            reason=reason,
            unlogged=held,
        )

    def _unlogged(self, key: object, held: int, last: object) -> None:
        # A source gone quiet with events counted but not logged.
        source = key[1] if isinstance(key, tuple) else key
        self.log.info(
            "{unlogged} more from {source} not logged one by one (last: {last})",
            event="unlogged",
            source=source,
            unlogged=held,
            last=last,
        )

    def _capped(self, unlogged: int) -> None:
        self.log.info(
            "{unlogged} more refused or failed connections in the last second were not "
            "logged one by one (at most {limit} lines a second)",
            event="refusals-unlogged",
            unlogged=unlogged,
            limit=self.perSecond,
        )


class _DropSource(Protocol):
    listener: str
    logInterval: float


class DropLog(LogThrottle):
    """
    The throttle for one UDP listener's dropped datagrams: one line per
    source per C{owner.logInterval}, L{LINES_PER_SECOND} in all, written to
    C{log}.  Between L{start} and L{stop} it reports a quiet source's count
    within two intervals and the summary of a second past the cap within
    two seconds, without waiting for another datagram.
    """

    def __init__(self, owner: _DropSource, clock: IReactorTime, maxKeys: int, log: Logger) -> None:
        super().__init__(
            owner.logInterval,
            clock,
            maxKeys,
            self._unlogged,
            perSecond=LINES_PER_SECOND,
            summary=self._capped,
        )
        self.owner = owner
        self.log = log
        self._loops: list[LoopingCall] = []

    def dropped(self, reason: str, host: str, port: int, source: Any, detail: str | None) -> None:
        """
        Log a dropped datagram unless its source was logged less than an
        interval ago or the cap is spent.
        """
        held = self.admit(host if source is None else source, (host, port, reason))
        if held is None:
            return
        self.log.info(
            "Dropped datagram from {client} on {listener}: {detail}" + unloggedNote(held),
            event="udp-dropped",
            unlogged=held,
            **hostFields(host, port, self.owner.listener),
            reason=reason,
            detail=detail or reason,
            suppressed=held,
            interval=self.interval,
        )

    def _unlogged(self, source: Any, held: int, last: tuple[str, int, str]) -> None:
        host, port, reason = last
        self.log.info(
            "{suppressed} more datagrams dropped from {client_host} on {listener}"
            " in {interval}s (last: {reason})",
            event="udp-dropped-more",
            client_host=host,
            client_port=port,
            listener=self.owner.listener,
            reason=reason,
            suppressed=held,
            interval=self.interval,
        )

    def _capped(self, unlogged: int) -> None:
        self.log.info(
            "{unlogged} more dropped datagrams on {listener} in the last second were not "
            "logged one by one (at most {limit} lines a second)",
            event="udp-drops-unlogged",
            listener=self.owner.listener,
            unlogged=unlogged,
            limit=self.perSecond,
        )

    def start(self) -> None:
        """
        Flush every interval, and hand over the summary every second.
        """
        self._loops = [LoopingCall(self.flush), LoopingCall(self.summarize)]
        for loop, every in zip(self._loops, (self.interval, 1.0), strict=True):
            loop.clock = self.clock
            loop.start(every, now=False)

    def stop(self) -> None:
        """
        Stop what L{start} started.
        """
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
