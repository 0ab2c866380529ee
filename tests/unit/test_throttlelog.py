"""
Tests for L{echotw.throttlelog}: the refusal and drop logs keep a flood from
many source addresses to L{LINES_PER_SECOND} lines a second plus one
summary line, while the counters still count every event.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IUDPTransport
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from echotw.factory import EchoFactory
from echotw.proxyprotocol import ProxyProtocolFactory
from echotw.rules.addresses import parseNetwork
from echotw.rules.policy import AccessRules
from echotw.service import EchoService
from echotw.throttlelog import LINES_PER_SECOND
from echotw.udp import UDPEchoProtocol
from tests.support.fakes import FakeDatagramTransport

SOURCES = 100
"""Sources in each flood: five times the cap."""


def source(i: int) -> str:
    return f"10.0.{i // 250}.{i % 250 + 1}"


class RefusalLogCapTests(SynchronousTestCase):
    """
    Refused TCP connections from many sources, as the echo service runs.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.factory = EchoFactory(
            rules=AccessRules(deny=[parseNetwork("10.0.0.0/8")]), clock=self.clock
        )
        self.service = EchoService(self.factory, self.clock, 1.0)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def test_manySourcesCapped(self) -> None:
        """One refusal from each of 100 sources in a second writes 20
        lines, then (with no further connection) one line with the 80 not
        logged; every refusal is counted."""
        with capturedLogs() as events:
            for i in range(SOURCES):
                self.factory.buildProtocolFor(IPv4Address("TCP", source(i), 4000), "tcp:7")
            self.clock.advance(1.0)
            self.clock.advance(1.0)
        refused = [e for e in events if e.get("event") == "refused"]
        self.assertEqual(len(refused), LINES_PER_SECOND)
        [summary] = [e for e in events if e.get("event") == "refusals-unlogged"]
        self.assertEqual(
            (summary["unlogged"], summary["limit"]),
            (SOURCES - LINES_PER_SECOND, LINES_PER_SECOND),
        )
        self.assertEqual(len(events), LINES_PER_SECOND + 1)
        self.assertEqual(self.factory.stats.refusals, {"denied": SOURCES})

    def test_proxyProblemsShareTheCap(self) -> None:
        """An untrusted proxy's refusals go through the same throttle as
        the TCP refusals, so both together stay under the cap."""
        proxy = ProxyProtocolFactory(
            self.factory.forListener("proxy"), [], 5.0, self.clock, self.factory.refusalLog
        )
        with capturedLogs() as events:
            for i in range(SOURCES // 2):
                self.factory.buildProtocolFor(IPv4Address("TCP", source(i), 4000), "tcp:7")
                proxy.buildProtocol(IPv4Address("TCP", source(SOURCES + i), 4000))
            self.clock.advance(1.0)
        names = [e.get("event") for e in events]
        self.assertEqual(names.count("refused") + names.count("proxy-untrusted"), LINES_PER_SECOND)
        [summary] = [e for e in events if e.get("event") == "refusals-unlogged"]
        self.assertEqual(summary["unlogged"], SOURCES - LINES_PER_SECOND)

    def test_standaloneProxyFactoryCapped(self) -> None:
        """A PROXY factory given no throttle makes its own, capped too."""
        proxy = ProxyProtocolFactory(EchoFactory(), [], 5.0, self.clock)
        with capturedLogs() as events:
            for i in range(SOURCES):
                proxy.buildProtocol(IPv4Address("TCP", source(i), 4000))
            self.clock.advance(1.0)
            proxy.problemLog.flush()
        names = [e.get("event") for e in events]
        self.assertEqual(names.count("proxy-untrusted"), LINES_PER_SECOND)
        self.assertEqual(names[-1], "refusals-unlogged")
        self.assertEqual(proxy.rejections, {"untrusted proxy": SOURCES})


class DropLogCapTests(SynchronousTestCase):
    """
    Datagrams dropped from many sources on a running UDP listener.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.proto = UDPEchoProtocol(
            rules=AccessRules(deny=[parseNetwork("10.0.0.0/8")]),
            listener="udp:7",
            clock=self.clock,
            logInterval=10,
        )
        self.proto.makeConnection(cast(IUDPTransport, FakeDatagramTransport()))

    def test_manySourcesCapped(self) -> None:
        """One datagram from each of 100 sources writes 20 lines, and a
        second later, with no further datagram, one line with the 80 not
        logged; the counters count all 100, and stopping leaves no timer."""
        with capturedLogs() as events:
            for i in range(SOURCES):
                self.proto.datagramReceived(b"x", (source(i), 4000))
            self.clock.advance(1.0)
            self.clock.advance(1.0)
        dropped = [e for e in events if e.get("event") == "udp-dropped"]
        self.assertEqual(len(dropped), LINES_PER_SECOND)
        [summary] = [e for e in events if e.get("event") == "udp-drops-unlogged"]
        self.assertEqual(
            (summary["unlogged"], summary["listener"]), (SOURCES - LINES_PER_SECOND, "udp:7")
        )
        self.assertEqual(len(events), LINES_PER_SECOND + 1)
        self.assertEqual(self.proto.dropped["denied"], SOURCES)
        self.proto.stopProtocol()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_floodStaysUnderTheCapEverySecond(self) -> None:
        """Ten seconds of 100 new sources a second: never more than the cap
        plus one summary line in a second, and lines plus summaries account
        for every datagram."""
        lines = summed = 0
        for second in range(10):
            with capturedLogs() as events:
                for i in range(SOURCES):
                    self.proto.datagramReceived(b"x", (source(second * SOURCES + i), 4000))
                self.clock.advance(1.0)
            self.assertLessEqual(len(events), LINES_PER_SECOND + 1)
            lines += sum(e.get("event") == "udp-dropped" for e in events)
            summed += sum(e["unlogged"] for e in events if e["event"] == "udp-drops-unlogged")
        self.assertEqual(lines + summed, 10 * SOURCES)
        self.assertEqual(self.proto.dropped["denied"], 10 * SOURCES)
