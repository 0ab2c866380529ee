"""
End-to-end tests of settings that reach their place only through the
wiring of a real C{twistd -n echo} process: C{--bandwidth} on UDP listeners,
and the cap on a lingering close.  Each fails if the setting stops reaching
its place (a mutation the unit tests of the pieces do not see).
"""

from __future__ import annotations

import select
import socket
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.support.process import LOOPBACK, ServerTestCase, connect, waitUntil

UDP_LOOPBACK = "udp:0:interface=127.0.0.1"

LINGER_CAP = 30.0
"""
Seconds a lingering close lasts at most, as promised; written here, not
imported, so that a change of the server's constant is seen.
"""


def udpDrops(metrics: str) -> dict[str, float]:
    """
    The server's count of UDP datagrams not echoed, by reason.
    """
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "echotw_udp_dropped_total"
    }


class UDPBandwidthEndToEndTests(ServerTestCase):
    def test_bandwidthLimitsUDP(self) -> None:
        """--bandwidth 1k applies to UDP too: of 100 datagrams of 40 bytes
        sent at once (4 seconds' worth), the server echoes some and drops
        the rest for bandwidth, and says so; every datagram is one or the
        other."""
        server = self.start(
            "--udp", UDP_LOOPBACK, "--bandwidth", "1k", "--udp-rate", "0",
            "--metrics", LOOPBACK,
        )  # fmt: skip
        udpPort = int(server.waitFor(r"Listening on udp:\S+ at 127\.0\.0\.1:(\d+)").group(1))
        metrics = server.webAddress()
        echoed = 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            for i in range(100):
                sock.sendto(b"%040d" % i, ("127.0.0.1", udpPort))

            def accounted() -> bool:
                nonlocal echoed
                while select.select([sock], [], [], 0)[0]:
                    sock.recv(100)
                    echoed += 1
                return echoed + sum(udpDrops(metrics).values()) >= 100

            waitUntil(accounted, "the 100 datagrams were not all echoed or dropped", 30)
        drops = udpDrops(metrics)
        self.assertGreater(drops.get("impairment-bandwidth", 0), 0, (echoed, drops))
        self.assertEqual(echoed + drops["impairment-bandwidth"], 100, (echoed, drops))


class LingerCapEndToEndTests(ServerTestCase):
    def test_lingerEndsAtItsCap(self) -> None:
        """A connection closed for --max-session-seconds whose client keeps
        sending (so the lingering close always sees something move) and
        never closes is let go once the linger's cap has passed, not held
        for longer: its next bytes meet a closed socket."""
        server = self.start("--port", LOOPBACK, "--max-session-seconds", "1")
        with connect(server.port) as sock:
            sock.settimeout(30)
            self.assertEqual(sock.recv(16), b"", "no EOF at the session limit")
            halfClosed = time.monotonic()
            # Thrice the cap: a loaded machine is late by far less.
            deadline = halfClosed + 3 * LINGER_CAP
            while True:
                self.assertLess(time.monotonic(), deadline, "still lingering")
                try:
                    sock.send(b"x")
                except (ConnectionResetError, BrokenPipeError):
                    break
                time.sleep(0.2)
        lingered = time.monotonic() - halfClosed
        self.assertGreaterEqual(lingered, LINGER_CAP - 1)
        server.waitFor(r"closed \(max-session-seconds\)")
