"""
The key and certificate files an C{ssl:} listener names are checked before
Twisted reads them whole: a device, a FIFO, a directory or an oversized
file is one line and exit status 1 at start-up, not a server that fills
memory reading C{/dev/zero} or waits for ever on a FIFO.
"""

from __future__ import annotations

import os
import resource
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from echotw.files import MAX_TLS_FILE_BYTES, checkSmallRegularFile
from tests.process import serverDirectory, twistdCommand
from tests.test_e2e_rulefiles import BAD_FILES as BAD_RULE_FILES


def writeHugeFile(path: Path) -> str:
    with path.open("wb") as f:
        f.truncate(MAX_TLS_FILE_BYTES + 1)
    return (
        f"{MAX_TLS_FILE_BYTES + 1} bytes, more than a key or certificate file holds "
        f"({MAX_TLS_FILE_BYTES} at most)"
    )


BAD_FILES = {
    **{name: make for name, make in BAD_RULE_FILES.items() if name != "long line"},
    "huge": writeHugeFile,
}
"""The bad rule files that are not regular files, and one too large."""


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


def limitMemory() -> None:
    # Without the check, reading /dev/zero would take all the memory there is.
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


class TLSFilesEndToEndTests(SynchronousTestCase):
    def test_refusedAtStartUp(self) -> None:
        """Each bad file as privateKey=, certKey= or extraCertChain= ends
        twistd at once with one line naming the parameter, the file and why."""
        directory = Path(tempfile.mkdtemp())
        good = directory / "good.pem"
        good.write_text("not read: the check comes first\n")
        cases = []
        for name, make in BAD_FILES.items():
            path = directory / name
            reason = make(path)
            for key in ("privateKey", "certKey", "extraCertChain"):
                files = {"privateKey": good, "certKey": good, key: path}
                listener = "ssl:0:interface=127.0.0.1:" + ":".join(
                    f"{k}={v}" for k, v in files.items()
                )
                cases.append((name, listener, f"{key}={path}: {reason}"))

        def start(listener: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                twistdCommand("--port", listener),
                capture_output=True,
                text=True,
                timeout=30,
                cwd=serverDirectory(),
                stdin=subprocess.DEVNULL,
                preexec_fn=limitMemory,
            )

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(start, [listener for _, listener, _ in cases]))
        for (name, listener, expected), result in zip(cases, results, strict=True):
            self.assertEqual(result.returncode, 1, (name, result.stdout, result.stderr))
            self.assertEqual(
                result.stderr.strip().splitlines(),
                [f"echo: error: --port: {listener!r}: {expected} (see --help)"],
                name,
            )
        os.remove(good)
