# -*- test-case-name: tests.unit.test_signals -*-
"""
The process's signals, for a real C{twistd echo} process (and each worker):
SIGHUP asks for a rule reload, and a second SIGTERM or SIGINT during a
shutdown stops at once.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from twisted.application.service import Service

from echotw.interfaces import IServerReactor

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_NOW_SIGNAL = signal.SIGUSR2
"""
What a supervisor sends its workers to make them stop at once.

L{STOP_NOW_SIGNAL} (SIGUSR2) stops at once in any process, shutting down
first if need be (its default action would kill the process outright).
"""


_hangupHeld = False


def holdHangups() -> None:
    """
    Remember SIGHUP instead of dying of it, until L{ProcessSignals} starts
    and asks for the reload it stands for.

    SIGHUP's default action ends the process.  A runner's process holds it from
    the moment its options are parsed (L{holdHangups}), before any listener is
    bound: a SIGHUP that comes before L{ProcessSignals} starts is remembered
    and becomes one reload then, so a reload sent as soon as the server says it
    listens never kills it.
    """
    signal.signal(signal.SIGHUP, _holdHangup)


def _holdHangup(signum: int, frame: FrameType | None) -> None:
    global _hangupHeld
    _hangupHeld = True


def takeHeldHangup() -> bool:
    """
    Whether a SIGHUP came while held (see L{holdHangups}); forget it.
    """
    global _hangupHeld
    held, _hangupHeld = _hangupHeld, False
    return held


class ProcessSignals(Service):
    """
    Route the process's signals: SIGHUP to C{onHangup}; after the first
    SIGTERM or SIGINT, further ones to C{onStopNow(signal name)} (in a
    C{worker}, those are ignored and L{STOP_NOW_SIGNAL} goes there
    instead).  Both are called in the reactor thread, on its next turn.

    Twisted handles the first SIGTERM or SIGINT itself: it stops the reactor and
    remembers the signal, so that twistd ends by the same signal (status 143 for
    SIGTERM).  A second one would make Twisted stop a reactor that is already
    stopping, which only logs a C{ReactorNotRunning} traceback while the drain
    goes on.  L{ProcessSignals} wraps Twisted's handlers once the reactor runs:
    the first signal still goes to Twisted, any later one (or one that arrives
    after a shutdown began some other way) calls C{onStopNow} instead.

    A worker of C{--workers} counts no second signal: a SIGTERM or SIGINT sent
    to the whole process group (systemd's default C{KillMode=control-group},
    Ctrl-C in a terminal) reaches it directly and again through its
    supervisor, and those two must not add up to "stop now".  Its supervisor
    sends L{STOP_NOW_SIGNAL} instead when the user asks it to stop at once.
    """

    def __init__(
        self,
        reactor: IServerReactor,
        onHangup: Callable[[], object],
        onStopNow: Callable[[str], object],
        worker: bool = False,
    ) -> None:
        self.reactor = reactor
        self.onHangup = onHangup
        self.onStopNow = onStopNow
        self.worker = worker
        self.stopping = False

    def startService(self) -> None:
        Service.startService(self)
        signal.signal(signal.SIGHUP, self._hangup)
        if takeHeldHangup():
            self.reactor.callFromThread(self.onHangup)
        signal.signal(STOP_NOW_SIGNAL, self._stopNowSignal)
        # Twisted installs its own handlers as the reactor starts; wrap them then.
        self.reactor.callWhenRunning(self._wrapStopSignals)
        self.reactor.addSystemEventTrigger("before", "shutdown", self._shuttingDown)

    def _shuttingDown(self) -> None:
        self.stopping = True

    def _hangup(self, signum: int, frame: FrameType | None) -> None:
        self.reactor.callFromThread(self.onHangup)

    def _stopNowSignal(self, signum: int, frame: FrameType | None) -> None:
        # It may overtake the SIGTERM sent before it (lower signals first).
        if not self.stopping:
            self.stopping = True
            self.reactor.callFromThread(self.reactor.stop)
        self.reactor.callFromThread(self.onStopNow, "supervisor" if self.worker else "SIGUSR2")

    def _wrapStopSignals(self) -> None:
        for signum in STOP_SIGNALS:
            previous = signal.getsignal(signum)
            signal.signal(signum, self._stopSignal(previous))

    def _stopSignal(self, previous: Any) -> Callable[[int, FrameType | None], None]:
        def handler(signum: int, frame: FrameType | None) -> None:
            if not self.stopping:
                self.stopping = True
                if callable(previous):
                    previous(signum, frame)
                else:
                    self.reactor.callFromThread(self.reactor.stop)
                return
            if not self.worker:
                self.reactor.callFromThread(self.onStopNow, signal.Signals(signum).name)

        return handler
