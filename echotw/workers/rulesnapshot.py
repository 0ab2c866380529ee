# -*- test-case-name: tests.unit.test_rulesnapshot -*-
"""
The rules in force, written down by the supervisor of C{--workers N} for
its workers: one file in memory that every worker inherits, rewritten in
place under a sequence lock (L{RuleSnapshot}), which the supervisor writes
at each load that succeeds (L{SupervisorRuleSource}) and the workers read
instead of the operator's files (L{SnapshotRuleSource}).
"""

from __future__ import annotations

import errno
import os
import struct
import time
from collections.abc import Iterable

from echotw.rules.addresses import IPNetwork, parseNetwork
from echotw.rules.files import RuleFileError, RuleSource
from echotw.rules.policy import AccessRules
from echotw.workers.sharedcount import anonymousFile

HEADER = struct.Struct("<QQQ")
"""The sequence number and the allow and deny lists' lengths in bytes."""

READ_ATTEMPTS = 500
"""Reads a worker tries while the supervisor rewrites the file, 10 ms apart."""

SNAPSHOT = "the supervisor's rule snapshot"
"""What the errors about the file call it."""


class RuleSnapshot:
    """
    The supervisor's anonymous file of the rules, made on the first L{write}.

    A worker reads the file (L{readSnapshot}) at start-up and on the SIGHUP the
    supervisor passes on after a reload that succeeded (L{SnapshotRuleSource}),
    so a replacement worker gets the rules the others have, whatever has become
    of the files since.  The file is rewritten in place, so the supervisor
    writes it as a sequence lock: a header of a sequence number, odd while a
    write is under way, and the lengths of the allow and deny lists that follow
    (one network a line); a reader that finds the number odd, or changed once
    it has read the lists, reads again.  The room for the new lists is
    allocated before the number turns odd, so a write that fails for lack of
    memory leaves the previous rules readable.
    """

    def __init__(self) -> None:
        self.fd: int | None = None
        self.sequence = 0

    def write(self, allow: Iterable[IPNetwork], deny: Iterable[IPNetwork]) -> int:
        """
        Write the rules in place of the last; return the file's descriptor.

        @raise OSError: if it cannot be written; the last rules stay readable.
        """
        if self.fd is None:
            self.fd = anonymousFile("echotw-rules")
        fd = self.fd
        allowed = "".join(f"{network}\n" for network in allow).encode("ascii")
        denied = "".join(f"{network}\n" for network in deny).encode("ascii")
        size = HEADER.size + len(allowed) + len(denied)
        if size > os.fstat(fd).st_size:
            _allocate(fd, size)
        os.pwrite(fd, HEADER.pack(self.sequence + 1, 0, 0), 0)
        _writeAll(fd, allowed + denied, HEADER.size)
        self.sequence += 2
        os.pwrite(fd, HEADER.pack(self.sequence, len(allowed), len(denied)), 0)
        return fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _allocate(fd: int, size: int) -> None:
    # Room for the whole file before it changes (posix_fallocate where the
    # file system has it), so no write after that can fail for lack of it.
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # not supported there
            raise
        os.ftruncate(fd, size)


def _writeAll(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _readAll(fd: int, size: int, offset: int) -> bytes:
    chunks = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def readSnapshot(fd: int, wait: float = 0.01) -> tuple[list[IPNetwork], list[IPNetwork]]:
    """
    The allow and deny networks the supervisor last wrote to C{fd}.

    @raise RuleFileError: if they cannot be read.
    """
    try:
        for _ in range(READ_ATTEMPTS):
            head = os.pread(fd, HEADER.size, 0)
            if len(head) == HEADER.size:
                sequence, allowed, denied = HEADER.unpack(head)
                if sequence and not sequence % 2:
                    body = _readAll(fd, allowed + denied, HEADER.size)
                    if len(body) == allowed + denied and os.pread(fd, HEADER.size, 0) == head:
                        return _networks(body[:allowed]), _networks(body[allowed:])
            time.sleep(wait)
    except OSError as e:
        raise RuleFileError(SNAPSHOT, f"cannot read {SNAPSHOT}: {e.strerror or e}") from None
    raise RuleFileError(SNAPSHOT, f"cannot read {SNAPSHOT}: it kept changing")


def _networks(text: bytes) -> list[IPNetwork]:
    try:
        return [parseNetwork(line) for line in text.decode("ascii").splitlines()]
    except ValueError as e:
        raise RuleFileError(SNAPSHOT, f"{SNAPSHOT}: {e}") from None


class SupervisorRuleSource(RuleSource):
    """
    The operator's rules, as the supervisor loads them: every load that
    succeeds is written to C{snapshot} for the workers, and one that cannot
    be written fails as a bad file does (the rules in force stay).

    Were every worker to read the operator's rule files itself, a file that
    went bad after start-up (a typo, a deletion, with no SIGHUP yet) would stop
    a worker started in place of one that died from starting at all, while the
    clients the kernel steers to its socket waited for it; and workers started
    at different times could hold different rules.  So the supervisor alone
    reads the operator's files (L{SupervisorRuleSource}, at start-up and on
    SIGHUP) and writes each set it loads into one anonymous file in memory
    (C{memfd_create}; an unlinked temporary file where that is missing), which
    every worker inherits as a descriptor.  Nothing is left in a directory: no
    temporary directory has to be writable, or have room, for a reload to
    reach the workers, and a supervisor killed with SIGKILL leaves nothing
    behind (the file goes with the last process holding it).
    """

    def __init__(self, source: RuleSource, snapshot: RuleSnapshot) -> None:
        super().__init__(source.allow, source.deny, source.allowFiles, source.denyFiles)
        self.fileNetworks = source.fileNetworks
        self.snapshot = snapshot
        self.writing = True

    def stopWriting(self) -> None:
        """
        Write no more snapshots (the first could not be written, so the
        workers read the files themselves): a reload then depends on the
        files alone.
        """
        self.writing = False
        self.snapshot.close()

    def writeSnapshot(self) -> int:
        """
        Write what the files held at the last load; return the descriptor.

        @raise OSError: if it cannot be written.
        """
        return self.snapshot.write(*self.fileNetworks)

    def load(self) -> AccessRules:
        rules = super().load()
        if not self.writing:
            return rules
        try:
            self.writeSnapshot()
        except OSError as e:
            raise RuleFileError(
                SNAPSHOT, f"cannot write the rules for the workers: {e.strerror or e}"
            ) from None
        return rules


class SnapshotRuleSource(RuleSource):
    """
    A worker's rules: the command line's networks, and what the supervisor
    last wrote for each kind of file the operator gave (C{kinds}: whether
    there were allow files, deny files); the operator's files are never
    read.
    """

    def __init__(self, source: RuleSource, fd: int, kinds: tuple[bool, bool]) -> None:
        super().__init__(source.allow, source.deny)
        self.fd = fd
        self.kinds = kinds

    @property
    def hasFiles(self) -> bool:
        return any(self.kinds)

    def load(self) -> AccessRules:
        allowed, denied = readSnapshot(self.fd)
        allow, deny = self.kinds
        allowed, denied = (allowed if allow else []), (denied if deny else [])
        self.fileNetworks = (allowed, denied)
        return AccessRules(
            self.allow + allowed, self.deny + denied, restrict=bool(self.allow or allow)
        )
