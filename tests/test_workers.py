"""
Tests for C{--workers}: the split of limits, and end to end with a real
supervisor and worker processes.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from echotw.options import EchoOptions
from echotw.workers import shareOf
from tests.process import (
    LOOPBACK,
    EchoServer,
    ServerTestCase,
    connect,
    echo,
    isClosedByServer,
    temporaryDirectory,
    twistdCommand,
    waitUntil,
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def running(pid: int) -> bool:
    """
    Whether process C{pid} exists and has not exited (a zombie has: an
    orphan's may wait a while for whoever adopted it to reap it).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def childrenOf(pid: int) -> set[int]:
    """
    The running processes whose parent is C{pid}: a supervisor's workers.
    """
    children = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            children.add(int(entry.name))
    return children


def socketHolders(inode: int, pids: set[int]) -> set[int]:
    """
    Which of C{pids} hold the socket C{inode} open.
    """
    holders = set()
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    holders.add(pid)
            except OSError:
                continue
    return holders


def udpInode(port: int) -> int:
    """
    The inode of the UDP socket bound to 127.0.0.1:C{port}, from the kernel's table.
    """
    local = f"0100007F:{port:04X}"
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local:
            return int(fields[9])
    raise AssertionError(f"no UDP socket on 127.0.0.1:{port}")


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


class WorkersBehaviourTests(ServerTestCase):
    """
    What README promises of --workers, seen from outside the processes.
    """

    def startWorkers(self, *args: str) -> tuple[EchoServer, set[int]]:
        """
        A supervisor with two workers, once both workers listen; returns it
        and the workers' process ids.
        """
        server = self.start("--workers", "2", "--port", LOOPBACK, *args)
        server.waitFor(r"(echotw worker \d\] Listening(.|\n)*){2}", timeout=30)
        workers = waitUntil(
            lambda: len(childrenOf(server.pid)) == 2 and childrenOf(server.pid),
            "two worker processes",
        )
        self.addCleanup(killAll, workers)
        return server, workers

    def holdOnEachWorker(self, server: EchoServer) -> dict[str, socket.socket]:
        """
        Open connections until each worker holds one (the kernel picks which
        worker accepts); return one held connection per worker index.
        """
        held: dict[str, socket.socket] = {}
        deadline = time.monotonic() + 30
        while len(held) < 2:
            self.assertLess(time.monotonic(), deadline, f"one worker got every connection: {held}")
            sock = connect(server.port)
            self.addCleanup(sock.close)
            port = sock.getsockname()[1]
            worker = server.waitFor(
                rf"echotw worker (\d)\] Connection from 127\.0\.0\.1:{port} on"
            ).group(1)
            held.setdefault(worker, sock)
        return held

    def test_hangupReachesEveryWorker(self) -> None:
        """SIGHUP to the supervisor re-reads --deny-file in every worker:
        each closes the connection it holds from a newly denied client, and
        new connections are refused."""
        deny = temporaryDirectory(self) / "deny.rules"
        deny.write_text("# nobody yet\n")
        server, _ = self.startWorkers("--deny-file", str(deny))
        held = self.holdOnEachWorker(server)
        deny.write_text("127.0.0.0/8\n")
        os.kill(server.pid, signal.SIGHUP)
        for worker, sock in held.items():
            self.assertTrue(isClosedByServer(sock, timeout=20), f"worker {worker}")
        for _ in range(10):
            with connect(server.port) as sock:
                self.assertTrue(isClosedByServer(sock))
        self.assertEqual(len(re.findall(r"echotw worker \d\] Rules reloaded", server.output())), 2)
        self.assertIsNone(server.process.poll())

    def test_restartBacksOff(self) -> None:
        """A worker that keeps dying is restarted later each time: at least
        0.1 s, then 0.5 s, then 1 s after it died (README: after 0.1 s,
        backing off to 5 s)."""
        server, workers = self.startWorkers()
        victim = min(workers)
        delays = []
        for _ in range(3):
            before = childrenOf(server.pid)
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            [victim] = waitUntil(
                lambda before=before: childrenOf(server.pid) - before,
                "the worker restarted",
                timeout=30,
            )
            delays.append(time.monotonic() - killed)
            self.addCleanup(killAll, {victim})
        for delay, least in zip(delays, (0.1, 0.5, 1.0), strict=True):
            self.assertGreaterEqual(delay, least, delays)
        with connect(server.port) as sock:
            self.assertEqual(echo(sock, b"still served"), b"still served")

    def test_workersExitWithTheSupervisor(self) -> None:
        """Workers whose supervisor disappears (SIGKILL, no chance to stop
        them) exit by themselves: none is left serving."""
        server, workers = self.startWorkers()
        server.process.kill()
        server.process.wait(10)
        waitUntil(
            lambda: not any(running(pid) for pid in workers),
            f"orphaned workers {workers} did not exit",
            timeout=30,
        )
        with self.assertRaises(ConnectionRefusedError):
            connect(server.port).close()

    def test_udpServedBySupervisorAlone(self) -> None:
        """With --workers, UDP is served by the supervisor only: it alone
        binds and holds the UDP socket, and it echoes."""
        server, workers = self.startWorkers("--udp", "udp:0:interface=127.0.0.1")
        port = int(server.waitFor(r"Listening on udp:\S+ at 127\.0\.0\.1:(\d+)").group(1))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.bind(("127.0.0.1", 0))
            client.settimeout(10)
            client.sendto(b"datagram", ("127.0.0.1", port))
            self.assertEqual(client.recvfrom(100), (b"datagram", ("127.0.0.1", port)))
        holders = socketHolders(udpInode(port), workers | {server.pid})
        self.assertEqual(holders, {server.pid})
        systems = re.findall(r"\[([^\]]*)\] Listening on udp:", server.output())
        self.assertEqual(len(systems), 1, systems)
        self.assertNotIn("worker", systems[0])

    def test_twistRunnerSharesOnePort(self) -> None:
        """Under twist (which only starts services, never privileged-starts
        them) the workers still serve the supervisor's one port, and a busy
        port still ends the command with status 1."""
        server = self.start("--workers", "2", "--port", LOOPBACK, runner="twist")
        server.waitFor(r"(echotw worker \d\] Listening(.|\n)*){2}", timeout=30)
        self.addCleanup(killAll, childrenOf(server.pid))
        ports = set(re.findall(r"Listening on \S+ at 127\.0\.0\.1:(\d+)", server.output()))
        self.assertEqual(ports, {str(server.port)})
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            listener = f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1"
            result = subprocess.run(
                twistdCommand("--workers", "2", "--port", listener, runner="twist"),
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            )
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn(f"cannot listen on {listener}", result.stdout + result.stderr)


def killAll(pids: set[int]) -> None:
    """
    Clean-up: SIGKILL those of C{pids} (worker processes this test started)
    still running, checking each is still one of ours.
    """
    for pid in pids:
        try:
            ours = b"echotw.workermain" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if ours and running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
