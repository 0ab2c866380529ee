"""
Tests for C{--worker-timeout}: the watchdog on its own, and the supervisor
killing and replacing a worker that stopped reporting, on a L{Clock}.
"""

from __future__ import annotations

import signal
from typing import Any, cast

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from echotw.options import EchoOptions
from echotw.watchdog import STARTING_ALLOWANCE, Watchdog
from echotw.workercontract import READY
from echotw.workers import RESTART_DELAYS, WorkerPool
from tests.fakes import FailingSpawnReactor, FakeCounters, FakeProcess


class WatchdogTests(SynchronousTestCase):
    def test_silentOnceAfterTimeout(self) -> None:
        """Silence for the whole timeout calls the callback, once."""
        clock = Clock()
        calls: list[None] = []
        dog = Watchdog(clock, 5, lambda: calls.append(None), starting=0)
        dog.start()
        clock.advance(4.9)
        self.assertEqual(calls, [])
        clock.advance(0.1)
        self.assertEqual(len(calls), 1)
        clock.advance(60)
        self.assertEqual(len(calls), 1)

    def test_startingAllowance(self) -> None:
        """Before its first line a worker gets the starting allowance, if
        longer than the timeout; from then on, the timeout."""
        clock = Clock()
        calls: list[None] = []
        dog = Watchdog(clock, 5, lambda: calls.append(None), starting=60)
        dog.start()
        clock.advance(59)
        self.assertEqual(calls, [])
        dog.heard()
        clock.advance(5)
        self.assertEqual(len(calls), 1)
        late = Watchdog(clock, 5, lambda: calls.append(None), starting=60)
        late.start()
        clock.advance(60)
        self.assertEqual(len(calls), 2)

    def test_heardPostpones(self) -> None:
        """Each report gives the whole timeout again."""
        clock = Clock()
        calls: list[None] = []
        dog = Watchdog(clock, 5, lambda: calls.append(None))
        dog.start()
        for _ in range(10):
            clock.advance(4)
            dog.heard()
        self.assertEqual(calls, [])
        clock.advance(5)
        self.assertEqual(len(calls), 1)

    def test_offAndStopped(self) -> None:
        """A timeout of 0 watches nothing; a stopped watchdog calls nothing."""
        clock = Clock()
        calls: list[None] = []
        Watchdog(clock, 0, lambda: calls.append(None)).start()
        dog = Watchdog(clock, 5, lambda: calls.append(None))
        dog.start()
        dog.stop()
        clock.advance(100)
        self.assertEqual(calls, [])
        self.assertEqual(clock.getDelayedCalls(), [])


class WorkerTimeoutTests(SynchronousTestCase):
    def pool(self, timeout: float) -> tuple[WorkerPool, FailingSpawnReactor]:
        reactor = FailingSpawnReactor(failures=0)
        shared = cast(Any, type("Shared", (), {"socketsFor": lambda self, i: []})())
        pool = WorkerPool(
            cast(Any, reactor),
            shared,
            2,
            [],
            0,
            10,
            counters=cast(Any, FakeCounters()),
            workerTimeout=timeout,
        )
        return pool, reactor

    def test_silentWorkerKilledAndLogged(self) -> None:
        """A worker silent for the timeout is killed with one line naming it;
        one that reports every second is left alone."""
        pool, reactor = self.pool(5)
        pool.startService()
        quiet, chatty = pool.workers[0], pool.workers[1]
        processes = [FakeProcess(), FakeProcess()]
        quiet.transport, chatty.transport = cast(Any, processes[0]), cast(Any, processes[1])
        quiet.childDataReceived(quiet.reportFD, READY + b"\n")
        with capturedLogs() as events:
            for _ in range(5):
                reactor.advance(1)
                chatty.childDataReceived(chatty.reportFD, b"{}\n")
        self.assertEqual(processes[0].signals, [signal.SIGKILL])
        self.assertEqual(processes[1].signals, [])
        [line] = [e for e in events if e.get("event") == "worker-timeout"]
        self.assertEqual((line["index"], line["pid"], line["timeout"]), (0, 4242, 5))

    def test_killedWorkerReplaced(self) -> None:
        """The killed worker's end starts another in its place, watched too."""
        pool, reactor = self.pool(5)
        pool.startService()
        worker = pool.workers[0]
        process = FakeProcess()
        worker.transport = cast(Any, process)
        worker.childDataReceived(worker.reportFD, READY + b"\n")
        reactor.advance(5)
        self.assertEqual(process.signals, [signal.SIGKILL])
        worker.processEnded(cast(Any, type("Reason", (), {"getErrorMessage": lambda s: "9"})()))
        reactor.advance(RESTART_DELAYS[0])
        self.assertEqual(reactor.spawned, 3)
        replacement = pool.workers[0]
        self.assertIsNot(replacement, worker)
        replacement.transport = cast(Any, FakeProcess())
        reactor.advance(STARTING_ALLOWANCE)
        self.assertEqual(cast(FakeProcess, replacement.transport).signals, [signal.SIGKILL])

    def test_offOrStopping(self) -> None:
        """With 0, or once the server is stopping, silence kills nothing."""
        pool, reactor = self.pool(0)
        pool.startService()
        process = FakeProcess()
        pool.workers[0].transport = cast(Any, process)
        reactor.advance(100)
        self.assertEqual(process.signals, [])
        pool, reactor = self.pool(5)
        pool.startService()
        process = FakeProcess()
        pool.workers[0].transport = cast(Any, process)
        pool.workers[0].ready = True
        pool.stopService()
        reactor.advance(5)
        self.assertEqual(process.signals, [signal.SIGTERM])

    def test_option(self) -> None:
        """--worker-timeout takes seconds, 30 by default and 0 for off, and
        refuses a value the one-second reports could not keep up with."""
        options = EchoOptions()
        options.parseOptions([])
        self.assertEqual(options.config.workerTimeout, 30)
        for value, expected in (("0", 0), ("2.5", 2.5), ("120", 120)):
            options = EchoOptions()
            options.parseOptions(["--workers", "2", "--worker-timeout", value])
            self.assertEqual(options.config.workerTimeout, expected)
        for value in ("1", "0.5", "-3", "soon"):
            with self.assertRaises(UsageError):
                EchoOptions().parseOptions(["--worker-timeout", value])
