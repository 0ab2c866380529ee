# -*- test-case-name: tests.unit.test_workerlog -*-
"""
How the workers of C{--workers N} log: straight to the supervisor's output
where they can, through the supervisor where they cannot.
"""

from __future__ import annotations

import os
import select
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    eventFromJSON,
    jsonFileLogObserver,
    textFileLogObserver,
)

from echotw.logs import jsonFileObserver, jsonObserver


@dataclass(frozen=True)
class LogOutput:
    """
    Where and how workers write their log lines.

    @ivar format: C{text} (twistd's and twist's text lines), C{json}
        (L{echotw.logs}' lines), C{twisted-json} (twist's JSON records), or
        C{relay}: events go to the supervisor, which logs them.
    @ivar fd: the supervisor's file descriptor the lines go to (the
        worker's standard output), unless relayed.
    @ivar level: the least important level the supervisor's runner logs,
        if it filters (twist's C{--log-level}).
    """

    format: str = "relay"
    fd: int | None = None
    level: str | None = None

    def describe(self) -> str:
        """
        How a worker learns this output (its fd is always its standard output).
        """
        return self.format + (f":{self.level}" if self.level else "")

    @classmethod
    def fromDescription(cls, text: str) -> LogOutput:
        format, _, level = text.partition(":")
        if format not in _FORMATS:
            return cls()
        return cls(format, 1, level or None)


RELAY = LogOutput()


def _fileno(f: Any) -> int | None:
    try:
        fd = f.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return fd if isinstance(fd, int) else None


def logOutputFor(runner: Mapping[str, Any] | None) -> LogOutput:
    """
    The workers' log output for a supervisor run by C{twistd} or C{twist}
    with the runner's options C{runner} (the parent of echotw's options),
    read before logging begins.

    Where the supervisor's log is a plain stream (C{twistd -n} without
    C{--logfile}, C{twistd -n --logger echotw.logs.jsonObserver}, or the
    C{twist} runner's C{--log-file}), each worker inherits that stream as its
    standard output and writes its own finished lines to it, formatted as the
    supervisor formats its own, one C{write} per line, so lines of different
    processes never mix (a pipe keeps writes of up to 4 KiB whole, a file opened
    for appending keeps every write whole).  The supervisor does nothing per
    worker line.

    Anywhere else (a log file twistd rotates, syslog, a custom C{--logger}) the
    workers send each event as a JSON record over a pipe and the supervisor
    publishes it to its own observers, which costs it a parse and a format per
    line (L{relayRecords}).
    """
    if runner is None:
        return RELAY
    if "fileLogObserverFactory" in runner:  # twist
        factory = runner["fileLogObserverFactory"]
        format = {textFileLogObserver: "text", jsonFileLogObserver: "twisted-json"}.get(factory)
        fd = _fileno(runner.get("logFile"))
        level = getattr(runner.get("logLevel"), "name", None)
        if format is None or fd is None:
            return RELAY
        return LogOutput(format, fd, level)
    if "logfile" not in runner:
        return RELAY
    logger = runner.get("logger")
    if runner.get("syslog") or (logger is not None and logger is not jsonObserver):
        return RELAY
    logfile = runner.get("logfile")
    toStdout = logfile == "-" or (runner.get("nodaemon") and not logfile)
    if logger is None and not toStdout:
        return RELAY
    fd = _fileno(sys.stdout)
    if fd is None:
        return RELAY
    return LogOutput("json" if logger is not None else "text", fd)


class LineWriter:
    """
    A text file for a log observer whose every C{write} (one finished line)
    is one C{write} system call to C{fd}, so that lines from several
    processes sharing C{fd} never mix.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, text: str) -> None:
        data = text.encode("utf-8", "replace")
        for _ in range(100):
            try:
                written = os.write(self.fd, data)
            except BlockingIOError:
                select.select([], [self.fd], [], 0.1)
                continue
            data = data[written:]
            if not data:
                return

    def flush(self) -> None:
        pass


_FORMATS: dict[str, Callable[[IO[Any]], ILogObserver]] = {
    "text": textFileLogObserver,
    "json": jsonFileObserver,
    "twisted-json": jsonFileLogObserver,
    "relay": jsonFileLogObserver,
}


def workerObserver(output: LogOutput, index: int, out: IO[Any] | None = None) -> ILogObserver:
    """
    The observer a worker logs through: marks each event with the worker,
    then writes it as the supervisor would (or as a record for it to relay)
    to C{out}, by default the worker's standard output.

    Each line names its worker: the text system is C{echotw worker
    N}, and the events carry C{worker} (N) and C{worker_pid} fields, which JSON
    lines include.
    """
    if out is None:
        out = LineWriter(1) if output.format != "relay" else sys.stdout  # type: ignore[assignment]
    assert out is not None
    write = _FORMATS[output.format](out)
    system = f"echotw worker {index}"
    pid = os.getpid()

    def observe(event: LogEvent) -> None:
        event["log_system"] = system
        event["worker"] = index
        event["worker_pid"] = pid
        write(event)

    if output.level is None:
        return observe  # type: ignore[return-value]
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(output.level))
    return FilteringLogObserver(observe, [predicate])  # type: ignore[arg-type]


def relayRecords(buffered: bytes, data: bytes) -> tuple[list[LogEvent], bytes]:
    """
    Split what a relaying worker wrote into the events it has finished
    (Twisted's JSON records, each after a record separator) and what is
    left for the next read.
    """
    records = (buffered + data).split(b"\x1e")
    rest = records.pop()
    if rest.endswith(b"\n"):
        records.append(rest)
        rest = b""
    events = []
    for record in records:
        if record.strip():
            try:
                events.append(eventFromJSON(record.decode("utf-8")))
            except ValueError:
                continue
    return events, rest
