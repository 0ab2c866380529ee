"""
Tests for the ranges of the duration, rate and count options: a value
outside a sane range is a one-line usage error naming the option, checked
before anything starts; the values at each end of a range are accepted.
And the one duration syntax all duration options share.
"""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from echotw.coercers import seconds, timeout
from echotw.options import EchoOptions
from echotw.probe.options import duration as probeDuration
from tests.support.properties import PROPERTIES

YEAR = "31536000"

RANGES: dict[str, tuple[list[str], list[str]]] = {
    # option: (refused values, accepted values at the edges of the range)
    "backlog": (["0", "-1", "65536", "99999999999999", "1.5", "many"], ["1", "65535"]),
    "max-connections": (["-1", "10000001", "5.5", "1e3"], ["0", "1", "10000000"]),
    "max-per-ip": (["-1", "10000001", "two"], ["0", "1", "10000000"]),
    "ipv6-prefix": (["0", "129", "64.0"], ["1", "128"]),
    "rate": (["-1", "0.0009", "1000001", "inf", "nan", "5/min"], ["0", "0.001", "1000000/s"]),
    "burst": (["0", "0.5", "1000001", "inf"], ["1", "1000000"]),
    "idle-timeout": (["1e-9", "0.09", "-1", "31536001", "inf", "nan"], ["0", "0.1", YEAR]),
    "max-session-bytes": (["-1", "1000000000000001", "1MB"], ["0", "1", "1000000000000000"]),
    "ws-max-message": (["0", "-1", "1073741825", "16MiB", "1.5"], ["1", "1073741824"]),
    "max-session-seconds": (["0.001", "-0.5", "31536001", "inf"], ["0", "0.1", YEAR]),
    "log-connections": (["-1", "1000001", "0.5"], ["0", "1", "1000000"]),
    "stats-interval": (["0.001", "0.999", "-1", "31536001", "nan"], ["0", "1", YEAR]),
    "workers": (["0", "65"], ["1", "64"]),
    "udp-rate": (["-1", "0.0001", "1000001", "inf"], ["0", "0.001", "1000000"]),
    "udp-burst": (["0", "0.99", "1000001"], ["1", "1000000"]),
    "proxy-timeout": (["0", "0.05", "31536001", "inf"], ["0.1", YEAR]),
    "shutdown-timeout": (["-2", "nan", "1e-9", "31536001"], ["0", "0.1", YEAR]),
    "drain-delay": (["-1", "0.01", "31536001", "inf"], ["0", "0.1", YEAR]),
    "worker-timeout": (["-1", "31536001", "inf", "nan", "5 minutes"], ["0", YEAR]),
    "delay": (["-1", "601s", "inf", "nan", "1h", "200"], ["0", "600s"]),
    "jitter": (["-0.5", "600.5s", "inf", "nan", "10"], ["0", "600s"]),
    "bandwidth": (["-1", "0.5", "100000000001", "1x", "inf"], ["0", "1"]),
    "udp-loss": (["-0.1", "1.01", "nan", "101%"], ["0", "1"]),
}

CHOICES = {"log-level", "native"}
"""Options with a coerce function that reads one of a few names, not a
number: they have no range."""


def parse(*args: str) -> EchoOptions:
    options = EchoOptions()
    options.parseOptions(list(args))
    return options


def coercer(option: str) -> object:
    [coerce] = [row[4] for row in EchoOptions.optParameters if row[0] == option]
    return coerce


class OptionRangeTests(SynchronousTestCase):
    """
    Every duration, rate and count option has a range, checked when the
    option is read.
    """

    def test_everyNumericOptionHasARange(self) -> None:
        """Each option with a coerce function that reads a number is in the
        table of ranges below, so a new one cannot go unchecked."""
        numeric = {
            row[0] for row in EchoOptions.optParameters if len(row) > 4 and row[0] not in CHOICES
        }
        self.assertEqual(numeric, set(RANGES))

    def test_choiceOptionsReadNoNumber(self) -> None:
        """The options left out of the ranges as choices refuse a number,
        so a numeric option cannot hide among them."""
        for option in sorted(CHOICES):
            for number in ("0", "1", "1.5"):
                with self.assertRaises(UsageError, msg=f"--{option} {number}"):
                    parse(f"--{option}", number)

    def test_outOfRangeIsUsageErrorNamingTheOption(self) -> None:
        """A value outside its option's range is a one-line usage error
        naming the option and the value."""
        for option, (refused, _) in RANGES.items():
            for value in refused:
                with self.assertRaises(UsageError, msg=(option, value)) as ctx:
                    parse(f"--{option}", value)
                message = str(ctx.exception)
                self.assertTrue(message.startswith(f"--{option}: "), message)
                self.assertIn(repr(value), message)
                self.assertNotIn("\n", message)

    def test_edgesAccepted(self) -> None:
        """The values at each end of a range are accepted as given."""
        for option, (_, accepted) in RANGES.items():
            for value in accepted:
                options = parse(f"--{option}", value)
                number = value.removesuffix("/s").removesuffix("s")
                self.assertEqual(options[option], float(number))

    def test_rangeInHelp(self) -> None:
        """The help text of each option states the range it checks: both
        ends of the accepted edges appear in it."""
        for option, (_, accepted) in RANGES.items():
            doc = coercer(option).coerceDoc  # type: ignore[attr-defined]
            for value in accepted:
                self.assertIn(value.removesuffix("/s"), doc, option)

    def test_defaultsInRange(self) -> None:
        """Every default lies in its option's range."""
        for row in EchoOptions.optParameters:
            if row[0] in RANGES:
                coerce = coercer(row[0])
                self.assertEqual(coerce(str(row[2])), row[2], row[0])  # type: ignore[operator]

    def test_runawayValuesFromTheField(self) -> None:
        """The values that made a server spin, flood its log or fail to
        listen are refused: a timeout of a nanosecond, a stats line every
        millisecond, a listen queue longer than any kernel takes."""
        for option, value in [
            ("idle-timeout", "1e-9"),
            ("stats-interval", "0.001"),
            ("backlog", "99999999999999"),
        ]:
            self.assertRaises(UsageError, parse, f"--{option}", value)

    def test_zeroOnlyWhenWritten(self) -> None:
        """A number too small to tell from 0 (which turns a limit off) is
        refused, not read as 0; so are digits other than ASCII ones, and
        Python's C{_} separators."""
        for option in RANGES:
            for value in ("1e-400", "0.5e-330", "\uff13", "\u0661", "1_0"):
                with self.assertRaises(UsageError, msg=(option, value)):
                    parse(f"--{option}", value)
        for value in ("0", "0.0", "0e5", "-0"):
            self.assertEqual(parse("--idle-timeout", value)["idle-timeout"], 0)


DURATIONS = {
    "idle-timeout",
    "max-session-seconds",
    "stats-interval",
    "proxy-timeout",
    "shutdown-timeout",
    "drain-delay",
    "delay",
    "jitter",
    "worker-timeout",
}
"""Every option that takes a duration."""


class DurationSyntaxTests(SynchronousTestCase):
    """
    Every duration option, the server's and the probe's, reads durations
    the same way: a bare number of seconds, or a number with ms, s, m or h.
    """

    def test_durationOptionsListed(self) -> None:
        """The options whose help says they take a duration are exactly
        those above, so a new one cannot take another syntax unnoticed."""
        documented = {
            row[0]
            for row in EchoOptions.optParameters
            if len(row) > 4 and "A duration" in getattr(row[4], "coerceDoc", "")
        }
        self.assertEqual(documented, DURATIONS)

    def test_everyFormEverywhere(self) -> None:
        """Each form gives the same seconds in every duration option (the
        unit that would leave an option's range aside)."""
        forms = {"3": 3.0, "3000ms": 3.0, "3s": 3.0, "0.05m": 3.0, "2m": 120.0, "1h": 3600.0}
        for option in DURATIONS:
            for text, expected in forms.items():
                if option in ("delay", "jitter") and expected > 600:
                    continue
                self.assertAlmostEqual(parse(f"--{option}", text)[option], expected, msg=option)
        for text, expected in forms.items():
            self.assertAlmostEqual(probeDuration(text), expected)

    def test_idleTimeoutInMinutes(self) -> None:
        """The reported case: --idle-timeout 5m is five minutes."""
        self.assertEqual(parse("--idle-timeout", "5m").config.limits.idleTimeout, 300.0)

    def test_badDurationOneLine(self) -> None:
        """A duration in no known form is one line naming the option and
        showing the forms that work."""
        for option in DURATIONS:
            with self.assertRaises(UsageError) as ctx:
                parse(f"--{option}", "5 minutes")
            message = str(ctx.exception)
            self.assertTrue(message.startswith(f"--{option}: "), message)
            self.assertIn("200ms", message)
            self.assertNotIn("\n", message)

    def test_longBareDelayNeedsUnit(self) -> None:
        """--delay 200 (200 seconds, almost surely meant as 200ms) is
        refused with both readings offered; with a unit it is taken."""
        for option in ("delay", "jitter"):
            with self.assertRaises(UsageError) as ctx:
                parse(f"--{option}", "200")
            self.assertIn("write 200s if that is meant, or 200ms", str(ctx.exception))
            self.assertEqual(parse(f"--{option}", "200s")[option], 200.0)
            self.assertEqual(parse(f"--{option}", "200ms")[option], 0.2)
            self.assertEqual(parse(f"--{option}", "9.5")[option], 9.5)


UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class DurationPropertyTests(SynchronousTestCase):
    """
    The one duration parser, L{seconds}, over generated text.
    """

    @PROPERTIES
    @given(st.floats(0, 1e6, allow_nan=False), st.sampled_from(["", *UNITS]), st.booleans())
    def test_numberTimesUnit(self, n: float, unit: str, spaced: bool) -> None:
        """A number written with a unit (or none: seconds) reads as the
        number times the unit, with or without a space or surrounding
        blanks."""
        text = f" {n!r}{' ' if spaced and unit else ''}{unit} "
        self.assertTrue(math.isclose(seconds(text), n * UNITS.get(unit, 1.0), rel_tol=1e-12))

    @PROPERTIES
    @given(st.integers(0, 10**9))
    def test_millisecondsAgree(self, n: int) -> None:
        """N ms is N/1000 s."""
        self.assertTrue(math.isclose(seconds(f"{n}ms"), seconds(str(n / 1000))))

    @PROPERTIES
    @given(st.text(max_size=12))
    def test_anyTextValueErrorOrFinite(self, text: str) -> None:
        """Any text either reads as a finite duration or is refused with a
        ValueError (the one error a usage error is made from), never
        another exception; nothing but a written zero reads as 0."""
        try:
            s = seconds(text)
        except ValueError as e:
            self.assertNotIn("\n", str(e))
            return
        self.assertTrue(math.isfinite(s))
        if s == 0:
            self.assertFalse(any(d in text for d in "123456789"), text)

    @PROPERTIES
    @given(st.floats(1e-300, 1e300), st.sampled_from(list(UNITS)))
    def test_rangeAfterUnit(self, n: float, unit: str) -> None:
        """Ranges are checked on the seconds a unit makes: a timeout is
        accepted exactly when its seconds lie in 0.1 .. a year."""
        text = f"{n!r}{unit}"
        value = n * UNITS[unit]
        try:
            accepted = timeout(text) == value
        except ValueError as e:
            self.assertIn("seconds", str(e))
            accepted = False
        self.assertEqual(accepted, 0.1 <= value <= 31536000, text)
