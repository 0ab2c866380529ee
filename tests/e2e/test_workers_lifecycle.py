"""
End to end: how a C{--workers} server takes signals and shutdowns that reach
its workers at awkward moments: SIGTERM or SIGINT sent to the whole process
group, reloads and stops while a worker is still starting, a second SIGTERM
during the drain delay, and a second server started on the same port.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
import urllib.request

from tests.e2e.test_workers import alive, workerPids
from tests.support.process import EchoServer, ServerTestCase, freePort, run, waitUntil

LOOPBACK = "tcp:0:interface=127.0.0.1"


class Client:
    """
    A client that sends C{size} bytes in two halves (the second when told),
    half-closes, and reads everything back in a thread: what it received
    and how the stream ended.
    """

    def __init__(self, port: int, size: int = 64 * 1024) -> None:
        self.payload = os.urandom(size)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.received = bytearray()
        self.ending = "open"
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.sock.sendall(self.payload[: size // 2])

    def _read(self) -> None:
        try:
            while chunk := self.sock.recv(65536):
                self.received += chunk
            self.ending = "eof"
        except ConnectionResetError:
            self.ending = "reset"
        except OSError as e:
            self.ending = f"error {e}"

    def finish(self) -> None:
        try:
            self.sock.sendall(self.payload[len(self.payload) // 2 :])
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the reader says how it ended

    def _ended(self, timeout: float) -> bytes:
        self._reader.join(timeout)
        self.sock.close()
        return bytes(self.received)

    def result(self, timeout: float = 30) -> tuple[bool, str]:
        """
        Whether it got all it sent back, and how the stream ended.
        """
        return self._ended(timeout) == self.payload, self.ending

    def drained(self, timeout: float = 30) -> tuple[bool, str]:
        """
        Whether it got back an exact prefix of what it sent, at least the
        first half (the server may have closed the connection as quiet
        before the second half came), and how the stream ended.
        """
        received = self._ended(timeout)
        half = len(self.payload) // 2
        return len(received) >= half and self.payload.startswith(received), self.ending


class WorkerSignalTests(ServerTestCase):
    def assertClientsComplete(self, clients: list[Client]) -> None:
        results = [client.result() for client in clients]
        self.assertEqual(results, [(True, "eof")] * len(clients))

    def restartWithClientsWaiting(self, server: EchoServer, count: int = 16) -> list[Client]:
        """
        SIGKILL worker 0, start C{count} clients (sent and half-closed)
        while it is gone, and return them once its successor has been
        started, before it can have its handlers in place.
        """
        pids = workerPids(server, 2)
        os.kill(pids[0], signal.SIGKILL)
        waitUntil(lambda: not alive(pids[0]) or None, "the worker died")
        clients = [Client(server.port, 4096) for _ in range(count)]
        for client in clients:
            client.finish()
        server.waitFor(rf"Started worker 0 \(pid (?!{pids[0]}\))", timeout=10)
        return clients

    def groupStop(self, sig: int) -> None:
        server = self.start(
            "--workers", "2", "--port", LOOPBACK, "--shutdown-timeout", "30", newSession=True
        )
        workerPids(server, 2)
        clients = [Client(server.port) for _ in range(6)]
        waitUntil(lambda: all(c.received for c in clients), "every client echoed")
        idle = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        self.addCleanup(idle.close)
        os.killpg(server.pid, sig)
        stoppedAt = time.monotonic()
        for client in clients:
            client.finish()
        results = [client.drained() for client in clients]
        self.assertEqual(results, [(True, "eof")] * len(clients))
        # An idle connection is closed by the drain, not at the kill deadline (35 s).
        self.assertEqual(idle.recv(16), b"")
        self.assertEqual(server.wait(timeout=60), -sig)
        self.assertLess(time.monotonic() - stoppedAt, 15)
        # Each worker stops once, gracefully: on the group's signal or, if
        # that reaches it second, on the one its supervisor relays.
        received = re.findall(r"worker (\d)\] Received SIG(?:INT|TERM)", server.output())
        self.assertEqual(sorted(received), ["0", "1"], server.output())
        self.assertNotIn("Stopping now", server.output())

    def test_groupTermDrains(self) -> None:
        """SIGTERM to the whole process group (systemd's default): the
        workers drain as with a SIGTERM to the supervisor alone, every
        client gets every byte and then the end of the stream."""
        self.groupStop(signal.SIGTERM)

    def test_groupInterruptDrains(self) -> None:
        """Ctrl-C (SIGINT to the foreground group) drains the same way."""
        self.groupStop(signal.SIGINT)

    def test_hangupsWhileAWorkerStarts(self) -> None:
        """Reloads asked for while a worker is being restarted wait until it
        can take them instead of killing it."""
        rules = self.temporaryDirectory() / "allow"
        rules.write_text("127.0.0.0/8\n")
        server = self.start("--workers", "2", "--port", LOOPBACK, "--allow-file", str(rules))
        self.restartWithClientsWaiting(server, count=0)
        for _ in range(10):
            os.kill(server.pid, signal.SIGHUP)
            time.sleep(0.03)
        server.waitForCount(r"echotw worker 0\] Listening", 2, timeout=30)
        server.waitForCount(r"echotw worker 0\] Rules reloaded", 1, timeout=30)
        time.sleep(0.5)
        self.assertEqual(len(re.findall(r"Worker 0 ended", server.output())), 1, server.output())

    def test_stopRightAfterARestart(self) -> None:
        """A SIGTERM just after a worker was restarted: the connections
        waiting for the new worker are served, not reset."""
        server = self.start("--workers", "2", "--port", LOOPBACK)
        clients = self.restartWithClientsWaiting(server)
        os.kill(server.pid, signal.SIGTERM)
        self.assertClientsComplete(clients)
        self.assertEqual(server.wait(timeout=30), -signal.SIGTERM)

    def test_groupTermWhileAWorkerStarts(self) -> None:
        """A SIGTERM to the whole group while a worker is still starting
        (it restarted a moment ago) does not kill it: it drains the
        connections that waited for it, like the others."""
        server = self.start("--workers", "2", "--port", LOOPBACK, newSession=True)
        clients = self.restartWithClientsWaiting(server)
        # At once: its interpreter is starting, long before its handlers exist.
        os.killpg(server.pid, signal.SIGTERM)
        self.assertClientsComplete(clients)
        self.assertEqual(server.wait(timeout=30), -signal.SIGTERM)
        self.assertEqual(len(re.findall(r"Worker \d ended", server.output())), 1)  # the SIGKILL

    def test_secondTermDuringDrainDelay(self) -> None:
        """A second SIGTERM during the drain delay stops the workers too,
        at once."""
        server = self.start(
            "--workers", "2", "--port", LOOPBACK, "--drain-delay", "20", "--shutdown-timeout", "30"
        )
        workerPids(server, 2)
        os.kill(server.pid, signal.SIGTERM)
        server.waitForCount(r"worker \d\] Shutting down", 2)
        os.kill(server.pid, signal.SIGTERM)
        stoppedAt = time.monotonic()
        server.wait(timeout=20)
        self.assertLess(time.monotonic() - stoppedAt, 10)
        self.assertEqual(len(re.findall(r"worker \d\] Stopping now", server.output())), 2)

    def test_stopNowWithAStuckWorker(self) -> None:
        """A second SIGTERM ends the server within seconds even when a worker
        is stopped (SIGSTOP) and cannot answer it."""
        server = self.start(
            "--workers", "2", "--port", LOOPBACK, "--drain-delay", "5", "--shutdown-timeout", "30"
        )
        pids = workerPids(server, 2)
        os.kill(pids[0], signal.SIGSTOP)
        self.addCleanup(lambda: alive(pids[0]) and os.kill(pids[0], signal.SIGKILL))
        os.kill(server.pid, signal.SIGTERM)
        server.waitFor(r"worker 1\] Shutting down")
        os.kill(server.pid, signal.SIGTERM)
        stoppedAt = time.monotonic()
        server.wait(timeout=30)
        self.assertLess(time.monotonic() - stoppedAt, 15)

    def test_drainDelayOnce(self) -> None:
        """With workers, the drain delay is waited out once, as with one
        process: new connections are echoed during it and refused after."""
        server = self.start("--workers", "2", "--port", LOOPBACK, "--drain-delay", "2")
        workerPids(server, 2)
        os.kill(server.pid, signal.SIGTERM)
        stoppedAt = time.monotonic()
        time.sleep(0.8)
        during = Client(server.port, 1024)
        during.finish()
        self.assertEqual(during.result(), (True, "eof"))
        time.sleep(max(0.0, stoppedAt + 3.2 - time.monotonic()))
        with self.assertRaises(OSError):
            late = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            late.sendall(b"too late")
            late.settimeout(5)
            if not late.recv(16):
                raise ConnectionResetError("closed")
        self.assertEqual(server.wait(timeout=30), -signal.SIGTERM)


class WorkerStartTests(ServerTestCase):
    def test_secondServerOnThePortRefused(self) -> None:
        """A second --workers server on a port the first listens on fails to
        start, as one process would, instead of taking a share of its
        connections."""
        first = self.start("--workers", "2", "--port", LOOPBACK)
        port = str(first.port)
        second = run("--workers", "2", "--port", f"tcp:{port}:interface=127.0.0.1")
        self.assertNotEqual(second.returncode, 0)
        self.assertIn("Address already in use", second.stdout + second.stderr)

    def test_healthWithWorkers(self) -> None:
        """--health with --workers is served by the supervisor: the workers
        run (none restarts) and the probes answer."""
        health = freePort()
        server = self.start(
            "--workers", "2", "--port", LOOPBACK, "--health", f"tcp:{health}:interface=127.0.0.1"
        )
        workerPids(server, 2)
        for path in ("/healthz", "/readyz"):
            url = f"http://127.0.0.1:{health}{path}"
            with urllib.request.urlopen(url, timeout=10) as response:
                self.assertEqual(response.status, 200)
        client = Client(server.port, 1024)
        client.finish()
        self.assertEqual(client.result(), (True, "eof"))
        self.assertNotIn("ended", server.output())
