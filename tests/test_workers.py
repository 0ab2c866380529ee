"""
Tests for C{--workers}: the split of limits, and end to end with a real
supervisor and worker processes.
"""

from __future__ import annotations

import os
import re
import signal
import time

from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from echotw.options import EchoOptions
from echotw.workers import shareOf
from tests.process import LOOPBACK, ServerTestCase, connect, echo


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class ShareTests(SynchronousTestCase):
    def test_sharesAddUp(self) -> None:
        """Shares of --max-connections add up to the limit; 0 stays 0."""
        for limit in [1, 2, 3, 10, 101]:
            for workers in [1, 2, 3, 4]:
                shares = [shareOf(limit, workers, i) for i in range(workers)]
                if limit >= workers:
                    self.assertEqual(sum(shares), limit)
                self.assertTrue(all(s >= 1 for s in shares))
        self.assertEqual(shareOf(0, 4, 2), 0)

    def test_unshareableListenersRefused(self) -> None:
        """Listeners that cannot be shared are a usage error with --workers."""
        for port in ["ssl:443", "systemd:domain=INET:index=0"]:
            options = EchoOptions()
            with self.assertRaises(UsageError):
                options.parseOptions(["--workers", "2", "--port", port])
        with self.assertRaises(UsageError):
            EchoOptions().parseOptions(["--workers", "0"])


class WorkersEndToEndTests(ServerTestCase):
    def test_twoWorkersServeRestartAndStop(self) -> None:
        """Connections are served by two worker processes; killing one does
        not refuse new connections; SIGTERM stops every process, leaving no
        orphan."""
        server = self.start("--workers", "2", "--port", LOOPBACK)
        started = server.waitFor(r"(Started worker \d \(pid \d+\)(.|\n)*){2}")
        pids = [int(p) for p in re.findall(r"Started worker \d \(pid (\d+)\)", started.group(0))]
        server.waitFor(r"(echotw worker \d\] Listening(.|\n)*){2}")
        server.waitFor(
            r"(echotw worker \d\] Worker running on echotw\.reactor\.EchoReactor(.|\n)*){2}"
        )
        deadline = time.monotonic() + 20
        served = set()
        while len(served) < 2 and time.monotonic() < deadline:
            with connect(server.port) as sock:
                self.assertEqual(echo(sock, b"which worker?"), b"which worker?")
            served = set(re.findall(r"echotw worker (\d)\] Connection from", server.output()))
        self.assertEqual(served, {"0", "1"})

        os.kill(pids[0], signal.SIGKILL)
        for _ in range(30):
            with connect(server.port) as sock:
                self.assertEqual(echo(sock, b"still here"), b"still here")
        server.waitFor(r"Worker 0 ended .*restarting")
        server.waitFor(r"(Started worker 0 \(pid \d+\)(.|\n)*){2}")
        newPid = int(re.findall(r"Started worker 0 \(pid (\d+)\)", server.output())[-1])
        self.assertNotEqual(newPid, pids[0])

        server.process.send_signal(signal.SIGTERM)
        self.assertEqual(server.wait(timeout=30), -signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(p) for p in (pids[1], newPid)):
            time.sleep(0.05)
        self.assertFalse(alive(pids[1]) or alive(newPid), "a worker outlived the supervisor")
        self.assertNotIn("Traceback", server.output())
