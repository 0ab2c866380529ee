"""
End-to-end tests of C{--workers} with a real supervisor and worker
processes: how connections spread over the workers,
limits that hold for the whole server, one metrics endpoint, restarts that
refuse nothing, and a stop that leaves no process behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from echotw.rules.addresses import ipFromText
from echotw.workers.steering import sourceIndex
from tests.support.process import (
    LOOPBACK,
    TWISTD,
    EchoServer,
    ServerTestCase,
    connect,
    echo,
    isClosedByServer,
    temporaryDirectory,
    twistdCommand,
    waitUntil,
)

SERVED = re.compile(r"echotw worker (\d+)\] Connection from ([\d.]+):(\d+) on")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def servedBy(server: EchoServer) -> dict[tuple[str, int], int]:
    """
    Which worker logged each client C{(host, port)}'s connection.
    """
    return {(host, int(port)): int(w) for w, host, port in SERVED.findall(server.output())}


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


def workerPids(server: EchoServer, count: int, listeners: int = 1) -> list[int]:
    """
    Wait until C{count} workers listen on all their C{listeners}; their pids
    in order of index.
    """
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = re.findall(r"echotw worker (\d+)\] Listening", server.output())
        if all(found.count(str(w)) >= listeners for w in range(count)):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"{count} workers did not listen:\n{server.output()}")
    started = re.findall(r"Started worker (\d+) \(pid (\d+)\)", server.output())
    return [int(pid) for _, pid in sorted(started)[:count]]


def openFrom(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def echoes(sock: socket.socket, payload: bytes = b"ping", timeout: float = 20.0) -> bool:
    """
    Whether C{sock} echoes C{payload}: False if the server closes it.
    """
    sock.settimeout(timeout)
    try:
        sock.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = sock.recv(len(payload) - len(received))
            if not chunk:
                return False
            received += chunk
    except (ConnectionResetError, BrokenPipeError):
        return False
    return received == payload


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode("utf-8")
    samples = {}
    for line in text.splitlines():
        if line.startswith("echotw_"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


class WorkersEndToEndTests(ServerTestCase):
    def test_longConnectionsSpread(self) -> None:
        """24 long connections from one client land at least 5 on each of 2
        workers (each has its own socket; the kernel spreads them)."""
        server = self.start("--workers", "2", "--port", LOOPBACK)
        workerPids(server, 2)
        socks = [openFrom(server.port) for _ in range(24)]
        for sock in socks:
            self.addCleanup(sock.close)
            self.assertTrue(echoes(sock))
        ports = {sock.getsockname()[1] for sock in socks}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            served = {p: w for (_, p), w in servedBy(server).items() if p in ports}
            if len(served) == 24:
                break
            time.sleep(0.05)
        counts = [list(served.values()).count(w) for w in (0, 1)]
        self.assertEqual(sum(counts), 24, server.output())
        self.assertGreaterEqual(min(counts), 5, counts)

    def _maxPerIP(self, workers: int) -> None:
        server = self.start("--workers", str(workers), "--port", LOOPBACK, "--max-per-ip", "3")
        workerPids(server, workers)
        socks = [openFrom(server.port) for _ in range(9)]
        for sock in socks:
            self.addCleanup(sock.close)
        admitted = [echoes(sock, timeout=5) for sock in socks]
        self.assertEqual(admitted.count(True), 3, server.output())

    def test_maxPerIPTwoWorkers(self) -> None:
        """--max-per-ip 3 admits exactly 3 of 9 concurrent connections from
        one address with 2 workers."""
        self._maxPerIP(2)

    def test_maxPerIPThreeWorkers(self) -> None:
        """... and with 3 workers."""
        self._maxPerIP(3)

    def test_rateForTheWholeServer(self) -> None:
        """--rate 1/s --burst 4 admits 4 of 12 quick connections from one
        address (and one more per second they took), with 2 workers."""
        server = self.start(
            "--workers", "2", "--port", LOOPBACK, "--rate", "1/s", "--burst", "4"
        )  # fmt: skip
        workerPids(server, 2)
        started = time.monotonic()
        admitted = 0
        for _ in range(12):
            with openFrom(server.port) as sock:
                admitted += echoes(sock, timeout=5)
        allowed = 4 + int(time.monotonic() - started)
        self.assertGreaterEqual(admitted, 4)
        self.assertLessEqual(admitted, allowed, server.output())

    def test_steeringBySource(self) -> None:
        """With a per-source limit, all connections from one address reach
        one worker, the one the steering program names, whichever of 12
        loopback addresses they come from; a Unix listener is shared."""
        path = temporaryDirectory(self) / "echo.sock"
        server = self.start(
            "--workers", "3", "--port", LOOPBACK, "--port", f"unix:{path}",
            "--max-per-ip", "100",
        )  # fmt: skip
        workerPids(server, 3, listeners=2)
        self.assertIn("steered by source", server.output())
        sources = [f"127.0.0.{n}" for n in range(2, 14)]
        for source in sources:
            for _ in range(3):
                with openFrom(server.port, source) as sock:
                    self.assertTrue(echoes(sock))
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            self.assertTrue(echoes(sock))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            served = servedBy(server)
            if sum(host in sources for host, _ in served) == 3 * len(sources):
                break
            time.sleep(0.05)
        workersOf: dict[str, set[int]] = {}
        for (host, _), worker in served.items():
            workersOf.setdefault(host, set()).add(worker)
        for source in sources:
            version, value = ipFromText(source) or (0, 0)
            self.assertEqual(workersOf.get(source), {sourceIndex(version, value, 3)}, source)
        self.assertGreater(len(set.union(*workersOf.values())), 1)
        self.assertEqual(server.stop(), -signal.SIGTERM)
        self.assertFalse(path.exists())
        self.assertNotIn("Traceback", server.output())

    def test_orphanedWorkersExit(self) -> None:
        """Workers whose supervisor was killed exit by themselves, leaving
        the Unix socket file to the supervisor that bound it."""
        path = temporaryDirectory(self) / "echo.sock"
        server = self.start("--workers", "2", "--port", LOOPBACK, "--port", f"unix:{path}")
        pids = workerPids(server, 2, listeners=2)
        server.process.kill()
        server.process.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.05)
        self.assertFalse(any(alive(p) for p in pids), "a worker outlived its supervisor")
        self.assertTrue(path.exists())
        self.assertNotIn("Traceback", server.output())

    def test_metricsSumTheWorkers(self) -> None:
        """--metrics with 2 workers is served by the supervisor and counts
        every connection of both workers."""
        server = self.start(
            "--workers", "2", "--port", LOOPBACK, "--metrics", LOOPBACK
        )  # fmt: skip
        workerPids(server, 2)
        metricsPort = int(server.waitFor(r"Serving metrics on \S+ at [\d.]+:(\d+)").group(1))
        for _ in range(20):
            with connect(server.port) as sock:
                self.assertEqual(echo(sock, b"count me"), b"count me")
        listener = f'listener="{LOOPBACK}"'
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            samples = scrape(metricsPort)
            if samples.get(f"echotw_connections_total{{{listener}}}") == 20:
                break
            time.sleep(0.2)
        self.assertEqual(samples.get(f"echotw_connections_total{{{listener}}}"), 20, samples)
        self.assertEqual(samples["echotw_bytes_echoed_total"], 20 * len(b"count me"))
        perWorker = [samples[f'echotw_worker_connections_total{{worker="{w}"}}'] for w in (0, 1)]
        self.assertEqual(sum(perWorker), 20)
        self.assertGreater(min(perWorker), 0)

    def test_killedWorkerRefusesNothingAndStopLeavesNoOrphan(self) -> None:
        """A SIGKILLed worker refuses nothing: 30 connections opened right
        after the kill all echo, those the kernel gave its socket once the
        worker in its place adopts it; SIGTERM stops every process."""
        server = self.start("--workers", "2", "--port", LOOPBACK)
        pids = workerPids(server, 2)
        os.kill(pids[0], signal.SIGKILL)
        socks = []
        for _ in range(30):
            sock = openFrom(server.port)
            self.addCleanup(sock.close)
            sock.sendall(b"still here")
            socks.append(sock)
        # Opened while worker 0 was gone: checked below by order of events
        # (some waited for its replacement), not by a time since the kill.
        for sock in socks:
            sock.settimeout(20)
            received = b""
            while len(received) < len(b"still here"):
                chunk = sock.recv(64)
                self.assertTrue(chunk, "a connection was closed without its echo")
                received += chunk
            self.assertEqual(received, b"still here")
        server.waitFor(r"Worker 0 ended .*restarting")
        newPid = int(re.findall(r"Started worker 0 \(pid (\d+)\)", server.output())[-1])
        self.assertNotEqual(newPid, pids[0])
        ports = {sock.getsockname()[1] for sock in socks}
        server.waitFor(r"echotw worker 0\] Connection from")
        servedByNew = [p for (_, p), w in servedBy(server).items() if p in ports and w == 0]
        self.assertTrue(servedByNew, "no connection waited for the restarted worker")

        server.process.send_signal(signal.SIGTERM)
        self.assertEqual(server.wait(timeout=30), -signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(p) for p in (pids[1], newPid)):
            time.sleep(0.05)
        self.assertFalse(alive(pids[1]) or alive(newPid), "a worker outlived the supervisor")
        self.assertNotIn("Traceback", server.output())


WORKERS2 = ("--workers", "2", "--port", LOOPBACK)


class WorkerLogTests(SynchronousTestCase):
    """
    Workers' log lines, written by the workers themselves to the
    supervisor's standard output, or relayed by the supervisor to its log file.
    """

    def twistd(self, *runner: str) -> tuple[subprocess.Popen[bytes], Path]:
        workdir = temporaryDirectory(self)
        stdoutPath = workdir / "stdout.log"
        with stdoutPath.open("wb") as stdout:
            process = subprocess.Popen(
                [sys.executable, "-c", TWISTD, "--pidfile=", *runner, "echo", *WORKERS2],
                cwd=workdir,
                stdout=stdout,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

        def stop() -> None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)

        self.addCleanup(stop)
        return process, workdir

    def waitFor(self, path: Path, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = path.read_text(errors="replace") if path.exists() else ""
            match = re.search(pattern, text)
            if match:
                return match
            time.sleep(0.05)
        self.fail(f"{pattern!r} not in {path}:\n{text}")

    def connectTwice(self, port: int) -> set[int]:
        ports = set()
        for _ in range(2):
            with connect(port) as sock:
                ports.add(sock.getsockname()[1])
                self.assertEqual(echo(sock, b"log me"), b"log me")
        return ports

    def test_jsonLinesFromWorkers(self) -> None:
        """With twistd's --logger echotw.logs.jsonObserver, every line is a
        JSON object, the workers' carrying their index and pid."""
        process, workdir = self.twistd("--nodaemon", "--logger", "echotw.logs.jsonObserver")
        out = workdir / "stdout.log"
        port = int(self.waitFor(out, r'"event": "listening".*"port": (\d+)').group(1))
        self.waitFor(out, r'("event": "listening".*"worker": \d, "worker_pid": \d+(.|\n)*){2}')
        clientPorts = self.connectTwice(port)
        self.waitFor(out, r'("event": "closed"(.|\n)*){2}')
        records = [json.loads(line) for line in out.read_text().splitlines()]
        closed = [r for r in records if r.get("event") == "closed"]
        self.assertEqual({r["client_port"] for r in closed}, clientPorts)
        for record in closed:
            self.assertIn(record["worker"], (0, 1))
            self.assertIsInstance(record["worker_pid"], int)
            self.assertNotEqual(record["worker_pid"], process.pid)

    def test_relayedToLogFile(self) -> None:
        """With a log file (which twistd rotates), the supervisor writes the
        workers' lines, each naming its worker."""
        _, workdir = self.twistd("--nodaemon", "--logfile", "echo.log")
        log = workdir / "echo.log"
        port = int(self.waitFor(log, r"Listening on \S+ at 127.0.0.1:(\d+)").group(1))
        self.waitFor(log, r"(echotw worker \d\] Listening(.|\n)*){2}")
        for clientPort in self.connectTwice(port):
            self.waitFor(log, rf"\[echotw worker \d\] Connection from 127.0.0.1:{clientPort} on")
        self.assertEqual((workdir / "stdout.log").read_text(), "")


class WorkersBehaviourTests(ServerTestCase):
    """
    What docs/deployment.md promises of --workers, seen from outside the processes.
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
        0.1 s, then 0.5 s, then 1 s after it died (docs/deployment.md: after 0.1 s,
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
            ours = b"echotw.workers.main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if ours and running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
