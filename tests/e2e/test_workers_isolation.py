"""
End to end: the worker processes of C{--workers} import nothing from the
directory the server was started in, where another user may have left
modules named like those a worker imports.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from tests.e2e.test_workers import workerPids
from tests.support.process import TWISTD, ServerTestCase, connect, echo

PLANTED = ("ipaddress", "json", "mmap", "zope", "echotw")
"""
Modules a worker imports (the standard library's, a dependency's, echotw
itself): each planted copy leaves a marker if it is ever imported.
"""

SAFE_TWISTD = "import sys; sys.path[:] = [p for p in sys.path if p]; " + TWISTD
"""
C{twistd} started without the current directory on its own path, as the
installed C{twistd} script is, so that only what its workers import is tested.
"""


class PlantedModuleTests(ServerTestCase):
    def plant(self) -> tuple[Path, Path]:
        """
        A directory holding the planted modules, and where their markers go.
        """
        directory = self.temporaryDirectory()
        markers = directory / "markers"
        markers.mkdir()
        for name in PLANTED:
            code = f"open({str(markers / name)!r}, 'w').close()\n"
            if name == "echotw":
                (directory / name).mkdir()
                (directory / name / "__init__.py").write_text(code)
            else:
                (directory / f"{name}.py").write_text(code)
        return directory, markers

    def test_plantedModulesNotImportedByWorkers(self) -> None:
        """Started from a directory holding planted modules, both workers
        and the one started in place of a killed one serve without
        importing any of them."""
        directory, markers = self.plant()
        server = self.start(
            cwd=directory,
            command=[
                sys.executable,
                "-c",
                SAFE_TWISTD,
                "--nodaemon",
                "--pidfile=",
                "echo",
                "--workers",
                "2",
                "--port",
                "tcp:0:interface=127.0.0.1",
            ],
        )
        try:
            pids = workerPids(server, 2)
        finally:
            # A planted echotw stops the workers: say what ran first.
            self.assertEqual(sorted(os.listdir(markers)), [])
        with connect(server.port) as sock:
            self.assertEqual(echo(sock, b"planted"), b"planted")
        self.assertEqual(sorted(os.listdir(markers)), [])

        os.kill(pids[0], signal.SIGKILL)
        server.waitForCount(r"echotw worker 0\] Worker running on", 2, timeout=30)
        with connect(server.port) as sock:
            self.assertEqual(echo(sock, b"again"), b"again")
        self.assertEqual(sorted(os.listdir(markers)), [])
        self.assertNotIn("Traceback", server.output())
