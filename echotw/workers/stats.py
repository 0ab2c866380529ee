# -*- test-case-name: tests.unit.test_workerstats -*-
"""
The worker processes' own resource use, for C{--metrics} with C{--workers}:
read from C{/proc} when Prometheus scrapes, for the workers running then;
where there is no C{/proc} (not Linux), there are no samples.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

PROC = "/proc"


@dataclass(frozen=True)
class ProcessStats:
    """
    What one process uses now.
    """

    cpuSeconds: float
    residentBytes: int
    openFDs: int
    startTime: float


def _bootTime(proc: str) -> float:
    with open(os.path.join(proc, "stat"), "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    return 0.0


def processStats(pid: int, proc: str = PROC) -> ProcessStats | None:
    """
    Process C{pid}'s use from C{proc}, or L{None} if it cannot be read (the
    process has just exited, or there is no C{/proc}).
    """
    try:
        with open(os.path.join(proc, str(pid), "stat"), "rb") as f:
            stat = f.read()
        # Past the command name, which may hold spaces and parentheses.
        fields = stat[stat.rindex(b")") + 2 :].split()
        openFDs = len(os.listdir(os.path.join(proc, str(pid), "fd")))
        boot = _bootTime(proc)
    except (OSError, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return ProcessStats(
        cpuSeconds=(int(fields[11]) + int(fields[12])) / ticks,
        residentBytes=int(fields[21]) * os.sysconf("SC_PAGESIZE"),
        openFDs=openFDs,
        startTime=boot + int(fields[19]) / ticks,
    )


class WorkerProcessCollector:
    """
    A C{prometheus_client} collector of the running workers' resource use;
    C{pids} gives each running worker's pid by index.

    C{process_*} (from C{prometheus_client}) describes the process serving
    the scrape, the supervisor: by convention every C{process_*} series is one
    process's, and dashboards and alerts read it so (C{process_start_time_seconds}
    to see a restart, C{process_open_fds / process_max_fds} to see descriptors
    run out).  Summing the workers into it would break each of those: start
    times and descriptor limits do not add up, and a sum of CPU counters drops
    whenever a worker is replaced.  So the workers get series of their own,
    labelled by worker index (at most 64 values), which C{sum()} adds up for
    the whole server and which show the one worker that leaks:

      - C{echotw_worker_process_cpu_seconds_total{worker}}: counter, user and
        system CPU time of the process in that place; it starts again from 0
        when the worker is replaced, as C{process_cpu_seconds_total} does when
        a process restarts (C{rate()} allows for it);
      - C{echotw_worker_process_resident_memory_bytes{worker}}: gauge;
      - C{echotw_worker_process_open_fds{worker}}: gauge;
      - C{echotw_worker_process_start_time_seconds{worker}}: gauge, since the
        Unix epoch.
    """

    def __init__(self, pids: Callable[[], Mapping[int, int]], proc: str = PROC) -> None:
        self.pids = pids
        self.proc = proc

    def collect(self) -> Iterator[Metric]:
        cpu = CounterMetricFamily(
            "echotw_worker_process_cpu_seconds_total",
            "User and system CPU time of each worker process.",
            labels=["worker"],
        )
        resident = GaugeMetricFamily(
            "echotw_worker_process_resident_memory_bytes",
            "Resident memory of each worker process.",
            labels=["worker"],
        )
        fds = GaugeMetricFamily(
            "echotw_worker_process_open_fds",
            "Open file descriptors of each worker process.",
            labels=["worker"],
        )
        started = GaugeMetricFamily(
            "echotw_worker_process_start_time_seconds",
            "When each worker process started, since the Unix epoch.",
            labels=["worker"],
        )
        for index, pid in sorted(self.pids().items()):
            stats = processStats(pid, self.proc)
            if stats is None:
                continue
            label = [str(index)]
            cpu.add_metric(label, stats.cpuSeconds)
            resident.add_metric(label, stats.residentBytes)
            fds.add_metric(label, stats.openFDs)
            started.add_metric(label, stats.startTime)
        yield cpu
        yield resident
        yield fds
        yield started
