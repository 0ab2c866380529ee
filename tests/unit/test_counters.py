"""
Tests for L{echotw.counters}: a process's counters as one value that
survives the trip to the supervisor, and the supervisor's sum over its
workers, which never goes backwards when a worker restarts.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from echotw.counters import (
    DURATION_BUCKETS,
    ConnectionStats,
    Counters,
    WorkerCounters,
    WorkerSummary,
    countersOf,
)
from echotw.factory import EchoFactory


def counters(open: int = 0, total: int = 0, refused: int = 0, echoed: int = 0) -> Counters:
    durations = [0] * (len(DURATION_BUCKETS) + 1)
    durations[2] = max(0, total - open)
    return Counters(
        openByListener={"tcp:7": open},
        totalByListener={"tcp:7": total},
        refusals={"rate": refused} if refused else {},
        bytesSent=echoed,
        durationCounts=tuple(durations),
        durationSum=0.5 * (total - open),
    )


def monotonic(before: Counters, after: Counters) -> bool:
    """Whether no counter (gauges aside) of C{after} is below C{before}'s."""
    return (
        all(after.totalByListener.get(k, 0) >= v for k, v in before.totalByListener.items())
        and all(after.refusals.get(k, 0) >= v for k, v in before.refusals.items())
        and after.bytesSent >= before.bytesSent
        and all(a >= b for a, b in zip(after.durationCounts, before.durationCounts, strict=True))
        and after.durationSum >= before.durationSum
    )


class CountersTests(SynchronousTestCase):
    def test_jsonRoundTrip(self) -> None:
        """A report read back is the counters sent, on one line."""
        sent = counters(open=2, total=9, refused=3, echoed=1234)
        line = sent.toJSON()
        self.assertEqual(line.count(b"\n"), 1)
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(Counters.fromJSON(line), sent)

    def test_badReports(self) -> None:
        """Anything but a report is a ValueError."""
        for line in [b"", b"{}", b"[1]", b'{"open": 1}', counters().toJSON()[:-5]]:
            with self.assertRaises(ValueError, msg=line):
                Counters.fromJSON(line)
        short = counters().toJSON().replace(b'"durations":[0,', b'"durations":[')
        with self.assertRaises(ValueError):
            Counters.fromJSON(short)

    def test_ofFactory(self) -> None:
        """A factory's counters include what open connections echoed so far."""
        factory = EchoFactory(maxPerSource=1)
        address = IPv4Address("TCP", "10.0.0.1", 1)
        first = factory.buildProtocolFor(address, "tcp:7")
        assert first is not None
        first.makeConnection(StringTransport())
        first.dataReceived(b"abc")
        self.assertIsNone(factory.buildProtocolFor(address, "tcp:7"))
        now = countersOf(factory)
        self.assertEqual(
            (now.openByListener, now.totalByListener, now.refusals, now.bytesSent),
            ({"tcp:7": 1}, {"tcp:7": 1}, {"max-per-ip": 1}, 3),
        )
        first.connectionLost(Failure(ConnectionDone()))
        closed = countersOf(factory)
        self.assertEqual((closed.open, closed.bytesSent, sum(closed.durationCounts)), (0, 3, 1))


class ConnectionStatsTests(SynchronousTestCase):
    def test_openedAndClosed(self) -> None:
        """The live counts follow connections open and closed, a closed
        connection is released once, and their value for metrics is read
        from them as a whole."""
        stats = ConnectionStats()
        a, b = EchoFactory().protocol(), EchoFactory().protocol()
        for p, listener, source in ((a, "tcp:7", "10.0.0.1"), (b, "tls:7", None)):
            p.listener, p.source = listener, source
            stats.opened(p)
        a.bytesReceived, a.bytesUnsent, a.bytesDiscarded = 10, 4, 2
        stats.refused("rate")
        self.assertEqual((stats.openConnections, stats.connectionsTotal), (2, 2))
        self.assertEqual(stats.perSource, {"10.0.0.1": 1})
        closed = stats.closed(a)
        assert closed is not None
        self.assertEqual(closed[0], 6)
        self.assertIsNone(stats.closed(a))
        self.assertEqual(
            stats.counters(),
            Counters(
                openByListener={"tcp:7": 0, "tls:7": 1},
                totalByListener={"tcp:7": 1, "tls:7": 1},
                refusals={"rate": 1},
                bytesSent=6,
                bytesDiscarded=2,
                durationCounts=tuple(stats.durationCounts),
                durationSum=stats.durationSum,
            ),
        )
        self.assertEqual(
            (stats.openConnections, stats.perSource, sum(stats.durationCounts)), (1, {}, 1)
        )

    def test_durationUntilGivenTime(self) -> None:
        """A connection's duration runs from its start to the end its
        caller gives (the lane's time of the wake-up that saw it end), and
        lands in the histogram's bucket for it; the bytes it sent are those
        the caller gives (the lane's count), not worked out again."""
        stats = ConnectionStats()
        p = EchoFactory().protocol()
        p.startedAt = 100.0
        stats.opened(p)
        p.bytesReceived = 9
        closed = stats.closed(p, 100.5, 7)
        self.assertEqual(closed, (7, 0.5))
        self.assertEqual(stats.sentClosed, 7)
        self.assertEqual(stats.durationSum, 0.5)
        self.assertEqual(stats.durationCounts[DURATION_BUCKETS.index(1.0)], 1)


class WorkerCountersTests(SynchronousTestCase):
    def test_sumOfWorkers(self) -> None:
        """The sum is every worker's latest report added up."""
        workers = WorkerCounters()
        workers.report(0, counters(open=1, total=5, echoed=10).toJSON())
        workers.report(1, counters(open=2, total=3, refused=1, echoed=7).toJSON())
        workers.report(0, counters(open=2, total=6, echoed=12).toJSON())
        total = workers.counters()
        self.assertEqual((total.open, total.total, total.bytesSent), (4, 9, 19))
        self.assertEqual(total.refusals, {"rate": 1})
        self.assertEqual(workers.workers(), {0: WorkerSummary(2, 6, 0), 1: WorkerSummary(2, 3, 0)})

    def test_restartKeepsCountersGoingUp(self) -> None:
        """A worker that dies and is replaced by one counting from zero makes
        no counter go backwards: its last report is kept as a base, its open
        connections leave the gauge, and the restart is counted."""
        workers = WorkerCounters()
        workers.report(0, counters(open=3, total=10, refused=2, echoed=100).toJSON())
        workers.report(1, counters(open=1, total=4, echoed=40).toJSON())
        before = workers.counters()
        workers.ended(0)
        afterDeath = workers.counters()
        self.assertTrue(monotonic(before, afterDeath))
        self.assertEqual(afterDeath.open, 1)
        workers.report(0, counters(open=1, total=1, echoed=5).toJSON())
        afterRestart = workers.counters()
        self.assertTrue(monotonic(afterDeath, afterRestart))
        self.assertEqual(
            (afterRestart.open, afterRestart.total, afterRestart.bytesSent), (2, 15, 145)
        )
        self.assertEqual(afterRestart.refusals, {"rate": 2})
        self.assertEqual(workers.workers()[0], WorkerSummary(open=1, total=11, restarts=1))
        workers.ended(0)
        workers.report(0, counters(total=2, echoed=1).toJSON())
        self.assertEqual(workers.workers()[0], WorkerSummary(open=0, total=13, restarts=2))
        self.assertTrue(monotonic(afterRestart, workers.counters()))

    def test_stopIsNoRestart(self) -> None:
        """A worker ended by a stop keeps its counts and is no restart."""
        workers = WorkerCounters()
        workers.report(0, counters(open=1, total=2).toJSON())
        workers.ended(0, restarting=False)
        self.assertEqual(workers.workers(), {0: WorkerSummary(0, 2, 0)})

    def test_badReportIgnored(self) -> None:
        """A line that is not a report changes nothing."""
        workers = WorkerCounters()
        workers.report(0, counters(total=2).toJSON())
        self.assertFalse(workers.report(0, b"garbage"))
        self.assertEqual(workers.counters().total, 2)
