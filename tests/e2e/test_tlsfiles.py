"""
The key and certificate files an C{ssl:} listener names are checked before
Twisted reads them whole: a device, a FIFO, a directory or an oversized
file is one line and exit status 1 at start-up, not a server that fills
memory reading C{/dev/zero} or waits for ever on a FIFO.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from echotw.files import MAX_TLS_FILE_BYTES, TLS_EXTRA
from tests.e2e.test_rulefiles import BAD_FILES as BAD_RULE_FILES
from tests.support.process import TWISTD, environmentWithRoot, serverDirectory, twistdCommand


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


WITHOUT_OPENSSL = "import sys; sys.modules['OpenSSL'] = None; "
"""Run first, makes every import of pyOpenSSL fail as if it were not installed."""


class WithoutTLSTests(SynchronousTestCase):
    def run_(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", *command],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=serverDirectory(),
            env=environmentWithRoot(),
            stdin=subprocess.DEVNULL,
        )

    def test_sayWhatToInstall(self) -> None:
        """Without pyOpenSSL, an ssl: listener (behind haproxy: too) and
        echotw-probe --tls each fail at start-up with one line saying what
        to install, in terms that work from a checkout: no index has
        echotw, so not C{pip install 'echotw[tls]'}."""
        self.assertIn(".[tls]", TLS_EXTRA)
        self.assertNotIn("echotw[tls]", TLS_EXTRA)
        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory, True)
        pem = directory / "server.pem"
        pem.write_text("not read: the module is missing\n")
        for listener in (f"ssl:0:privateKey={pem}", f"haproxy:ssl:0:privateKey={pem}"):
            result = self.run_(
                WITHOUT_OPENSSL + TWISTD, "--nodaemon", "--pidfile=", "echo", "--port", listener
            )
            self.assertEqual(
                (result.returncode, result.stderr.strip().splitlines()),
                (1, [f"echo: error: --port: {listener!r}: needs the OpenSSL module "
                     f"({TLS_EXTRA}) (see --help)"]),
            )  # fmt: skip
        result = self.run_(
            WITHOUT_OPENSSL + "from echotw.probe import main; main()", "--tls", "127.0.0.1", "7"
        )
        [line] = result.stderr.strip().splitlines()
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertRegex(
            line, rf"^echotw-probe: error: --tls needs pyOpenSSL .*\({re.escape(TLS_EXTRA)}\)"
        )
