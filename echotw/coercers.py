# -*- test-case-name: tests.unit.test_ranges -*-
"""
Option values: each function turns one command-line string into a checked
value or raises L{ValueError} with a short reason, and its C{coerceDoc}
shows in C{twistd echo --help}.  L{NamingCoerceParameter} makes the usage
error name the option.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.python import usage

from echotw.loglevel import LEVELS

T = TypeVar("T")
N = TypeVar("N", int, float)

YEAR = 365 * 24 * 60 * 60
"""The longest duration any option takes, in seconds: anything longer is a typo."""


def documented(doc: str) -> Callable[[Callable[[str], T]], Callable[[str], T]]:
    """
    Give a coerce function the C{coerceDoc} that C{--help} shows.
    """

    def decorate(coerce: Callable[[str], T]) -> Callable[[str], T]:
        coerce.coerceDoc = doc  # type: ignore[attr-defined]
        return coerce

    return decorate


def wholeNumber(value: str) -> int:
    """
    C{value} as an integer, with an error a user can read.  Digits are
    ASCII ones, without Python's C{_} separators: Python would also read
    fullwidth or Arabic-Indic digits, and C{1_0}, which no one types on
    purpose.
    """
    try:
        if not value.isascii() or "_" in value:
            raise ValueError
        return int(value)
    except ValueError:
        raise ValueError("not a whole number") from None


def finiteNumber(value: str) -> float:
    """
    C{value} as a finite float, ASCII digits only: C{nan} and C{inf} are
    refused here, once, and so is a number too small to be told from 0
    (C{1e-400}), since 0 turns most limits off.
    """
    try:
        if not value.isascii() or "_" in value:
            raise ValueError
        n = float(value)
    except ValueError:
        raise ValueError("not a number") from None
    if not math.isfinite(n):
        raise ValueError("not a finite number")
    if n == 0 and any(digit in value.lower().split("e")[0] for digit in "123456789"):
        raise ValueError("too small: it would read as 0")
    return n


def perSecondNumber(value: str) -> float:
    """
    A rate written C{N} or C{N/s}.
    """
    return finiteNumber(value.removesuffix("/s"))


MAX_DELAY = 600.0
"""The longest --delay or --jitter: ten minutes is past any client's timeout."""

BARE_DELAY_LIMIT = 10.0
"""
From this many seconds on, --delay and --jitter want a unit: C{--delay 200}
is far more often a forgotten C{ms} than a wish for echoes that take three
minutes, and a server that seems dead is a poor way to find out.
"""

MAX_BANDWIDTH = 100e9
"""The highest --bandwidth, far above what one connection can echo."""

_MULTIPLIERS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}
_BYTE_RATE = re.compile(r"(?P<number>[0-9]*\.?[0-9]+)(?P<unit>[kKmMgG]?)(/s)?")

DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
"""The units a duration may end with ("ms" is looked for before "m" and "s")."""

DURATION_FORMS = "30, 1.5, 200ms, 5s, 5m or 1h"


def durationUnit(value: str) -> tuple[str, str]:
    """
    Split a duration into its number and its unit (C{""} for bare seconds).
    """
    text = value.strip()
    for unit in DURATION_UNITS:
        if text.endswith(unit):
            return text[: -len(unit)].rstrip(), unit
    return text, ""


def seconds(value: str) -> float:
    """
    A duration, the one syntax of every duration option (the server's and
    the probe's): a bare number is seconds, or a number followed by C{ms},
    C{s}, C{m} or C{h}.  Refused: what L{finiteNumber} refuses, and a value
    that only the unit turns into 0 or infinity (C{1e-323ms}, C{1e308h}).
    """
    number, unit = durationUnit(value)
    try:
        n = finiteNumber(number)
    except ValueError as e:
        if str(e) == "not a number":
            raise ValueError(f"not a duration (examples: {DURATION_FORMS})") from None
        raise
    s = n * DURATION_UNITS.get(unit, 1.0)
    if not math.isfinite(s):
        raise ValueError("not a finite number")
    if s == 0 and n != 0:
        raise ValueError("too small: it would read as 0")
    return s


def _impairmentDuration(value: str) -> float:
    s = seconds(value)
    if not 0 <= s <= MAX_DELAY:
        raise ValueError(f"must be between 0 and {MAX_DELAY:g} seconds")
    if s >= BARE_DELAY_LIMIT and durationUnit(value)[1] == "":
        raise ValueError(
            f"would be {numberText(s)} seconds: write {value.strip()}s if that is meant, "
            f"or {value.strip()}ms"
        )
    return s


duration = documented(
    f"A duration ({DURATION_FORMS}; bare numbers are seconds, and from "
    f"{BARE_DELAY_LIMIT:g} on need a unit), 0 to 600s; 0 is off."
)(_impairmentDuration)


@documented("Bytes per second: 64k, 1M, 1.5G (decimal: k=1000), at most 100G; 0 is off.")
def byteRate(value: str) -> float:
    match = _BYTE_RATE.fullmatch(value.strip())
    if match is None:
        raise ValueError("must be bytes per second like 500, 64k, 1M or 1.5G")
    r = float(match["number"]) * _MULTIPLIERS[match["unit"].lower()]
    if r and not 1 <= r <= MAX_BANDWIDTH:
        raise ValueError("must be 0 (off) or between 1 byte and 100G a second")
    return r


@documented("A share from 0 to 1 (0.05), or a percentage (5%).")
def fraction(value: str) -> float:
    text = value.strip()
    f = finiteNumber(text[:-1]) / 100 if text.endswith("%") else finiteNumber(text)
    if not 0 <= f <= 1:
        raise ValueError("must be between 0 and 1 (or 0% and 100%)")
    return f


LEVEL_ALIASES = {"warning": "warn"}
"""Names other tools give a level (Python's logging says "warning")."""


@documented(f"One of {', '.join(LEVELS)} (warning is warn).")
def logLevel(value: str) -> str:
    name = value.strip().lower()
    name = LEVEL_ALIASES.get(name, name)
    if name not in LEVELS:
        raise ValueError(f"must be one of {', '.join(LEVELS)}")
    return name


NATIVE_SETTINGS = ("auto", "on", "off")


@documented(f"One of {', '.join(NATIVE_SETTINGS)}.")
def nativeSetting(value: str) -> str:
    if value not in NATIVE_SETTINGS:
        raise ValueError(f"must be one of {', '.join(NATIVE_SETTINGS)}")
    return value


def numberText(n: float) -> str:
    """
    A bound as the help and the errors write it: C{0.1}, C{31536000}.
    """
    return str(int(n)) if float(n).is_integer() else str(n)


def inRange(
    coerce: Callable[[str], N],
    low: N,
    high: N,
    doc: str,
    orZero: bool = False,
    unit: str = "",
) -> Callable[[str], N]:
    """
    A coerce function: C{coerce}'s value, refused unless it lies between
    C{low} and C{high} (or is 0, where C{orZero} says 0 turns the option
    off).  A value outside a sane range is a typo or a misunderstanding
    (C{--idle-timeout 1e-9} would abort every connection in a busy loop),
    so it is refused before anything starts.  The bounds must appear in
    C{doc}, which C{--help} shows; C{unit} follows them in the error.
    """
    expected = f"{'0 or ' if orZero else ''}between {numberText(low)} and {numberText(high)}"
    expected += f" {unit}" if unit else ""

    def bounded(value: str) -> N:
        n = coerce(value)
        if not (low <= n <= high or (orZero and n == 0)):
            raise ValueError(f"must be {expected}")
        return n

    return documented(doc)(bounded)


MAX_CONNECTIONS = 10_000_000
"""Far more than one process can hold open (file descriptors run out first)."""

MAX_RATE = 1_000_000.0
"""Events a second beyond which a rate or burst limits nothing."""

MIN_RATE = 0.001
"""The slowest rate: one event in about 17 minutes."""

MAX_SESSION_BYTES = 10**15
"""A petabyte: no echo session lasts that long."""

MIN_TIMEOUT = 0.1
"""Shorter timeouts would end connections before a round trip completes."""

MIN_INTERVAL = 1.0
"""Summary lines more often than each second would flood the log."""

backlog = inRange(wholeNumber, 1, 65535, "A whole number, 1-65535.")
connectionLimit = inRange(
    wholeNumber,
    1,
    MAX_CONNECTIONS,
    f"A whole number up to {MAX_CONNECTIONS}; 0 means no limit.",
    orZero=True,
)
sessionBytes = inRange(
    wholeNumber,
    1,
    MAX_SESSION_BYTES,
    f"Bytes, a whole number up to {MAX_SESSION_BYTES}; 0 means no limit.",
    orZero=True,
)
linesPerSecond = inRange(
    wholeNumber,
    1,
    int(MAX_RATE),
    f"A whole number up to {numberText(MAX_RATE)}; 0 means no limit.",
    orZero=True,
)
perSecond = inRange(
    perSecondNumber,
    MIN_RATE,
    MAX_RATE,
    f"Per second (N or N/s), {numberText(MIN_RATE)} to {numberText(MAX_RATE)}; 0 means no limit.",
    orZero=True,
)
burst = inRange(finiteNumber, 1.0, MAX_RATE, f"A number, 1 to {numberText(MAX_RATE)}.")
timeout = inRange(
    seconds,
    MIN_TIMEOUT,
    float(YEAR),
    f"A duration ({DURATION_FORMS}; bare numbers are seconds): 0, or "
    f"{numberText(MIN_TIMEOUT)} to {YEAR} (a year).",
    orZero=True,
    unit="seconds",
)
positiveTimeout = inRange(
    seconds,
    MIN_TIMEOUT,
    float(YEAR),
    f"A duration ({DURATION_FORMS}; bare numbers are seconds), "
    f"{numberText(MIN_TIMEOUT)} to {YEAR} (a year).",
    unit="seconds",
)
anyDuration = inRange(
    seconds,
    0.0,
    float(YEAR),
    f"A duration ({DURATION_FORMS}; bare numbers are seconds), 0 to {YEAR} (a year).",
    unit="seconds",
)
workerCount = inRange(wholeNumber, 1, 64, "1-64.")
prefixLength = inRange(wholeNumber, 1, 128, "Prefix length, 1-128.")
interval = inRange(
    seconds,
    MIN_INTERVAL,
    float(YEAR),
    f"A duration ({DURATION_FORMS}; bare numbers are seconds): 0, or "
    f"{numberText(MIN_INTERVAL)} to {YEAR} (a year).",
    orZero=True,
    unit="seconds",
)


class NamingCoerceParameter(usage.CoerceParameter):
    """
    Make a bad value's error name its option (Twisted's does not).
    """

    def dispatch(self, parameterName: str, value: Any) -> None:
        if value is None:
            raise usage.UsageError(f"--{parameterName} needs a value")
        try:
            self.options.opts[parameterName] = self.coerce(value)
        except ValueError as e:
            raise usage.UsageError(f"--{parameterName}: invalid value {value!r}: {e}") from None
