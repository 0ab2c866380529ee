"""
Unit tests of the module search path a worker is started with: the
directory the server was started in is dropped, echotw's own kept last.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from echotw.workers.command import workerPath


class WorkerPathTests(SynchronousTestCase):
    def test_currentDirectoryDropped(self) -> None:
        """Empty and relative entries and the current directory, which all
        stand for the directory the server was started in, are dropped;
        the rest keep their order, each once."""
        path = ["", "/srv/start", "/usr/lib/python3", ".", "lib", "/venv/site", "/usr/lib/python3"]
        self.assertEqual(
            workerPath(path, "/srv/start", "/venv/site"), ["/usr/lib/python3", "/venv/site"]
        )

    def test_packageRootKeptLast(self) -> None:
        """The directory echotw came from stays searchable, after everything
        else, even when it is the current directory."""
        self.assertEqual(
            workerPath(["/srv/echotw", "/usr/lib/python3"], "/srv/echotw", "/srv/echotw"),
            ["/usr/lib/python3", "/srv/echotw"],
        )
