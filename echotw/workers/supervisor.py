# -*- test-case-name: tests.unit.test_workerpool -*-
"""
The supervisor of C{--workers N}: it holds the listening sockets
(L{echotw.workers.listeners}) while worker processes serve them, starts each
worker as L{echotw.workers.contract} says, restarts one that dies or cannot
be started after a delay that grows while it keeps dying (L{Backoff}),
replaces one silent for C{--worker-timeout} (L{echotw.workers.watchdog}), passes
SIGHUP on once its own reload succeeded, and drains them on SIGTERM.  What
that means for an operator is in C{docs/deployment.md}, "Many cores".
"""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from echotw import loglevel
from echotw.counters import WorkerCounters
from echotw.interfaces import IServerReactor
from echotw.signals import STOP_NOW_SIGNAL
from echotw.workers.command import workerCommand
from echotw.workers.contract import HELD_SIGNALS, handover
from echotw.workers.listeners import SharedListeners
from echotw.workers.logs import RELAY, LogOutput
from echotw.workers.process import WorkerProcess
from echotw.workers.rulesnapshot import SupervisorRuleSource
from echotw.workers.sharedcount import SharedCount, createSharedFile
from echotw.workers.watchdog import DEFAULT_WORKER_TIMEOUT

RESTART_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)
"""Seconds before restarting a worker that died, growing while it keeps dying."""
STOP_NOW_GRACE = 5.0
"""Seconds workers get to stop once told to stop at once, before they are killed."""
HEALTHY_AFTER = 30.0
"""A worker that ran this many seconds before dying is restarted after the shortest delay."""


class Backoff:
    """
    The restart delays of one worker's place: L{RESTART_DELAYS} in turn
    while it keeps dying, from the first again once a worker ran
    C{healthyAfter} seconds.
    """

    def __init__(
        self, delays: tuple[float, ...] = RESTART_DELAYS, healthyAfter: float = HEALTHY_AFTER
    ):
        self.delays = delays
        self.healthyAfter = healthyAfter
        self.failures = 0
        self.startedAt: float | None = None

    def started(self, now: float) -> None:
        self.startedAt = now

    def died(self, now: float) -> float:
        """
        The worker died at C{now}: the seconds to wait before the next.
        """
        if self.startedAt is not None and now - self.startedAt >= self.healthyAfter:
            self.failures = 0
        self.startedAt = None
        delay = self.delays[min(self.failures, len(self.delays) - 1)]
        self.failures += 1
        return delay


class WorkerPool(Service):
    """
    Start, watch, restart and stop the worker processes.

    @ivar counters: the workers' counters summed, for metrics.
    """

    _log = Logger(observer=loglevel.observer)

    def __init__(
        self,
        reactor: IServerReactor,
        shared: SharedListeners,
        workers: int,
        arguments: list[str],
        maxConnections: int,
        shutdownTimeout: float,
        logOutput: LogOutput = RELAY,
        counters: WorkerCounters | None = None,
        drainDelay: float = 0,
        rules: SupervisorRuleSource | None = None,
        workerTimeout: float = DEFAULT_WORKER_TIMEOUT,
    ) -> None:
        self.reactor = reactor
        self.workerTimeout = workerTimeout
        self.rules = rules
        self._forwarding: Deferred[bool] | None = None
        self.shared = shared
        self.count = workers
        self.arguments = arguments
        self.maxConnections = maxConnections
        self.shutdownTimeout = shutdownTimeout
        self.drainDelay = drainDelay
        self.logOutput = logOutput
        self.counters = counters if counters is not None else WorkerCounters()
        self.workers: dict[int, WorkerProcess] = {}
        self.backoff = {index: Backoff() for index in range(workers)}
        self.restarts: dict[int, IDelayedCall] = {}
        self.stopping = False
        self.countFD: int | None = None
        self.serverCount: SharedCount | None = None
        self._killer: IDelayedCall | None = None

    def startService(self) -> None:
        Service.startService(self)
        self.stopping = False
        if self.maxConnections:
            self.countFD = createSharedFile(self.count)
            self.serverCount = SharedCount(self.countFD, self.count)
        if self.rules is not None:
            try:
                self.rules.writeSnapshot()
            except OSError as e:
                self.rules.stopWriting()
                self._log.warn(
                    "Cannot write the rules for the workers ({why}); each reads the rule"
                    " files itself",
                    event="rules-snapshot-failed",
                    why=e.strerror or str(e),
                )
        for index in range(self.count):
            self._respawn(index)

    @property
    def rulesFD(self) -> int | None:
        """
        The file the workers read the rules from, or L{None} when they read the
        rule files themselves (none given, or no snapshot could be written).
        """
        return self.rules.snapshot.fd if self.rules is not None else None

    def pids(self) -> dict[int, int]:
        """
        The running workers' pids, by index (for their processes' metrics).
        """
        return {i: w.pid for i, w in self.workers.items() if w.pid is not None}

    def anyReady(self) -> bool:
        """
        Whether at least one worker is up to serve (for C{/readyz}).
        """
        return any(worker.ready for worker in self.workers.values())

    def forwardHangup(self) -> None:
        """
        SIGHUP: each worker reloads its rules, reporting late meanwhile,
        so its watchdog allows as long as for a start.
        """
        for worker in list(self.workers.values()):
            worker.watchdog.reloading()
        self.signalAll(signal.SIGHUP)

    def forwardAfter(self, reloading: Deferred[bool]) -> None:
        """
        Pass SIGHUP on to the workers once the supervisor's own reload
        succeeded (and wrote the rules they read); after one that failed
        they keep theirs, which are the supervisor's.  Requests that joined
        one reload pass it on once.
        """
        if reloading is self._forwarding:
            return
        self._forwarding = reloading

        def forward(reloaded: bool) -> bool:
            if reloaded and not self.stopping:
                self.forwardHangup()
            return reloaded

        reloading.addCallback(forward)

    def stopNow(self) -> None:
        """
        A second SIGTERM: the workers, draining already, stop at once too;
        any still running L{STOP_NOW_GRACE} seconds later (one stopped with
        SIGSTOP, say) is killed.
        """
        self.signalAll(STOP_NOW_SIGNAL)
        killer = self._killer
        if killer is not None and killer.active():
            due = self.reactor.seconds() + STOP_NOW_GRACE
            if killer.getTime() > due:
                killer.reset(STOP_NOW_GRACE)

    def signalAll(self, sig: int) -> None:
        for worker in list(self.workers.values()):
            worker.signal(sig)

    def spawn(self, index: int) -> None:
        """
        Start worker C{index} on its sockets.

        @raise OSError: if the process cannot be started.
        """
        handed = handover(
            index,
            self.count,
            self.shared.socketsFor(index),
            log=self.logOutput.describe(),
            logFD=self.logOutput.fd,
            countFD=self.countFD,
            rulesFD=self.rulesFD,
            reactor=type(self.reactor).__module__,
            supervisor=os.getpid(),
        )
        argv, extra = workerCommand(self.arguments)
        env = {**os.environ, **handed.environment, **extra}
        worker = WorkerProcess(self, index, handed.reportFD)
        # The child inherits the mask; the supervisor's own signals wait a moment.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        try:
            transport = self.reactor.spawnProcess(
                worker,
                argv[0],
                argv,
                env=env,
                childFDs=handed.childFDs,
            )
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.workers[index] = worker
        worker.pid = transport.pid
        if not self.stopping:
            worker.watchdog.start()
        self.backoff[index].started(self.reactor.seconds())
        self._log.info(
            "Started worker {index} (pid {pid})",
            event="worker-started",
            index=index,
            pid=transport.pid,
        )

    def workerTimedOut(self, worker: WorkerProcess) -> None:
        """
        C{worker} sent nothing for L{workerTimeout} seconds: kill it; its
        end restarts it as any other.
        """
        if self.stopping or self.workers.get(worker.index) is not worker:
            return
        self._log.warn(
            "Worker {index} (pid {pid}) sent nothing for {timeout}s; killing it",
            event="worker-timeout",
            index=worker.index,
            pid=worker.pid,
            timeout=self.workerTimeout,
        )
        worker.signal(signal.SIGKILL)

    def workerEnded(self, worker: WorkerProcess, reason: Failure) -> None:
        index = worker.index
        if self.workers.get(index) is worker:
            del self.workers[index]
        if self.serverCount is not None:
            self.serverCount.clear(index)
        self.counters.ended(index, restarting=not self.stopping)
        if self.stopping:
            return
        self._restartLater(index, "Worker {index} ended ({why})", reason.getErrorMessage())

    def _restartLater(self, index: int, what: str, why: str) -> None:
        delay = self.backoff[index].died(self.reactor.seconds())
        self._log.warn(
            what + "; restarting in {delay}s",
            event="worker-died",
            index=index,
            why=why,
            delay=delay,
        )
        self.restarts[index] = self.reactor.callLater(delay, self._respawn, index)

    def _respawn(self, index: int) -> None:
        self.restarts.pop(index, None)
        if self.stopping or index in self.workers:
            return
        try:
            self.spawn(index)
        except OSError as e:
            self.backoff[index].started(self.reactor.seconds())
            self._restartLater(index, "Cannot start worker {index} ({why})", str(e))

    def stopService(self) -> Deferred[Any]:
        """
        Ask every worker to drain (SIGTERM); kill any still running after the
        drain delay and deadline plus a margin.
        """
        Service.stopService(self)
        self.stopping = True
        for pending in self.restarts.values():
            if pending.active():
                pending.cancel()
        self.restarts.clear()
        for worker in self.workers.values():
            # The drain has its own deadline.
            worker.watchdog.stop()
        for index in range(self.count):
            if index not in self.workers:
                # Dead and waiting for its restart: the connections queued on
                # its sockets would be reset when the supervisor closes its
                # copies, so a worker starts now to drain them.
                try:
                    self.spawn(index)
                except OSError as e:
                    self._log.warn(
                        "Cannot start worker {index} to drain its sockets ({why})",
                        event="worker-drain-failed",
                        index=index,
                        why=str(e),
                    )
        ended = [w.ended for w in self.workers.values()]
        self.signalAll(signal.SIGTERM)
        deadline = self.drainDelay + self.shutdownTimeout + 5
        killer = self._killer = self.reactor.callLater(deadline, self.signalAll, signal.SIGKILL)

        def done(result: Any) -> Any:
            if killer.active():
                killer.cancel()
            if self.countFD is not None:
                os.close(self.countFD)
                self.countFD = None
            if self.rules is not None:
                self.rules.snapshot.close()
            return result

        return DeferredList(ended).addBoth(done)
