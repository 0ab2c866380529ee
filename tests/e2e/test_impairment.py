"""
End-to-end tests of impairment against a real C{twistd -n echo} process on
loopback: C{--delay}, C{--jitter}, C{--bandwidth} and C{--udp-loss} as a
client sees them, with the server's memory, idle timeout and shutdown drain.
Every wait is bounded; timing bounds are generous (a shared 2-core machine).
"""

from __future__ import annotations

import hashlib
import random
import select
import signal
import socket
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.support.process import LOOPBACK, ServerTestCase, connect, echo, isClosedByServer, run

UDP_LOOPBACK = "udp:0:interface=127.0.0.1"


def recvExactly(sock: socket.socket, size: int, timeout: float = 30.0) -> bytes:
    """
    Read exactly C{size} bytes, or fail at the deadline or on EOF.
    """
    received = bytearray()
    deadline = time.monotonic() + timeout
    while len(received) < size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"got {len(received)} of {size} bytes in {timeout}s")
        sock.settimeout(left)
        chunk = sock.recv(size - len(received))
        if not chunk:
            raise AssertionError(f"EOF after {len(received)} of {size} bytes")
        received += chunk
    return bytes(received)


class ImpairmentEndToEndTests(ServerTestCase):
    def test_delayRoundTripsAndOrder(self) -> None:
        """--delay 0.2: no round trip takes less than 0.2 s, and the
        quickest less than 0.6 s (a loaded machine can slow some, not
        all); 200 chunks sent at once (with --jitter) come back in order
        and byte-exact."""
        server = self.start("--port", LOOPBACK, "--delay", "0.2", "--jitter", "0.05")
        with connect(server.port) as sock:
            elapsed = []
            for i in range(5):
                message = b"ping %d" % i
                started = time.monotonic()
                sock.sendall(message)
                self.assertEqual(recvExactly(sock, len(message)), message)
                elapsed.append(time.monotonic() - started)
            self.assertGreaterEqual(min(elapsed), 0.2)
            self.assertLess(min(elapsed), 0.6, elapsed)
            rng = random.Random(2)
            chunks = [rng.randbytes(rng.randrange(1, 5000)) for _ in range(200)]
            for chunk in chunks:
                sock.sendall(chunk)
            expected = b"".join(chunks)
            self.assertTrue(recvExactly(sock, len(expected)) == expected)

    def test_bandwidth(self) -> None:
        """--bandwidth 1M: 3 MB come back byte-exact, taking at least 2.3 s
        and at most 4 s more than the same echo without the limit takes in
        this run (the baseline: slow on a loaded machine too)."""
        server = self.start("--port", LOOPBACK, "--bandwidth", "1M")
        plain = self.start("--port", LOOPBACK)
        payload = random.Random(3).randbytes(3_000_000)

        def timedEcho(port: int) -> float:
            with connect(port) as sock:
                started = time.monotonic()
                received = echo(sock, payload, timeout=60)
                elapsed = time.monotonic() - started
            self.assertEqual(hashlib.sha256(received).digest(), hashlib.sha256(payload).digest())
            return elapsed

        baseline = timedEcho(plain.port)
        elapsed = timedEcho(server.port)
        self.assertGreaterEqual(elapsed, 2.3)
        self.assertLess(elapsed, 3.0 + 1.0 + 10 * baseline, (elapsed, baseline))

    def test_udpLoss(self) -> None:
        """--udp-loss 0.5: 30-70 % of 200 datagrams are echoed; the rest
        are counted as impairment-loss in the metrics."""
        server = self.start(
            "--port", LOOPBACK, "--udp", UDP_LOOPBACK, "--udp-loss", "0.5",
            "--metrics", LOOPBACK, listeners=2,
        )  # fmt: skip
        udpPort = int(server.waitFor(r"Listening on udp:\S+ at 127\.0\.0\.1:(\d+)").group(1))
        metrics = server.waitFor(r"Serving metrics on \S+ at (127\.0\.0\.1:\d+)").group(1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            for i in range(200):
                sock.sendto(b"datagram %d" % i, ("127.0.0.1", udpPort))
            echoed = set()
            # Until a second passes without a reply (5 s at most).
            deadline = time.monotonic() + 5.0
            quietUntil = time.monotonic() + 1.0
            while time.monotonic() < min(deadline, quietUntil):
                readable, _, _ = select.select([sock], [], [], 0.1)
                if readable:
                    echoed.add(sock.recv(100))
                    quietUntil = time.monotonic() + 1.0
        self.assertTrue(60 <= len(echoed) <= 140, len(echoed))
        url = f"http://{metrics}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        lost = {
            sample.labels["reason"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "echotw_udp_dropped_total"
        }
        self.assertEqual(lost["impairment-loss"], 200 - len(echoed))

    def test_udpDelay(self) -> None:
        """--delay on UDP: each datagram comes back after the delay, the
        quickest well within three times it."""
        server = self.start("--udp", UDP_LOOPBACK, "--port", LOOPBACK, "--delay", "200ms",
                            listeners=2)  # fmt: skip
        udpPort = int(server.waitFor(r"Listening on udp:\S+ at 127\.0\.0\.1:(\d+)").group(1))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(10)
            elapsed = []
            for i in range(5):
                started = time.monotonic()
                sock.sendto(b"u%d" % i, ("127.0.0.1", udpPort))
                self.assertEqual(sock.recv(100), b"u%d" % i)
                elapsed.append(time.monotonic() - started)
            self.assertGreaterEqual(min(elapsed), 0.2)
            # The quickest: a loaded machine can slow some, not all.
            self.assertLess(min(elapsed), 0.6, elapsed)

    def test_nonReadingClientBoundedMemory(self) -> None:
        """A client that sends for three seconds without reading against
        --delay 1 --bandwidth 10k grows the server by less than 32 MiB."""
        server = self.start("--port", LOOPBACK, "--delay", "1", "--bandwidth", "10k")
        time.sleep(0.2)
        baseline = peak = server.rssKiB()
        block = random.Random(4).randbytes(65536)
        sent = 0
        with connect(server.port) as sock:
            sock.setblocking(False)
            until = time.monotonic() + 3.0
            while time.monotonic() < until:
                _, writable, _ = select.select([], [sock], [], 0.05)
                if writable:
                    try:
                        sent += sock.send(block)
                    except BlockingIOError:
                        pass
                peak = max(peak, server.rssKiB())
        growth = (peak - baseline) / 1024
        self.assertGreater(sent, 256 * 1024)
        self.assertLess(growth, 32, f"server RSS grew {growth:.1f} MiB")
        print(f"\nimpaired backpressure: sent {sent} bytes, peak RSS growth {growth:.2f} MiB")

    def test_idleTimeoutWaitsForTheDelay(self) -> None:
        """--idle-timeout 1 with --delay 2: a connection whose echo waits on
        the delay is not idle; once echoed and quiet, it is closed."""
        server = self.start("--port", LOOPBACK, "--idle-timeout", "1", "--delay", "2")
        with connect(server.port) as sock:
            sock.sendall(b"patience")
            started = time.monotonic()
            self.assertEqual(recvExactly(sock, 8, timeout=10), b"patience")
            self.assertGreaterEqual(time.monotonic() - started, 1.9)
            self.assertTrue(isClosedByServer(sock, timeout=10))
            self.assertGreaterEqual(time.monotonic() - started, 2.9)
        server.waitFor(r"closed \(timeout\) after 8 bytes")

    def test_drainDeliversDelayedBytes(self) -> None:
        """On SIGTERM, bytes waiting on --delay 1 are still echoed (within
        --shutdown-timeout 5), then the connection closes and the process exits."""
        server = self.start("--port", LOOPBACK, "--delay", "1", "--shutdown-timeout", "5")
        payload = random.Random(5).randbytes(20_000)
        with connect(server.port) as sock:
            sock.sendall(payload)
            server.waitFor(r"Connection from")
            server.process.send_signal(signal.SIGTERM)
            self.assertTrue(recvExactly(sock, len(payload), timeout=10) == payload)
            sock.settimeout(10)
            self.assertEqual(sock.recv(1), b"")
        # Ended by the echo, not by the deadline: its abort would have reset
        # the connection instead of the EOF above.
        self.assertEqual(server.wait(timeout=15), -signal.SIGTERM)
        self.assertIn("closed (server shutdown) after 20000 bytes", server.output())

    def test_helpAndBadValues(self) -> None:
        """--help documents each impairment option for streams and UDP; a bad
        value ends start-up with one line naming the option."""
        help = run("--help").stdout
        for option in ("--delay", "--jitter", "--bandwidth", "--udp-loss"):
            self.assertIn(option, help)
        self.assertIn("200ms", help)
        self.assertIn("64k, 1M", help)
        for args in (("--delay", "5x"), ("--bandwidth", "10Mbit"), ("--udp-loss", "2")):
            result = run(*args)
            self.assertNotEqual(result.returncode, 0)
            lines = result.stderr.strip().splitlines()
            self.assertEqual(len(lines), 1, result.stderr)
            self.assertIn(args[0], lines[0])
