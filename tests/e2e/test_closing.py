"""
End-to-end tests of how a real C{twistd -n echo} process ends connections:
nothing echoed is lost to a reset when the server closes (drain, reload,
session limits), a second signal stops at once, and no peer can flood the
log or stall the server.

The clients here are deliberately impolite: each fills every buffer on the
way (sends until the kernel will take no more, reading nothing), and only
then starts reading.  The races they probe depend on timing, so each
scenario runs several times.
"""

from __future__ import annotations

import os
import random
import re
import selectors
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support.process import LOOPBACK, EchoServer, ServerTestCase, connect, echo, twistdCommand

OFFER = 48 * 1024 * 1024
"""Bytes each filling client offers; it stops as soon as the kernel blocks it."""

CHUNK = 256 * 1024
REPEATS = 3


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def fill(sock: socket.socket, payload: bytes, settle: float = 0.3) -> int:
    """
    Send C{payload} without reading until the socket has not been writable
    for C{settle} seconds (every buffer on the way is full) or all of it is
    sent; return how many bytes were sent.
    """
    sock.setblocking(False)
    view = memoryview(payload)
    sent = 0
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_WRITE)
    try:
        while sent < len(payload):
            if not selector.select(settle):
                break
            try:
                sent += sock.send(view[sent : sent + CHUNK])
            except BlockingIOError:
                continue
    finally:
        selector.close()
    return sent


def readAll(socks: list[socket.socket], timeout: float = 60.0) -> list[tuple[bytes, str]]:
    """
    Read every socket until its EOF; return, for each, what came and how it
    ended (C{"eof"}, C{"reset"} or C{"timeout"}).
    """
    selector = selectors.DefaultSelector()
    received = {sock: bytearray() for sock in socks}
    ended: dict[socket.socket, str] = {}
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while len(ended) < len(socks) and time.monotonic() < deadline:
            for key, _ in selector.select(0.5):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    chunk = sock.recv(CHUNK)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    ended[sock] = "reset"
                    selector.unregister(sock)
                    continue
                if not chunk:
                    ended[sock] = "eof"
                    selector.unregister(sock)
                else:
                    received[sock] += chunk
    finally:
        selector.close()
    return [(bytes(received[s]), ended.get(s, "timeout")) for s in socks]


def fillThree(port: int, seed: int) -> tuple[list[socket.socket], list[bytes]]:
    """
    Three connections, each filled with its own pattern; return them and
    what each managed to send.
    """
    socks, sent = [], []
    for i in range(3):
        sock = connect(port)
        payload = pattern(seed * 10 + i, OFFER)
        socks.append(sock)
        sent.append(payload[: fill(sock, payload)])
    return socks, sent


class ClosingTestCase(ServerTestCase):
    def assertAllBack(self, results: list[tuple[bytes, str]], sent: list[bytes]) -> None:
        """
        Each connection got exactly what it sent, then a clean EOF.
        """
        for i, ((got, how), expected) in enumerate(zip(results, sent, strict=True)):
            self.assertEqual(how, "eof", f"connection {i}: {how} after {len(got)} bytes")
            self.assertEqual(len(got), len(expected), f"connection {i}")
            self.assertTrue(got == expected, f"connection {i}: bytes differ")


class DrainTests(ClosingTestCase):
    def test_sigtermUnderBackpressure(self) -> None:
        """Connections that filled every buffer and then start reading after
        SIGTERM get every byte they sent back, then EOF, never a reset."""
        for round in range(REPEATS):
            server = self.start("--port", LOOPBACK, "--shutdown-timeout", "30")
            socks, sent = fillThree(server.port, round)
            self.assertTrue(all(len(s) > 1024 * 1024 for s in sent), [len(s) for s in sent])
            server.process.send_signal(signal.SIGTERM)
            # Slow to start reading: the drain sees paused connections first.
            server.waitFor(r"Draining 3 connections")
            time.sleep(0.5)
            results = readAll(socks)
            for sock in socks:
                sock.close()
            self.assertAllBack(results, sent)
            self.assertEqual(server.wait(30), -signal.SIGTERM)
            output = server.output()
            self.assertNotIn("Traceback", output)
            self.assertEqual(len(re.findall(r"closed \(server shutdown\)", output)), 3, output)

    def test_listenersCloseAtOnce(self) -> None:
        """On SIGTERM (no --drain-delay) new connections are refused while a
        busy connection keeps the drain open."""
        server = self.start("--port", LOOPBACK, "--shutdown-timeout", "30")
        busy = connect(server.port)
        fill(busy, pattern(1, 4 * 1024 * 1024))
        server.process.send_signal(signal.SIGTERM)
        server.waitFor(r"Draining 1 connection ")
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
        busy.close()
        self.assertEqual(server.wait(30), -signal.SIGTERM)


class SecondSignalTests(ClosingTestCase):
    def startHeld(self, *args: str) -> tuple[EchoServer, socket.socket]:
        """
        A server whose drain is held open by a peer that never reads.
        """
        server = self.start("--port", LOOPBACK, "--shutdown-timeout", "60", *args)
        stalled = connect(server.port)
        self.addCleanup(stalled.close)
        fill(stalled, pattern(2, 8 * 1024 * 1024))
        return server, stalled

    def checkStopsAtOnce(self, second: signal.Signals, *args: str) -> None:
        server, _ = self.startHeld(*args)
        server.process.send_signal(signal.SIGTERM)
        server.waitFor(r"Draining 1 connection ", timeout=30)
        server.process.send_signal(second)
        # At once: well before the drain's 60 s deadline.
        self.assertEqual(server.wait(30), -signal.SIGTERM)
        output = server.output()
        self.assertIn(f"Stopping now ({second.name})", output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("ReactorNotRunning", output)
        self.assertNotIn("critical", output.lower())

    def test_secondSigterm(self) -> None:
        """A second SIGTERM ends a drain held open by a non-reader at once,
        cleanly, with SIGTERM's exit status."""
        self.checkStopsAtOnce(signal.SIGTERM)

    def test_secondSigtermAfterDrainDelay(self) -> None:
        """Once --drain-delay is over and the drain runs, a second SIGTERM
        stops at once with nothing critical logged (it cancelled the
        delay's Deferred, which had fired, failing the drain: an
        unhandled CancelledError)."""
        self.checkStopsAtOnce(signal.SIGTERM, "--drain-delay", "0.5")

    def test_sigintAfterSigterm(self) -> None:
        """SIGINT after SIGTERM does the same."""
        self.checkStopsAtOnce(signal.SIGINT)

    def test_burstOfSignals(self) -> None:
        """Five SIGTERMs within 50 ms never make a traceback, and the server
        stops at once.  (The kernel and Python may merge signals that
        arrive before the process runs again, so the burst may count as one
        signal: then one more SIGTERM after the drain began must do.)"""
        for _ in range(REPEATS):
            server, _ = self.startHeld()
            for _ in range(5):
                server.process.send_signal(signal.SIGTERM)
                time.sleep(0.01)
            server.waitFor(r"Draining 1 connection |Stopping now")
            try:
                server.process.wait(1)
            except subprocess.TimeoutExpired:
                server.process.send_signal(signal.SIGTERM)
            self.assertEqual(server.wait(5), -signal.SIGTERM)
            output = server.output()
            self.assertIn("Stopping now (SIGTERM)", output)
            self.assertNotIn("Traceback", output)
            self.assertNotIn("ReactorNotRunning", output)


class ReloadTests(ClosingTestCase):
    def test_reloadDenyUnderBackpressure(self) -> None:
        """Connections a reload denies get what they sent back, then EOF,
        even though they filled every buffer before reading."""
        deny = self.temporaryDirectory() / "deny"
        deny.write_text("")
        server = self.start("--port", LOOPBACK, "--deny-file", str(deny))
        for round in range(REPEATS):
            socks, sent = fillThree(server.port, round)
            deny.write_text("127.0.0.0/8\n")
            os.kill(server.pid, signal.SIGHUP)
            server.waitFor(rf"(closing 3 connections they deny(.|\n)*){{{round + 1}}}")
            time.sleep(0.5)
            results = readAll(socks)
            for sock in socks:
                sock.close()
            self.assertAllBack(results, sent)
            deny.write_text("")
            os.kill(server.pid, signal.SIGHUP)
            server.waitFor(rf"(Rules reloaded: 0 allow and 0 deny(.|\n)*){{{round + 1}}}")
        output = server.output()
        self.assertEqual(len(re.findall(r"closed \(denied by reload\)", output)), 3 * REPEATS)
        self.assertNotIn("Traceback", output)

    def test_reloadsCoalesceAndDoNotStall(self) -> None:
        """Five SIGHUPs within 50 ms against a 100,000-line allow file: two
        reloads run (the first, then one for all that came during it), and
        an open connection keeps being echoed meanwhile.  Counted, not
        timed: a reload that stalled the server would let at most one
        round trip through per reload, however fast the machine."""
        allow = self.temporaryDirectory() / "allow"
        lines = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(100_000)]
        allow.write_text("\n".join(["127.0.0.0/8", *lines]) + "\n")
        server = self.start("--port", LOOPBACK, "--allow-file", str(allow))
        sock = connect(server.port)
        self.addCleanup(sock.close)
        sock.settimeout(60)
        for _ in range(5):
            os.kill(server.pid, signal.SIGHUP)
            time.sleep(0.01)
        echoedDuringReloads = 0
        deadline = time.monotonic() + 90
        while len(re.findall("Rules reloaded", server.output())) < 2:
            self.assertLess(time.monotonic(), deadline, server.output())
            sock.sendall(b"ping")
            self.assertEqual(sock.recv(16), b"ping")
            echoedDuringReloads += 1
        self.assertGreaterEqual(echoedDuringReloads, 20, "echoes while the rules reloaded")
        time.sleep(0.5)
        self.assertEqual(len(re.findall("Rules reloaded", server.output())), 2)


class SessionLimitTests(ClosingTestCase):
    def test_maxSessionBytesUnderBackpressure(self) -> None:
        """A client offering 48 MiB before reading gets at least the first
        --max-session-bytes back, exact, then EOF: never a reset."""
        limit = 1024 * 1024
        server = self.start("--port", LOOPBACK, "--max-session-bytes", str(limit))
        for round in range(REPEATS):
            socks, sent = fillThree(server.port, round)
            results = readAll(socks)
            for sock in socks:
                sock.close()
            for i, ((got, how), offered) in enumerate(zip(results, sent, strict=True)):
                self.assertEqual(how, "eof", f"round {round} connection {i}: {how}")
                self.assertGreaterEqual(len(got), limit)
                self.assertTrue(got == offered[: len(got)], "bytes differ")
        self.assertNotIn("Traceback", server.output())

    def test_maxSessionSecondsDeliversWhatWasEchoed(self) -> None:
        """At --max-session-seconds a client sending faster than it reads
        gets every byte the close event counts as echoed, then EOF."""
        server = self.start("--port", LOOPBACK, "--max-session-seconds", "1")
        sock = connect(server.port)
        payload = pattern(7, OFFER)
        offered = fill(sock, payload, settle=1.5)
        [(got, how)] = readAll([sock])
        sock.close()
        self.assertEqual(how, "eof")
        self.assertTrue(got == payload[: len(got)])
        closed = server.waitFor(r"closed \(max-session-seconds\) after (\d+) bytes")
        self.assertEqual(int(closed.group(1)), len(got))
        self.assertLessEqual(len(got), offered)


class FloodTests(ClosingTestCase):
    def test_untrustedSenderDoesNotFloodLog(self) -> None:
        """2,000 connections from an untrusted sender to a PROXY listener
        write a few throttled lines, and all are counted."""
        server = self.start(
            "--port", "haproxy:tcp:0:interface=127.0.0.1", "--trusted-proxy", "10.0.0.0/8",
            "--stats-interval", "1",
        )  # fmt: skip
        for _ in range(2000):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.recv(1)
        server.waitFor(r"Stats: 0 open, 0 accepted, 2000 refused", timeout=20)
        warnings = re.findall(r"untrusted proxy \(trust it", server.output())
        self.assertLess(len(warnings), 40)

    def test_malformedHeadersDoNotFloodLog(self) -> None:
        """1,000 malformed PROXY headers from a trusted balancer write a few
        throttled lines."""
        server = self.start("--port", "haproxy:tcp:0:interface=127.0.0.1", "--stats-interval", "1")
        for _ in range(1000):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                try:
                    sock.recv(1)
                except ConnectionResetError:
                    pass
        server.waitFor(r"Stats: 0 open, 0 accepted, 1000 refused", timeout=20)
        self.assertLess(len(re.findall(r"malformed header \(", server.output())), 40)

    def test_failingVerifierDoesNotFloodLog(self) -> None:
        """A --verifier that raises for every connection writes a few
        tracebacks, not one per connection."""
        directory = self.temporaryDirectory()
        (directory / "broken_verifier.py").write_text(
            "def check(address, listener):\n    raise RuntimeError('broken')\n"
        )
        env = dict(os.environ, PYTHONPATH=str(directory))
        server = self.start(
            "--port", LOOPBACK, "--verifier", "broken_verifier:check", "--stats-interval", "1",
            env=env,
        )  # fmt: skip
        for _ in range(300):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.recv(1)
        server.waitFor(r"Stats: 0 open, 0 accepted, 300 refused", timeout=20)
        self.assertLess(server.output().count("Traceback"), 20)

    def test_pendingProxyConnectionsCounted(self) -> None:
        """Connections waiting for their PROXY header count against
        --max-connections: past the limit, new ones are closed at once."""
        server = self.start(
            "--port", "haproxy:tcp:0:interface=127.0.0.1", "--max-connections", "10",
            "--proxy-timeout", "30",
        )  # fmt: skip
        held = [connect(server.port) for _ in range(10)]
        self.addCleanup(lambda: [s.close() for s in held])
        server.waitFor(r"(?s)(Connection from|PROXY|listening).*", timeout=5)
        refused = 0
        for _ in range(20):
            with connect(server.port) as sock:
                sock.settimeout(5)
                try:
                    refused += sock.recv(1) == b""
                except ConnectionResetError:
                    refused += 1
        self.assertEqual(refused, 20)


class DescriptorLimitTests(ClosingTestCase):
    def test_outOfDescriptors(self) -> None:
        """Under a limit of 64 descriptors, 150 connections at once leave the
        server under half a CPU, with a bounded log, and serving again once
        they close."""
        command = ["prlimit", "--nofile=64:64", *twistdCommand("--port", LOOPBACK)]
        logPath = self.temporaryDirectory() / "twistd.log"
        with logPath.open("wb") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.addCleanup(lambda: process.poll() is None and (process.kill(), process.wait(5)))
        deadline = time.monotonic() + 20
        while "Listening on" not in logPath.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        port = int(re.findall(r"at 127\.0\.0\.1:(\d+)", logPath.read_text())[0])
        socks = []
        for _ in range(150):
            try:
                socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError:
                pass
        before = cpuSeconds(process.pid)
        time.sleep(2)
        used = cpuSeconds(process.pid) - before
        for sock in socks:
            sock.close()
        self.assertLess(used, 1.0)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with connect(port, timeout=5) as sock:
                    if echo(sock, b"back", timeout=5) == b"back":
                        break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            self.fail("not serving again after the descriptors were freed")
        output = logPath.read_text()
        self.assertLess(len(output.splitlines()), 200, output[-3000:])
        self.assertIn("no file descriptors", output)
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(20), -signal.SIGTERM)


def cpuSeconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
