"""
Unit tests of the echo service's life: readiness, the drain delay and a
second signal during it, the count of connections a flood left, and
reloads coalesced while one runs.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from echotw.factory import EchoFactory
from echotw.protocol import EchoProtocol
from echotw.rules.files import RuleSource
from echotw.rules.policy import AccessRules
from echotw.service import EchoService


def connect(factory: EchoFactory, host: str = "10.0.0.1") -> tuple[EchoProtocol, StringTransport]:
    p = factory.buildProtocolFor(IPv4Address("TCP", host, 1234), "l")
    assert p is not None
    t = StringTransport()
    p.makeConnection(t)
    return p, t


class ServiceLifecycleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.factory = EchoFactory(clock=self.clock)

    def test_readiness(self) -> None:
        """Ready once started, not ready from the moment stopping begins."""
        service = EchoService(self.factory, self.clock, 1.0)
        self.assertFalse(service.isReady())
        service.startService()
        self.assertTrue(service.isReady())
        service.stopService()
        self.assertFalse(service.isReady())

    def test_connectionLogFlushedEverySecond(self) -> None:
        """The running service logs the count of connections a flood left
        unlogged within about a second of the flood's end, with no
        connection after it."""
        factory = EchoFactory(clock=self.clock, logConnections=2)
        service = EchoService(factory, self.clock, 1.0)
        service.startService()
        self.addCleanup(service.stopService)
        with capturedLogs() as events:
            for _ in range(7):
                connect(factory)
            self.clock.advance(1.0)
            self.clock.advance(1.0)
        unlogged = [e["unlogged"] for e in events if e["event"] == "connections-unlogged"]
        self.assertEqual(unlogged, [5])

    def test_drainDelayKeepsListening(self) -> None:
        """With a drain delay the listeners stop only after it, while
        readiness is off at once."""
        service = EchoService(self.factory, self.clock, 1.0, drainDelay=2.0)
        listener = RecordingService()
        listener.setServiceParent(service)
        service.startService()
        d = service.stopService()
        self.assertFalse(service.isReady())
        self.assertTrue(listener.running)
        self.clock.advance(1.9)
        self.assertTrue(listener.running)
        self.clock.advance(0.2)
        self.assertFalse(listener.running)
        self.successResultOf(d)

    def test_webServicesStopLast(self) -> None:
        """Children that serve through the drain stop after the connections
        are closed."""
        service = EchoService(self.factory, self.clock, 5.0)
        web = RecordingService()
        web.servesThroughDrain = True  # type: ignore[attr-defined]
        web.setServiceParent(service)
        service.startService()
        p, t = connect(self.factory)
        d = service.stopService()
        self.assertTrue(web.running)
        self.clock.advance(0.2)
        self.assertTrue(t.disconnecting)
        self.assertTrue(web.running)
        p.connectionLost()
        self.clock.advance(0.1)
        self.successResultOf(d)
        self.assertFalse(web.running)

    def test_stopNowDuringDelay(self) -> None:
        """A second signal during the drain delay skips it and aborts."""
        service = EchoService(self.factory, self.clock, 10.0, drainDelay=30.0)
        service.startService()
        p, _ = connect(self.factory)
        aborted: list[str] = []
        p.abort = aborted.append  # type: ignore[method-assign]
        d = service.stopService()
        with capturedLogs() as events:
            service.stopNow("SIGTERM")
        self.assertEqual(aborted[:1], ["server shutdown"])
        self.assertEqual(events[0]["event"], "stop-now")
        self.factory.protocols.clear()
        self.clock.advance(0.1)
        self.successResultOf(d)

    def test_stopNowDuringDrainAfterDelay(self) -> None:
        """A second signal once the drain delay is over, while the drain
        runs, aborts what is left and the stop completes: the delay's
        Deferred, fired and waiting on the drain, is not cancelled (which
        failed the drain with an unhandled CancelledError)."""
        service = EchoService(self.factory, self.clock, 10.0, drainDelay=5.0)
        service.startService()
        p, _ = connect(self.factory)
        aborted: list[str] = []
        p.abort = aborted.append  # type: ignore[method-assign]
        d = service.stopService()
        with capturedLogs() as events:
            self.clock.advance(5.05)
            self.assertIn("draining", [e.get("event") for e in events])
            service.stopNow("SIGTERM")
        self.assertEqual(aborted[:1], ["server shutdown"])
        self.factory.protocols.clear()
        self.clock.advance(0.1)
        self.successResultOf(d)
        self.assertEqual(self.flushLoggedErrors(CancelledError), [])

    def test_reloadsCoalesce(self) -> None:
        """Reloads asked for while one runs become one more reload."""
        source = CountingSource()
        service = EchoService(self.factory, self.clock, 1.0, ruleSource=source)
        first = service.requestReload()
        for _ in range(4):
            service.requestReload()
        self.assertEqual(source.loads, 1)
        source.finish()
        self.assertEqual(source.loads, 2)
        source.finish()
        self.assertEqual(self.successResultOf(first), True)
        self.assertEqual(source.loads, 2)


class RecordingService:
    """A minimal service that records whether it runs."""

    name = None
    parent = None
    running = False

    def setServiceParent(self, parent: Any) -> None:
        parent.addService(self)
        self.parent = parent

    def privilegedStartService(self) -> None:
        pass

    def startService(self) -> None:
        self.running = True

    def stopService(self) -> Deferred[None]:
        self.running = False
        return succeed(None)


class CountingSource(RuleSource):
    """A rule source whose loads finish when told to."""

    def __init__(self) -> None:
        super().__init__(allowFiles=["unused"])
        self.loads = 0
        self.waiting: Deferred[AccessRules] | None = None

    def load(self) -> AccessRules:  # type: ignore[override]
        self.loads += 1
        self.waiting = Deferred()
        return self.waiting  # type: ignore[return-value]

    def finish(self) -> None:
        waiting, self.waiting = self.waiting, None
        assert waiting is not None
        waiting.callback(AccessRules())
