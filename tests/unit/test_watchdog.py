"""
Tests for C{--worker-timeout}: the watchdog on its own, and the supervisor
killing and replacing a worker that stopped reporting, on a L{Clock}.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from echotw.options import EchoOptions
from echotw.workers.contract import READY, WORKER_REPORT_FD, WORKER_RULES
from echotw.workers.main import StartingBeat
from echotw.workers.rulesnapshot import HEADER
from echotw.workers.supervisor import RESTART_DELAYS, WorkerPool
from echotw.workers.watchdog import STARTING_ALLOWANCE, Watchdog
from tests.support.fakes import FailingSpawnReactor, FakeCounters, FakeProcess


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

    def test_reloadingAllowance(self) -> None:
        """After a reload is asked for, silence up to the starting allowance
        is not fatal, even if a report came in just after the request; the
        timeout applies again once the allowance is over."""
        clock = Clock()
        calls: list[None] = []
        dog = Watchdog(clock, 5, lambda: calls.append(None), starting=60)
        dog.start()
        dog.heard()
        clock.advance(1)
        dog.reloading()
        clock.advance(0.5)
        dog.heard()  # a report already on its way when SIGHUP was sent
        clock.advance(59)
        self.assertEqual(calls, [])
        dog.heard()
        clock.advance(4.9)
        self.assertEqual(calls, [])
        clock.advance(0.1)
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

    def test_reloadingWorkerNotKilled(self) -> None:
        """A worker silent for longer than the timeout while it reloads the
        rules the supervisor's SIGHUP passed on (a long rule file) is not
        killed; one still silent after the starting allowance is."""
        pool, reactor = self.pool(5)
        pool.startService()
        worker = pool.workers[0]
        process = FakeProcess()
        worker.transport = cast(Any, process)
        worker.childDataReceived(worker.reportFD, READY + b"\n")
        pool.forwardHangup()
        worker.childDataReceived(worker.reportFD, b"{}\n")
        reactor.advance(STARTING_ALLOWANCE - 1)
        self.assertEqual(process.signals, [signal.SIGHUP])
        reactor.advance(1)
        self.assertEqual(process.signals, [signal.SIGHUP, signal.SIGKILL])

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


class StartingBeatTests(SynchronousTestCase):
    def test_beatsUntilStopped(self) -> None:
        """While a worker builds its service (a long rule file read before
        the reactor runs), empty lines reach the supervisor, which count as
        signs of life and as no report; none once stopped."""
        reading, writing = os.pipe()
        self.addCleanup(os.close, reading)
        self.addCleanup(os.close, writing)
        beat = StartingBeat(writing, interval=0.01)
        beat.start()
        self.addCleanup(beat.stop)
        received = b""
        for _ in range(3):
            ready, _, _ = select.select([reading], [], [], 30)
            self.assertTrue(ready, "no line within 30 s")
            received += os.read(reading, 100)
        beat.stop()
        while select.select([reading], [], [], 0)[0]:
            received += os.read(reading, 100)
        self.assertGreaterEqual(len(received), 3)
        self.assertEqual(received.strip(b"\n"), b"")
        self.assertEqual(select.select([reading], [], [], 0.05)[0], [])

    def test_workerBeatsWhileReadingRules(self) -> None:
        """A real worker process says it is alive while its options read the
        rules: here a snapshot caught mid-write, which it retries for
        seconds before giving up."""
        rules = os.memfd_create("rules")
        self.addCleanup(os.close, rules)
        os.write(rules, HEADER.pack(1, 0, 0))  # odd: a write under way, for ever
        reading, writing = os.pipe()
        self.addCleanup(os.close, reading)
        env = dict(os.environ, **{WORKER_REPORT_FD: str(writing), WORKER_RULES: str(rules)})
        worker = subprocess.Popen(
            [
                *(sys.executable, "-c", "from echotw.workers.main import main; main()"),
                *("--workers", "2", "--deny-file", "unread.txt"),
            ],
            env=env,
            pass_fds=(writing, rules),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(writing)
        received = b""
        while True:
            ready, _, _ = select.select([reading], [], [], 60)
            self.assertTrue(ready, "the worker sent nothing within 60 s")
            chunk = os.read(reading, 100)
            if not chunk:
                break
            received += chunk
        _, errors = worker.communicate(timeout=60)
        self.assertIn(b"kept changing", errors)
        self.assertGreaterEqual(received.count(b"\n"), 2)
        self.assertEqual(received.strip(b"\n"), b"")


class _Pipe:
    """A pipe's reading end as a reactor reader, calling C{onRead}."""

    def __init__(self, onRead: Any) -> None:
        self.reading, self.writing = os.pipe()
        self.onRead = onRead

    def fileno(self) -> int:
        return self.reading

    def doRead(self) -> None:
        os.read(self.reading, 100)
        self.onRead()

    def connectionLost(self, reason: object) -> None:
        pass

    def logPrefix(self) -> str:
        return "pipe"

    def close(self) -> None:
        cast(Any, reactor).removeReader(self)
        os.close(self.reading)
        os.close(self.writing)


class BusySupervisorTests(TestCase):
    def test_reportReadBeforeVerdict(self) -> None:
        """A report that reached the supervisor while it was busy past the
        deadline (here: handling another descriptor) is read before the
        worker is judged silent: a busy supervisor kills no healthy worker."""
        calls: list[None] = []
        read: Deferred[None] = Deferred()
        dog = Watchdog(cast(Any, reactor), 0.2, lambda: calls.append(None), starting=0)
        report = _Pipe(lambda: (dog.heard(), read.called or read.callback(None)))

        def busy() -> None:
            os.write(report.writing, b"{}\n")  # the worker reports...
            time.sleep(0.5)  # ...while the supervisor is busy past the deadline

        other = _Pipe(busy)
        for pipe in (report, other):
            self.addCleanup(pipe.close)
            cast(Any, reactor).addReader(pipe)
        self.addCleanup(dog.stop)
        dog.start()
        os.write(other.writing, b"x")

        def judged(_: None) -> None:
            self.assertEqual(calls, [])

        return read.addCallback(judged)
