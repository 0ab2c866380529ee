"""
echotw's version comes from the installed package's metadata.
"""

from __future__ import annotations

import re
from importlib import metadata

from twisted.trial.unittest import SynchronousTestCase

from echotw import version
from tests.support.process import ROOT


def declaredVersion() -> str:
    """
    The version pyproject.toml declares (read with a pattern: tomllib is
    Python 3.11+ and echotw supports 3.10).
    """
    match = re.search(r'(?m)^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text())
    assert match is not None, "no version line in pyproject.toml"
    return match[1]


class VersionTests(SynchronousTestCase):
    def test_installedVersion(self) -> None:
        """__version__ is the version pyproject.toml declares, as installed
        (reinstall after changing it)."""
        self.assertEqual(version.__version__, declaredVersion())
        self.assertEqual(version.__version__, metadata.version("echotw"))

    def test_notInstalled(self) -> None:
        """Without package metadata (a source tree on sys.path) the version
        is 0+unknown, not an exception at import."""

        def missing(distribution: str) -> str:
            raise metadata.PackageNotFoundError(distribution)

        self.patch(version, "version", missing)
        self.assertEqual(version.installedVersion(), "0+unknown")

    def test_otherDistribution(self) -> None:
        """installedVersion reads the named distribution's metadata."""
        self.assertEqual(version.installedVersion("twisted"), metadata.version("twisted"))

    def test_twistdEchoVersion(self) -> None:
        """twistd echo --version names echotw's own version, then Twisted's."""
        import twisted
        from tests.support.process import run

        result = run("--version")
        self.assertEqual(result.returncode, 0)
        self.assertEqual(
            result.stdout.strip(),
            f"echotw {declaredVersion()} (Twisted {twisted.__version__})",
        )
