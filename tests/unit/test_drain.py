"""
Unit tests of the quiet closer that ends connections at shutdown: one with
nothing queued and nothing arriving is closed once it stays quiet, bytes
queued keep it open, and one that keeps receiving is closed when its grace
is over.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from echotw.drain import QuietCloser
from tests.support.fakes import AbortableTransport


class BufferedTransport(AbortableTransport):
    """
    A transport that reports bytes as queued until L{flush}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.queued = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        self.queued += len(data)

    def flush(self) -> None:
        self.queued = 0


class FakeConnection:
    """
    What L{QuietCloser} sees of a connection.
    """

    def __init__(self) -> None:
        self.bytesReceived = 0
        self.queued = 0
        self.finishing = False
        self.closed = False
        self.finished: tuple[str, float | None] | None = None

    def pendingBytes(self) -> int:
        return self.queued

    def finish(self, reason: str, deadline: float | None = None) -> None:
        self.finishing = True
        self.finished = (reason, deadline)


class QuietCloserTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.closer = QuietCloser(self.clock)

    def test_quietClosedAfterTwoTicks(self) -> None:
        """A connection with nothing queued and nothing arriving is closed
        at the second look, with the reason and deadline given."""
        c = FakeConnection()
        self.closer.close([c], "server shutdown", 10, lingerUntil=20)  # type: ignore[list-item]
        self.assertIsNone(c.finished)
        self.clock.advance(0.1)
        self.assertEqual(c.finished, ("server shutdown", 20))
        self.assertEqual(len(self.closer), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_pausedIsNotQuiet(self) -> None:
        """Bytes queued to send (reading paused by backpressure) keep a
        connection open, however long nothing arrives; once they drain it
        must stay quiet for a tick more."""
        c = FakeConnection()
        c.queued = 100_000
        self.closer.close([c], "server shutdown", 10)  # type: ignore[list-item]
        for _ in range(20):
            self.clock.advance(0.1)
        self.assertIsNone(c.finished)
        c.queued = 0
        self.clock.advance(0.1)
        self.assertIsNone(c.finished)
        c.bytesReceived += 5000  # the resumed socket is read
        self.clock.advance(0.1)
        self.assertIsNone(c.finished)
        self.clock.advance(0.1)
        self.assertIsNotNone(c.finished)

    def test_busyUntilGrace(self) -> None:
        """A connection that keeps receiving is closed once its grace is over."""
        c = FakeConnection()
        self.closer.close([c], "denied by reload", 1.0)  # type: ignore[list-item]
        for _ in range(9):
            c.bytesReceived += 10
            self.clock.advance(0.1)
            self.assertIsNone(c.finished)
        c.bytesReceived += 10
        self.clock.advance(0.15)
        self.assertEqual(c.finished, ("denied by reload", None))

    def test_closedConnectionsForgotten(self) -> None:
        """Connections that end meanwhile are dropped, not finished."""
        c = FakeConnection()
        c.queued = 1
        self.closer.close([c], "server shutdown", 10)  # type: ignore[list-item]
        c.closed = True
        self.clock.advance(0.1)
        self.assertIsNone(c.finished)
        self.assertEqual(self.clock.getDelayedCalls(), [])
