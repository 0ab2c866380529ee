"""
The probe's protocols on fake transports and a L{Clock}: what they send,
when, how they time out, and the one timer each keeps.
"""

from __future__ import annotations

import select
import socket

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from echotw.probe.clients import CHUNK, DatagramProbe, StreamProbe
from echotw.probe.pattern import StreamCheck
from echotw.probe.proxyheader import v1Header
from echotw.probe.stats import ProbeRun, Report, Thresholds
from echotw.probe.timing import Flow, Plan
from tests.support.fakes import FakeUDPPort


def plan(**changes: object) -> Plan:
    values: dict[str, object] = {
        "size": 100,
        "count": 3,
        "interval": 0.0,
        "timeout": 5.0,
        "seed": 11,
    }
    values.update(changes)
    return Plan(**values)  # type: ignore[arg-type]


class PausingTransport(StringTransport):
    """
    A transport that asks its streaming producer to pause once more than
    C{limit} bytes are queued, as Twisted's own do past their buffer size.
    """

    limit = 100_000

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and len(self.value()) > self.limit:
            self.producer.pauseProducing()


class StreamProbeTests(SynchronousTestCase):
    def connect(self, transport: StringTransport | None = None, **changes: object) -> None:
        self.clock = Clock()
        self.run = ProbeRun(self.clock.seconds)
        self.plan = plan(**changes)
        self.probe = StreamProbe(Flow(0, self.plan, self.run, self.clock, self.clock.seconds))
        self.transport = StringTransport() if transport is None else transport
        self.probe.makeConnection(self.transport)
        self.expected = StreamCheck(self.plan.seed, 0)
        self.done: list[None] = []
        self.probe.finished.addCallback(self.done.append)

    def sent(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def report(self) -> Report:
        return self.run.report("tcp", "x:7", 1, self.plan.size, self.plan.seed, Thresholds())

    def lose(self, reason: Failure) -> None:
        self.probe.connectionLost(reason)

    def test_pingPong(self) -> None:
        """Without an interval, each message goes out when the previous one
        came back whole; after the last, the probe closes and reports each
        round trip."""
        self.connect()
        for rtt in (0.010, 0.020, 0.030):
            message = self.sent()
            self.assertEqual(message, self.expected.nextBytes(100))
            self.clock.advance(rtt)
            self.probe.dataReceived(message[:40])
            self.assertEqual(self.transport.value(), b"")
            self.probe.dataReceived(message[40:])
        self.assertTrue(self.transport.disconnecting)
        self.lose(Failure(ConnectionDone()))
        self.assertEqual(self.done, [None])
        result = self.report()
        self.assertEqual(result.exitCode, 0)
        self.assertEqual((result.messagesEchoed, result.verifiedBytes), (3, 300))
        self.assertAlmostEqual(result.rtt["min"], 0.010)
        self.assertAlmostEqual(result.rtt["max"], 0.030)

    def test_tlsRoundTripsLeaveOutTheHandshake(self) -> None:
        """Over TLS the first message waits for the handshake, and its
        round trip is the echo's alone, however slow the handshake."""
        self.clock = Clock()
        self.run = ProbeRun(self.clock.seconds)
        self.plan = plan(count=2)
        self.probe = StreamProbe(
            Flow(0, self.plan, self.run, self.clock, self.clock.seconds), handshake=True
        )
        self.transport = StringTransport()
        self.probe.makeConnection(self.transport)
        self.assertEqual(self.transport.value(), b"")
        self.clock.advance(3.0)
        self.probe.handshakeCompleted()
        for _ in range(2):
            message = self.sent()
            self.clock.advance(0.010)
            self.probe.dataReceived(message)
        self.assertEqual(self.report().exitCode, 0)
        self.assertAlmostEqual(self.report().rtt["max"], 0.010)

    def test_tlsHandshakeTimesOut(self) -> None:
        """A handshake that never completes fails the connection after the
        timeout, saying so."""
        self.clock = Clock()
        self.run = ProbeRun(self.clock.seconds)
        self.plan = plan()
        self.probe = StreamProbe(
            Flow(0, self.plan, self.run, self.clock, self.clock.seconds), handshake=True
        )
        self.transport = StringTransport()
        self.probe.makeConnection(self.transport)
        self.clock.advance(self.plan.timeout)
        self.assertTrue(self.transport.disconnected)
        result = self.report()
        self.assertEqual(result.exitCode, 2)
        self.assertIn("TLS handshake not completed within 5 s", "\n".join(result.lines()))

    def test_closeThatNeverEndsIsDropped(self) -> None:
        """A close the server never completes (a TLS close_notify left
        unanswered) is dropped after the timeout, so the probe ends, and
        the verified run still counts as verified."""
        self.connect(count=1)
        self.probe.dataReceived(self.sent())
        self.assertTrue(self.transport.disconnecting)
        self.clock.advance(self.plan.timeout - 0.1)
        self.assertFalse(self.transport.disconnected)
        self.clock.advance(0.2)
        self.assertTrue(self.transport.disconnected)
        self.lose(Failure(ConnectionAborted()))
        self.assertEqual(self.done, [None])
        self.run.finish(allConcluded=True)
        result = self.report()
        self.assertEqual(result.exitCode, 0)
        # The wait for the close is not the run's time.
        self.assertEqual(result.elapsed, 0.0)

    def test_interval(self) -> None:
        """With an interval, messages go out on their timetable whether or
        not earlier ones came back, and one timer stands for all the
        messages in flight."""
        self.connect(interval=1.0, count=5)
        self.assertEqual(len(self.sent()), 100)
        for _ in range(4):
            self.clock.advance(1.0)
            self.assertEqual(len(self.sent()), 100)
        # Five messages in flight, no schedule left: one timeout timer.
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.probe.dataReceived(self.expected.nextBytes(500))
        self.assertTrue(self.transport.disconnecting)
        # Only the bound on the close is left, and it goes with the connection.
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.lose(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        trips = self.run.roundTrips
        self.assertEqual((trips.count, trips.minimum, trips.maximum), (5, 0.0, 4.0))

    def test_intervalWaitsForAPausedTransport(self) -> None:
        """Messages that fall due while the transport is paused (a path
        that stopped reading) are written once it resumes, in order, and
        their round trips run from when they were due; until then they
        take no memory and do not count as sent."""
        self.connect(interval=1.0, count=5)
        self.assertEqual(self.sent(), self.expected.nextBytes(100))
        self.probe.pauseProducing()
        self.clock.advance(4.0)
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.report().messagesSent, 1)
        self.probe.resumeProducing()
        self.assertEqual(self.sent(), self.expected.nextBytes(400))
        self.assertEqual(self.report().messagesSent, 5)
        self.clock.advance(0.5)
        self.probe.dataReceived(self.expectedEcho(500))
        trips = self.run.roundTrips
        self.assertEqual((trips.count, trips.minimum, trips.maximum), (5, 0.5, 4.5))

    def expectedEcho(self, length: int) -> bytes:
        return StreamCheck(self.plan.seed, 0).nextBytes(length)

    def test_largeMessageWrittenAsTheTransportTakesIt(self) -> None:
        """A message larger than the transport's buffer is written a chunk
        at a time while the transport takes more, not all at once."""
        self.connect(transport=PausingTransport(), size=1_000_000, count=1)
        queued = len(self.sent())
        self.assertLessEqual(queued, PausingTransport.limit + CHUNK)
        self.assertEqual(self.report().messagesSent, 0)
        written = queued
        while written < 1_000_000:
            self.probe.resumeProducing()
            chunk = len(self.sent())
            self.assertGreater(chunk, 0)
            self.assertLessEqual(chunk, PausingTransport.limit + CHUNK)
            written += chunk
        self.assertEqual(written, 1_000_000)
        self.assertEqual(self.report().messagesSent, 1)
        self.probe.dataReceived(self.expectedEcho(1_000_000))
        self.assertTrue(self.transport.disconnecting)
        self.assertIsNone(self.transport.producer)

    def test_duration(self) -> None:
        """With a stop time and no count, messages go out until then."""
        self.connect(interval=0.25, count=None, stopAt=1.0)
        self.clock.pump([0.05] * 40)
        self.assertEqual(len(self.sent()), 400)

    def test_timeout(self) -> None:
        """A message not back within the timeout fails the connection,
        which is aborted."""
        self.connect(timeout=2.0)
        message = self.sent()
        self.probe.dataReceived(message[:10])
        self.clock.advance(1.999)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.002)
        self.assertTrue(self.transport.disconnecting)
        self.lose(Failure(ConnectionLost()))
        result = self.report()
        self.assertEqual(result.exitCode, 2)
        self.assertEqual(result.failures, [(0, "timed out: byte offset 10 not echoed within 2 s")])

    def test_mismatch(self) -> None:
        """A wrong byte aborts the connection and names its offset."""
        self.connect()
        message = bytearray(self.sent())
        message[77] ^= 0xFF
        self.probe.dataReceived(bytes(message))
        self.assertTrue(self.transport.disconnecting)
        self.lose(Failure(ConnectionLost()))
        result = self.report()
        self.assertEqual((result.exitCode, result.mismatches), (2, 1))
        assert result.firstMismatch is not None
        self.assertEqual(result.firstMismatch[0], 0)
        self.assertEqual(result.firstMismatch[1].offset, 77)
        self.assertEqual(result.failures, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_peerClosesEarly(self) -> None:
        """A peer that closes with bytes outstanding is a missing-bytes
        mismatch at the first byte not echoed."""
        self.connect()
        message = self.sent()
        self.probe.dataReceived(message[:30])
        self.lose(Failure(ConnectionDone()))
        result = self.report()
        assert result.firstMismatch is not None
        self.assertEqual(result.firstMismatch[1].offset, 30)
        self.assertIn("missing", result.firstMismatch[1].detail)
        self.assertEqual(self.done, [None])

    def test_connectionLost(self) -> None:
        """A reset is a failure with its reason."""
        self.connect()
        self.lose(Failure(ConnectionLost("reset by peer")))
        [(index, reason)] = self.report().failures
        self.assertEqual(index, 0)
        self.assertTrue(reason.startswith("ConnectionLost: "), reason)
        self.assertIn("reset by peer", reason)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_proxyHeaderFirst(self) -> None:
        """With a header builder, the header goes out before the stream, made
        from the connection's own addresses."""
        self.clock = Clock()
        self.run = ProbeRun(self.clock.seconds)
        probe = StreamProbe(Flow(0, plan(), self.run, self.clock, self.clock.seconds), v1Header)
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 40000),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 7),
        )
        probe.makeConnection(transport)
        header = b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 7\r\n"
        self.assertEqual(transport.value()[: len(header)], header)
        self.assertEqual(transport.value()[len(header) :], StreamCheck(11, 0).nextBytes(100))


class DatagramProbeTests(SynchronousTestCase):
    def start(self, **changes: object) -> FakeUDPPort:
        self.clock = Clock()
        self.run = ProbeRun(self.clock.seconds)
        self.plan = plan(**changes)
        self.probe = DatagramProbe(
            Flow(0, self.plan, self.run, self.clock, self.clock.seconds), "127.0.0.1", 7
        )
        port = FakeUDPPort(protocol=self.probe)
        self.addCleanup(port.socket.close)
        self.probe.makeConnection(port)  # type: ignore[arg-type]
        self.done: list[None] = []
        self.probe.finished.addCallback(self.done.append)
        return port

    def report(self) -> Report:
        return self.run.report("udp", "x:7", 1, self.plan.size, 11, Thresholds())

    def test_echoes(self) -> None:
        """Each datagram is sent when the previous one came back; the flow
        ends after the count."""
        port = self.start()
        self.assertEqual(port.connected, ("127.0.0.1", 7))
        for i in range(3):
            self.assertEqual(len(port.written), i + 1)
            self.clock.advance(0.01)
            self.probe.datagramReceived(port.written[i], ("127.0.0.1", 7))
        self.assertTrue(port.stopped)
        self.assertEqual(self.done, [None])
        result = self.report()
        self.assertEqual((result.exitCode, result.messagesEchoed, result.lost), (0, 3, 0))

    def test_lossAndLate(self) -> None:
        """A datagram not back within the timeout is lost, not a mismatch,
        and the next one goes out; if it turns up later it is late."""
        port = self.start(timeout=1.0)
        self.clock.advance(1.0)
        self.assertEqual(len(port.written), 2)
        self.probe.datagramReceived(port.written[0], None)
        self.probe.datagramReceived(port.written[1], None)
        self.probe.datagramReceived(port.written[2], None)
        result = self.report()
        self.assertEqual((result.lost, result.late, result.mismatches), (1, 1, 0))
        self.assertEqual(result.exitCode, 1)
        self.assertEqual(result.loss, 1 / 3)

    def test_intervalOneTimer(self) -> None:
        """On a timetable many datagrams are in flight, under one timeout
        timer; they are lost in order as their time runs out."""
        # Binary fractions, so the clock's sums are exact.
        port = self.start(interval=0.125, count=10, timeout=0.5)
        self.clock.pump([0.0625] * 19)
        self.assertEqual(len(port.written), 10)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(self.report().lost, 6)  # sent at 0 ... 0.625, due by 1.1875
        self.clock.advance(0.0625)
        self.assertEqual(self.report().lost, 7)  # and the one sent at 0.75
        self.clock.advance(0.0625)
        self.assertEqual(self.report().lost, 7)
        self.probe.datagramReceived(port.written[9], None)
        self.clock.pump([0.125] * 10)
        result = self.report()
        self.assertEqual((result.lost, result.messagesEchoed), (9, 1))
        self.assertEqual(self.done, [None])

    def test_duplicateAndCorrupt(self) -> None:
        """A duplicate and a corrupt echo are mismatches (exit 2)."""
        port = self.start(interval=0.1, count=2)
        self.clock.advance(0.1)
        first, second = port.written
        self.probe.datagramReceived(first, None)
        self.probe.datagramReceived(first, None)
        self.probe.datagramReceived(second[:-1] + bytes([second[-1] ^ 1]), None)
        result = self.report()
        self.assertEqual((result.duplicated, result.mismatches, result.exitCode), (1, 2, 2))

    def test_truncatedReplies(self) -> None:
        """A server that shortens every reply: each datagram came back, so
        none is lost and the flow does not say that no echo came back;
        each is a mismatch (exit 2)."""
        port = self.start(count=3, timeout=1.0)
        for i in range(3):
            self.assertEqual(len(port.written), i + 1)
            self.probe.datagramReceived(port.written[i][:40], None)
        self.assertEqual(self.done, [None])
        result = self.report()
        self.assertEqual((result.mismatches, result.lost, result.failures), (3, 0, []))
        self.assertEqual(result.exitCode, 2)
        assert result.firstMismatch is not None
        self.assertIn("40 bytes came back of 100", result.firstMismatch[1].describe())

    def test_nothingBack(self) -> None:
        """A flow that got no echo at all failed: nothing answers there."""
        self.start(count=2, timeout=0.5)
        self.clock.pump([0.5, 0.5])
        result = self.report()
        self.assertEqual(result.failures, [(0, "no echo came back within 0.5 s")])
        self.assertEqual(self.done, [None])

    def test_refused(self) -> None:
        """ICMP port unreachable, as reported by the reactor, fails the flow."""
        port = self.start()
        self.probe.connectionRefused()
        self.assertTrue(port.stopped)
        self.assertEqual(
            self.report().failures, [(0, "connection refused: nothing listens on that UDP port")]
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closedBySocketError(self) -> None:
        """When the reactor closes the port over a socket error instead, the
        error is read from the socket and reported."""
        port = self.start()
        # A connected UDP socket to a closed loopback port holds ECONNREFUSED.
        listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        listener.bind(("127.0.0.1", 0))
        address = listener.getsockname()
        listener.close()
        port.socket.connect(address)
        port.socket.send(b"x")
        # The pending error makes the socket readable; reading it would clear it.
        readable, _, _ = select.select([port.socket], [], [], 5.0)
        if not readable:
            self.skipTest("no ICMP port unreachable on loopback")
        self.probe.doStop()
        self.assertEqual(
            self.report().failures, [(0, "connection refused: nothing listens on that UDP port")]
        )
