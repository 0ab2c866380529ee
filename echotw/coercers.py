"""
Option values: each function turns one command-line string into a checked
value or raises L{ValueError} with a short reason, and its C{coerceDoc}
shows in C{twistd echo --help}.  L{NamingCoerceParameter} makes the usage
error name the option.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.python import usage

from echotw.loglevel import LEVELS

T = TypeVar("T")


def documented(doc: str) -> Callable[[Callable[[str], T]], Callable[[str], T]]:
    """
    Give a coerce function the C{coerceDoc} that C{--help} shows.
    """

    def decorate(coerce: Callable[[str], T]) -> Callable[[str], T]:
        coerce.coerceDoc = doc  # type: ignore[attr-defined]
        return coerce

    return decorate


@documented("A whole number; 0 means no limit.")
def count(value: str) -> int:
    n = int(value)
    if n < 0:
        raise ValueError("must not be negative")
    return n


@documented("A whole number, at least 1.")
def positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise ValueError("must be at least 1")
    return n


@documented("Seconds (decimals allowed).")
def seconds(value: str) -> float:
    s = float(value)
    if not s >= 0 or s == float("inf"):
        raise ValueError("must be a finite number of seconds, 0 or more")
    return s


@documented("Seconds (decimals allowed), more than 0.")
def positiveSeconds(value: str) -> float:
    s = seconds(value)
    if s == 0:
        raise ValueError("must be more than 0")
    return s


@documented("Per second (N or N/s); 0 means no limit.")
def rate(value: str) -> float:
    r = float(value.removesuffix("/s"))
    if not 0 <= r < float("inf"):
        raise ValueError("must be a finite number, 0 or more")
    return r


@documented("A number, at least 1.")
def positiveRate(value: str) -> float:
    r = rate(value)
    if r < 1:
        raise ValueError("must be at least 1")
    return r


MAX_DELAY = 600.0
"""The longest --delay or --jitter: ten minutes is past any client's timeout."""

MAX_BANDWIDTH = 100e9
"""The highest --bandwidth, far above what one connection can echo."""

_MULTIPLIERS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}
_BYTE_RATE = re.compile(r"(?P<number>[0-9]*\.?[0-9]+)(?P<unit>[kKmMgG]?)(/s)?")


@documented("Seconds (0.2) or milliseconds (200ms), at most 600; 0 is off.")
def duration(value: str) -> float:
    text = value.strip()
    if text.endswith("ms"):
        s = float(text[:-2]) / 1000
    else:
        s = float(text.removesuffix("s"))
    if not 0 <= s <= MAX_DELAY:
        raise ValueError(f"must be between 0 and {MAX_DELAY:g} seconds")
    return s


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
    f = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0 <= f <= 1:
        raise ValueError("must be between 0 and 1 (or 0% and 100%)")
    return f


@documented("1-64.")
def workerCount(value: str) -> int:
    n = int(value)
    if not 1 <= n <= 64:
        raise ValueError("must be between 1 and 64")
    return n


@documented(f"One of {', '.join(LEVELS)}.")
def logLevel(value: str) -> str:
    if value not in LEVELS:
        raise ValueError(f"must be one of {', '.join(LEVELS)}")
    return value


@documented("Prefix length, 1-128.")
def prefixLength(value: str) -> int:
    n = int(value)
    if not 1 <= n <= 128:
        raise ValueError("must be between 1 and 128")
    return n


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
