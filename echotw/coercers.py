"""
Option values: each function turns one command-line string into a checked
value or raises L{ValueError} with a short reason, and its C{coerceDoc}
shows in C{twistd echo --help}.  L{NamingCoerceParameter} makes the usage
error name the option.
"""

from __future__ import annotations

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
