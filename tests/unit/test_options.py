"""
Unit tests of the operator's options: their documented defaults, and the
one-line errors for values they refuse.
"""

from __future__ import annotations

from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from echotw.options import EchoOptions


class OptionTests(SynchronousTestCase):
    def test_operationsOptions(self) -> None:
        """The operator's options parse with their documented defaults."""
        options = EchoOptions()
        options.parseOptions([])
        self.assertEqual(
            (options["idle-timeout"], options["rate"], options["burst"], options["stats-interval"]),
            (300.0, 0.0, 10.0, 0.0),
        )
        options = EchoOptions()
        options.parseOptions(
            ["--idle-timeout", "0", "--rate", "5/s", "--burst", "2", "--max-session-bytes", "100",
             "--max-session-seconds", "1.5", "--stats-interval", "30"]
        )  # fmt: skip
        self.assertEqual(
            (options["idle-timeout"], options["rate"], options["burst"]), (0.0, 5.0, 2.0)
        )
        self.assertEqual((options["max-session-bytes"], options["max-session-seconds"]), (100, 1.5))

    def test_badValues(self) -> None:
        """Bad values name their option."""
        for args in (
            ["--idle-timeout", "-1"], ["--rate", "fast"], ["--burst", "0"],
            ["--max-session-bytes", "-5"], ["--max-session-seconds", "inf"],
            ["--stats-interval", "x"],
        ):  # fmt: skip
            with self.assertRaises(UsageError) as ctx:
                EchoOptions().parseOptions(args)
            self.assertIn(args[0], str(ctx.exception))
