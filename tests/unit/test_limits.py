"""
Unit tests of the limits an echo connection is held to: the bytes and
seconds of a session, and the rate of connections from one source.
Clock-driven, no network.
"""

from __future__ import annotations

from twisted.internet.address import IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from echotw.factory import EchoFactory
from echotw.ratelimit import TokenBuckets
from echotw.service import EchoService
from tests.support.fakes import AbortableTransport
from tests.unit.test_housekeeping import client, connect


class SessionLimitTests(SynchronousTestCase):
    def test_maxBytesClosesAfterEchoing(self) -> None:
        """At the byte limit the connection closes gracefully, having echoed
        exactly the limit: the read that crosses it is echoed up to it, and
        the rest counted as discarded."""
        factory = EchoFactory(maxSessionBytes=10, clock=Clock())
        p, t = connect(factory)
        p.dataReceived(b"12345")
        self.assertFalse(t.disconnecting)
        p.dataReceived(b"6789012")
        self.assertEqual(t.value(), b"1234567890")
        self.assertTrue(t.disconnecting)
        self.assertFalse(t.aborted)
        self.assertEqual(p.closeReason, "max-session-bytes")
        self.assertEqual((p.bytesReceived, p.bytesDiscarded), (10, 2))

    def test_maxSecondsClosesAndTimerCancelled(self) -> None:
        """After the session time the connection closes gracefully; a
        connection that closed earlier leaves no timer behind."""
        clock = Clock()
        factory = EchoFactory(maxSessionSeconds=30, clock=clock)
        p, t = connect(factory)
        early, _ = connect(factory)
        early.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(29.9)
        self.assertFalse(t.disconnecting)
        clock.advance(0.2)
        self.assertTrue(t.disconnecting)
        self.assertEqual(p.closeReason, "max-session-seconds")
        with capturedLogs() as events:
            p.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(events[0]["reason"], "max-session-seconds")


class ConnectionRateTests(SynchronousTestCase):
    def test_rateRefusesAndRefills(self) -> None:
        """Past the burst, connections from a source are refused until the
        bucket refills; other sources are unaffected."""
        clock = Clock()
        factory = EchoFactory(connectionRate=TokenBuckets(2, 3, clock), clock=clock)
        built = [factory.buildProtocolFor(client(), "l") for _ in range(5)]
        self.assertEqual([p is not None for p in built], [True] * 3 + [False] * 2)
        self.assertEqual(factory.stats.refusals, {"rate": 2})
        self.assertIsNotNone(factory.buildProtocolFor(client("10.0.0.2"), "l"))
        clock.advance(0.5)
        self.assertIsNotNone(factory.buildProtocolFor(client(), "l"))
        self.assertIsNone(factory.buildProtocolFor(client(), "l"))

    def test_givenSourceCounted(self) -> None:
        """A source key the caller gives (the lane's IPv4 listener gives the
        peer's host) is the one the rate and the per-source limit count."""
        clock = Clock()
        rate = TokenBuckets(1, 2, clock)
        factory = EchoFactory(maxPerSource=1, connectionRate=rate, clock=clock)
        first = factory.buildProtocolFor(client("10.0.0.1"), "l", source="shared")
        assert first is not None
        first.makeConnection(AbortableTransport())
        self.assertEqual(factory.stats.perSource, {"shared": 1})
        self.assertIsNone(factory.buildProtocolFor(client("10.0.0.2"), "l", source="shared"))
        self.assertIsNone(factory.buildProtocolFor(client("10.0.0.3"), "l", source="shared"))
        self.assertEqual(factory.stats.refusals, {"max-per-ip": 1, "rate": 1})
        self.assertIsNotNone(factory.buildProtocolFor(client("10.0.0.2"), "l"))

    def test_ipv6ByPrefixAndMappedAsIPv4(self) -> None:
        """IPv6 sources share a bucket per /64; ::ffff:127.0.0.1 and
        127.0.0.1 are one source."""
        clock = Clock()
        factory = EchoFactory(connectionRate=TokenBuckets(1, 1, clock), clock=clock)
        self.assertIsNotNone(factory.buildProtocolFor(IPv6Address("TCP", "2001:db8::1", 1), "l"))
        self.assertIsNone(factory.buildProtocolFor(IPv6Address("TCP", "2001:db8::2", 1), "l"))
        self.assertIsNotNone(factory.buildProtocolFor(client("127.0.0.1"), "l"))
        self.assertIsNone(factory.buildProtocolFor(IPv6Address("TCP", "::ffff:127.0.0.1", 1), "l"))

    def test_refusalLogThrottledPerSource(self) -> None:
        """A flood of refusals logs one line per source per second, then
        says how many it held back."""
        clock = Clock()
        factory = EchoFactory(connectionRate=TokenBuckets(1, 1, clock), clock=clock)
        with capturedLogs() as events:
            for _ in range(100):
                factory.buildProtocolFor(client(), "l")
            factory.buildProtocolFor(client("10.0.0.9"), "l")
            factory.buildProtocolFor(client("10.0.0.9"), "l")
            clock.advance(1.0)
            factory.buildProtocolFor(client(), "l")
            factory.buildProtocolFor(client(), "l")
        refused = [e for e in events if e.get("event") == "refused"]
        self.assertEqual(
            [(e["client_host"], e["unlogged"]) for e in refused],
            [("10.0.0.1", 0), ("10.0.0.9", 0), ("10.0.0.1", 98)],
        )
        self.assertEqual(factory.stats.refusals, {"rate": 101})

    def test_quietFloodStillReported(self) -> None:
        """When a flood of refusals stops, the running server logs how many
        it held back within two seconds, with the last one's reason."""
        clock = Clock()
        factory = EchoFactory(connectionRate=TokenBuckets(1, 1, clock), clock=clock)
        service = EchoService(factory, clock, 1.0)
        service.startService()
        with capturedLogs() as events:
            for _ in range(100):
                factory.buildProtocolFor(client(), "tcp:7")
            clock.advance(2.0)
        self.assertEqual(
            [(e["event"], e["unlogged"]) for e in events],
            [("refused", 0), ("unlogged", 98)],  # 99 refused: one line, 98 held
        )
        self.assertEqual(
            (events[1]["source"], events[1]["last"]), ("10.0.0.1", "refused on tcp:7: rate")
        )
        service.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_unixClientsNotRateLimited(self) -> None:
        """Clients without an IP have no source to rate-limit."""
        clock = Clock()
        factory = EchoFactory(connectionRate=TokenBuckets(1, 1, clock), clock=clock)
        for _ in range(5):
            self.assertIsNotNone(factory.buildProtocolFor(UNIXAddress(b"/s"), "unix:/s"))
