"""
One log level for everything echotw logs (C{--log-level}).

twistd shows every event its observers receive, debug ones included, and a
plugin cannot filter those observers.  So echotw's loggers publish through
L{observer}, which drops events below the chosen level before they reach
twistd's log: health checks and other per-connection detail at debug level
cost almost nothing unless asked for.
"""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)

LEVELS = [level.name for level in sorted(LogLevel.iterconstants())]
"""Level names from least to most important, as L{LogLevel} orders them."""

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
enabled = {name: LogLevel.levelWithName(name) >= LogLevel.info for name in LEVELS}
"""Whether each level is shown now: a dict lookup, for hot paths."""
observer = FilteringLogObserver(globalLogPublisher, [_predicate])
"""Give this to every echotw C{Logger}: C{Logger(observer=observer)}."""


def setLogLevel(name: str) -> None:
    """
    Show echotw's events at level C{name} and above.
    """
    chosen = LogLevel.levelWithName(name)
    _predicate.setLogLevelForNamespace("", chosen)
    for level in LEVELS:
        enabled[level] = LogLevel.levelWithName(level) >= chosen
