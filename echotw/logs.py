# -*- test-case-name: tests.unit.test_logs -*-
"""
One JSON object per line for C{twistd}'s log, for log shippers:
L{jsonObserver} is the C{twistd --logger} factory, L{jsonFileObserver}
writes to any text or binary file, and L{formatEventAsJSON} formats a
single event as the flat line general log shippers handle more easily than
Twisted's own JSON format.
"""

from __future__ import annotations

import json
import math
import sys
from datetime import datetime, timezone
from time import time
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    LoggingFile,
    formatEvent,
)
from twisted.python.failure import Failure

__all__ = ["formatEventAsJSON", "jsonFileObserver", "jsonObserver"]

_RESERVED = ("time", "level", "namespace", "message")


def formatEventAsJSON(event: LogEvent) -> str:
    """
    One event as one line of JSON, newline included, with the keys below.
    Never raises for an odd field value: a log line must not be lost
    because some field cannot be serialised.

    Every echotw event is a C{twisted.logger} event with named fields (C{event},
    C{client_host}, C{client_port}, C{listener}, C{bytes}, C{duration},
    C{reason}, ...).  L{jsonObserver} writes each as one flat JSON object::

        {"time": "2024-05-01T12:00:00.123456Z", "level": "info",
         "namespace": "echotw.factory.EchoFactory",
         "message": "Connection from 10.0.0.1:50000 on tcp:7 closed ...",
         "event": "closed", "client_host": "10.0.0.1", "client_port": 50000,
         "listener": "tcp:7", "bytes": 2, "duration": 0.0041,
         "reason": "client closed"}

    (on one line).  C{message} is the formatted text a human log would show.
    Each named field that is not a C{log_*} key is copied: strings, numbers,
    booleans and C{null} as they are, anything else as its C{str()} (so a log
    line is never lost to an unserialisable value).  A field named C{time},
    C{level}, C{namespace} or C{message} gives way to the one above.  An event
    carrying a failure gets a C{traceback} string.

    Twisted's own alternative is the C{twist} runner's JSON format,
    C{twist --log-format=json echo ...} (its default when standard output is
    not a terminal).  That is Twisted's serialisation for reading events back
    with C{eventsFromJSONLogFile}: each record starts with a record separator
    (U+001E), keeps the C{log_*} keys and the format string rather than the
    formatted message, and nests failures as objects; general log shippers
    handle the flat lines here more easily.
    """
    when = event.get("log_time")
    if not isinstance(when, int | float):
        when = time()
    level = getattr(event.get("log_level"), "name", None)
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(when, timezone.utc)
        .isoformat(timespec="microseconds")
        .replace("+00:00", "Z"),
        "level": level if isinstance(level, str) else "info",
        "namespace": _plain(event.get("log_namespace")),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        key = str(key)
        if key.startswith("log_") or key in _RESERVED:
            continue
        record[key] = _plain(value)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        try:
            record["traceback"] = failure.getTraceback()
        except Exception as e:
            record["traceback"] = f"(traceback unavailable: {e!r}) {failure!r}"
    return json.dumps(record) + "\n"


def _plain(value: object) -> object:
    """
    C{value} if JSON represents it as itself, else its C{str()}.  Non-finite
    floats become strings too: C{NaN} and C{Infinity} are not JSON.
    """
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def jsonFileObserver(outFile: IO[Any]) -> ILogObserver:
    """
    An observer writing L{formatEventAsJSON} lines to C{outFile} (text, or
    binary as UTF-8), flushing after each.

    Each line is flushed as it is written, so C{tail -f} and a pipe see events
    at once.
    """
    observer: ILogObserver = FileLogObserver(outFile, formatEventAsJSON)
    return observer


def jsonObserver() -> ILogObserver:
    """
    The C{twistd --logger} factory: JSON lines on standard output.

    twistd calls it, with no arguments, before it redirects C{sys.stdout}
    into the log, so C{sys.stdout} is still the real one here.  If it is
    already a L{LoggingFile} (logging began before), the interpreter's
    original standard output is used: writing log lines into the log would
    loop.

    With twistd, name the factory with C{--logger}, a twistd option (so before
    the plugin name)::

        twistd --nodaemon --pidfile= --logger echotw.logs.jsonObserver echo --port tcp:7

    C{--logger} takes precedence over C{--logfile}; the lines go to the
    process's standard output, which suits C{--nodaemon} under a supervisor
    (systemd, a container runtime) that collects it.
    """
    out: IO[Any] | None = sys.stdout
    if isinstance(out, LoggingFile) or out is None:
        out = sys.__stdout__
    assert out is not None, "no standard output to log to"
    return jsonFileObserver(out)
