"""
End-to-end test of the log cap against a real C{twistd -n echo} process: a
flood of denied datagrams, each from a different loopback address, writes
no more than L{LINES_PER_SECOND} drop lines a second, and the summary lines
and the metrics still account for every datagram.  Every wait is bounded.
"""

from __future__ import annotations

import math
import re
import socket
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from echotw.throttlelog import LINES_PER_SECOND
from tests.support.process import LOOPBACK, ServerTestCase, waitUntil

SOURCES = 300
"""Datagrams, each from its own address in 127.2.0.0/16 (denied)."""


class LogCapEndToEndTests(ServerTestCase):
    def test_manySourcesDoNotFloodTheLog(self) -> None:
        """300 denied datagrams from 300 addresses: at most the cap of drop
        lines a second, and the summary lines hold the rest of the drops
        the metrics count."""
        server = self.start(
            "--port", LOOPBACK, "--udp", "udp:0:interface=127.0.0.1",
            "--deny", "127.2.0.0/16", "--metrics", LOOPBACK, listeners=2,
        )  # fmt: skip
        udpPort = int(server.waitFor(r"Listening on udp:\S+ at 127\.0\.0\.1:(\d+)").group(1))
        metrics = server.waitFor(r"Serving metrics on \S+ at (127\.0\.0\.1:\d+)").group(1)
        started = time.monotonic()
        for i in range(SOURCES):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind((f"127.2.{i // 250}.{i % 250 + 1}", 0))
                sock.sendto(b"x", ("127.0.0.1", udpPort))
            if i % 25 == 24:
                time.sleep(0.02)  # paced, so the kernel's receive buffer keeps up
        sending = time.monotonic() - started

        def denied() -> float:
            url = f"http://{metrics}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
            return sum(
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "echotw_udp_dropped_total" and sample.labels["reason"] == "denied"
            )

        def accounted() -> tuple[int, int, float] | None:
            output = server.output()
            lines = len(re.findall(r"Dropped datagram from 127\.2\.", output))
            summed = sum(map(int, re.findall(r"(\d+) more dropped datagrams on udp", output)))
            count = denied()
            return (lines, summed, count) if count and lines + summed == count else None

        # The kernel may still drop a datagram on a loaded machine: the
        # server's own count is what the log must account for.
        lines, summed, count = waitUntil(accounted, "every drop in a line or a summary", 15.0)
        self.assertGreaterEqual(count, SOURCES * 0.8)
        # Windows of one second begin with a line: sending over S seconds
        # touches at most ceil(S) + 1 of them.
        self.assertLessEqual(lines, LINES_PER_SECOND * (math.ceil(sending) + 1))
        self.assertGreater(summed, 0)
