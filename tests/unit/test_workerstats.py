"""
Tests for the worker processes' resource metrics: reading C{/proc}, and the
collector's families.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from echotw.workers.stats import WorkerProcessCollector, processStats
from tests.support.process import temporaryDirectory

# Fields 3 to 24 of /proc/PID/stat: utime 14, stime 15, starttime 22, rss 24.
FIELDS = "S 1 1 1 0 -1 0 0 0 0 0 250 150 0 0 20 0 1 0 5000 99999 30".split()


def fakeProc(directory: Path, pid: int, command: str = "python", fds: int = 3) -> str:
    """
    A C{/proc} holding one process C{pid}.
    """
    (directory / "stat").write_text("cpu  1 2 3\nbtime 1700000000\n")
    process = directory / str(pid)
    (process / "fd").mkdir(parents=True)
    for fd in range(fds):
        (process / "fd" / str(fd)).touch()
    (process / "stat").write_text(f"{pid} ({command}) {' '.join(FIELDS)}\n")
    return str(directory)


class ProcessStatsTests(SynchronousTestCase):
    def test_fields(self) -> None:
        """CPU is user plus system time, resident memory is pages times the
        page size, the start time counts from boot; a command name with
        spaces and parentheses does not shift the fields."""
        proc = fakeProc(temporaryDirectory(self), 42, command="a) (b c", fds=5)
        stats = processStats(42, proc)
        assert stats is not None
        ticks = os.sysconf("SC_CLK_TCK")
        self.assertEqual(stats.cpuSeconds, 400 / ticks)
        self.assertEqual(stats.residentBytes, 30 * os.sysconf("SC_PAGESIZE"))
        self.assertEqual(stats.openFDs, 5)
        self.assertEqual(stats.startTime, 1700000000 + 5000 / ticks)

    def test_goneOrMissing(self) -> None:
        """A process that has exited, or no /proc at all, gives nothing."""
        proc = fakeProc(temporaryDirectory(self), 42)
        self.assertIsNone(processStats(43, proc))
        self.assertIsNone(processStats(42, "/nonexistent"))

    def test_thisProcess(self) -> None:
        """The real /proc of this process reads as sane values."""
        stats = processStats(os.getpid())
        if stats is None:
            self.skipTest("no /proc here")
        self.assertGreater(stats.residentBytes, 1_000_000)
        self.assertGreaterEqual(stats.openFDs, 3)
        self.assertLessEqual(stats.startTime, time.time() + 1)


class CollectorTests(SynchronousTestCase):
    def test_labelledByWorker(self) -> None:
        """One sample per running worker, labelled by index, in each of the
        four families; a worker that cannot be read is left out."""
        proc = fakeProc(temporaryDirectory(self), 42)
        families = list(WorkerProcessCollector(lambda: {0: 42, 1: 43}, proc).collect())
        self.assertEqual(
            [f.name for f in families],
            [
                "echotw_worker_process_cpu_seconds",
                "echotw_worker_process_resident_memory_bytes",
                "echotw_worker_process_open_fds",
                "echotw_worker_process_start_time_seconds",
            ],
        )
        for family in families:
            self.assertEqual([s.labels for s in family.samples][:1], [{"worker": "0"}])
            self.assertNotIn({"worker": "1"}, [s.labels for s in family.samples])
