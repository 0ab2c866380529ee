"""
Unit tests of the check of a key or certificate file before it is read:
a small regular file, or a link to one, passes; anything else is refused,
saying what it is.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from echotw.files import MAX_TLS_FILE_BYTES, checkSmallRegularFile
from tests.e2e.test_tlsfiles import BAD_FILES


class CheckSmallRegularFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp())

    def test_smallRegularFile(self) -> None:
        """A regular file within the size, or a link to one, passes."""
        path = self.directory / "key.pem"
        path.write_bytes(b"x" * MAX_TLS_FILE_BYTES)
        link = self.directory / "link.pem"
        link.symlink_to(path)
        checkSmallRegularFile(str(path), MAX_TLS_FILE_BYTES)
        checkSmallRegularFile(str(link), MAX_TLS_FILE_BYTES)

    def test_refused(self) -> None:
        """Anything else is refused, saying what it is."""
        for name, make in BAD_FILES.items():
            path = self.directory / name
            reason = make(path)
            with self.assertRaises(ValueError) as caught:
                checkSmallRegularFile(str(path), MAX_TLS_FILE_BYTES)
            self.assertEqual(str(caught.exception), reason, name)
        with self.assertRaises(ValueError) as caught:
            checkSmallRegularFile(str(self.directory / "missing"), MAX_TLS_FILE_BYTES)
        self.assertEqual(str(caught.exception), "cannot read: No such file or directory")
