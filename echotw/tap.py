# -*- test-case-name: tests.unit.test_tap -*-
"""
The C{twistd echo} subcommand: its options and the service they build
(see L{echotw.options} and L{echotw.build}).
"""

from __future__ import annotations

from typing import Any, cast

from twisted.python import usage

from echotw import build
from echotw.interfaces import IServerReactor
from echotw.options import EchoOptions
from echotw.service import EchoService
from echotw.signals import holdHangups
from echotw.transport.reactor import installIfUnchosen
from echotw.workers.logs import logOutputFor


class Options(EchoOptions):
    """
    L{EchoOptions} for the command line: a bad value ends the command with one
    line naming the option, not a page of usage text.
    """

    def parseOptions(self, options: Any = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(f"echo: error: {e} (see --help)") from None
        if getattr(self, "parent", None) is not None:
            # A runner's process (not a test's): from here on a SIGHUP is a
            # reload, even before the service can do it.
            holdHangups()


def makeService(options: EchoOptions, reactor: IServerReactor | None = None) -> EchoService:
    """
    The service tree for C{options} (see L{echotw.build.makeService}).  With
    no reactor given (twistd), echotw's own is installed unless one was
    chosen, and the process's signals are handled.  Workers write their log
    lines where the runner (C{twistd}, C{twist}: the options' parent) sends
    its own, when they can.
    """
    if reactor is not None:
        return build.makeService(options.config, reactor)
    installIfUnchosen()
    from twisted.internet import reactor as globalReactor

    return build.makeService(
        options.config,
        cast(IServerReactor, globalReactor),
        workerLog=logOutputFor(getattr(options, "parent", None)),
        handleSignals=True,
    )
