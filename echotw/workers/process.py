# -*- test-case-name: tests.unit.test_workerpool -*-
"""
One worker process of C{--workers N} as its supervisor sees it: the
signals it is sent (held until it is ready for them), its counter reports,
its log records, its silence (L{echotw.workers.watchdog}) and its end.
"""

from __future__ import annotations

import signal
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from echotw.interfaces import IServerReactor
from echotw.workers.contract import READY
from echotw.workers.logs import relayRecords
from echotw.workers.watchdog import Watchdog


class Reports(Protocol):
    def report(self, index: int, line: bytes) -> object: ...


class Pool(Protocol):
    """
    What a worker process needs of the pool that started it.
    """

    reactor: IServerReactor
    workerTimeout: float

    @property
    def counters(self) -> Reports: ...

    def workerTimedOut(self, worker: WorkerProcess) -> None: ...

    def workerEnded(self, worker: WorkerProcess, reason: Failure) -> None: ...


class WorkerProcess(ProcessProtocol):
    """
    One worker process: relays its log records (when it does not write
    them itself) and takes its counter reports.
    """

    def __init__(self, pool: Pool, index: int, reportFD: int) -> None:
        self.pool = pool
        self.index = index
        self.reportFD = reportFD
        self.ended: Deferred[None] = Deferred()
        self.pid: int | None = None
        self.watchdog = Watchdog(pool.reactor, pool.workerTimeout, self.timedOut)
        self.ready = False
        self.held: list[int] = []
        self._logs = b""
        self._reports = b""

    def signal(self, sig: int) -> None:
        """
        Send C{sig} now if the worker is ready for it, else once it is
        (each signal once, in order); SIGKILL, which needs no handler, is
        always sent now.
        """
        if not self.ready and sig != signal.SIGKILL:
            if sig not in self.held:
                self.held.append(sig)
            return
        try:
            self.transport.signalProcess(sig)  # type: ignore[union-attr]
        except Exception:
            pass  # it has just exited

    def timedOut(self) -> None:
        """
        Silent for too long (see L{echotw.workers.watchdog}): kill it, so that
        another starts in its place.
        """
        self.pool.workerTimedOut(self)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == self.reportFD:
            self.watchdog.heard()
            *lines, self._reports = (self._reports + data).split(b"\n")
            if READY in lines and not self.ready:
                self.ready = True
                held, self.held = self.held, []
                for sig in held:
                    self.signal(sig)
            reports = [line for line in lines if line and line != READY]
            if reports:
                self.pool.counters.report(self.index, reports[-1])
        elif childFD == 1:
            events, self._logs = relayRecords(self._logs, data)
            for event in events:
                globalLogPublisher(event)

    def processEnded(self, reason: Failure) -> None:
        self.watchdog.stop()
        events, _ = relayRecords(self._logs, b"\n")
        for event in events:
            globalLogPublisher(event)
        self.ended.callback(None)
        self.pool.workerEnded(self, reason)
