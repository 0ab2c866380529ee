# -*- test-case-name: tests.unit.test_rulefiles -*-
"""
Allow and deny lists kept in files (C{--allow-file}, C{--deny-file}), in the
spirit of tcpserver's rules files and ncat's C{--allowfile}: one address or
CIDR network per line, C{#} starts a comment, blank lines are ignored.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from typing import BinaryIO

from echotw.files import fileKind
from echotw.rules.addresses import IPNetwork, parseNetwork
from echotw.rules.policy import AccessRules

MAX_LINE_BYTES = 1024
"""
The longest line a rule file may have, its line end not counted.  The
longest useful line (an IPv6 network and a comment) is far shorter; a longer
one is refused rather than buffered, so a file without line ends cannot grow
memory without bound.
"""

_BYTE_ORDER_MARK = b"\xef\xbb\xbf"


class RuleFileError(ValueError):
    """
    A rule file that cannot be used; the message names the file and line.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


def readRuleFile(path: str) -> list[IPNetwork]:
    """
    The networks listed in C{path}.

    Only a regular file (or a link to one) is read: a device such as
    C{/dev/zero} would never end, and a FIFO would block the server until
    some other process wrote to it.  Lines end in LF or CRLF and may be at
    most L{MAX_LINE_BYTES} long; no more than that is held per line.

    @raise RuleFileError: if the file cannot be read, is not a regular file,
        or a line is too long, not UTF-8, or not an address or network.
    """
    networks = []
    with _openRegular(path) as f:
        for number, line in _lines(path, f):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                networks.append(parseNetwork(text))
            except ValueError as e:
                raise RuleFileError(path, f"{path}:{number}: {e}") from None
    return networks


def _openRegular(path: str) -> BinaryIO:
    """
    Open C{path} for reading if it is a regular file.  Opened without
    blocking, so that a FIFO is refused instead of waited on.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise RuleFileError(path, f"{path}: cannot read: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise RuleFileError(path, f"{path}: not a regular file ({fileKind(mode)})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _lines(path: str, f: BinaryIO) -> Iterator[tuple[int, str]]:
    """
    C{(number, text)} for each line of C{f}, its line end removed, reading
    at most L{MAX_LINE_BYTES} and a CRLF at a time.
    """
    number = 0
    while True:
        number += 1
        try:
            raw = f.readline(MAX_LINE_BYTES + 2)
        except OSError as e:
            raise RuleFileError(path, f"{path}: cannot read: {e.strerror or e}") from None
        if not raw:
            return
        ended = raw.endswith(b"\n")
        line = raw[:-1] if ended else raw
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > MAX_LINE_BYTES or (not ended and len(raw) == MAX_LINE_BYTES + 2):
            raise RuleFileError(path, f"{path}:{number}: line longer than {MAX_LINE_BYTES} bytes")
        if number == 1:
            line = line.removeprefix(_BYTE_ORDER_MARK)
        try:
            yield number, line.decode("utf-8")
        except UnicodeDecodeError:
            raise RuleFileError(path, f"{path}:{number}: not UTF-8 text") from None


class RuleSource:
    """
    Where the access rules come from: networks given on the command line
    plus files, which L{load} (re-)reads.
    """

    def __init__(
        self,
        allow: Sequence[IPNetwork] = (),
        deny: Sequence[IPNetwork] = (),
        allowFiles: Sequence[str] = (),
        denyFiles: Sequence[str] = (),
    ) -> None:
        self.allow = list(allow)
        self.deny = list(deny)
        self.allowFiles = list(allowFiles)
        self.denyFiles = list(denyFiles)
        # What the files held at the last load that succeeded.
        self.fileNetworks: tuple[list[IPNetwork], list[IPNetwork]] = ([], [])

    @property
    def hasFiles(self) -> bool:
        return bool(self.allowFiles or self.denyFiles)

    def load(self) -> AccessRules:
        """
        Build the rules, reading every file now.

        @raise RuleFileError: if any file cannot be used; nothing is built.
        """
        allowed: list[IPNetwork] = []
        denied: list[IPNetwork] = []
        for path in self.allowFiles:
            allowed += readRuleFile(path)
        for path in self.denyFiles:
            denied += readRuleFile(path)
        self.fileNetworks = (allowed, denied)
        return AccessRules(
            self.allow + allowed, self.deny + denied, restrict=bool(self.allow or self.allowFiles)
        )
