"""
A worker process of C{--workers N} (C{python -m echotw.workermain ARGS}): it
parses the supervisor's command line, derives its own configuration from it
and serves the listening sockets it inherited (see L{echotw.workers}).
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from typing import cast

from twisted.logger import Logger, globalLogBeginner, jsonFileLogObserver
from twisted.python.reflect import qual

from echotw import loglevel
from echotw.build import makeService
from echotw.config import EchoConfig
from echotw.interfaces import IServerReactor
from echotw.options import EchoOptions
from echotw.reactor import installIfUnchosen
from echotw.workers import (
    WORKER_MAX_CONNECTIONS,
    WORKER_REACTOR,
    inheritedSockets,
)


def workerConfig(config: EchoConfig, maxConnections: int) -> EchoConfig:
    """
    A worker's view of the supervisor's configuration: one process, its
    share of C{--max-connections}, and no UDP (the supervisor serves that).
    """
    return replace(
        config,
        workers=1,
        udpListeners=(),
        limits=replace(config.limits, maxConnections=maxConnections),
    )


def installReactor(chosen: str) -> None:
    """
    Run on the reactor the supervisor runs on (by its module's name).
    """
    if chosen.endswith("asyncioreactor"):
        from twisted.internet import asyncioreactor

        asyncioreactor.install()
    elif chosen == "echotw.reactor":
        installIfUnchosen()


def main(argv: list[str] | None = None) -> None:
    """
    Serve the inherited listeners with the supervisor's options until told
    to stop, or until the supervisor is gone.
    """
    installReactor(os.environ.get(WORKER_REACTOR, ""))
    from twisted.internet import reactor as globalReactor
    from twisted.internet.task import LoopingCall

    reactor = cast(IServerReactor, globalReactor)
    options = EchoOptions()
    options.parseOptions(sys.argv[1:] if argv is None else argv)
    config = workerConfig(options.config, int(os.environ.get(WORKER_MAX_CONNECTIONS, "0")))
    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(sys.stdout)], redirectStandardIO=False)
    service = makeService(
        config, reactor, inherited=inheritedSockets(os.environ), handleSignals=True
    )
    Logger(observer=loglevel.observer).info(
        "Worker running on {reactor}", event="worker-reactor", reactor=qual(type(reactor))
    )
    parent = os.getppid()

    def orphaned() -> None:
        if os.getppid() != parent:
            reactor.stop()

    LoopingCall(orphaned).start(1.0, now=False)
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
