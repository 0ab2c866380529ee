"""
End to end: how C{--workers} is wired as a whole, each test against a real
supervisor and its workers: a stopped worker replaced after
C{--worker-timeout}, counters that survive a worker's restart, steering by
C{--ipv6-prefix}, C{--max-connections} for the whole server, and C{/readyz}
during the shutdown.
"""

from __future__ import annotations

import os
import signal
import socket
import urllib.error
import urllib.request

from echotw.rules.addresses import ipFromText
from echotw.workers.steering import sourceIndex
from tests.e2e.test_workers import echoes, isClosedByServer, openFrom, scrape, workerPids
from tests.support.process import LOOPBACK, ServerTestCase, freePort, waitUntil


def sourceFor(worker: int, workers: int, skip: int = 0) -> str:
    """
    A loopback address whose connections the steering program sends to
    C{worker} (the C{skip}-th such address).
    """
    for n in range(2, 250):
        source = f"127.0.0.{n}"
        version, value = ipFromText(source) or (0, 0)
        if sourceIndex(version, value, workers) == worker:
            if not skip:
                return source
            skip -= 1
    raise AssertionError(f"no loopback address steered to worker {worker}")


def total(samples: dict[str, float], name: str) -> float:
    """
    The sum of every labelled sample of C{name}.
    """
    return sum(v for k, v in samples.items() if k.startswith(name + "{"))


def reported(port: int, connections: int) -> dict[str, float] | None:
    """
    A scrape, if its sum of connections accepted is C{connections}.
    """
    samples = scrape(port)
    return samples if total(samples, "echotw_connections_total") == connections else None


class WorkerTimeoutEndToEndTests(ServerTestCase):
    def test_stoppedWorkerReplaced(self) -> None:
        """A worker stopped with SIGSTOP is logged, killed and replaced once
        silent for --worker-timeout; a client steered to it meanwhile gets
        its echo from the replacement."""
        server = self.start(
            "--workers", "2", "--port", LOOPBACK, "--max-per-ip", "100",
            "--worker-timeout", "3",
        )  # fmt: skip
        pids = workerPids(server, 2)
        self.addCleanup(self.killIfStopped, pids[0])
        os.kill(pids[0], signal.SIGSTOP)
        with openFrom(server.port, sourceFor(0, 2)) as sock:
            self.assertTrue(echoes(sock, b"anyone there?", timeout=60))
        server.waitFor(rf"Worker 0 \(pid {pids[0]}\) sent nothing for 3(\.0)?s; killing it")
        server.waitFor(r"Worker 0 ended")
        self.assertNotIn("Worker 1 (pid", server.output())

    def killIfStopped(self, pid: int) -> None:
        # Clean-up of the worker this test stopped, if the server did not kill it.
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class WorkerWiringTests(ServerTestCase):
    def test_countersSurviveARestart(self) -> None:
        """A killed worker's counts stay in the sums, the worker serving in
        its place counts on top of them, and the restart is counted."""
        metrics = freePort()
        server = self.start(
            "--workers", "2", "--port", LOOPBACK, "--max-per-ip", "100",
            "--metrics", f"tcp:{metrics}:interface=127.0.0.1",
        )  # fmt: skip
        pids = workerPids(server, 2)
        for worker in (0, 1):
            for _ in range(3):
                with openFrom(server.port, sourceFor(worker, 2)) as sock:
                    self.assertTrue(echoes(sock))
        waitUntil(
            lambda: total(scrape(metrics), "echotw_connections_total") == 6,
            "the workers did not report 6 connections",
            timeout=20,
        )
        os.kill(pids[0], signal.SIGKILL)
        server.waitForCount(r"echotw worker 0\] Listening", 2, timeout=30)
        with openFrom(server.port, sourceFor(0, 2)) as sock:
            self.assertTrue(echoes(sock))
        samples = waitUntil(
            lambda: reported(metrics, 7),
            "the sum did not reach 7 connections after the restart",
            timeout=20,
        )
        self.assertEqual(samples['echotw_worker_connections_total{worker="0"}'], 4)
        self.assertEqual(samples['echotw_worker_restarts_total{worker="0"}'], 1)
        self.assertEqual(samples['echotw_worker_restarts_total{worker="1"}'], 0)

    def test_workerProcessMetrics(self) -> None:
        """The metrics cover each worker's process: CPU, resident memory,
        descriptors and start time, labelled by worker; the worker started
        in place of a killed one has a later start time."""
        metrics = freePort()
        server = self.start(
            "--workers", "2", "--port", LOOPBACK, "--metrics", f"tcp:{metrics}:interface=127.0.0.1"
        )  # fmt: skip
        pids = workerPids(server, 2)
        samples = scrape(metrics)
        for worker in ("0", "1"):
            label = f'{{worker="{worker}"}}'
            self.assertGreater(samples[f"echotw_worker_process_resident_memory_bytes{label}"], 1e6)
            self.assertGreaterEqual(samples[f"echotw_worker_process_open_fds{label}"], 3)
            self.assertGreater(samples[f"echotw_worker_process_cpu_seconds_total{label}"], 0)
        started = samples['echotw_worker_process_start_time_seconds{worker="0"}']
        os.kill(pids[0], signal.SIGKILL)
        server.waitForCount(r"echotw worker 0\] Listening", 2, timeout=30)
        restarted = scrape(metrics)['echotw_worker_process_start_time_seconds{worker="0"}']
        self.assertGreater(restarted, started)

    def test_steeringFollowsIPv6Prefix(self) -> None:
        """With --ipv6-prefix 128, ::1 is steered as a whole address: to the
        worker the program names for /128, not the one /64 would name."""
        self.assertNotEqual(sourceIndex(6, 1, 2, 128), sourceIndex(6, 1, 2, 64))
        metrics = freePort()
        server = self.start(
            "--workers", "2", "--port", r"tcp6:0:interface=\:\:1", "--max-per-ip", "100",
            "--ipv6-prefix", "128", "--metrics", f"tcp:{metrics}:interface=127.0.0.1",
        )  # fmt: skip
        workerPids(server, 2)
        for _ in range(4):
            with socket.create_connection(("::1", server.port), timeout=10) as sock:
                self.assertTrue(echoes(sock))
        expected = sourceIndex(6, 1, 2, 128)
        samples = waitUntil(
            lambda: reported(metrics, 4),
            "the workers did not report 4 connections",
            timeout=20,
        )
        self.assertEqual(samples[f'echotw_worker_connections_total{{worker="{expected}"}}'], 4)

    def test_maxConnectionsForTheWholeServer(self) -> None:
        """--max-connections counts the connections of every worker: with one
        open on each of two workers and a limit of 2, a third is refused."""
        server = self.start(
            "--workers", "2", "--port", LOOPBACK, "--max-per-ip", "100",
            "--max-connections", "2",
        )  # fmt: skip
        workerPids(server, 2)
        first = openFrom(server.port, sourceFor(0, 2))
        self.addCleanup(first.close)
        second = openFrom(server.port, sourceFor(1, 2))
        self.addCleanup(second.close)
        self.assertTrue(echoes(first))
        self.assertTrue(echoes(second))
        with openFrom(server.port, sourceFor(0, 2, skip=1)) as third:
            self.assertTrue(isClosedByServer(third, timeout=20))
        first.close()
        waitUntil(
            lambda: echoedFrom(server.port, sourceFor(0, 2, skip=1)),
            "no connection admitted once one of the two closed",
            timeout=20,
        )

    def test_notReadyDuringShutdown(self) -> None:
        """From SIGTERM on, /readyz answers 503 while the workers still
        accept through their drain delay."""
        health = freePort()
        server = self.start(
            "--workers", "2", "--port", LOOPBACK, "--drain-delay", "30",
            "--health", f"tcp:{health}:interface=127.0.0.1",
        )  # fmt: skip
        workerPids(server, 2)
        self.assertEqual(readyz(health), 200)
        server.process.send_signal(signal.SIGTERM)
        server.waitForCount(r"echotw worker \d\] Shutting down", 2, timeout=20)
        self.assertEqual(readyz(health), 503)
        with openFrom(server.port) as sock:
            self.assertTrue(echoes(sock))
        self.assertEqual(readyz(health), 503)


def echoedFrom(port: int, source: str) -> bool:
    with openFrom(port, source) as sock:
        return echoes(sock)


def readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code
