# -*- test-case-name: tests.unit.test_workercontract -*-
"""
What the supervisor of C{--workers N} (L{echotw.workers.supervisor}) and a worker
process (L{echotw.workers.main}) agree on, kept in one place that both import.
The supervisor starts a worker with L{HELD_SIGNALS} blocked, running
L{WORKER_MAIN} through the command L{echotw.workers.command} builds, and hands
it the descriptors L{handover} lays out, named by the C{ECHOTW_WORKER_*}
variables: its listening sockets from L{FIRST_FD} on, in the order of the
listeners (C{--port}, then C{--websocket}); the shared connection count (L{echotw.workers.sharedcount}) and the rule
snapshot (L{echotw.workers.rulesnapshot}) where there are any; the pipe it reports
on; and as its standard output the supervisor's log stream or a pipe to
relay log records through (L{echotw.workers.logs}).  The worker writes
L{READY} on the report pipe once its signal handlers are in place, then its
counters (L{echotw.counters}) as one JSON line every L{REPORT_INTERVAL}
seconds; the supervisor sends it SIGHUP to read the rules again, SIGTERM to
drain and L{echotw.signals.STOP_NOW_SIGNAL} to stop at once.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

WORKER_MAIN = "echotw.workers.main"
"""The module whose C{main} a worker runs."""

WORKER_PATH = "ECHOTW_WORKER_PATH"
"""The variable that carries the worker's C{sys.path}, as a JSON list."""

WORKER_FDS = "ECHOTW_WORKER_FDS"
"""The listening sockets, C{fd:family} comma-separated (L{workerSockets})."""
WORKER_INDEX = "ECHOTW_WORKER_INDEX"
"""The worker's index, from 0: its socket of each group, its slot of the count."""
WORKER_COUNT = "ECHOTW_WORKER_COUNT"
"""How many workers there are: the slots of the shared count."""
WORKER_COUNT_FD = "ECHOTW_WORKER_COUNT_FD"
"""The shared connection count's descriptor, with C{--max-connections} only."""
WORKER_REPORT_FD = "ECHOTW_WORKER_REPORT_FD"
"""The descriptor the worker writes L{READY} and its counter reports to."""
WORKER_LOG = "ECHOTW_WORKER_LOG"
"""How its standard output takes its log (L{echotw.workers.logs.LogOutput.describe})."""
WORKER_REACTOR = "ECHOTW_WORKER_REACTOR"
"""The module of the supervisor's reactor, for the worker to run the same."""
WORKER_SUPERVISOR = "ECHOTW_WORKER_SUPERVISOR"
"""The supervisor's pid: a worker whose parent is no longer that stops."""
WORKER_RULES = "ECHOTW_WORKER_RULES"
"""The rule snapshot's descriptor, when the supervisor wrote one."""

FIRST_FD = 3
"""The worker's first inherited descriptor after standard input, output and error."""

HELD_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
"""
Signals a worker is started with blocked, so that they wait (pending) until
its handlers are in place (L{echotw.workers.main.main} unblocks them): the
interpreter's start and the worker's imports take a while, and a signal's
default action would kill it meanwhile, with the connections in its
socket's backlog.  A blocked mask survives C{exec}.
"""

READY = b"ready"
"""The line a worker sends on its report descriptor once signals are safe to send it."""

REPORT_INTERVAL = 1.0
"""Seconds between a worker's counter reports to the supervisor."""

_FAMILIES = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}
_NAMES = {family: name for name, family in _FAMILIES.items()}


@dataclass(frozen=True)
class Handover:
    """
    What the supervisor hands one worker: C{childFDs} for
    C{spawnProcess}, the C{environment} variables to add, and the
    descriptor its reports arrive on.
    """

    childFDs: dict[int, int | str]
    environment: dict[str, str]
    reportFD: int


def handover(
    index: int,
    count: int,
    sockets: Iterable[socket.socket],
    log: str,
    logFD: int | None,
    countFD: int | None,
    rulesFD: int | None,
    reactor: str,
    supervisor: int,
) -> Handover:
    """
    Lay out worker C{index}'s descriptors (of C{count}) and the variables
    naming them: its C{sockets}, the shared count and the rule snapshot if
    any (the supervisor's descriptors), and a new pipe for its reports; its
    standard output is C{logFD}, or a pipe when its C{log} is relayed.
    """
    childFDs: dict[int, int | str] = {0: "w", 1: "r" if logFD is None else logFD, 2: 2}
    env: dict[str, str] = {}
    inherited: list[str] = []
    for sock in sockets:
        fd = FIRST_FD + len(inherited)
        childFDs[fd] = sock.fileno()
        inherited.append(f"{fd}:{_NAMES[sock.family]}")
    nextFD = FIRST_FD + len(inherited)
    if countFD is not None:
        childFDs[nextFD] = countFD
        env[WORKER_COUNT_FD] = str(nextFD)
        nextFD += 1
    if rulesFD is not None:
        childFDs[nextFD] = rulesFD
        env[WORKER_RULES] = str(nextFD)
        nextFD += 1
    childFDs[nextFD] = "r"
    env[WORKER_REPORT_FD] = str(nextFD)
    env[WORKER_FDS] = ",".join(inherited)
    env[WORKER_INDEX] = str(index)
    env[WORKER_COUNT] = str(count)
    env[WORKER_LOG] = log
    env[WORKER_REACTOR] = reactor
    env[WORKER_SUPERVISOR] = str(supervisor)
    return Handover(childFDs, env, nextFD)


def workerSockets(environment: Mapping[str, str]) -> list[tuple[int, int]]:
    """
    The listening sockets a worker inherited from its supervisor,
    C{(fd, family)} in the order of the listeners, as the supervisor
    described them in C{environment} (systemd's are
    L{echotw.systemd.systemdSockets}).
    """
    inherited: list[tuple[int, int]] = []
    for item in filter(None, environment.get(WORKER_FDS, "").split(",")):
        fd, family = item.split(":")
        inherited.append((int(fd), _FAMILIES[family]))
    return inherited
