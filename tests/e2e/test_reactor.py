"""
Tests of when L{echotw.transport.reactor} is installed, in fresh Python processes:
it becomes the reactor where none was chosen, and leaves a chosen or
installed one alone.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from echotw.transport import reactor as echoreactor


class InstallTests(SynchronousTestCase):
    def test_leavesAnInstalledReactorAlone(self) -> None:
        """With a reactor already installed (here, the test runner's), nothing
        is replaced."""
        from twisted.internet import reactor

        before = type(reactor)
        self.assertFalse(echoreactor.installIfUnchosen())
        self.assertIs(type(sys.modules["twisted.internet.reactor"]), before)

    def run_python(self, code: str) -> str:
        result = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout.strip()

    def test_installedWhenNoneWasChosen(self) -> None:
        """In a fresh process it becomes the reactor, unless one was chosen."""
        if echoreactor.EPollReactor is None:
            raise SkipTest("no epoll on this platform")
        report = "from twisted.internet import reactor; print(installed, type(reactor).__name__)"
        fresh = "from echotw.transport.reactor import installIfUnchosen; installed = installIfUnchosen(); "
        self.assertEqual(self.run_python(fresh + report), "True EchoReactor")
        chosen = "from twisted.internet import pollreactor; pollreactor.install(); " + fresh
        self.assertEqual(self.run_python(chosen + report), "False PollReactor")
