"""
End-to-end tests of the metrics listener's limits against a real
C{twistd -n echo --metrics} process: a pipelining client that never reads
and a flood of idle connections cost it bounded memory and descriptors.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.request

from echotw.web.guard import LINGER, MAX_CONNECTIONS, MAX_PIPELINED
from tests.support.hostile import AttackProcess, probe, roundTrip
from tests.support.process import LOOPBACK, EchoServer, ServerTestCase, connect, echo, waitUntil

GET_METRICS = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"


def metricsPort(server: EchoServer, what: str = "metrics") -> int:
    address = server.waitFor(rf"Serving {what} on \S+ at (127\.0\.0\.1:\d+)").group(1)
    return int(address.rsplit(":", 1)[1])


def openDescriptors(server: EchoServer) -> int:
    return len(os.listdir(f"/proc/{server.pid}/fd"))


def scrape(port: int) -> str:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode("utf-8")
    return text


class MetricsSeriesTests(ServerTestCase):
    def test_listenerSeriesFromStartUp(self) -> None:
        """Before any connection, a scrape already has every TCP listener's
        open and total connection series, at 0: in one process, and with
        --workers, whose supervisor sums reports its workers have not made
        yet."""
        for workers in ((), ("--workers", "2")):
            server = self.start(
                *workers,
                "--port", f"{LOOPBACK}:name=front",
                "--port", f"{LOOPBACK}:name=back",
                "--metrics", LOOPBACK,
                listeners=2,
            )  # fmt: skip
            text = scrape(metricsPort(server))
            for listener in ("front", "back"):
                for name in ("echotw_connections_open", "echotw_connections_total"):
                    self.assertIn(f'{name}{{listener="{listener}"}} 0.0\n', text, workers)
            server.close()


class MetricsGuardTests(ServerTestCase):
    def test_pipeliningNonReaderBounded(self) -> None:
        """A client pipelining /metrics requests for seconds without reading
        grows the server by a few megabytes at most (unguarded, it grew by
        about 19 MB a second), and is closed, counted and logged."""
        server = self.start("--port", LOOPBACK, "--metrics", LOOPBACK)
        port = metricsPort(server)
        before = server.rssKiB()
        sock = connect(port)
        self.addCleanup(sock.close)
        sock.setblocking(False)
        burst = GET_METRICS * 200
        closed = False
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            try:
                sock.send(burst)
            except BlockingIOError:
                time.sleep(0.01)
            except OSError:
                closed = True
                break
        grown = server.rssKiB() - before
        self.assertLess(grown, 30 * 1024, f"RSS grew by {grown} KiB")

        def gone() -> bool:
            try:
                sock.send(burst)
            except BlockingIOError:
                return False
            except OSError:
                return True
            return False

        self.assertTrue(closed or waitUntil(gone, "the server to close the connection", 30))
        server.waitFor(r": pipelined without reading")

    def test_connectionFloodLeavesEchoServed(self) -> None:
        """Hundreds of half-sent requests on the metrics port hold at most
        its connection cap of descriptors once settled; echo clients are served and a
        health probe still gets its answer."""
        server = self.start("--port", LOOPBACK, "--metrics", LOOPBACK)
        port = metricsPort(server)
        baseline = openDescriptors(server)
        flood = []
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            self.addCleanup(sock.close)
            try:
                sock.send(b"GET /metr")
            except OSError:
                pass
            flood.append(sock)
        waitUntil(lambda: openDescriptors(server) <= baseline + 64 + 2, "descriptors to settle")
        with connect(server.port) as client:
            self.assertEqual(echo(client, b"ping"), b"ping")
        url = f"http://127.0.0.1:{port}/healthz"
        with urllib.request.urlopen(url, timeout=10) as response:
            self.assertEqual(response.status, 200)
        # The probe's connection and the one it displaced close a turn or two
        # after the answer arrives, so the bound is checked once they have.
        waitUntil(lambda: openDescriptors(server) <= baseline + 64 + 2, "descriptors to settle")
        server.waitFor(r"too many connections")

    def test_halfClosedRequestsAnswered(self) -> None:
        """A client that sends its requests and then shuts down its sending
        side, as C{printf ... | nc -N} does, gets every answer and then the
        end of the stream (twisted.web alone answered none of them); a
        refused request gets its 413 without waiting out the linger."""
        server = self.start("--port", LOOPBACK, "--metrics", LOOPBACK)
        metrics = metricsPort(server)

        def halfClosed(port: int, requests: bytes) -> bytes:
            sock = connect(port)
            self.addCleanup(sock.close)
            sock.sendall(requests)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(30)
            started, got = time.monotonic(), b""
            while chunk := sock.recv(65536):
                got += chunk
            durations.append(time.monotonic() - started)
            return got

        # A server that waited out the linger would make every exchange last
        # LINGER; a loaded machine makes a few slow, not most.
        durations: list[float] = []

        for _ in range(20):
            answer = halfClosed(metrics, GET_METRICS)
            self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK"), answer[:100])
            self.assertIn(b"echotw_connections_total", answer)
        probes = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
        for _ in range(20):
            self.assertEqual(halfClosed(metrics, probes).count(b"HTTP/1.1 200 OK"), 2)
        quick = sum(d < LINGER for d in durations)
        self.assertGreater(quick, len(durations) / 2, durations)
        durations.clear()
        for _ in range(5):
            refused = halfClosed(
                metrics, b"POST /healthz HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
            )
            self.assertTrue(refused.startswith(b"HTTP/1.1 413 "), refused[:100])
        self.assertGreater(sum(d < LINGER for d in durations), 2, durations)


PROBES = 15


class HostileClientTests(ServerTestCase):
    """
    Readiness probes as the kubelet makes them (a new connection, a 1 s
    timeout) while hostile clients attack the same listener: each must be
    answered in time, all but one of them (one is allowed to a machine
    that stalls us now and then), and the echo must go on answering.
    """

    def underAttack(self, kind: str, connections: int, *options: str) -> dict[str, object]:
        """
        Start a server with C{options}, attack its HTTP listener with
        C{connections} clients of C{kind} (see L{tests.support.hostile}), and probe
        it and its echo L{PROBES} times; what the attack saw.
        """
        server = self.start("--port", LOOPBACK, *options)
        port = metricsPort(server, "metrics" if "--metrics" in options else "health checks")
        baseline = openDescriptors(server)
        client = connect(server.port)
        self.addCleanup(client.close)
        attack = AttackProcess(kind, port, connections, duration=120)
        self.addCleanup(attack.kill)
        waitUntil(
            lambda: openDescriptors(server) >= baseline + MAX_CONNECTIONS // 2,
            "the attack to take the listener's places",
            30,
        )
        probes, echoes = [], []
        for _ in range(PROBES):
            probes.append(probe(port, timeout=1.0))
            echoes.append(roundTrip(client, timeout=30))
            time.sleep(0.2)
        report = attack.stop()
        failed = [p for p in probes if not p.ok]
        self.assertLessEqual(len(failed), 1, f"{kind}: {failed}")
        slow = [seconds for seconds in echoes if seconds > 1.0]
        self.assertLessEqual(len(slow), 1, f"{kind}: echo round trips {echoes}")
        return report

    def test_pipeliningNonReaders(self) -> None:
        """64 clients pipelining requests without reading (which took every
        place and stalled the echo for seconds) leave probes and the echo
        answered, on the metrics and on the health listener; no connection
        had more than MAX_PIPELINED + 1 answers made for it while it did
        not read (it had as many as the kernel would take, 1,785 for one)."""
        for options in (("--metrics", LOOPBACK), ("--health", LOOPBACK)):
            report = self.underAttack("pipelining", 64, *options)
            self.assertLessEqual(report["mostAnswers"], MAX_PIPELINED + 1, options)

    def test_slowHeaders(self) -> None:
        """2,000 connections sending their headers a byte a second, each
        reopened as soon as it is closed, leave probes answered."""
        report = self.underAttack("slow-headers", 2000, "--metrics", LOOPBACK)
        self.assertGreater(report["closedByServer"], 2000)

    def test_reconnectFlood(self) -> None:
        """3,000 connections that send half a request line and reconnect as
        soon as they are closed leave probes answered (a probe queued behind
        them was refused or timed out)."""
        report = self.underAttack("reconnect", 3000, "--metrics", LOOPBACK)
        self.assertGreater(report["closedByServer"], 3000)
