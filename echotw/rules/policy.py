# -*- test-case-name: tests.unit.test_policy -*-
"""
Connection verification: the asyncore original's C{verify_request}, as data.

A verifier is any callable C{(address, listener) -> Verdict}: it sees the
client's address (an L{IAddress}) and the name of the listener it arrived on,
and returns L{None} (or C{True}) to accept, or a short reason string (or
C{False}) to refuse.  L{AccessRules} is the built-in one behind C{--allow} and
C{--deny}; L{echotw.factory.EchoFactory} takes more through its C{verifiers}.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable, Iterable
from typing import Any, Union

from twisted.internet.interfaces import IAddress

from echotw.rules.addresses import IPNetwork, NetworkSet, ipFromText

Verdict = Union[None, bool, str]  # noqa: UP007 (a runtime alias on 3.10)
"""C{None}/C{True}: accept; a string: refuse with that reason; C{False}: refuse."""

Verifier = Callable[[IAddress, str], Verdict]


class AccessRules:
    """
    Allow and deny lists of IP networks.

    A deny match always refuses; if any allow rule exists (or C{restrict}
    is set: an allow file that is empty for now still means "only those
    listed"), only matching clients are accepted.  Clients without an IP
    address (Unix sockets) are not subject to IP rules: file permissions
    govern who reaches them.
    """

    def __init__(
        self,
        allow: Iterable[IPNetwork] = (),
        deny: Iterable[IPNetwork] = (),
        restrict: bool = False,
    ) -> None:
        self.allow = NetworkSet(allow)
        self.deny = NetworkSet(deny)
        self.restrict = restrict or bool(self.allow)
        # Asked for every connection; the rules never change (a reload
        # makes new ones).
        self._denies = bool(self.deny)
        self._active = self.restrict or self._denies
        self._verdicts: dict[str, str | None] = {}

    def __bool__(self) -> bool:
        return self._active

    def reasonFor(self, address: IAddress, listener: str = "") -> str | None:
        """
        The reason to refuse a client at C{address}, or L{None} (also the
        rules' C{__call__}, as every L{Verifier}'s; a method is the cheaper
        call, made for every connection).  The answer for each host is
        remembered (the rules never change), for up to L{VERDICTS_KEPT}
        hosts at a time: most connections come from a few hosts (a
        balancer's), and then cost one lookup.
        """
        if not self._active:
            return None
        try:
            host = address.host  # type: ignore[attr-defined]
        except AttributeError:
            return None  # no IP (a Unix socket): not subject to IP rules
        verdicts = self._verdicts
        try:
            return verdicts[host]
        except KeyError:
            pass
        if len(verdicts) >= VERDICTS_KEPT:
            verdicts.clear()  # a flood from many hosts: bounded, never slower
        verdict = verdicts[host] = self._judge(host)
        return verdict

    __call__ = reasonFor

    def _judge(self, host: str) -> str | None:
        if not isinstance(host, str):
            return None
        ip = ipFromText(host)
        if ip is None:
            return None
        if self._denies and ip in self.deny:
            return "denied"
        if self.restrict and ip not in self.allow:
            return "not allowed"
        return None


VERDICTS_KEPT = 4096
"""Hosts whose verdict an L{AccessRules} remembers at a time."""


def refusalReason(verdict: Verdict, default: str = "refused") -> str | None:
    """
    Normalise a verifier's answer: L{None} to accept, else a reason string.
    """
    if verdict is None or verdict is True:
        return None
    if verdict is False or verdict == "":
        return default
    return str(verdict)


def loadVerifier(name: str) -> Verifier:
    """
    The verifier C{--verifier} names: C{package.module:callable} (or
    C{package.module.callable}); a class is instantiated with no arguments.

    @raise ValueError: with a one-line reason.
    """
    try:
        target: Any = pkgutil.resolve_name(name)
    except Exception as e:
        raise ValueError(f"cannot import {name!r}: {type(e).__name__}: {e}") from None
    if isinstance(target, type):
        try:
            target = target()
        except Exception as e:
            raise ValueError(f"cannot instantiate {name!r}: {type(e).__name__}: {e}") from None
    if not callable(target):
        raise ValueError(f"{name!r} is not callable")
    verifier: Verifier = target
    return verifier
