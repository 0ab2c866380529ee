"""
End-to-end tests of what a user meets first, against a real twistd: the
one-line errors for habits brought from other tools, and the start-up line
that announces the impairment in force.
"""

from __future__ import annotations

from tests.support.process import LOOPBACK, ServerTestCase, run

UDP_LOOPBACK = "udp:0:interface=127.0.0.1"


class StartupEndToEndTests(ServerTestCase):
    def assertOneLineExit(self, *args: str) -> str:
        result = run(*args)
        self.assertNotEqual(result.returncode, 0, result.stderr)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertNotIn("Listening", result.stdout + result.stderr)
        return lines[0]

    def test_habitsOneLineEach(self) -> None:
        """twistd exits non-zero with one line for each habit."""
        self.assertIn(
            "write tcp:8080:interface=127.0.0.1", self.assertOneLineExit("--port", "127.0.0.1:8080")
        )
        for args in (["-n"], ["--pidfile", "x.pid"], ["--logfile", "x.log"]):
            self.assertIn("before 'echo'", self.assertOneLineExit("--port", LOOPBACK, *args))
        self.assertIn(
            "write 200s if that is meant, or 200ms",
            self.assertOneLineExit("--port", LOOPBACK, "--delay", "200"),
        )

    def test_impairmentAnnounced(self) -> None:
        """An impaired server says so at start-up, with units, even at
        --log-level warning."""
        server = self.start(
            "--port", LOOPBACK, "--udp", UDP_LOOPBACK, "--log-level", "warning",
            "--delay", "200ms", "--jitter", "0.05", "--bandwidth", "64k", "--udp-loss", "5%",
            listeners=0,
        )  # fmt: skip
        server.waitFor(
            r"Impairment in force: delay 200ms, jitter 50ms, bandwidth 64000 bytes/s, "
            r"udp-loss 5%"
        )

    def test_impairmentAnnouncedOnceWithWorkers(self) -> None:
        """With --workers the supervisor says it once, not each worker."""
        server = self.start("--port", LOOPBACK, "--workers", "2", "--delay", "50ms")
        server.waitForCount(r"Worker running on", 2, timeout=30)
        self.assertEqual(server.output().count("Impairment in force: delay 50ms"), 1)
