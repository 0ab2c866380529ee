"""
End-to-end tests: a real C{twistd -n echo} process on loopback, driven by
plain sockets.  Each test is bounded by socket and process timeouts.
"""

from __future__ import annotations

import hashlib
import random
import select
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.process import (
    LOOPBACK,
    TWISTD,
    ServerTestCase,
    connect,
    echo,
    isClosedByServer,
    refusedFrom,
    run,
)


class EchoEndToEndTests(ServerTestCase):
    def test_byteExactManyConnections(self) -> None:
        """Random binary payloads up to several MiB, on 40 connections at
        once, come back byte-exact, each followed by EOF after a half-close."""
        server = self.start("--port", LOOPBACK)
        rng = random.Random(7)
        payloads = [rng.randbytes(n) for n in [0, 1, 4096, 3 * 1024 * 1024, 5 * 1024 * 1024]]
        payloads += [rng.randbytes(rng.randrange(1, 400_000)) for _ in range(35)]

        def roundTrip(payload: bytes) -> bool:
            with connect(server.port) as sock:
                return echo(sock, payload) == payload

        with ThreadPoolExecutor(max_workers=len(payloads)) as pool:
            self.assertEqual(list(pool.map(roundTrip, payloads)), [True] * len(payloads))
        server.waitFor(r"closed \(client closed\) after 5242880 bytes")

    def test_backpressureBoundsMemory(self) -> None:
        """A client that writes 200 MiB without reading for seconds does not
        grow the server by 32 MiB, and then gets all 200 MiB back exactly."""
        server = self.start("--port", LOOPBACK)
        total = 200 * 1024 * 1024
        chunk = 1024 * 1024
        rng = random.Random(200)
        blocks = [rng.randbytes(chunk) for _ in range(8)]
        sent_hash, recv_hash = hashlib.sha256(), hashlib.sha256()
        time.sleep(0.2)
        baseline = server.rssKiB()
        peak = baseline
        sock = connect(server.port)
        sock.setblocking(False)
        sent = received = 0
        pending = memoryview(b"")
        flood_until = time.monotonic() + 4.0
        deadline = time.monotonic() + 120.0
        while received < total:
            self.assertLess(time.monotonic(), deadline, "backpressure round trip timed out")
            flooding = time.monotonic() < flood_until
            if not pending and sent < total:
                block = blocks[(sent // chunk) % len(blocks)] + sent.to_bytes(8, "big")
                block = block[: min(chunk, total - sent)]
                sent_hash.update(block)
                pending = memoryview(block)
            readers = [] if flooding else [sock]
            writers = [sock] if pending else []
            r, w, _ = select.select(readers, writers, [], 0.05)
            if w:
                try:
                    n = sock.send(pending)
                    pending = pending[n:]
                    sent += n
                except BlockingIOError:
                    pass
            if r:
                data = sock.recv(1 << 20)
                self.assertTrue(data, "server closed early")
                recv_hash.update(data)
                received += len(data)
            if flooding:
                peak = max(peak, server.rssKiB())
        sock.close()
        growth = (peak - baseline) / 1024
        self.assertLess(growth, 32, f"server RSS grew {growth:.1f} MiB")
        self.assertEqual(sent_hash.hexdigest(), recv_hash.hexdigest())
        print(f"\nbackpressure: peak RSS growth {growth:.2f} MiB during the flood")

    def test_halfClose(self) -> None:
        """Data pending when the client shuts down writing is all echoed,
        then EOF."""
        server = self.start("--port", LOOPBACK)
        payload = random.Random(1).randbytes(2 * 1024 * 1024)
        with connect(server.port) as sock:
            sock.sendall(payload[:1000])
            self.assertEqual(echo(sock, payload[1000:]), payload)

    def test_denyAndAllow(self) -> None:
        """A denied client is closed without an echo and the refusal is
        logged with its address; an allowed one is served."""
        server = self.start("--port", LOOPBACK, "--deny", "127.0.0.2", "--allow", "127.0.0.0/8")
        with connect(server.port) as sock:
            self.assertEqual(echo(sock, b"ok"), b"ok")
        self.assertTrue(refusedFrom(server.port, "127.0.0.2"))
        server.waitFor(
            r"Refused connection from 127\.0\.0\.2:\d+ on tcp:0:interface=127\.0\.0\.1: denied"
        )

    def test_maxConnections(self) -> None:
        """--max-connections refuses past the limit and frees slots on close."""
        server = self.start("--port", LOOPBACK, "--max-connections", "2")
        first, second = connect(server.port), connect(server.port)
        self.assertEqual(echo(second, b"x"), b"x")
        second = connect(server.port)
        server.waitFor(r"(Connection from.*\n.*){3}")
        third = connect(server.port)
        self.assertTrue(isClosedByServer(third))
        server.waitFor("max-connections")
        first.close()
        server.waitFor(r"closed \(client (closed|reset)\) after 0 bytes")
        with connect(server.port) as again:
            self.assertEqual(echo(again, b"y"), b"y")
        second.close()
        third.close()

    def test_severalListenersAndUnix(self) -> None:
        """One process serves several listeners, Unix sockets included."""
        path = Path(tempfile.mkdtemp()) / "echo.sock"
        server = self.start("-p", LOOPBACK, "-p", LOOPBACK, "-p", f"unix:{path}", listeners=3)
        ports = {int(a.rsplit(":", 1)[1]) for a in server.addresses[:2]}
        self.assertEqual(len(ports), 2)
        for port in ports:
            with connect(port) as sock:
                self.assertEqual(echo(sock, b"tcp"), b"tcp")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            self.assertEqual(echo(sock, b"unix"), b"unix")

    def test_burstOfConnections(self) -> None:
        """1,000 connections opened back to back all connect without a SYN
        retransmit (which would take a second): the backlog absorbs them."""
        server = self.start("--port", LOOPBACK, "--log-connections", "0")
        socks = []
        started = time.monotonic()
        try:
            for _ in range(1000):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", server.port))
                socks.append(s)
            pending = set(socks)
            slowest = 0.0
            with selectors.DefaultSelector() as poller:
                for s in socks:
                    poller.register(s, selectors.EVENT_WRITE)
                while pending and time.monotonic() - started < 10:
                    for key, _ in poller.select(0.5):
                        s = key.fileobj  # type: ignore[assignment]
                        self.assertEqual(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), 0)
                        poller.unregister(s)
                        pending.discard(s)
                    slowest = time.monotonic() - started
            self.assertEqual(len(pending), 0)
            self.assertLess(slowest, 1.0, "connections waited for a SYN retransmit")
            server.waitFor(r"(Connection from[^\n]*\n[^\n]*){1000}", timeout=20)
        finally:
            for s in socks:
                s.close()

    def test_sigtermStopsCleanly(self) -> None:
        """SIGTERM closes listeners, echoes bytes already in flight, then
        the process ends by SIGTERM after a clean shutdown (twistd's
        convention)."""
        server = self.start("--port", LOOPBACK, "--shutdown-timeout", "5")
        sock = connect(server.port)
        payload = random.Random(3).randbytes(64 * 1024)
        sock.sendall(payload)
        server.process.send_signal(signal.SIGTERM)
        received = bytearray()
        sock.settimeout(10)
        while True:
            data = sock.recv(65536)
            if not data:
                break
            received += data
        self.assertEqual(bytes(received), payload)
        self.assertEqual(server.wait(), -signal.SIGTERM)
        output = server.output()
        self.assertIn("closed (server shutdown)", output)
        self.assertIn("Server Shut Down", output)
        self.assertNotIn("Traceback", output)

    def test_reactorChoice(self) -> None:
        """twistd runs echotw's epoll reactor unless told otherwise (or when
        told C{-r echotw}); with C{-r epoll} the stock one serves the same
        echo."""
        payload = random.Random(11).randbytes(300_000)
        choices = [
            ("", "echotw.reactor.EchoReactor"),
            ("echotw", "echotw.reactor.EchoReactor"),
            ("epoll", "EPollReactor"),
        ]
        for chosen, expected in choices:
            server = self.start("--port", LOOPBACK, reactor=chosen)
            with connect(server.port) as sock:
                self.assertEqual(echo(sock, payload), payload)
            server.waitFor(r"reactor class: \S*" + expected.replace(".", r"\."))
            server.stop()

    def test_twistRunner(self) -> None:
        """Twisted's newer runner, twist, runs the same plugin."""
        server = self.start("--port", LOOPBACK, runner="twist")
        with connect(server.port) as sock:
            self.assertEqual(echo(sock, b"twist"), b"twist")
        self.assertIn(server.stop(), (0, -signal.SIGTERM))


class StartupErrorTests(SynchronousTestCase):
    def assertOneLineError(self, result: subprocess.CompletedProcess[str], *needles: str) -> None:
        self.assertNotEqual(result.returncode, 0)
        self.assertNotIn("Traceback", result.stdout + result.stderr)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if "error" in line]
        self.assertEqual(len(errors), 1, result.stdout + result.stderr)
        for needle in needles:
            self.assertIn(needle, errors[0])

    def test_badOptions(self) -> None:
        """Bad values exit non-zero with one line naming the option, before
        anything listens."""
        cases = [
            (["--allow", "10.0.0.1/8"], "--allow"),
            (["--max-per-ip", "-1"], "--max-per-ip"),
            (["--port", "nosuchtype:1"], "--port"),
            (["--port", "tcp:1:bogus=2"], "--port"),
        ]
        for args, option in cases:
            result = run(*args)
            self.assertOneLineError(result, option)
            self.assertNotIn("Listening on", result.stdout)

    def test_portInUse(self) -> None:
        """A busy port exits non-zero with one line naming the address, and
        no other listener is left serving."""
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            result = run("--port", LOOPBACK, "--port", f"tcp:{port}:interface=127.0.0.1")
        self.assertNotEqual(result.returncode, 0)
        output = result.stdout + result.stderr
        self.assertNotIn("Traceback", output)
        [line] = [line for line in output.splitlines() if "cannot listen" in line]
        self.assertIn(f"tcp:{port}:interface=127.0.0.1", line)
        self.assertIn("Address already in use", line)

    def test_helpListsEveryOption(self) -> None:
        """twistd --help lists echo; twistd echo --help documents options
        with their defaults."""
        result = subprocess.run(
            [sys.executable, "-c", TWISTD, "--help"], capture_output=True, text=True, timeout=30
        )
        self.assertRegex(result.stdout, r"\n\s+echo\s+")
        help = run("--help")
        self.assertEqual(help.returncode, 0)
        for option in [
            "--port", "--interface", "--backlog", "--allow", "--deny", "--max-connections",
            "--max-per-ip", "--ipv6-prefix", "--shutdown-timeout",
        ]:  # fmt: skip
            self.assertIn(option, help.stdout)
        self.assertIn("[default: 8080", help.stdout)
