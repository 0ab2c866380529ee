"""
The rules the supervisor of C{--workers} writes for its workers: the
file in memory rewritten in place, the supervisor's source that writes it
on each successful load, the worker's source that reads the newest, the
worker's command line, and the supervisor passing SIGHUP on only after a
reload that succeeded.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import signal
import tempfile
from pathlib import Path
from typing import Any, cast

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from echotw.rules.addresses import IPNetwork, parseNetwork
from echotw.rules.files import RuleFileError, RuleSource
from echotw.workers import rulesnapshot
from echotw.workers.contract import READY
from echotw.workers.main import WorkerOptions
from echotw.workers.rulesnapshot import (
    HEADER,
    RuleSnapshot,
    SnapshotRuleSource,
    SupervisorRuleSource,
    readSnapshot,
)
from echotw.workers.supervisor import WorkerPool
from tests.support.fakes import FailingSpawnReactor, FakeCounters, FakeProcess

V4 = parseNetwork("10.0.0.0/8")
V6 = parseNetwork("2001:db8::/32")


def client(host: str) -> IPv4Address:
    return IPv4Address("TCP", host, 40000)


class RuleSnapshotTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.snapshot = RuleSnapshot()
        self.addCleanup(self.snapshot.close)

    def test_rewrittenInPlace(self) -> None:
        """Each write replaces the last in the one file, longer or shorter,
        and leaves nothing in any directory; a reader always gets a whole
        write."""
        fd = self.snapshot.write([V4], [V6])
        self.assertEqual(readSnapshot(fd), ([V4], [V6]))
        many = [parseNetwork(f"10.{n // 256}.{n % 256}.0/24") for n in range(2000)]
        self.assertEqual(self.snapshot.write(many, []), fd)
        self.assertEqual(readSnapshot(fd), (many, []))
        self.assertEqual(self.snapshot.write([], [V4]), fd)
        self.assertEqual(readSnapshot(fd), ([], [V4]))
        self.assertEqual(os.readlink(f"/proc/self/fd/{fd}").split(" ")[0], "/memfd:echotw-rules")

    def test_writeUnderWayReadAgain(self) -> None:
        """A reader that finds a write under way (an odd sequence number)
        waits for it to end; one that never ends is an error, not a hang."""
        fd = self.snapshot.write([V4], [])
        sleeps: list[float] = []

        def finishWrite(seconds: float) -> None:
            sleeps.append(seconds)
            os.pwrite(fd, HEADER.pack(4, len(b"10.0.0.0/8\n"), 0), 0)

        os.pwrite(fd, HEADER.pack(3, 0, 0), 0)
        self.patch(rulesnapshot.time, "sleep", finishWrite)
        self.assertEqual(readSnapshot(fd), ([V4], []))
        self.assertEqual(len(sleeps), 1)
        os.pwrite(fd, HEADER.pack(5, 0, 0), 0)
        self.patch(rulesnapshot.time, "sleep", sleeps.append)
        self.assertRaises(RuleFileError, readSnapshot, fd)
        self.assertEqual(len(sleeps), 1 + rulesnapshot.READ_ATTEMPTS)

    def test_failedWriteKeepsTheLast(self) -> None:
        """A write that cannot get room for the new rules leaves the last
        ones readable."""
        fd = self.snapshot.write([V4], [V6])

        def full(*args: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(rulesnapshot, "_allocate", full)
        many = [parseNetwork(f"10.{n // 256}.{n % 256}.0/24") for n in range(500)]
        self.assertRaises(OSError, self.snapshot.write, many, [])
        self.assertEqual(readSnapshot(fd), ([V4], [V6]))

    @given(
        st.lists(
            st.one_of(
                st.tuples(st.just(4), st.integers(0, 2**32 - 1), st.integers(0, 32)),
                st.tuples(st.just(6), st.integers(0, 2**128 - 1), st.integers(0, 128)),
            ),
            max_size=20,
        )
    )
    def test_networksReadBackAsWritten(self, specs: list[tuple[int, int, int]]) -> None:
        """Whatever networks the files held come back the same from a
        generation (IPv4, IPv6, any prefix)."""
        networks: list[IPNetwork] = [
            parseNetwork(str(ipaddress.ip_network((value, prefix), strict=False)))
            if version == 4
            else parseNetwork(str(ipaddress.IPv6Network((value, prefix), strict=False)))
            for version, value, prefix in specs
        ]
        fd = self.snapshot.write(networks, [])
        self.assertEqual(readSnapshot(fd), (networks, []))


class SupervisorRuleSourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.files = Path(tempfile.mkdtemp())
        self.deny = self.files / "deny.rules"
        self.deny.write_text("10.0.0.0/8\n")
        self.snapshot = RuleSnapshot()
        self.addCleanup(self.snapshot.close)
        source = RuleSource(deny=[V6], denyFiles=[str(self.deny)])
        source.load()
        self.source = SupervisorRuleSource(source, self.snapshot)

    def snapshotDeny(self) -> list[IPNetwork]:
        assert self.snapshot.fd is not None
        return readSnapshot(self.snapshot.fd)[1]

    def test_writesWhatTheFilesHeld(self) -> None:
        """The first snapshot is what the files held when the options were
        read; each load that succeeds writes the new contents (the command
        line's networks stay on the command line)."""
        self.source.writeSnapshot()
        self.assertEqual(self.snapshotDeny(), [V4])
        self.deny.write_text("192.0.2.0/24\n")
        rules = self.source.load()
        self.assertEqual(rules(client("192.0.2.9")), "denied")
        self.assertEqual(self.snapshotDeny(), [parseNetwork("192.0.2.0/24")])

    def test_badFileWritesNothing(self) -> None:
        """A load that fails leaves the snapshot as it was."""
        self.source.writeSnapshot()
        self.deny.write_text("10.0.0.0/33\n")
        self.assertRaises(RuleFileError, self.source.load)
        self.assertEqual(self.snapshotDeny(), [V4])

    def test_snapshotThatCannotBeWrittenFailsTheLoad(self) -> None:
        """If the rules cannot be written for the workers, the reload fails
        as a bad file does, so the supervisor does not tell them to reload."""

        def full(*args: object) -> int:
            raise OSError(28, "No space left on device")

        self.patch(self.snapshot, "write", full)
        with self.assertRaises(RuleFileError) as caught:
            self.source.load()
        self.assertIn(
            "cannot write the rules for the workers: No space left", str(caught.exception)
        )


class SnapshotRuleSourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.snapshot = RuleSnapshot()
        self.addCleanup(self.snapshot.close)
        self.fd = self.snapshot.write([], [V4])

    def test_readsTheNewestRules(self) -> None:
        """Each load reads what the supervisor wrote last, with the command
        line's networks; the operator's paths are never read."""
        given = RuleSource(deny=[parseNetwork("192.0.2.1")], denyFiles=["/nonexistent"])
        source = SnapshotRuleSource(given, self.fd, (False, True))
        rules = source.load()
        self.assertEqual(rules(client("10.1.2.3")), "denied")
        self.assertEqual(rules(client("192.0.2.1")), "denied")
        self.assertIsNone(rules(client("172.16.0.1")))
        self.snapshot.write([], [parseNetwork("172.16.0.0/12")])
        rules = source.load()
        self.assertIsNone(rules(client("10.1.2.3")))
        self.assertEqual(rules(client("172.16.0.1")), "denied")
        self.assertTrue(source.hasFiles)

    def test_emptyAllowFileStillRestricts(self) -> None:
        """An allow file that holds nothing for now still means "only those
        listed", through the snapshot as directly."""
        self.snapshot.write([], [])
        source = SnapshotRuleSource(RuleSource(), self.fd, (True, False))
        self.assertEqual(source.load()(client("192.0.2.1")), "not allowed")


class WorkerOptionsTests(SynchronousTestCase):
    def test_readsTheSnapshot(self) -> None:
        """Given the supervisor's rules, a worker's command line reads them
        instead of the operator's files, which may have gone bad since."""
        snapshot = RuleSnapshot()
        self.addCleanup(snapshot.close)
        fd = snapshot.write([V4], [V6])
        options = WorkerOptions(fd)
        options.parseOptions(
            ["--allow-file", "/nonexistent/a", "--allow-file", "/b", "--deny-file", "/c"]
        )
        self.assertEqual(options.config.rules(client("10.0.0.1")), None)
        self.assertEqual(options.config.rules(client("192.0.2.1")), "not allowed")
        self.assertEqual(options.config.ruleSource.fileNetworks, ([V4], [V6]))

    def test_withoutSnapshot(self) -> None:
        """Without one (it could not be written), the files are read as ever."""
        self.assertRaises(
            UsageError, WorkerOptions(None).parseOptions, ["--deny-file", "/nonexist"]
        )


def pool(workers: int = 1) -> tuple[WorkerPool, FailingSpawnReactor]:
    reactor = FailingSpawnReactor(failures=0)
    shared = cast(Any, type("Shared", (), {"socketsFor": lambda self, i: []})())
    return (
        WorkerPool(
            cast(Any, reactor), shared, workers, [], 0, 60, counters=cast(Any, FakeCounters())
        ),
        reactor,
    )


def readyProcesses(workerPool: WorkerPool) -> dict[int, FakeProcess]:
    processes = {}
    for index, worker in workerPool.workers.items():
        if worker.ready:
            processes[index] = cast(FakeProcess, worker.transport)
            continue
        process = processes[index] = FakeProcess()
        worker.transport = cast(Any, process)
        worker.childDataReceived(worker.reportFD, READY + b"\n")
    return processes


class ForwardAfterReloadTests(SynchronousTestCase):
    def test_onlyAfterSuccess(self) -> None:
        """SIGHUP reaches the workers once per reload that succeeded, however
        many requests joined it, and not after one that failed."""
        workerPool, _ = pool()
        workerPool.startService()
        [process] = readyProcesses(workerPool).values()
        failing: Deferred[bool] = Deferred()
        workerPool.forwardAfter(failing)
        failing.callback(False)
        self.assertEqual(process.signals, [])
        reloading: Deferred[bool] = Deferred()
        for _ in range(3):
            workerPool.forwardAfter(reloading)
        reloading.callback(True)
        self.assertEqual(process.signals, [signal.SIGHUP])


class StopWithDeadWorkerTests(SynchronousTestCase):
    def test_deadWorkerStartedToDrain(self) -> None:
        """A worker waiting to be restarted when the supervisor stops is
        started at once and told to drain, so the connections queued on its
        socket are served, not reset when the supervisor closes its copy."""
        workerPool, reactor = pool(workers=2)
        workerPool.startService()
        processes = readyProcesses(workerPool)
        dead = workerPool.workers[0]
        workerPool.workerEnded(dead, Failure(Exception("killed")))
        self.assertNotIn(0, workerPool.workers)
        self.assertEqual(reactor.spawned, 2)
        workerPool.stopService()
        self.assertEqual(reactor.spawned, 3)
        self.assertIn(0, workerPool.workers)
        replacement = readyProcesses(workerPool)[0]
        self.assertEqual(replacement.signals, [signal.SIGTERM])
        self.assertEqual(processes[1].signals, [signal.SIGTERM])
        # Nothing else is restarted later.
        reactor.advance(60)
        self.assertEqual(reactor.spawned, 3)


class SnapshotFailsAtStartTests(SynchronousTestCase):
    def test_workersReadTheFilesThemselves(self) -> None:
        """If the first snapshot cannot be written (no writable temporary
        directory, say), one warning says so, the workers are told nothing
        of it and read the files as before, and the supervisor's reloads no
        longer try to write one."""
        deny = Path(tempfile.mkdtemp()) / "deny.rules"
        deny.write_text("10.0.0.0/8\n")
        given = RuleSource(denyFiles=[str(deny)])
        given.load()
        snapshot = RuleSnapshot()
        attempts: list[object] = []

        def full(*args: object) -> int:
            attempts.append(args)
            raise OSError(30, "Read-only file system")

        self.patch(snapshot, "write", full)
        source = SupervisorRuleSource(given, snapshot)
        workerPool, _ = pool()
        workerPool.rules = source
        with capturedLogs() as events:
            workerPool.startService()
        [warning] = [e for e in events if e.get("event") == "rules-snapshot-failed"]
        self.assertEqual(warning["why"], "Read-only file system")
        self.assertIsNone(workerPool.rulesFD)
        self.assertEqual(source.load()(client("10.0.0.1")), "denied")
        self.assertEqual(len(attempts), 1)
