"""
Unit tests of the service's housekeeping an operator relies on: the idle
timeout sweep, reloading the rule files, the stats line. Clock-driven, no
network. The helpers here (a client address, a connection, a rule file)
serve the tests of the limits, the verifiers and the rule files too.
"""

from __future__ import annotations

import os
import socket
import tempfile
import textwrap

from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from echotw.factory import EchoFactory
from echotw.protocol import EchoProtocol
from echotw.rules.files import RuleSource
from echotw.service import EchoService
from tests.support.fakes import AbortableTransport


def client(host: str = "10.0.0.1", port: int = 40000) -> IPv4Address:
    return IPv4Address("TCP", host, port)


def connect(factory: EchoFactory, addr: object = None) -> tuple[EchoProtocol, AbortableTransport]:
    p = factory.buildProtocolFor(addr or client(), "l")  # type: ignore[arg-type]
    assert p is not None
    t = AbortableTransport()
    p.makeConnection(t)
    return p, t


def writeFile(test: SynchronousTestCase, text: str) -> str:
    """
    A rule file with C{text}, removed when C{test} ends.
    """
    fd, path = tempfile.mkstemp(suffix=".rules")
    test.addCleanup(os.remove, path)
    with os.fdopen(fd, "w") as f:
        f.write(textwrap.dedent(text))
    return path


class IdleTimeoutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.factory = EchoFactory(clock=self.clock)
        self.service = EchoService(self.factory, self.clock, 1.0, idleTimeout=10.0)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def test_idleConnectionAborted(self) -> None:
        """A connection with no traffic is aborted, reason 'timeout', within
        one sweep (2.5 s here) after the timeout."""
        p, t = connect(self.factory)
        self.clock.advance(2.5)
        self.clock.advance(2.5)
        self.clock.advance(2.5)
        self.assertFalse(t.aborted)
        for _ in range(4):
            self.clock.advance(2.5)
        self.assertTrue(t.aborted)
        self.assertEqual(p.closeReason, "timeout")

    def test_trafficKeepsItOpen(self) -> None:
        """Echoed bytes reset the idle clock."""
        p, t = connect(self.factory)
        for _ in range(20):
            p.dataReceived(b"x")
            self.clock.advance(2.5)
        self.assertFalse(t.aborted)

    def test_stalledReaderAborted(self) -> None:
        """A peer that stopped reading while its echo is queued (so the
        server has paused reading from it) is idle too, and is aborted: a
        graceful close could never finish.  On a real socket whose other
        end never reads, driven by a fake reactor."""
        reactor = MemoryReactorClock()
        factory = EchoFactory(clock=reactor)
        service = EchoService(factory, reactor, 1.0, idleTimeout=10.0)
        service.startService()
        near, far = socket.socketpair()
        self.addCleanup(near.close)
        self.addCleanup(far.close)
        near.setblocking(False)
        # (No TCP_NODELAY: a socket pair is not TCP.)
        p = factory.buildProtocolFor(client(), "l", noDelay=False)
        assert p is not None
        transport = tcp.Connection(near, p, reactor)
        transport.connected = True
        p.makeConnection(transport)
        p.dataReceived(b"y" * 4 * 1024 * 1024)
        self.assertTrue(transport.producerPaused, "the echo should be stuck in the buffer")
        with capturedLogs() as events:
            for _ in range(6):
                reactor.advance(2.5)
        self.assertEqual(factory.stats.openConnections, 0)
        [closed] = [e for e in events if e.get("event") == "closed"]
        self.assertEqual(closed["reason"], "timeout")

    def test_disabled(self) -> None:
        """With 0 there is no sweep at all."""
        service = EchoService(self.factory, self.clock, 1.0, idleTimeout=0)
        service.startService()
        self.assertNotIn(service.sweepIdle, [loop.f for loop in service._loops])


class ReloadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.deny = writeFile(self, "")
        self.source = RuleSource(denyFiles=[self.deny])
        self.clock = Clock()
        self.factory = EchoFactory(rules=self.source.load(), clock=self.clock)
        self.service = EchoService(self.factory, self.clock, 1.0, ruleSource=self.source)

    def test_reloadDeniesAndClosesOpenConnection(self) -> None:
        """After a reload that denies an open connection's address, it is
        closed (gracefully, reason logged); others stay; new ones refused."""
        victim, victimT = connect(self.factory, client("10.6.6.6"))
        _, otherT = connect(self.factory, client("10.1.1.1"))
        with open(self.deny, "w") as f:
            f.write("10.6.0.0/16\n")
        with capturedLogs() as events:
            self.assertTrue(self.service.reload())
        self.assertFalse(victimT.disconnecting)
        self.clock.advance(0.1)  # quiet for a tick: closed
        self.assertTrue(victimT.disconnecting)
        self.assertEqual(victim.closeReason, "denied by reload")
        self.assertFalse(otherT.disconnecting)
        self.assertEqual(events[-1]["event"], "reloaded")
        self.assertEqual(events[-1]["closed"], 1)
        self.assertIsNone(self.factory.buildProtocolFor(client("10.6.0.1"), "l"))

    def test_brokenFileKeepsOldRules(self) -> None:
        """A file that fails to parse keeps the previous rules and logs one
        error naming the file and line."""
        with open(self.deny, "w") as f:
            f.write("10.6.0.0/16\n")
        self.service.reload()
        with open(self.deny, "w") as f:
            f.write("10.6.0.0/16\n300.1.1.1\n")
        with capturedLogs() as events:
            self.assertFalse(self.service.reload())
        [event] = events
        self.assertEqual(event["event"], "reload-failed")
        self.assertIn(f"{self.deny}:2:", event["error"])
        self.assertIsNone(self.factory.buildProtocolFor(client("10.6.0.1"), "l"))
        self.assertIsNotNone(self.factory.buildProtocolFor(client("10.5.0.1"), "l"))

    def test_noFilesNothingToReload(self) -> None:
        """Without rule files a reload changes nothing."""
        service = EchoService(self.factory, Clock(), 1.0, ruleSource=RuleSource())
        rules = self.factory.rules
        self.assertFalse(service.reload())
        self.assertIs(self.factory.rules, rules)


class StatsTests(SynchronousTestCase):
    def test_periodicSummary(self) -> None:
        """Every --stats-interval seconds one line sums up the server."""
        clock = Clock()
        factory = EchoFactory(rules=None, clock=clock)
        factory.stats.refusals["denied"] = 2
        p, _ = connect(factory)
        p.dataReceived(b"abc")
        service = EchoService(factory, clock, 1.0, statsInterval=60)
        service.startService()
        self.addCleanup(service.stopService)
        with capturedLogs() as events:
            clock.advance(59)
            self.assertEqual(events, [])
            clock.advance(1)
        [event] = events
        self.assertEqual(
            (event["event"], event["open"], event["total"], event["refused"], event["bytes"]),
            ("stats", 1, 1, 2, 3),
        )
