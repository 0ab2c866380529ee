# -*- test-case-name: tests.unit.test_sharedcount -*-
"""
The open-connection count of the whole server, shared by its worker
processes, for C{--max-connections} with C{--workers}.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from typing import Protocol

SLOT = 8


class ServerCount(Protocol):
    """
    What L{echotw.factory.EchoFactory} needs from a count shared by the
    processes of one server: to be told this process's connections in use,
    and the whole server's total, which C{--max-connections} is checked
    against.
    """

    def publish(self, openHere: int) -> None: ...

    def total(self) -> int: ...


def createSharedFile(slots: int) -> int:
    """
    A file descriptor for a zeroed shared file of C{slots} slots, to be
    inherited by the workers.
    """
    fd = anonymousFile("echotw-connections")
    os.ftruncate(fd, max(1, slots) * SLOT)
    return fd


def anonymousFile(name: str) -> int:
    """
    A descriptor for a new empty file in memory, named C{name} for
    C{/proc/PID/fd} only (C{memfd_create}), or an unlinked temporary file
    where that is missing: either way nothing is left in a directory, and
    the file goes with the last process holding it.
    """
    memfdCreate = getattr(os, "memfd_create", None)
    if memfdCreate is not None:
        try:
            fd: int = memfdCreate(name, 0)
            return fd
        except OSError:
            pass
    fd, path = tempfile.mkstemp(prefix=name + "-")
    os.unlink(path)
    return fd


class SharedCount:
    """
    One process's view of the shared slots: a worker's C{index} is the slot
    it writes (L{publish}; the supervisor has none); L{total} is the whole
    server's count.  The file descriptor is the caller's to close; the
    mapping outlives it.

    The supervisor makes a small shared memory file (C{memfd_create}, or an
    unlinked temporary file where that is missing) with one 64-bit slot per
    worker, and every worker maps it.  Each worker writes only its own slot,
    its number of open connections, whenever that changes; the limit is checked
    against the sum of all slots.  Python has no atomic operations across
    processes, and none is needed: a slot has one writer, and an aligned 8-byte
    store is not torn on the platforms Linux runs on.

    What this cannot do is make the check and the count one step: between a
    worker reading the sum and writing its own new count (a few microseconds
    within one accept), another worker may read the old sum too.  Each worker
    is in that window for at most one connection at a time, so with N workers
    the server may admit at most N - 1 connections over the limit, and only
    while connections arrive on several workers within the same microseconds;
    once the burst is over the count is exact again, and no worker admits
    anything while the sum is at the limit.

    The supervisor clears a worker's slot when the worker dies (its connections
    died with it) and reads the sum for its own statistics.
    """

    def __init__(self, fd: int, slots: int, index: int | None = None) -> None:
        if index is not None and not 0 <= index < slots:
            raise ValueError(f"slot {index} of {slots}")
        self._map = mmap.mmap(fd, slots * SLOT)
        self._slots = memoryview(self._map).cast("q")
        self.index = index

    def publish(self, openHere: int) -> None:
        """
        This process now has C{openHere} connections open.
        """
        assert self.index is not None, "only a worker publishes"
        self._slots[self.index] = openHere

    def total(self) -> int:
        """
        Connections open over all the workers.
        """
        return sum(self._slots)

    def clear(self, index: int) -> None:
        """
        Forget worker C{index}'s connections (it has died); supervisor only.
        """
        self._slots[index] = 0

    def counts(self) -> list[int]:
        """
        Each worker's open connections, by slot.
        """
        return list(self._slots)

    def close(self) -> None:
        self._slots.release()
        self._map.close()
