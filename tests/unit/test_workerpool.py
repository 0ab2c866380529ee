"""
Unit tests of the supervisor's pieces on a clock: the restart back-off, a
worker left orphaned, signals held until a worker is ready, a spawn that
fails, stop-now, and the options --workers refuses.
"""

from __future__ import annotations

import os
import signal
from typing import Any, cast

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from echotw.options import EchoOptions
from echotw.workers import main as workermain
from echotw.workers.contract import READY
from echotw.workers.main import Orphan
from echotw.workers.process import WorkerProcess
from echotw.workers.supervisor import RESTART_DELAYS, STOP_NOW_GRACE, Backoff, WorkerPool
from tests.support.fakes import FailingSpawnReactor, FakeCounters, FakeProcess, FakeReactor


class BackoffTests(SynchronousTestCase):
    def test_growsWhileDying(self) -> None:
        """A worker that keeps dying at once waits longer each time, up to the last delay."""
        backoff = Backoff()
        delays = []
        for n in range(len(RESTART_DELAYS) + 2):
            backoff.started(float(n))
            delays.append(backoff.died(n + 0.5))
        self.assertEqual(delays, [*RESTART_DELAYS, RESTART_DELAYS[-1], RESTART_DELAYS[-1]])

    def test_resetsAfterHealthyRun(self) -> None:
        """A worker that ran healthily for a while is restarted after the shortest delay again."""
        backoff = Backoff(healthyAfter=30)
        for n in range(6):
            backoff.started(n)
            backoff.died(n + 0.1)
        backoff.started(100)
        self.assertEqual(backoff.died(129), RESTART_DELAYS[-1])
        backoff.started(200)
        self.assertEqual(backoff.died(230), RESTART_DELAYS[0])
        backoff.started(231)
        self.assertEqual(backoff.died(231.5), RESTART_DELAYS[1])


class OrphanTests(SynchronousTestCase):
    def test_supervisorPresent(self) -> None:
        """While the supervisor is the parent, nothing happens."""
        reactor = FakeReactor()
        self.assertTrue(Orphan(os.getppid(), reactor, 10).check())
        self.assertTrue(reactor.running)

    def test_orphanStopsThenExits(self) -> None:
        """A worker whose supervisor is gone stops its reactor (a drain), and
        exits outright if that is not over well after the drain's deadline."""
        exits: list[int] = []
        self.patch(workermain.os, "_exit", exits.append)
        reactor = FakeReactor()
        orphan = Orphan(-1, reactor, 10)
        self.assertFalse(orphan.check())
        self.assertFalse(reactor.running)
        reactor.advance(14)
        orphan.check()
        self.assertEqual(exits, [])
        reactor.advance(2)
        orphan.check()
        self.assertEqual(exits, [1])


class HeldSignalTests(SynchronousTestCase):
    """
    Signals for a worker wait until it says it is ready for them.
    """

    def worker(self) -> tuple[WorkerProcess, FakeProcess, FakeCounters]:
        counters = FakeCounters()
        pool = cast(
            WorkerPool,
            type("Pool", (), {"counters": counters, "reactor": Clock(), "workerTimeout": 0})(),
        )
        worker = WorkerProcess(pool, 1, reportFD=7)
        process = FakeProcess()
        worker.transport = cast(Any, process)
        return worker, process, counters

    def test_heldUntilReady(self) -> None:
        """Before READY nothing is sent (each signal kept once, in order);
        then they all are, and later ones at once."""
        worker, process, _ = self.worker()
        for sig in (signal.SIGHUP, signal.SIGHUP, signal.SIGTERM, signal.SIGHUP):
            worker.signal(sig)
        self.assertEqual(process.signals, [])
        worker.childDataReceived(7, READY + b"\n")
        self.assertEqual(process.signals, [signal.SIGHUP, signal.SIGTERM])
        worker.signal(signal.SIGHUP)
        self.assertEqual(process.signals[-1], signal.SIGHUP)

    def test_killNeverHeld(self) -> None:
        """SIGKILL needs no handler: it is sent at once, ready or not."""
        worker, process, _ = self.worker()
        worker.signal(signal.SIGKILL)
        self.assertEqual(process.signals, [signal.SIGKILL])

    def test_readyAmongReports(self) -> None:
        """READY may arrive in pieces and beside counter reports, which still
        reach the counters (the latest of a batch)."""
        worker, process, counters = self.worker()
        worker.signal(signal.SIGHUP)
        worker.childDataReceived(7, b'{"a": 1}\nrea')
        self.assertEqual(process.signals, [])
        worker.childDataReceived(7, b'dy\n{"a": 2}\n{"a": 3}\n')
        self.assertEqual(process.signals, [signal.SIGHUP])
        self.assertEqual(counters.reports, [(1, b'{"a": 1}'), (1, b'{"a": 3}')])


class SpawnFailureTests(SynchronousTestCase):
    def test_retriedWithBackoff(self) -> None:
        """A worker that cannot be started (no descriptors left) is tried
        again after the restart delays, with one line each time."""
        reactor = FailingSpawnReactor(failures=2)
        shared = cast(Any, type("Shared", (), {"socketsFor": lambda self, i: []})())
        pool = WorkerPool(
            cast(Any, reactor), shared, 1, [], 0, 10, counters=cast(Any, FakeCounters())
        )
        with capturedLogs() as events:
            pool.startService()
            self.assertEqual(reactor.spawned, 0)
            reactor.advance(RESTART_DELAYS[0])
            self.assertEqual(reactor.spawned, 0)
            reactor.advance(RESTART_DELAYS[1])
        self.assertEqual(reactor.spawned, 1)
        failures = [e for e in events if e.get("event") == "worker-died"]
        self.assertEqual(len(failures), 2)
        self.assertIn("Too many open files", failures[0]["why"])


class StopNowTests(SynchronousTestCase):
    def test_stuckWorkerKilledSoon(self) -> None:
        """After stop-now, a worker that does not end (stopped with SIGSTOP,
        say) is killed within STOP_NOW_GRACE seconds, not at the drain
        deadline."""
        reactor = FailingSpawnReactor(failures=0)
        shared = cast(Any, type("Shared", (), {"socketsFor": lambda self, i: []})())
        pool = WorkerPool(
            cast(Any, reactor), shared, 1, [], 0, 60, counters=cast(Any, FakeCounters())
        )
        pool.startService()
        [worker] = pool.workers.values()
        process = FakeProcess()
        worker.transport = cast(Any, process)
        worker.childDataReceived(worker.reportFD, READY + b"\n")
        pool.stopService()
        pool.stopNow()
        self.assertEqual(process.signals, [signal.SIGTERM, signal.SIGUSR2])
        reactor.advance(STOP_NOW_GRACE)
        self.assertEqual(process.signals[-1], signal.SIGKILL)


class OptionsTests(SynchronousTestCase):
    def test_unshareableListenersRefused(self) -> None:
        """Listeners that cannot be shared are a usage error with --workers."""
        for port in ["ssl:443", "systemd:domain=INET:index=0"]:
            options = EchoOptions()
            with self.assertRaises(UsageError):
                options.parseOptions(["--workers", "2", "--port", port])
        with self.assertRaises(UsageError):
            EchoOptions().parseOptions(["--workers", "0"])

    def test_metricsWithWorkers(self) -> None:
        """--metrics is accepted with --workers."""
        options = EchoOptions()
        options.parseOptions(["--workers", "2", "--metrics", "tcp:0"])
        self.assertEqual(options.config.metrics, "tcp:0")
