"""
Unit tests of the process's signals: the first SIGTERM goes to Twisted, a
later one (or SIGUSR2) stops at once, and SIGHUPs that arrive before the
service runs are held for it.
"""

from __future__ import annotations

import signal
from typing import Any, cast

from twisted.trial.unittest import SynchronousTestCase

from echotw.signals import STOP_NOW_SIGNAL, ProcessSignals, holdHangups, takeHeldHangup
from echotw.tap import Options
from tests.support.fakes import FakeReactor


class ProcessSignalsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.saved = {
            s: signal.getsignal(s)
            for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, STOP_NOW_SIGNAL)
        }
        for s, handler in self.saved.items():
            self.addCleanup(signal.signal, s, handler)
        self.addCleanup(takeHeldHangup)

    def test_firstToTwistedThenStopNow(self) -> None:
        """The first SIGTERM goes to the handler that was there (Twisted's);
        any later SIGTERM or SIGINT calls stop-now with its name."""
        fake = FakeReactor()
        first: list[int] = []
        signal.signal(signal.SIGTERM, lambda n, f: first.append(n))
        stoppedNow: list[str] = []
        hangups: list[bool] = []
        service = ProcessSignals(cast(Any, fake), lambda: hangups.append(True), stoppedNow.append)
        service.startService()
        [wrap] = fake.whenRunning
        wrap()
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        handler(signal.SIGTERM, None)
        self.assertEqual(first, [signal.SIGTERM])
        handler(signal.SIGTERM, None)
        cast(Any, signal.getsignal(signal.SIGINT))(signal.SIGINT, None)
        self.assertEqual(stoppedNow, ["SIGTERM", "SIGINT"])
        cast(Any, signal.getsignal(signal.SIGHUP))(signal.SIGHUP, None)
        self.assertEqual(hangups, [True])

    def test_afterShutdownBegan(self) -> None:
        """Once a shutdown began some other way, a SIGTERM stops at once."""
        fake = FakeReactor()
        stoppedNow: list[str] = []
        service = ProcessSignals(cast(Any, fake), lambda: None, stoppedNow.append)
        service.startService()
        fake.whenRunning[0]()
        for trigger in fake.triggers:
            trigger()
        cast(Any, signal.getsignal(signal.SIGTERM))(signal.SIGTERM, None)
        self.assertEqual(stoppedNow, ["SIGTERM"])

    def test_workerCountsNoSecondSignal(self) -> None:
        """In a worker, a SIGTERM or SIGINT after the first (the same signal
        sent to the process group and relayed by the supervisor) does not
        stop at once; the supervisor's stop-now signal does."""
        fake = FakeReactor()
        first: list[int] = []
        signal.signal(signal.SIGTERM, lambda n, f: first.append(n))
        stoppedNow: list[str] = []
        service = ProcessSignals(cast(Any, fake), lambda: None, stoppedNow.append, worker=True)
        service.startService()
        fake.whenRunning[0]()
        handler = cast(Any, signal.getsignal(signal.SIGTERM))
        for _ in range(3):
            handler(signal.SIGTERM, None)
        cast(Any, signal.getsignal(signal.SIGINT))(signal.SIGINT, None)
        self.assertEqual((first, stoppedNow), ([signal.SIGTERM], []))
        cast(Any, signal.getsignal(STOP_NOW_SIGNAL))(STOP_NOW_SIGNAL, None)
        self.assertEqual(stoppedNow, ["supervisor"])
        self.assertEqual(fake.stopped, 0)

    def test_stopNowSignalAnywhere(self) -> None:
        """SIGUSR2 stops a process at once, not only a worker: it shuts down
        (its default action would kill it outright) and stops now."""
        fake = FakeReactor()
        stoppedNow: list[str] = []
        service = ProcessSignals(cast(Any, fake), lambda: None, stoppedNow.append)
        service.startService()
        cast(Any, signal.getsignal(STOP_NOW_SIGNAL))(STOP_NOW_SIGNAL, None)
        self.assertEqual((fake.stopped, stoppedNow), (1, ["SIGUSR2"]))

    def test_hangupHeldUntilStarted(self) -> None:
        """SIGHUPs that come after option parsing, before the service
        handles them, do not kill the process: they are held and become one
        reload once it starts, and only once."""
        holdHangups()
        held = cast(Any, signal.getsignal(signal.SIGHUP))
        held(signal.SIGHUP, None)
        held(signal.SIGHUP, None)
        hangups: list[bool] = []
        ProcessSignals(cast(Any, FakeReactor()), lambda: hangups.append(True), print).startService()
        self.assertEqual(hangups, [True])
        ProcessSignals(cast(Any, FakeReactor()), lambda: hangups.append(True), print).startService()
        self.assertEqual(hangups, [True])

    def test_runnerOptionsHoldHangups(self) -> None:
        """twistd's parse of the echo options (they have a parent) holds
        SIGHUP from then on; a test's parse (no parent) leaves it alone."""
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        Options().parseOptions(["--port", "tcp:0:interface=127.0.0.1"])
        self.assertEqual(signal.getsignal(signal.SIGHUP), signal.SIG_DFL)
        options = Options()
        options.parent = object()  # type: ignore[attr-defined]
        options.parseOptions(["--port", "tcp:0:interface=127.0.0.1"])
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), signal.SIG_DFL)

    def test_workerStopNowBeforeStop(self) -> None:
        """A stop-now signal that overtakes the SIGTERM before it stops the
        worker's reactor too."""
        fake = FakeReactor()
        stoppedNow: list[str] = []
        service = ProcessSignals(cast(Any, fake), lambda: None, stoppedNow.append, worker=True)
        service.startService()
        cast(Any, signal.getsignal(STOP_NOW_SIGNAL))(STOP_NOW_SIGNAL, None)
        self.assertEqual((fake.stopped, stoppedNow), (1, ["supervisor"]))
