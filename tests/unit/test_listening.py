"""
Unit tests of accept errors on a listening port: a port that could not
accept (no descriptors left) stops reading for a while instead of spinning,
each refusal is counted, and the port's other log lines pass as they were.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from echotw.listening import AcceptErrors, watchAcceptErrors
from echotw.throttlelog import LogThrottle
from tests.support.fakes import FakePort


class AcceptErrorsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.port = FakePort()
        self.refused: list[str] = []
        watcher = watchAcceptErrors(
            self.port, "tcp:7", self.clock, LogThrottle(1.0, self.clock), self.refused.append
        )
        assert watcher is not None
        self.watcher = watcher

    def emit(self, fmt: str, **fields: Any) -> None:
        self.port._logger.info(fmt, **fields)

    def test_recoveryCountedAndThrottled(self) -> None:
        """Each connection Twisted closes for lack of descriptors is a
        refusal; one line a second is logged, with the count held back."""
        with capturedLogs() as events:
            for i in range(100):
                self.emit("EMFILE encountered; releasing reserved file descriptor.")
                self.emit("EMFILE recovery: Closed socket from {address}", address=("a", i))
                self.emit("Re-reserving EMFILE recovery file descriptor.")
            self.clock.advance(1)
            self.emit("EMFILE recovery: Closed socket from {address}", address=("a", 1))
        self.assertEqual(len(self.refused), 101)
        refused = [e for e in events if e.get("event") == "accept-refused"]
        self.assertEqual([e["unlogged"] for e in refused], [0, 99])

    def test_failedAcceptBacksOff(self) -> None:
        """A port that could not accept stops reading for a while instead of
        being woken again at once (a busy loop)."""
        self.emit("Could not accept new connection ({acceptError})", acceptError="EMFILE")
        self.assertFalse(self.port.reading)
        self.clock.advance(0.05)
        self.assertTrue(self.port.reading)
        self.emit("Could not accept new connection ({acceptError})", acceptError="EMFILE")
        self.clock.advance(0.05)
        self.assertFalse(self.port.reading)
        self.clock.advance(0.05)
        self.assertTrue(self.port.reading)

    def test_otherEventsPassThrough(self) -> None:
        """Anything else the port logs is published as it was."""
        with capturedLogs() as events:
            self.emit("something else {x}", x=1)
        self.assertEqual([e.get("x") for e in events], [1])

    def test_notAPort(self) -> None:
        """Without Twisted's port logger, nothing is installed."""
        self.assertIsNone(
            watchAcceptErrors(object(), "l", self.clock, LogThrottle(1, self.clock), print)
        )
        self.assertIsInstance(self.watcher, AcceptErrors)
