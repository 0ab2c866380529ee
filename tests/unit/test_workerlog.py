"""
Tests for L{echotw.workers.logs}: where workers' log lines go, what they look
like, and the relay for outputs the workers cannot share.
"""

from __future__ import annotations

import io
import json
import os
import sys

from twisted.logger import (
    LogLevel,
    eventAsJSON,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.trial.unittest import SynchronousTestCase

from echotw.logs import jsonObserver
from echotw.workers.logs import (
    RELAY,
    LineWriter,
    LogOutput,
    logOutputFor,
    relayRecords,
    workerObserver,
)


def event(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "log_format": "Connection from {client_host}",
        "log_level": LogLevel.info,
        "log_namespace": "echotw.factory.EchoFactory",
        "log_time": 1_700_000_000.0,
        "client_host": "10.0.0.1",
    }
    base.update(fields)
    return base


class LogOutputTests(SynchronousTestCase):
    def test_twistdStdout(self) -> None:
        """twistd -n without --logfile writes text to standard output, which workers share."""
        stdout = sys.stdout.fileno()
        for runner in [
            {"logfile": None, "nodaemon": True, "logger": None, "syslog": False},
            {"logfile": "-", "nodaemon": True, "logger": None},
        ]:
            self.assertEqual(logOutputFor(runner), LogOutput("text", stdout))

    def test_twistdJSONLogger(self) -> None:
        """twistd --logger echotw.logs.jsonObserver: workers write JSON lines."""
        runner = {"logfile": None, "nodaemon": True, "logger": jsonObserver}
        self.assertEqual(logOutputFor(runner), LogOutput("json", sys.stdout.fileno()))

    def test_relayed(self) -> None:
        """A rotated log file, syslog, another logger or no runner: relayed."""
        for runner in [
            None,
            {},
            {"logfile": "twistd.log", "nodaemon": True, "logger": None},
            {"logfile": None, "nodaemon": False, "logger": None},
            {"logfile": None, "nodaemon": True, "logger": None, "syslog": True},
            {"logfile": None, "nodaemon": True, "logger": textFileLogObserver},
        ]:
            self.assertEqual(logOutputFor(runner), RELAY, runner)

    def test_twist(self) -> None:
        """twist: its format, its file, its level."""
        with open(os.devnull, "a") as f:
            runner = {
                "fileLogObserverFactory": jsonFileLogObserver,
                "logFile": f,
                "logLevel": LogLevel.warn,
            }
            self.assertEqual(logOutputFor(runner), LogOutput("twisted-json", f.fileno(), "warn"))
            runner["logFile"] = io.StringIO()
            self.assertEqual(logOutputFor(runner), RELAY)

    def test_description(self) -> None:
        """A worker reads back what the supervisor describes (on its stdout)."""
        for output in [LogOutput("text", 5), LogOutput("twisted-json", 9, "warn"), RELAY]:
            back = LogOutput.fromDescription(output.describe())
            self.assertEqual((back.format, back.level), (output.format, output.level))
        self.assertEqual(LogOutput.fromDescription("nonsense"), RELAY)


class WorkerObserverTests(SynchronousTestCase):
    def test_textLine(self) -> None:
        """Text lines name the worker as their system, one line per event."""
        out = io.StringIO()
        workerObserver(LogOutput("text", 1), 3, out)(event())
        line = out.getvalue()
        self.assertEqual(line.count("\n"), 1)
        self.assertIn("[echotw worker 3] Connection from 10.0.0.1", line)

    def test_jsonLine(self) -> None:
        """JSON lines carry the worker and its pid."""
        out = io.StringIO()
        workerObserver(LogOutput("json", 1), 2, out)(event())
        record = json.loads(out.getvalue())
        self.assertEqual((record["worker"], record["worker_pid"]), (2, os.getpid()))
        self.assertEqual(record["message"], "Connection from 10.0.0.1")

    def test_level(self) -> None:
        """A runner's level leaves out less important events."""
        out = io.StringIO()
        observer = workerObserver(LogOutput("text", 1, "warn"), 0, out)
        observer(event())
        observer(event(log_level=LogLevel.error))
        self.assertEqual(out.getvalue().count("\n"), 1)

    def test_relayRoundTrip(self) -> None:
        """Relayed records come back as the events, marked, however the
        stream was cut."""
        out = io.StringIO()
        observer = workerObserver(RELAY, 1, out)
        observer(event())
        observer(event(client_host="10.0.0.2"))
        data = out.getvalue().encode("utf-8")
        events, rest = relayRecords(b"", data[:7])
        self.assertEqual(events, [])
        events, rest = relayRecords(rest, data[7:])
        self.assertEqual(rest, b"")
        self.assertEqual([e["client_host"] for e in events], ["10.0.0.1", "10.0.0.2"])
        self.assertEqual({e["log_system"] for e in events}, {"echotw worker 1"})
        garbled, _ = relayRecords(b"", b"\x1e{not json\n\x1e" + eventAsJSON(event()).encode())
        self.assertEqual(len(garbled), 0)

    def test_lineWriterWritesOnce(self) -> None:
        """A line is one write to the descriptor."""
        reader, writer = os.pipe()
        self.addCleanup(os.close, reader)
        self.addCleanup(os.close, writer)
        LineWriter(writer).write("é" * 1000 + "\n")
        self.assertEqual(os.read(reader, 65536).decode("utf-8"), "é" * 1000 + "\n")
