"""
End to end, with a real supervisor and workers: rule files that go bad
after start-up do not stop a worker from being restarted, a reload that
fails is one line and leaves every worker's rules alone, and a worker
waiting to be restarted when the supervisor stops still serves the
connections queued on its socket.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import time

from tests.e2e.test_workers import echoes, killAll, openFrom, running, workerPids
from tests.e2e.test_workers_wiring import sourceFor
from tests.support.process import (
    LOOPBACK,
    EchoServer,
    ServerTestCase,
    temporaryDirectory,
    waitUntil,
)

PAYLOAD = b"queued while its worker was down"


def startedWorkers(server: EchoServer, index: int) -> list[int]:
    return [
        int(pid) for pid in re.findall(rf"Started worker {index} \(pid (\d+)\)", server.output())
    ]


def killAndAwaitRestart(server: EchoServer, index: int) -> int:
    """
    SIGKILL worker C{index} and wait for the worker started in its place to
    listen; return its pid.
    """
    listening = f"echotw worker {index}] Listening"
    before = server.output().count(listening)
    os.kill(startedWorkers(server, index)[-1], signal.SIGKILL)
    waitUntil(lambda: server.output().count(listening) > before, "the restarted worker", 30)
    return startedWorkers(server, index)[-1]


class RuleFilesWithWorkersTests(ServerTestCase):
    def setUp(self) -> None:
        self.deny = temporaryDirectory(self) / "deny.rules"
        self.deny.write_text("10.0.0.0/8\n")
        self.server = self.start(
            "--workers", "2", "--port", LOOPBACK, "--deny-file", str(self.deny)
        )
        self.pids = workerPids(self.server, 2)
        self.addCleanup(killAll, set(self.pids))

    def test_badFileDoesNotStopARestart(self) -> None:
        """The rule file goes bad (no SIGHUP); a worker dies: the one started
        in its place runs on the rules in force, and every connection is
        served, whichever socket the kernel gives it."""
        self.deny.write_text("10.0.0.0/33\n")
        replacement = killAndAwaitRestart(self.server, 0)
        self.addCleanup(killAll, {replacement})
        for _ in range(20):
            with openFrom(self.server.port) as sock:
                self.assertTrue(echoes(sock), self.server.output())
        self.assertNotIn("Traceback", self.server.output())
        self.assertEqual(len(startedWorkers(self.server, 0)), 2)

    def test_failedReloadIsOneLine(self) -> None:
        """SIGHUP with a bad file: one error line, from the supervisor, and
        no worker reloads; once mended, SIGHUP reloads every worker."""
        self.deny.write_text("10.0.0.0/33\n")
        os.kill(self.server.pid, signal.SIGHUP)
        self.server.waitFor(r"Rules not reloaded")
        time.sleep(1.0)  # what the workers would have logged, had they been told
        output = self.server.output()
        self.assertEqual(output.count("Rules not reloaded"), 1, output)
        self.assertNotIn("Rules reloaded", output)
        self.deny.write_text("127.0.0.0/8\n")
        os.kill(self.server.pid, signal.SIGHUP)
        self.server.waitForCount(r"echotw worker \d\] Rules reloaded: 0 allow and 1 deny", 2)
        for _ in range(10):
            with socket.create_connection(("127.0.0.1", self.server.port), timeout=10) as sock:
                self.assertFalse(echoes(sock), "a denied client was echoed")


class StopWithWorkerDownTests(ServerTestCase):
    def test_queuedConnectionsServedAtStop(self) -> None:
        """SIGTERM while a worker waits out its restart delay: the clients the
        kernel queued on its socket get their echo and then an orderly end,
        not a reset, as every other client does."""
        server = self.start("--workers", "2", "--port", LOOPBACK)
        self.addCleanup(killAll, set(workerPids(server, 2)))
        # Three quick deaths make the next restart wait 2 s.
        for _ in range(3):
            self.addCleanup(killAll, {killAndAwaitRestart(server, 0)})
        os.kill(startedWorkers(server, 0)[-1], signal.SIGKILL)
        server.waitFor(r"Worker 0 ended .*restarting in 2\.0s")
        socks = []
        for _ in range(20):
            sock = openFrom(server.port)
            self.addCleanup(sock.close)
            sock.sendall(PAYLOAD)
            socks.append(sock)
        os.kill(server.pid, signal.SIGTERM)
        for number, sock in enumerate(socks):
            sock.settimeout(30)
            received = b""
            try:
                while True:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    received += chunk
            except ConnectionResetError:
                self.fail(f"client {number} was reset after {received!r}:\n{server.output()}")
            self.assertEqual(received, PAYLOAD, number)
        self.assertEqual(server.wait(timeout=30), -signal.SIGTERM)


class SnapshotWithoutTemporaryDirectoryTests(ServerTestCase):
    """
    The rules reach the workers without files in a temporary directory.
    """

    def start(self, *args: str, **kw: object) -> EchoServer:
        self.tmp = temporaryDirectory(self)
        self.deny = temporaryDirectory(self) / "deny.rules"
        self.deny.write_text("10.0.0.0/8\n")
        env = dict(os.environ, TMPDIR=str(self.tmp))
        server = super().start(
            "--workers", "2", "--port", LOOPBACK, "--deny-file", str(self.deny),
            "--max-per-ip", "100", env=env,
        )  # fmt: skip
        self.addCleanup(killAll, set(workerPids(server, 2)))
        return server

    def test_reloadsWithTheTemporaryDirectoryEmptied(self) -> None:
        """With the temporary directory emptied under the server (by a
        cleaner, or full), a reload still reaches both workers, and the
        worker started in place of a killed one has the new rules."""
        server = self.start()
        for entry in self.tmp.iterdir():
            shutil.rmtree(entry, ignore_errors=True)
        self.deny.write_text("127.0.0.0/8\n")
        os.kill(server.pid, signal.SIGHUP)
        server.waitForCount(r"echotw worker \d\] Rules reloaded: 0 allow and 1 deny", 2)
        self.addCleanup(killAll, {killAndAwaitRestart(server, 0)})
        for worker in (0, 1):
            with openFrom(server.port, sourceFor(worker, 2)) as sock:
                self.assertFalse(echoes(sock), f"a denied client was echoed by worker {worker}")
        self.assertNotIn("cannot write", server.output())

    def test_nothingLeftAfterSupervisorKilled(self) -> None:
        """A supervisor killed with SIGKILL, its workers gone after it,
        leaves nothing in the temporary directory."""
        server = self.start()
        pids = workerPids(server, 2)
        os.kill(server.pid, signal.SIGHUP)
        server.waitForCount(r"echotw worker \d\] Rules reloaded", 2)
        server.stop(signal.SIGKILL)
        waitUntil(lambda: not any(running(pid) for pid in pids), "the workers exited", 30)
        self.assertEqual(os.listdir(self.tmp), [])
