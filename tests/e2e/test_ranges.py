"""
End-to-end tests of the option ranges: twistd given a value out of range
exits with status 1 and one line naming the option, before anything
listens.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.support.process import run


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
