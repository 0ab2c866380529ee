"""
Allow and deny lists kept in files (C{--allow-file}, C{--deny-file}), in the
spirit of tcpserver's rules files and ncat's C{--allowfile}: one address or
CIDR network per line, C{#} starts a comment, blank lines are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

from echotw.addresses import IPNetwork, parseNetwork
from echotw.policy import AccessRules


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

    @raise RuleFileError: if the file cannot be read or a line is not an
        address or network.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RuleFileError(
            path, f"{path}: cannot read: {getattr(e, 'strerror', None) or e}"
        ) from None
    networks = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            networks.append(parseNetwork(text))
        except ValueError as e:
            raise RuleFileError(path, f"{path}:{number}: {e}") from None
    return networks


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

    @property
    def hasFiles(self) -> bool:
        return bool(self.allowFiles or self.denyFiles)

    def load(self) -> AccessRules:
        """
        Build the rules, reading every file now.

        @raise RuleFileError: if any file cannot be used; nothing is built.
        """
        allow = list(self.allow)
        deny = list(self.deny)
        for path in self.allowFiles:
            allow += readRuleFile(path)
        for path in self.denyFiles:
            deny += readRuleFile(path)
        return AccessRules(allow, deny, restrict=bool(self.allow or self.allowFiles))
