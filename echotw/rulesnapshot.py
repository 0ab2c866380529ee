"""
The rules in force, written down by the supervisor of C{--workers N} for
its workers.

Were every worker to read the operator's rule files itself, a file that
went bad after start-up (a typo, a deletion, with no SIGHUP yet) would stop
a worker started in place of one that died from starting at all, while the
clients the kernel steers to its socket waited for it; and workers started
at different times could hold different rules.  So the supervisor alone
reads the operator's files (L{SupervisorRuleSource}, at start-up and on
SIGHUP); each set it loads is written as a new generation, a directory
holding C{allow} and C{deny} files, and the C{current} link, replaced
atomically, names the newest.  A worker reads the generation C{current}
names, resolved once per load so that its allow and deny lists come from
the same one (L{SnapshotRuleSource}): at start-up, and on the SIGHUP the
supervisor passes on after a reload that succeeded.  A replacement worker
gets the rules the others have, whatever has become of the files since.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable

from echotw.addresses import IPNetwork
from echotw.policy import AccessRules
from echotw.rulefiles import RuleFileError, RuleSource

CURRENT = "current"
"""The link to the newest generation, in the snapshot's directory."""

KEPT_GENERATIONS = 3
"""Generations kept, so that a worker still reading an older one finds it."""


class RuleSnapshot:
    """
    The supervisor's private directory of rule generations; made on the
    first L{write} (after twistd has switched to the user it runs as, so
    that the workers, running as that user too, can read it).
    """

    def __init__(self) -> None:
        self.directory: str | None = None
        self.generation = 0

    def write(self, allow: Iterable[IPNetwork], deny: Iterable[IPNetwork]) -> str:
        """
        Write a new generation and make it C{current}; return the directory.

        @raise OSError: if it cannot be written; C{current} is unchanged.
        """
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix="echotw-rules-")
        self.generation += 1
        name = f"gen-{self.generation}"
        path = os.path.join(self.directory, name)
        os.mkdir(path)
        for kind, networks in (("allow", allow), ("deny", deny)):
            with open(generationFile(path, kind), "w", encoding="utf-8") as f:
                f.writelines(f"{network}\n" for network in networks)
        link = os.path.join(self.directory, CURRENT + ".new")
        os.symlink(name, link)
        os.replace(link, os.path.join(self.directory, CURRENT))
        old = self.generation - KEPT_GENERATIONS
        if old > 0:
            shutil.rmtree(os.path.join(self.directory, f"gen-{old}"), ignore_errors=True)
        return self.directory

    def remove(self) -> None:
        """
        Remove the directory and every generation in it.
        """
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


def currentGeneration(directory: str) -> str:
    """
    The directory of the generation C{current} names now.
    """
    return os.path.realpath(os.path.join(directory, CURRENT))


def generationFile(generation: str, kind: str) -> str:
    """
    The file of a generation holding its C{kind} ("allow" or "deny") rules.
    """
    return os.path.join(generation, kind)


class SupervisorRuleSource(RuleSource):
    """
    The operator's rules, as the supervisor loads them: every load that
    succeeds is written to C{snapshot} for the workers, and one that cannot
    be written fails as a bad file does (the rules in force stay).
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
        self.snapshot.remove()

    def writeSnapshot(self) -> str:
        """
        Write what the files held at the last load; return the directory.

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
            where = self.snapshot.directory or tempfile.gettempdir()
            raise RuleFileError(
                where, f"{where}: cannot write the rules for the workers: {e.strerror or e}"
            ) from None
        return rules


class SnapshotRuleSource(RuleSource):
    """
    A worker's rules: the command line's networks, and the supervisor's
    current generation for each kind of file the operator gave.
    """

    def __init__(self, source: RuleSource, directory: str) -> None:
        super().__init__(source.allow, source.deny)
        self.directory = directory
        self._kinds = (bool(source.allowFiles), bool(source.denyFiles))
        self.pointAt(currentGeneration(directory))

    def pointAt(self, generation: str) -> None:
        """
        Read C{generation}'s files on the next load.
        """
        allow, deny = self._kinds
        self.allowFiles = [generationFile(generation, "allow")] if allow else []
        self.denyFiles = [generationFile(generation, "deny")] if deny else []

    def load(self) -> AccessRules:
        self.pointAt(currentGeneration(self.directory))
        return super().load()
