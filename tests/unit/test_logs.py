"""
Tests for L{echotw.logs}: JSON lines from log events (those from a real
twistd process are in L{tests.e2e.test_jsonlog}).
"""

from __future__ import annotations

import io
import json
import sys
from datetime import datetime
from typing import Any

from twisted.logger import Logger, LoggingFile, LogLevel, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from echotw.logs import formatEventAsJSON, jsonFileObserver, jsonObserver


class Opaque:
    def __str__(self) -> str:
        return "opaque thing"


def loggerTo(outFile: Any, namespace: str = "echotw.test") -> Logger:
    """
    A L{Logger} whose events go only to a JSON observer writing to C{outFile}.
    """
    return Logger(namespace=namespace, observer=LogPublisher(jsonFileObserver(outFile)))


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    text = out.getvalue()
    assert text.endswith("\n"), repr(text)
    return [json.loads(line) for line in text.splitlines()]


class JSONObserverTests(SynchronousTestCase):
    def test_oneObjectPerEvent(self) -> None:
        """Each event is one line holding one JSON object with the time,
        level, namespace, formatted message and every named field."""
        out = io.StringIO()
        log = loggerTo(out)
        log.info(
            "Connection from {client_host}:{client_port} closed after {bytes} bytes",
            event="closed",
            client_host="10.0.0.1",
            client_port=50000,
            bytes=2,
            duration=0.25,
        )
        log.warn("second {n}", n=2)
        first, second = lines(out)
        self.assertEqual(first["level"], "info")
        self.assertEqual(first["namespace"], "echotw.test")
        self.assertEqual(first["message"], "Connection from 10.0.0.1:50000 closed after 2 bytes")
        self.assertEqual(
            {k: first[k] for k in ("event", "client_host", "client_port", "bytes", "duration")},
            {
                "event": "closed",
                "client_host": "10.0.0.1",
                "client_port": 50000,
                "bytes": 2,
                "duration": 0.25,
            },
        )
        self.assertFalse([k for k in first if k.startswith("log_")])
        self.assertNotIn("traceback", first)
        self.assertEqual((second["level"], second["message"], second["n"]), ("warn", "second 2", 2))

    def test_timeIsUTCISO8601(self) -> None:
        """The time is the event's own, as ISO 8601 in UTC."""
        event = {"log_format": "x", "log_time": 1700000000.5, "log_level": LogLevel.info}
        record = json.loads(formatEventAsJSON(event))
        self.assertEqual(record["time"], "2023-11-14T22:13:20.500000Z")
        parsed = datetime.fromisoformat(record["time"].replace("Z", "+00:00"))
        self.assertEqual(parsed.timestamp(), 1700000000.5)

    def test_plainValuesKeptOthersAsText(self) -> None:
        """Strings, numbers, booleans and None stay as they are; anything
        else, and floats JSON cannot hold, becomes its str()."""
        out = io.StringIO()
        loggerTo(out).info(
            "odd values",
            flag=True,
            nothing=None,
            big=2**70,
            obj=Opaque(),
            items=[1, 2],
            nan=float("nan"),
            inf=float("inf"),
            raw=b"\x00",
        )
        (record,) = lines(out)
        self.assertIs(record["flag"], True)
        self.assertIsNone(record["nothing"])
        self.assertEqual(record["big"], 2**70)
        self.assertEqual(record["obj"], "opaque thing")
        self.assertEqual(record["items"], "[1, 2]")
        self.assertEqual((record["nan"], record["inf"]), ("nan", "inf"))
        self.assertEqual(record["raw"], "b'\\x00'")

    def test_failureTraceback(self) -> None:
        """An event with a failure gets a traceback string naming the error."""
        out = io.StringIO()
        log = loggerTo(out)
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            log.failure("Verifier {verifier} failed", verifier="v1")
        (record,) = lines(out)
        self.assertEqual(record["level"], "critical")
        self.assertEqual(record["message"], "Verifier v1 failed")
        self.assertIn("ZeroDivisionError", record["traceback"])
        self.assertIn("Traceback", record["traceback"])

    def test_reservedNamesNotOverwritten(self) -> None:
        """Fields named like the fixed keys do not replace them."""
        out = io.StringIO()
        loggerTo(out).info("the {what}", what="message", message="other", namespace=5, time="now")
        (record,) = lines(out)
        self.assertEqual(record["message"], "the message")
        self.assertEqual(record["namespace"], "echotw.test")
        self.assertNotEqual(record["time"], "now")
        self.assertEqual(record["what"], "message")

    def test_nonASCIIAndNewlinesStayOnOneLine(self) -> None:
        """Non-ASCII text and newlines in a message still make one ASCII
        line that decodes back to the same text."""
        out = io.StringIO()
        loggerTo(out).info("caf\u00e9\nsecond line {x}", x="\u2603")
        text = out.getvalue()
        self.assertEqual(text.count("\n"), 1)
        self.assertTrue(text.isascii())
        (record,) = lines(out)
        self.assertEqual(record["message"], "caf\u00e9\nsecond line \u2603")

    def test_binaryFile(self) -> None:
        """A binary file gets UTF-8 lines."""
        out = io.BytesIO()
        loggerTo(out).info("hello {who}", who="you")
        record = json.loads(out.getvalue().decode("utf-8"))
        self.assertEqual(record["message"], "hello you")

    def test_unformattableEventStillLogged(self) -> None:
        """An event whose format cannot be filled in is still written, with
        its fields."""
        out = io.StringIO()
        loggerTo(out).info("needs {missing}", present=1)
        (record,) = lines(out)
        self.assertIn("Unable to format event", record["message"])
        self.assertEqual(record["present"], 1)

    def test_flushesEachLine(self) -> None:
        """Each line is flushed as it is written."""

        class Recording(io.StringIO):
            flushedAt: list[int] = []

            def flush(self) -> None:
                self.flushedAt.append(len(self.getvalue()))
                super().flush()

        out = Recording()
        log = loggerTo(out)
        log.info("one")
        log.info("two")
        ends = [i + 1 for i, c in enumerate(out.getvalue()) if c == "\n"]
        self.assertEqual(out.flushedAt, ends)

    def test_jsonObserverWritesToStdout(self) -> None:
        """The twistd factory takes no arguments and writes to the current
        standard output."""
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        observer = jsonObserver()
        observer({"log_format": "hi {x}", "log_level": LogLevel.info, "x": 1})
        self.assertEqual(lines(out)[0]["message"], "hi 1")

    def test_jsonObserverAvoidsRedirectedStdout(self) -> None:
        """If standard output already goes into the log, the observer
        writes to the original one instead of feeding itself."""
        real = io.StringIO()
        self.patch(sys, "__stdout__", real)
        self.patch(sys, "stdout", LoggingFile(Logger(observer=LogPublisher())))
        observer = jsonObserver()
        observer({"log_format": "hi", "log_level": LogLevel.info})
        self.assertEqual(lines(real)[0]["message"], "hi")
