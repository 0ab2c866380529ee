# -*- test-case-name: tests.unit.test_counters -*-
"""
The counters metrics report, as one value that can cross a process
boundary, and their sum over the workers of C{--workers N}.

A process's L{EchoFactory} keeps its live counts in one L{ConnectionStats}
(its limits read them too); L{ConnectionStats.counters} reads them, as a
whole, into a frozen L{Counters}.  A worker sends its
L{Counters} to the supervisor as one line of JSON about once a second
(L{Counters.toJSON}), and the supervisor's L{WorkerCounters} keeps the
latest from each worker.  The sum it serves never goes backwards, which a
Prometheus counter must not (a drop reads as a reset): when a worker dies,
its last counts are kept as a base, and the worker started in its place
counts on top of that base.  What a worker counted after its last report
and before it died is lost: at most about a second of its counts.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from time import monotonic
from typing import Any, Protocol

DURATION_BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 600.0, 3600.0)
"""Upper bounds (seconds) of the connection duration histogram."""

_BUCKETS = len(DURATION_BUCKETS) + 1


def _add(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    out = dict(a)
    for key, value in b.items():
        out[key] = out.get(key, 0) + value
    return out


@dataclass(frozen=True)
class Counters:
    """
    What the metrics endpoint serves about TCP connections.

    @ivar openByListener: connections open now, per listener (a gauge).
    @ivar totalByListener: connections accepted, per listener.
    @ivar refusals: connections refused, per reason.
    @ivar bytesSent: bytes echoed (handed to the kernel) by closed and
        open connections.
    @ivar bytesDiscarded: bytes received and not echoed because the server
        was closing their connection.
    @ivar durationCounts: closed connections per duration bucket
        (L{DURATION_BUCKETS}, and one more for longer ones).
    @ivar durationSum: the closed connections' durations added up.
    """

    openByListener: Mapping[str, int] = field(default_factory=dict)
    totalByListener: Mapping[str, int] = field(default_factory=dict)
    refusals: Mapping[str, int] = field(default_factory=dict)
    bytesSent: int = 0
    bytesDiscarded: int = 0
    durationCounts: tuple[int, ...] = (0,) * _BUCKETS
    durationSum: float = 0.0

    @property
    def open(self) -> int:
        return sum(self.openByListener.values())

    @property
    def total(self) -> int:
        return sum(self.totalByListener.values())

    def __add__(self, other: Counters) -> Counters:
        return Counters(
            openByListener=_add(self.openByListener, other.openByListener),
            totalByListener=_add(self.totalByListener, other.totalByListener),
            refusals=_add(self.refusals, other.refusals),
            bytesSent=self.bytesSent + other.bytesSent,
            bytesDiscarded=self.bytesDiscarded + other.bytesDiscarded,
            durationCounts=tuple(
                a + b for a, b in zip(self.durationCounts, other.durationCounts, strict=True)
            ),
            durationSum=self.durationSum + other.durationSum,
        )

    def closed(self) -> Counters:
        """
        These counters once their process has ended: nothing open.
        """
        return replace(self, openByListener={k: 0 for k in self.openByListener})

    def toJSON(self) -> bytes:
        """
        One line of JSON, newline included.
        """
        record = {
            "open": self.openByListener,
            "total": self.totalByListener,
            "refused": self.refusals,
            "bytes": self.bytesSent,
            "discarded": self.bytesDiscarded,
            "durations": self.durationCounts,
            "durationSum": self.durationSum,
        }
        return json.dumps(record, separators=(",", ":")).encode("utf-8") + b"\n"

    @classmethod
    def fromJSON(cls, line: bytes) -> Counters:
        """
        Read L{toJSON}'s line back.

        @raise ValueError: if it is not such a line.
        """
        try:
            record: Any = json.loads(line)
            counters = cls(
                openByListener=_counts(record["open"]),
                totalByListener=_counts(record["total"]),
                refusals=_counts(record["refused"]),
                bytesSent=int(record["bytes"]),
                bytesDiscarded=int(record["discarded"]),
                durationCounts=tuple(int(n) for n in record["durations"]),
                durationSum=float(record["durationSum"]),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not a counters record: {e}") from None
        if len(counters.durationCounts) != _BUCKETS:
            raise ValueError("not a counters record: wrong number of duration buckets")
        return counters


def _counts(value: Any) -> dict[str, int]:
    return {str(k): int(v) for k, v in value.items()}


class OpenConnection(Protocol):
    """
    What L{ConnectionStats} reads of an open connection (an
    L{echotw.protocol.EchoProtocol}).
    """

    listener: str
    source: str | None
    startedAt: float
    bytesReceived: int
    bytesUnsent: int
    bytesDiscarded: int

    def pendingBytes(self) -> int: ...


class ConnectionStats:
    """
    The live counts of one process's TCP connections: kept by its
    L{EchoFactory} as connections open, close and are refused, read by its
    limits (open, pending and per-source counts) and, as a whole, by metrics
    and worker reports (L{counters}).

    @ivar pendingConnections: connections accepted but not verified yet
        (PROXY listeners waiting for the header), which count against
        C{--max-connections} too.
    @ivar perSource: open connections by source key
        (L{echotw.rules.addresses.sourceKey}).
    @ivar refusals: refused connections since start, by reason.
    @ivar sentClosed: bytes echoed (handed to the kernel) by connections
        that have closed.
    @ivar discardedClosed: bytes received and not echoed by connections
        that have closed, because the server was closing them.
    @ivar protocols: the open connections, which the open counts are read
        from (L{openConnections}, L{openByListener}): a connection opens
        and closes with one count fewer to keep.
    @ivar totalByListener: accepted connections per listener name.
    @ivar durationCounts: closed connections per L{DURATION_BUCKETS} bucket
        (one more for longer ones); with C{durationSum}, a histogram that
        metrics can read without costing anything per connection.
    """

    def __init__(self) -> None:
        self.pendingConnections = 0
        self.perSource: dict[str, int] = {}
        self.refusals: dict[str, int] = {}
        self.sentClosed = 0
        self.discardedClosed = 0
        self.protocols: set[Any] = set()
        self.totalByListener: dict[str, int] = {}
        self.durationCounts = [0] * _BUCKETS
        self.durationSum = 0.0

    @property
    def openConnections(self) -> int:
        """
        Connections open now.
        """
        return len(self.protocols)

    @property
    def connectionsTotal(self) -> int:
        """
        Connections accepted since start.
        """
        return sum(self.totalByListener.values())

    def openByListener(self) -> dict[str, int]:
        """
        Connections open now per listener name, every listener that has
        accepted one included: for scrapes, it costs a step per open
        connection.
        """
        counts = dict.fromkeys(self.totalByListener, 0)
        for p in list(self.protocols):
            counts[p.listener] += 1
        return counts

    def opened(self, p: OpenConnection) -> None:
        """
        Count a connection that has just been connected.
        """
        self.protocols.add(p)
        listener = p.listener
        self.totalByListener[listener] = self.totalByListener.get(listener, 0) + 1
        source = p.source
        if source is not None:
            self.perSource[source] = self.perSource.get(source, 0) + 1

    def closed(
        self, p: OpenConnection, now: float | None = None, sent: int | None = None
    ) -> tuple[int, float] | None:
        """
        Release a closed connection's counts; return the bytes it sent
        (C{sent}, by default its bytes received less those unsent) and how
        long it lasted (until C{now}, by C{time.monotonic}; by default,
        now), or L{None} if it was not counted as open.
        """
        try:
            self.protocols.remove(p)
        except KeyError:
            return None
        source = p.source
        if source is not None:
            left = self.perSource[source] - 1
            if left:
                self.perSource[source] = left
            else:
                del self.perSource[source]
        if sent is None:
            sent = p.bytesReceived - p.bytesUnsent
        self.sentClosed += sent
        self.discardedClosed += p.bytesDiscarded
        duration = (monotonic() if now is None else now) - p.startedAt
        self.durationCounts[bisect_left(DURATION_BUCKETS, duration)] += 1
        self.durationSum += duration
        return sent, duration

    def refused(self, reason: str) -> None:
        """
        Count a connection refused for C{reason}.
        """
        self.refusals[reason] = self.refusals.get(reason, 0) + 1

    def inUse(self) -> int:
        """
        This process's connections that count against C{--max-connections}:
        open and pending.
        """
        return len(self.protocols) + self.pendingConnections

    def sentBytes(self) -> int:
        """
        Bytes echoed so far, closed and open connections together: handed to
        the kernel, not merely received.
        """
        open_ = sum(p.bytesReceived - p.pendingBytes() for p in list(self.protocols))
        return self.sentClosed + open_

    def discardedBytes(self) -> int:
        """
        Bytes received and not echoed because the server was closing their
        connection, closed and open connections together.
        """
        return self.discardedClosed + sum(p.bytesDiscarded for p in list(self.protocols))

    def counters(self) -> Counters:
        """
        These counts now, as one frozen value.  The open connections' bytes
        are read too, so this costs a little per open connection: it is for
        scrapes and reports, not for the echo path.
        """
        return Counters(
            openByListener=self.openByListener(),
            totalByListener=dict(self.totalByListener),
            refusals=dict(self.refusals),
            bytesSent=self.sentBytes(),
            bytesDiscarded=self.discardedBytes(),
            durationCounts=tuple(self.durationCounts),
            durationSum=self.durationSum,
        )


class HasStats(Protocol):
    """
    What keeps a L{ConnectionStats}: an L{echotw.factory.EchoFactory}.
    """

    @property
    def stats(self) -> ConnectionStats: ...


def countersOf(factory: HasStats) -> Counters:
    """
    A factory's counters now (see L{ConnectionStats.counters}).
    """
    return factory.stats.counters()


class CounterSource(Protocol):
    """
    Where the metrics endpoint reads its counters: one process's factory
    (L{FactoryCounters}) or the sum over workers (L{WorkerCounters}).
    """

    def counters(self) -> Counters: ...

    def workers(self) -> Mapping[int, WorkerSummary] | None: ...


@dataclass(frozen=True)
class WorkerSummary:
    """
    One worker's part, for metrics labelled by worker: connections open
    now and accepted since the server started, and how often the worker
    was restarted.
    """

    open: int = 0
    total: int = 0
    restarts: int = 0


class FactoryCounters:
    """
    The counters of a server running in one process.
    """

    def __init__(self, factory: HasStats) -> None:
        self.factory = factory

    def counters(self) -> Counters:
        return self.factory.stats.counters()

    def workers(self) -> None:
        return None


class WorkerCounters:
    """
    The supervisor's sum of its workers' reports (see the module docstring).
    """

    def __init__(self) -> None:
        self._live: dict[int, Counters] = {}
        self._base: dict[int, Counters] = {}
        self._restarts: dict[int, int] = {}

    def report(self, index: int, line: bytes) -> bool:
        """
        Take worker C{index}'s latest report; return whether it was one.
        """
        try:
            self._live[index] = Counters.fromJSON(line)
        except ValueError:
            return False
        return True

    def ended(self, index: int, restarting: bool = True) -> None:
        """
        Worker C{index} has exited: its last report becomes part of the base
        its successor counts on (C{restarting}: it is to be replaced).
        """
        last = self._live.pop(index, None)
        if last is not None:
            self._base[index] = self._base.get(index, Counters()) + last.closed()
        if restarting:
            self._restarts[index] = self._restarts.get(index, 0) + 1

    def _byWorker(self) -> dict[int, Counters]:
        out = dict(self._base)
        for index, live in self._live.items():
            out[index] = out[index] + live if index in out else live
        return out

    def counters(self) -> Counters:
        total = Counters()
        for counters in self._byWorker().values():
            total = total + counters
        return total

    def workers(self) -> dict[int, WorkerSummary]:
        byWorker = self._byWorker()
        empty = Counters()
        return {
            index: WorkerSummary(
                byWorker.get(index, empty).open,
                byWorker.get(index, empty).total,
                self._restarts.get(index, 0),
            )
            for index in sorted(byWorker.keys() | self._restarts.keys())
        }
