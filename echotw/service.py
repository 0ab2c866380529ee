"""
The service tree: one L{ListenerService} per listening endpoint under an
L{EchoService} that drains open connections on shutdown.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort, IReactorTime, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from echotw.factory import EchoFactory, describeAddress, formatAddress


class ListenFailed(SystemExit):
    """
    A listener could not start: the process exits non-zero with this one-line
    message instead of a traceback, before anything serves.
    """

    def __init__(self, description: str, why: Failure) -> None:
        super().__init__(f"echotw: cannot listen on {description}: {why.getErrorMessage()}")


class ListenerService(Service):
    """
    Listen on one endpoint, log the address actually bound (so C{tcp:0}
    reports its port), and stop the whole process if listening fails.
    """

    _log = Logger()

    def __init__(self, description: str, endpoint: IStreamServerEndpoint, factory: Factory):
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None
        self._pending: Deferred[Any] | None = None

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        outcome: list[Any] = []
        d = self.endpoint.listen(self.factory)
        d.addBoth(outcome.append)
        if not outcome:
            # An endpoint that binds later (no built-in one does).
            self._pending = d
            d.addCallback(lambda _: self._listening(outcome[0]))
            return
        if isinstance(outcome[0], Failure):
            raise ListenFailed(self.description, outcome[0])
        self._listening(outcome[0])

    def _listening(self, port: Any) -> Any:
        if isinstance(port, Failure):
            self._log.critical("{message}", message=str(ListenFailed(self.description, port)))
            os._exit(1)
        self.port = port
        address = port.getHost()
        host, portNumber = describeAddress(address)
        self._log.info(
            "Listening on {listener} at {address}",
            event="listening",
            listener=self.description,
            address=formatAddress(address),
            host=host,
            port=portNumber,
        )
        return port

    def startService(self) -> None:
        Service.startService(self)
        if self.port is None and self._pending is None:
            self.privilegedStartService()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        stopped: Deferred[None] = maybeDeferred(port.stopListening)  # type: ignore[call-overload]
        return stopped


class EchoService(MultiService):
    """
    All of one server's listeners, sharing one L{EchoFactory}.

    Stopping it closes the listeners at once, then gives open connections up
    to C{shutdownTimeout} seconds: each is closed, after echoing what it
    already received, as soon as it has been quiet for one C{drainTick}; any
    still open at the deadline is aborted (a peer that does not read would
    otherwise hold a graceful close open for ever).
    """

    _log = Logger()
    drainTick = 0.1

    def __init__(self, factory: EchoFactory, clock: IReactorTime, shutdownTimeout: float):
        super().__init__()
        self.factory = factory
        self.clock = clock
        self.shutdownTimeout = shutdownTimeout

    def stopService(self) -> Deferred[None]:
        d: Deferred[Any] = MultiService.stopService(self)
        d.addCallback(lambda _: self.drain())
        return d

    def drain(self) -> Deferred[None]:
        """
        Close every open connection as described above; fires when all are.
        """
        factory = self.factory
        if not factory.protocols:
            return succeed(None)
        self._log.info(
            "Draining {count} connections for up to {timeout}s",
            event="draining",
            count=len(factory.protocols),
            timeout=self.shutdownTimeout,
        )
        deadline = self.clock.seconds() + self.shutdownTimeout
        seen: dict[Any, int] = {}

        def tick() -> None:
            if not factory.protocols:
                loop.stop()
                return
            late = self.clock.seconds() >= deadline
            for p in list(factory.protocols):
                if late:
                    p.abort("server shutdown")
                elif p.finishing:
                    continue
                elif seen.get(p) == p.bytesEchoed:
                    p.finish("server shutdown")
                else:
                    seen[p] = p.bytesEchoed

        loop = LoopingCall(tick)
        loop.clock = self.clock
        done = loop.start(self.drainTick, now=True)
        return done.addCallback(lambda _: None)
