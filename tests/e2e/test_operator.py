"""
End-to-end tests of what an operator and a platform meet: health and
readiness through a real shutdown with a drain delay, a gzip scrape, UDP
alone, short listener names and the kernel's listen-queue cap.
"""

from __future__ import annotations

import gzip
import signal
import socket
import urllib.error
import urllib.request

from tests.support.process import LOOPBACK, ServerTestCase, connect, echo, freePort, waitUntil


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=5) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


class HealthEndToEndTests(ServerTestCase):
    def test_readinessThroughDrainDelay(self) -> None:
        """Through a real SIGTERM with --drain-delay: /readyz answers 503
        while the listeners still accept (before the drain begins), new
        connections echo during the delay and are refused after it, and
        /healthz answers 200 throughout."""
        web = freePort()
        server = self.start(
            "--port", LOOPBACK, "--metrics", f"tcp:{web}:interface=127.0.0.1",
            "--drain-delay", "4", "--shutdown-timeout", "5",
        )  # fmt: skip
        base = f"http://127.0.0.1:{web}"
        self.assertEqual(get(f"{base}/readyz")[0], 200)
        self.assertEqual(get(f"{base}/healthz")[0], 200)
        held = connect(server.port)
        self.addCleanup(held.close)
        server.process.send_signal(signal.SIGTERM)
        waitUntil(lambda: get(f"{base}/readyz")[0] == 503, "/readyz did not turn 503")
        self.assertNotIn("Draining", server.output(), "not ready only once the drain began")
        self.assertEqual(get(f"{base}/healthz")[0], 200)
        with connect(server.port) as late:
            # Accepted, so during the delay: the listeners close after it.
            self.assertEqual(echo(late, b"during the delay"), b"during the delay")
        server.waitFor(r"Draining 1 connection ", timeout=20)
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
        self.assertEqual(get(f"{base}/healthz")[0], 200)
        self.assertEqual(get(f"{base}/readyz")[0], 503)
        held.close()
        self.assertEqual(server.wait(20), -signal.SIGTERM)

    def test_healthAlone(self) -> None:
        """--health serves /healthz and /readyz without metrics."""
        web = freePort()
        self.start("--port", LOOPBACK, "--health", f"tcp:{web}:interface=127.0.0.1")
        self.assertEqual(get(f"http://127.0.0.1:{web}/healthz")[0], 200)
        self.assertEqual(get(f"http://127.0.0.1:{web}/readyz")[0], 200)
        self.assertEqual(get(f"http://127.0.0.1:{web}/metrics")[0], 404)

    def test_gzipScrape(self) -> None:
        """A scraper that accepts gzip gets the metrics compressed."""
        web = freePort()
        self.start("--port", LOOPBACK, "--metrics", f"tcp:{web}:interface=127.0.0.1")
        status, body, headers = get(f"http://127.0.0.1:{web}/metrics", {"Accept-Encoding": "gzip"})
        self.assertEqual(status, 200)
        self.assertEqual(headers.get("Content-Encoding"), "gzip")
        self.assertIn(b"echotw_connections_total", gzip.decompress(body))


class ListenerEndToEndTests(ServerTestCase):
    def test_udpAloneOpensNoTCP(self) -> None:
        """--udp alone opens a UDP listener and no TCP one (the default port
        applies only when no listener of any kind is given)."""
        server = self.start("--udp", "udp:0:interface=127.0.0.1")
        output = server.output()
        self.assertEqual(server.addresses, [server.addresses[0]])
        self.assertNotRegex(output, r"Listening on tcp")
        self.assertRegex(output, r"Listening on udp:0:interface=127\.0\.0\.1")
        self.assertRegex(output, r"UDP replies on udp:0\S* are limited to 100/s per source, 200")

    def test_shortNames(self) -> None:
        """A listener named with name= is called so in logs."""
        server = self.start("--port", "tcp:0:interface=127.0.0.1:name=edge")
        with connect(server.port) as sock:
            self.assertEqual(echo(sock, b"hi"), b"hi")
        server.waitFor(r"Connection from 127\.0\.0\.1:\d+ on edge closed")
        self.assertRegex(server.output(), r"Listening on edge at 127\.0\.0\.1:\d+")

    def test_backlogCapSaid(self) -> None:
        """A --backlog above the kernel's cap is said once at start-up."""
        cap = int(open("/proc/sys/net/core/somaxconn").read())
        if cap >= 65535:
            self.skipTest("the kernel here caps no backlog echotw accepts")
        server = self.start("--port", LOOPBACK, "--backlog", str(cap + 1))
        server.waitFor(rf"Listen queue of \S+ is {cap + 1}, but the kernel caps it at {cap}")
        self.assertEqual(server.output().count("caps it at"), 1)
