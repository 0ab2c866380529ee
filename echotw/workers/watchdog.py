# -*- test-case-name: tests.unit.test_watchdog -*-
"""
C{--worker-timeout}: notice a worker process that has stopped reporting.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

DEFAULT_WORKER_TIMEOUT = 30.0
"""Seconds a worker may be silent before it is replaced (as gunicorn's default)."""

MIN_WORKER_TIMEOUT = 2.0
"""The shortest timeout allowed: longer than the one second between reports."""

STARTING_ALLOWANCE = 60.0
"""
Seconds a worker gets to send its first line, if the timeout is shorter: a
worker starting on a loaded machine (imports, a long rule file) may take
several seconds, and killing it then would only start the same again.
"""


class Watchdog:
    """
    Call C{silent} once if L{heard} is not called for C{timeout} seconds
    after the last L{heard}, or, before the first, for C{starting}
    seconds (at least C{timeout}) after L{start}; C{timeout} 0 watches
    nothing.

    A worker sends its counters to the supervisor every second whatever they
    are (L{echotw.workers.main.Reporter}), so silence means its event loop is not
    running: stopped with SIGSTOP, stuck in a busy loop, swapped out for good.
    Such a worker still holds its listening socket, and the kernel keeps
    handing it the connections of its share of the clients, which wait and get
    nothing.  As gunicorn's C{--timeout} does, the supervisor kills a worker
    silent for that long and starts another in its place, which adopts the
    same socket and serves the connections queued on it.
    """

    def __init__(
        self,
        clock: IReactorTime,
        timeout: float,
        silent: Callable[[], object],
        starting: float = STARTING_ALLOWANCE,
    ) -> None:
        self.clock = clock
        self.timeout = timeout
        self.starting = max(timeout, starting)
        self.silent = silent
        self._call: IDelayedCall | None = None
        self._graceUntil = 0.0
        self._lastLook = False

    def start(self) -> None:
        if self.timeout:
            self._call = self.clock.callLater(self.starting, self._expired)

    def heard(self) -> None:
        """
        The worker reported: it has C{timeout} seconds again (or what is
        left of an allowance L{reloading} gave, if longer).
        """
        if self._call is not None and self._call.active():
            self._lastLook = False
            left = self._graceUntil - self.clock.seconds()
            self._call.reset(max(self.timeout, left))

    def reloading(self) -> None:
        """
        The worker was asked to reload its rules: it parses them in a
        thread, which holds the interpreter's lock most of the time, so
        its reports come late while it does (gaps of 3 s between reports
        seen with 120,000 networks on a loaded machine): it has C{starting}
        seconds again, however often it reports first (a report may
        already be on its way when the reload is asked for).
        """
        if self._call is not None and self._call.active():
            self._graceUntil = self.clock.seconds() + self.starting
            self._call.reset(self.starting)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _expired(self) -> None:
        if not self._lastLook:
            # The deadline passed, but what the worker sent meanwhile may
            # wait unread: a supervisor busy past it (its own reload's
            # thread holding the interpreter's lock) runs its timers before
            # it reads.  A call in 0 s comes after the reactor's next look
            # at its descriptors, where a report found calls L{heard}.
            self._lastLook = True
            self._call = self.clock.callLater(0, self._expired)
            return
        self._call = None
        self._lastLook = False
        self.silent()
