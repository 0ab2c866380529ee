"""
End-to-end tests of JSON logs from a real C{twistd --logger
echotw.logs.jsonObserver echo} process.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.support.process import TWISTD, temporaryDirectory


class TwistdJSONLogTests(SynchronousTestCase):
    """
    A real C{twistd --logger echotw.logs.jsonObserver echo} process.
    """

    def waitForLine(
        self, path: Path, process: subprocess.Popen[bytes], want: dict[str, Any]
    ) -> dict[str, Any]:
        """
        Poll the process's standard output until a JSON line has all the
        items of C{want}; every line seen must be a JSON object.
        """
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            for record in self.records(path):
                if want.items() <= record.items():
                    return record
            if process.poll() is not None:
                break
            time.sleep(0.02)
        self.fail(f"no line with {want} in:\n{path.read_text(errors='replace')}")

    def records(self, path: Path) -> list[dict[str, Any]]:
        text = path.read_text()
        complete = text[: text.rfind("\n") + 1]
        records = []
        for line in complete.splitlines():
            record = json.loads(line)
            self.assertIsInstance(record, dict, line)
            records.append(record)
        return records

    def test_connectionEventsAsJSONLines(self) -> None:
        """Every line twistd writes is a JSON object; the listening event
        gives the bound port, and a connection's close event carries the
        client address, listener, bytes, duration and reason."""
        workdir = temporaryDirectory(self, prefix="echotw-json-")
        stdoutPath = workdir / "stdout.log"
        stderrPath = workdir / "stderr.log"
        listener = "tcp:0:interface=127.0.0.1"
        with stdoutPath.open("wb") as stdout, stderrPath.open("wb") as stderr:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    TWISTD,
                    "--nodaemon",
                    "--pidfile=",
                    "--logger",
                    "echotw.logs.jsonObserver",
                    "echo",
                    "--port",
                    listener,
                ],
                cwd=workdir,
                stdout=stdout,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
            )

        def kill() -> None:
            if process.poll() is None:
                process.kill()
                process.wait(10)

        self.addCleanup(kill)

        listening = self.waitForLine(stdoutPath, process, {"event": "listening"})
        self.assertEqual(listening["listener"], listener)
        port = listening["port"]
        self.assertIsInstance(port, int)

        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            clientPort = sock.getsockname()[1]
            sock.sendall(b"hi")
            received = b""
            while len(received) < 2:
                chunk = sock.recv(16)
                self.assertTrue(chunk, "server closed before echoing")
                received += chunk
            self.assertEqual(received, b"hi")

        closed = self.waitForLine(
            stdoutPath, process, {"event": "closed", "client_port": clientPort}
        )
        self.assertEqual(closed["client_host"], "127.0.0.1")
        self.assertEqual(closed["listener"], listener)
        self.assertEqual(closed["bytes"], 2)
        self.assertIsInstance(closed["duration"], float)
        self.assertEqual(closed["reason"], "client closed")
        self.assertEqual(closed["level"], "info")
        self.assertIn(f"127.0.0.1:{clientPort}", closed["message"])

        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(20)
        except subprocess.TimeoutExpired:
            self.fail("twistd did not exit within 20s of SIGTERM")
        # twistd re-raises the signal that stopped it, after a clean shutdown.
        self.assertIn(code, (0, -signal.SIGTERM), stderrPath.read_text(errors="replace"))
        text = stdoutPath.read_text()
        self.assertTrue(text.endswith("\n"))
        records = self.records(stdoutPath)
        self.assertEqual(len(records), len(text.splitlines()))
        self.assertEqual(records[-1]["message"], "Server Shut Down.")
