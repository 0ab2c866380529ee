"""
Unit tests of custom verifiers (--verifier): loading one by its dotted
name, what it is asked and what its answer does, and the one-line errors
for one that cannot be loaded.
"""

from __future__ import annotations

import os
import sys
import textwrap

from twisted.internet.task import Clock
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from echotw.factory import EchoFactory
from echotw.options import EchoOptions
from echotw.rules.policy import loadVerifier
from tests.support.process import temporaryDirectory
from tests.unit.test_housekeeping import client


class VerifierTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = str(temporaryDirectory(self))
        with open(os.path.join(self.directory, "my_verifiers.py"), "w") as f:
            f.write(
                textwrap.dedent(
                    """
                    def evenPorts(address, listener):
                        return None if address.port % 2 == 0 else "odd port"

                    class OnlyListener:
                        def __init__(self):
                            self.allowed = "tcp:7"
                        def __call__(self, address, listener):
                            return listener == self.allowed

                    notCallable = 3
                    """
                )
            )
        sys.path.insert(0, self.directory)
        self.addCleanup(sys.path.remove, self.directory)
        self.addCleanup(sys.modules.pop, "my_verifiers", None)

    def test_function(self) -> None:
        """A function is used as it is."""
        verifier = loadVerifier("my_verifiers:evenPorts")
        factory = EchoFactory(verifiers=[verifier], clock=Clock())
        self.assertIsNotNone(factory.buildProtocolFor(client(port=2), "l"))
        self.assertIsNone(factory.buildProtocolFor(client(port=3), "l"))
        self.assertEqual(factory.stats.refusals, {"odd port": 1})

    def test_classInstantiated(self) -> None:
        """A class is instantiated and its instance called."""
        verifier = loadVerifier("my_verifiers:OnlyListener")
        self.assertTrue(verifier(client(), "tcp:7"))
        self.assertFalse(verifier(client(), "tcp:8"))
        self.assertTrue(callable(loadVerifier("my_verifiers.evenPorts")))

    def test_errors(self) -> None:
        """Import problems are one-line errors."""
        for name in [
            "nosuchmodule_xyz:f",
            "my_verifiers:missing",
            "my_verifiers:notCallable",
            "nocolon",
        ]:
            with self.assertRaises(ValueError, msg=name) as ctx:
                loadVerifier(name)
            self.assertNotIn("\n", str(ctx.exception))
        with self.assertRaises(UsageError) as ctx2:
            EchoOptions().parseOptions(["--verifier", "nosuchmodule_xyz:f"])
        self.assertIn("--verifier", str(ctx2.exception))
