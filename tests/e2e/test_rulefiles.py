"""
End-to-end tests of rule files that are not rule files, against a real
C{twistd -n echo} process: a device, a FIFO, a directory, a file with an
over-long line.  At start-up each is one line and exit status 1 with nothing
listening; on a SIGHUP reload each is one error line and the rules in force
stay.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from echotw.rules.files import MAX_LINE_BYTES
from tests.support.process import ServerTestCase, connect, echo, freePort, refusedFrom, run


def makeFifo(path: Path) -> str:
    os.mkfifo(path)
    return "not a regular file (a FIFO)"


def linkToDevZero(path: Path) -> str:
    path.symlink_to("/dev/zero")
    return "not a regular file (a character device)"


def makeDirectory(path: Path) -> str:
    path.mkdir()
    return "not a regular file (a directory)"


def writeLongLine(path: Path) -> str:
    path.write_bytes(b"127.0.0.2\n# " + b"x" * MAX_LINE_BYTES + b"\n")
    return f"line longer than {MAX_LINE_BYTES} bytes"


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    else:
        path.unlink()


BAD_FILES: dict[str, Callable[[Path], str]] = {
    "device": linkToDevZero,
    "FIFO": makeFifo,
    "directory": makeDirectory,
    "long line": writeLongLine,
}
"""Each makes the path it is given a bad rule file, and returns the reason."""


class BadRuleFileEndToEndTests(ServerTestCase):
    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp())

    def test_refusedAtStartUp(self) -> None:
        """Each bad rule file ends twistd with one line naming the option,
        the file (and line) and why, exit status 1, and nothing listening."""
        cases = []
        for name, make in BAD_FILES.items():
            path = self.directory / name.replace(" ", "-")
            reason = make(path)
            where = f"{path}:2" if name == "long line" else str(path)
            cases.append((name, path, f"--deny-file: {where}: {reason}", freePort()))

        def start(case: tuple[str, Path, str, int]) -> tuple[str, int, str, str]:
            _, path, _, port = case
            result = run("--port", f"tcp:{port}:interface=127.0.0.1", "--deny-file", str(path))
            return result.stdout + result.stderr, result.returncode, result.stderr, str(port)

        with ThreadPoolExecutor(len(cases)) as pool:
            results = list(pool.map(start, cases))
        for (name, _, expected, port), (output, status, stderr, _) in zip(
            cases, results, strict=True
        ):
            self.assertEqual(status, 1, (name, output))
            self.assertEqual(
                stderr.strip().splitlines(), [f"echo: error: {expected} (see --help)"], name
            )
            self.assertNotIn("Listening", output, name)
            with socket.socket() as sock:
                self.assertNotEqual(sock.connect_ex(("127.0.0.1", port)), 0, name)

    def test_reloadKeepsRules(self) -> None:
        """On SIGHUP, each bad rule file in place of a good one is one error
        line naming it; the rules already in force stay (127.0.0.2 still
        denied, 127.0.0.1 still served), and a good file later applies."""
        path = self.directory / "deny.rules"
        path.write_text("127.0.0.2\n")
        server = self.start("--port", "tcp:0:interface=127.0.0.1", "--deny-file", str(path))
        self.assertTrue(refusedFrom(server.port, "127.0.0.2"))
        for count, (name, make) in enumerate(BAD_FILES.items(), 1):
            remove(path)
            reason = make(path)
            os.kill(server.pid, signal.SIGHUP)
            server.waitForCount("Rules not reloaded", count)
            errors = [line for line in server.output().splitlines() if "Rules not reloaded" in line]
            self.assertEqual(len(errors), count, name)
            self.assertIn(f"{path}", errors[-1], name)
            self.assertIn(reason, errors[-1], name)
            self.assertTrue(refusedFrom(server.port, "127.0.0.2"), name)
            with connect(server.port) as sock:
                self.assertEqual(echo(sock, b"still served"), b"still served", name)
        remove(path)
        path.write_text("")
        os.kill(server.pid, signal.SIGHUP)
        server.waitFor(r"Rules reloaded: 0 allow and 0 deny networks")
        with socket.socket() as sock:
            sock.bind(("127.0.0.2", 0))
            sock.settimeout(10)
            sock.connect(("127.0.0.1", server.port))
            self.assertEqual(echo(sock, b"served again"), b"served again")
        self.assertNotIn("Traceback", server.output())
