"""
End-to-end tests of the option ranges: twistd given a value out of range
exits with status 1 and one line naming the option, before anything
listens.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.process import run

YEAR = "31536000"

RANGES: dict[str, tuple[list[str], list[str]]] = {
    # option: (refused values, accepted values at the edges of the range)
    "backlog": (["0", "-1", "65536", "99999999999999", "1.5", "many"], ["1", "65535"]),
    "max-connections": (["-1", "10000001", "5.5", "1e3"], ["0", "1", "10000000"]),
    "max-per-ip": (["-1", "10000001", "two"], ["0", "1", "10000000"]),
    "ipv6-prefix": (["0", "129", "64.0"], ["1", "128"]),
    "rate": (["-1", "0.0009", "1000001", "inf", "nan", "5/min"], ["0", "0.001", "1000000/s"]),
    "burst": (["0", "0.5", "1000001", "inf"], ["1", "1000000"]),
    "idle-timeout": (["1e-9", "0.09", "-1", "31536001", "inf", "nan"], ["0", "0.1", YEAR]),
    "max-session-bytes": (["-1", "1000000000000001", "1MB"], ["0", "1", "1000000000000000"]),
    "max-session-seconds": (["0.001", "-0.5", "31536001", "inf"], ["0", "0.1", YEAR]),
    "log-connections": (["-1", "1000001", "0.5"], ["0", "1", "1000000"]),
    "stats-interval": (["0.001", "0.999", "-1", "31536001", "nan"], ["0", "1", YEAR]),
    "workers": (["0", "65"], ["1", "64"]),
    "udp-rate": (["-1", "0.0001", "1000001", "inf"], ["0", "0.001", "1000000"]),
    "udp-burst": (["0", "0.99", "1000001"], ["1", "1000000"]),
    "proxy-timeout": (["0", "0.05", "31536001", "inf"], ["0.1", YEAR]),
    "shutdown-timeout": (["-2", "nan", "1e-9", "31536001"], ["0", "0.1", YEAR]),
    "drain-delay": (["-1", "0.01", "31536001", "inf"], ["0", "0.1", YEAR]),
    "worker-timeout": (["-1", "31536001", "inf", "nan", "5 minutes"], ["0", YEAR]),
    "delay": (["-1", "601s", "inf", "nan", "1h", "200"], ["0", "600s"]),
    "jitter": (["-0.5", "600.5s", "inf", "nan", "10"], ["0", "600s"]),
    "bandwidth": (["-1", "0.5", "100000000001", "1x", "inf"], ["0", "1"]),
    "udp-loss": (["-0.1", "1.01", "nan", "101%"], ["0", "1"]),
}


class OptionRangeEndToEndTests(SynchronousTestCase):
    def test_outOfRangeExitsWithOneLine(self) -> None:
        """twistd given an out-of-range value exits with status 1 and one
        line naming the option, before anything listens."""
        result = run("--port", "tcp:0:interface=127.0.0.1", "--idle-timeout", "1e-9")
        self.assertEqual(result.returncode, 1, result.stderr)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertIn("--idle-timeout", lines[0])
        self.assertNotIn("Listening", result.stdout + result.stderr)
