"""
Tests for what a user meets first: the start-up line that announces the
impairment in force, and the one-line errors for habits brought from other
tools (C{HOST:PORT} listeners, twistd's own options after C{echo},
C{--log-level warning}).
"""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from echotw.build import makeService
from echotw.config import Impairment
from echotw.options import EchoOptions
from tests.support.process import LOOPBACK


def parse(*args: str) -> EchoOptions:
    options = EchoOptions()
    options.parseOptions(list(args))
    return options


def usageError(test: SynchronousTestCase, *args: str) -> str:
    with test.assertRaises(UsageError) as ctx:
        parse(*args)
    message = str(ctx.exception)
    test.assertNotIn("\n", message)
    return message


class ImpairmentAnnouncementTests(SynchronousTestCase):
    def test_describeWithUnits(self) -> None:
        """Each impairment with its unit; what is off says so."""
        self.assertEqual(
            Impairment(delay=0.2, jitter=0.05, bandwidth=64000, udpLoss=0.05).describe(),
            "delay 200ms, jitter 50ms, bandwidth 64000 bytes/s, udp-loss 5%",
        )
        self.assertEqual(
            Impairment(delay=200).describe(),
            "delay 200s, jitter off, bandwidth off, udp-loss off",
        )

    def announcements(self, *args: str, worker: bool = False) -> list[str]:
        config = parse("--port", LOOPBACK, *args).config
        with capturedLogs() as events:
            makeService(config, MemoryReactorClock(), worker=worker)
        return [e["impairment"] for e in events if e.get("event") == "impairment"]

    def test_announcedOnceWhenOn(self) -> None:
        """Building an impaired server logs the impairment once; an
        unimpaired one, or a worker (its supervisor says it), nothing."""
        self.assertEqual(
            self.announcements("--delay", "1.5s", "--udp-loss", "50%"),
            ["delay 1.5s, jitter off, bandwidth off, udp-loss 50%"],
        )
        self.assertEqual(self.announcements(), [])
        self.assertEqual(self.announcements("--bandwidth", "1M", worker=True), [])


class HabitErrorTests(SynchronousTestCase):
    def test_hostPortListener(self) -> None:
        """HOST:PORT, as other servers take it, is answered with the
        endpoint string that means it, which works."""
        cases = [
            ("--port", "127.0.0.1:8080", "tcp:8080:interface=127.0.0.1"),
            ("--port", "[::1]:8080", "tcp6:8080:interface=\\:\\:1"),
            ("--port", "localhost:7", "tcp:7:interface=127.0.0.1"),
            ("--udp", "127.0.0.1:9", "udp:9:interface=127.0.0.1"),
        ]
        for option, value, endpoint in cases:
            message = usageError(self, option, value)
            self.assertEqual(message, f"{option}: {value!r} is not an endpoint: write {endpoint}")
            parse(option, endpoint.replace(":8080", ":0").replace(":7", ":0"))

    def test_runnerOptionsAfterEcho(self) -> None:
        """twistd's own options given after C{echo} are said to go before
        it, in each way they are written."""
        for args in (["-n"], ["--nodaemon"], ["--pidfile", "x"], ["--pidfile=x"], ["-l", "f"]):
            message = usageError(self, *args)
            self.assertIn(f"{args[0].split('=')[0]} is twistd's own option", message)
            self.assertIn("before 'echo'", message)

    def test_unknownOptionsUnchanged(self) -> None:
        """An option neither echo nor twistd has is still just unknown."""
        self.assertEqual(usageError(self, "--frobnicate"), "option --frobnicate not recognized")

    def test_logLevelWarning(self) -> None:
        """--log-level warning (Python's name) is warn; case does not matter."""
        for name in ("warning", "WARNING", "Warn"):
            self.assertEqual(parse("--log-level", name).config.logging.level, "warn")
        self.assertIn("must be one of", usageError(self, "--log-level", "loud"))
