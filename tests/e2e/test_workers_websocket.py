"""
End to end: C{--websocket} served by C{--workers} against a real
supervisor and its workers: echoes and metrics from every worker, a killed
worker's replacement serving WebSocket again, C{--max-per-ip} across
workers and listeners, 1001 from every worker on SIGTERM, and a shared
C{haproxy:} listener.
"""

from __future__ import annotations

import os
import re
import signal

from twisted.trial.unittest import SynchronousTestCase
from wsproto.events import CloseConnection, TextMessage

from tests.e2e.test_workers import echoes, openFrom, scrape, workerPids
from tests.e2e.test_workers_wiring import sourceFor, total
from tests.support.process import LOOPBACK, ServerTestCase, waitUntil
from tests.support.wsclient import WebSocketClient

WS = f"{LOOPBACK}:name=ws"
"""A WebSocket listener on loopback, named apart from the TCP one in logs and metrics."""


def admitted(test: SynchronousTestCase, port: int, source: str) -> bool:
    """
    Whether a WebSocket connection from C{source} is accepted and echoes;
    one that is stays open until the end of C{test}.
    """
    try:
        client = WebSocketClient(port, source=source, timeout=20)
    except (AssertionError, OSError):
        return False
    test.addCleanup(client.close)
    try:
        client.send(TextMessage("admitted?"))
        return client.receive(20) == TextMessage("admitted?")
    except OSError:
        return False


class WebSocketWorkersTests(ServerTestCase):
    def connectedOn(self, port: int, source: str = "127.0.0.1") -> WebSocketClient:
        """
        A WebSocket client from C{source} whose echo came back, closed after the test.
        """
        client = WebSocketClient(port, source=source)
        self.addCleanup(client.close)
        client.send(TextMessage(f"from {source}"))
        self.assertEqual(client.receive(), TextMessage(f"from {source}"))
        return client

    def test_echoedByEveryWorkerAndCounted(self) -> None:
        """Both workers echo WebSocket messages on the one port the
        supervisor bound, and the supervisor's metrics count the listener's
        connections summed over them."""
        server = self.start("--workers", "2", "--websocket", WS, "--metrics", LOOPBACK)
        metrics = int(server.waitFor(r"Serving metrics on \S+ at [\d.]+:(\d+)").group(1))
        workerPids(server, 2)
        # Listed from start-up, as every configured listener is.
        self.assertEqual(scrape(metrics).get('echotw_connections_total{listener="ws"}'), 0)
        servedBy: dict[int, str] = {}
        for _ in range(40):
            client = self.connectedOn(server.port)
            port = client.sock.getsockname()[1]
            worker = server.waitFor(
                rf"echotw worker (\d)\] Connection from 127\.0\.0\.1:{port} on ws"
            ).group(1)
            servedBy[port] = worker
            if set(servedBy.values()) == {"0", "1"}:
                break
        self.assertEqual(set(servedBy.values()), {"0", "1"}, server.output())
        opened = len(servedBy)

        def counted() -> dict[str, float] | None:
            samples = scrape(metrics)
            return (
                samples
                if samples.get('echotw_connections_total{listener="ws"}') == opened
                else None
            )

        samples = waitUntil(counted, f"{opened} WebSocket connections counted", timeout=15)
        self.assertEqual(samples['echotw_connections_open{listener="ws"}'], opened)
        self.assertEqual(total(samples, "echotw_worker_connections_total"), opened)
        for worker in "01":
            self.assertGreater(
                samples[f'echotw_worker_connections_total{{worker="{worker}"}}'], 0, worker
            )

    def test_killedWorkerReplacedServesWebSocket(self) -> None:
        """A SIGKILLed worker is replaced, and the replacement serves the
        WebSocket clients steered to its socket; the other worker's clients
        keep their connection meanwhile."""
        server = self.start("--workers", "2", "--websocket", WS, "--max-per-ip", "100")
        pids = workerPids(server, 2)
        other = self.connectedOn(server.port, sourceFor(1, 2))
        os.kill(pids[0], signal.SIGKILL)
        server.waitFor(r"Worker 0 ended .*restarting", timeout=20)
        # Worker 0 is gone: only its replacement can answer this one.
        source = sourceFor(0, 2)
        client = self.connectedOn(server.port, source)
        port = client.sock.getsockname()[1]
        server.waitFor(rf"echotw worker 0\] Connection from {source}:{port} on ws")
        started = re.findall(r"Started worker 0 \(pid (\d+)\)", server.output())
        self.assertNotEqual(int(started[-1]), pids[0])
        other.send(TextMessage("still here"))
        self.assertEqual(other.receive(), TextMessage("still here"))
        self.assertNotIn("Traceback", server.output())

    def test_maxPerIPAcrossWorkersAndListeners(self) -> None:
        """--max-per-ip 3 holds for the whole server: of 9 connections from
        one address, alternately TCP and WebSocket, exactly 3 are admitted."""
        server = self.start(
            "--workers", "2", "--port", LOOPBACK, "--websocket", WS, "--max-per-ip", "3",
            listeners=2,
        )  # fmt: skip
        workerPids(server, 2, listeners=2)
        self.assertIn("steered by source", server.output())
        tcpPort, wsPort = (int(a.rsplit(":", 1)[1]) for a in server.addresses[:2])
        source = "127.0.0.5"
        results = []
        for n in range(9):
            if n % 2:
                results.append(admitted(self, wsPort, source))
                continue
            sock = openFrom(tcpPort, source)
            self.addCleanup(sock.close)
            results.append(echoes(sock, timeout=5))
            if not results[-1]:
                sock.close()
        self.assertEqual(results.count(True), 3, (results, server.output()))

    def test_goingAwayFromEveryWorker(self) -> None:
        """On SIGTERM to the supervisor, a WebSocket client of each worker
        gets 1001; once they answer, every process exits."""
        server = self.start("--workers", "2", "--websocket", WS, "--max-per-ip", "100")
        workerPids(server, 2)
        clients = {w: self.connectedOn(server.port, sourceFor(w, 2)) for w in (0, 1)}
        for w in (0, 1):
            server.waitFor(rf"echotw worker {w}\] Connection from {sourceFor(w, 2)}:\d+ on ws")
        server.process.send_signal(signal.SIGTERM)
        for client in clients.values():
            close = client.receive()
            self.assertEqual(close, CloseConnection(1001, ""))
            assert isinstance(close, CloseConnection)
            client.closeWith(close)
        self.assertEqual(server.wait(30), -signal.SIGTERM)
        for w in (0, 1):
            self.assertRegex(
                server.output(),
                rf"echotw worker {w}\] Connection from {sourceFor(w, 2)}:\d+ on ws closed"
                r" \(server shutdown\)",
            )

    def test_proxyListenerShared(self) -> None:
        """A haproxy: WebSocket listener is shared by the workers too, each
        taking the client's address from the PROXY header."""
        server = self.start("--workers", "2", "--websocket", f"haproxy:{WS}")
        workerPids(server, 2)
        client = WebSocketClient(server.port, prefix=b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 80\r\n")
        self.addCleanup(client.close)
        client.send(TextMessage("via proxy"))
        self.assertEqual(client.receive(), TextMessage("via proxy"))
        server.waitFor(r"echotw worker \d\] Connection from 192\.0\.2\.7:5555 on ws")
