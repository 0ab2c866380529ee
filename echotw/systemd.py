# -*- test-case-name: tests.unit.test_systemd -*-
"""
Sockets inherited through systemd's socket activation protocol
(C{sd_listen_fds}): C{LISTEN_PID}, C{LISTEN_FDS}, C{LISTEN_FDNAMES} and
C{LISTEN_FDS_FIRST_FD}.

Twisted's own C{systemd:} endpoint ignores C{LISTEN_FDS} unless
C{LISTEN_FDNAMES} is set too, although systemd's own
C{sd_listen_fds_with_names()} names such descriptors "unknown", and
C{systemd-socket-activate} without C{--fdname}, C{systemfd} and
C{watchexec --socket} set only C{LISTEN_FDS}.  It also deletes
C{LISTEN_PID} and C{LISTEN_FDS} from the environment as soon as its
endpoints module is imported, which happens before echotw's options are
read.  So the variables are read here from the environment if they are
still there, else from the environment the process was started with
(C{/proc/self/environ}, which deleting a variable does not change).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

SD_LISTEN_FDS_START = 3
"""The first inherited descriptor, unless C{LISTEN_FDS_FIRST_FD} says otherwise."""

UNNAMED = "unknown"
"""The name systemd gives a descriptor when C{LISTEN_FDNAMES} does not."""


@dataclass(frozen=True)
class ListenFDs:
    """
    The listening sockets this process inherited: their descriptors, in
    order, and their names.
    """

    descriptors: tuple[int, ...] = ()
    names: tuple[str, ...] = ()

    def byIndex(self, index: int) -> int:
        """
        @raise ValueError: if there is no such descriptor.
        """
        if not 0 <= index < len(self.descriptors):
            raise ValueError(f"no inherited socket at index {index} ({self._what()})")
        return self.descriptors[index]

    def byName(self, name: str) -> int:
        """
        @raise ValueError: if no descriptor has that name.
        """
        if name in self.names:
            return self.descriptors[self.names.index(name)]
        raise ValueError(f"no inherited socket named {name!r} ({self._what()})")

    def _what(self) -> str:
        if not self.descriptors:
            return "none inherited: not started by systemd socket activation?"
        names = ", ".join(self.names)
        return f"{len(self.descriptors)} inherited, named {names}"


def parseListenFDs(environ: Mapping[str, str], pid: int) -> ListenFDs:
    """
    The sockets C{environ} describes for process C{pid}: none unless
    C{LISTEN_PID} names it; names default to L{UNNAMED}.
    """
    if environ.get("LISTEN_PID", "").strip() != str(pid):
        return ListenFDs()
    try:
        count = int(environ.get("LISTEN_FDS", ""))
        start = int(environ.get("LISTEN_FDS_FIRST_FD", SD_LISTEN_FDS_START))
    except ValueError:
        return ListenFDs()
    if count <= 0 or start < 0:
        return ListenFDs()
    names = tuple(environ.get("LISTEN_FDNAMES", "").split(":"))
    if len(names) != count:
        names = (UNNAMED,) * count
    return ListenFDs(tuple(range(start, start + count)), names)


def _startingEnvironment() -> dict[str, str]:
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    environ = {}
    for entry in raw.split(b"\0"):
        key, eq, value = entry.partition(b"=")
        if eq and key.startswith(b"LISTEN_"):
            environ[key.decode("ascii", "replace")] = value.decode("utf-8", "replace")
    return environ


_inherited: ListenFDs | None = None


def systemdSockets() -> ListenFDs:
    """
    The sockets systemd's socket activation passed this process
    (C{LISTEN_FDS}), read once (before a daemonising fork changes the pid
    the variables name).  Not a worker's sockets: see
    L{echotw.workers.contract.workerSockets}.
    """
    global _inherited
    if _inherited is None:
        pid = os.getpid()
        found = parseListenFDs(os.environ, pid)
        if not found.descriptors:
            found = parseListenFDs(_startingEnvironment(), pid)
        _inherited = found
    return _inherited
