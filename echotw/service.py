# -*- test-case-name: tests.unit.test_service -*-
"""
The service tree: one L{ListenerService} per listening endpoint under an
L{EchoService} that reloads rules, sweeps idle connections and drains open
connections on shutdown.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorThreads,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from echotw import loglevel
from echotw.drain import TICK, QuietCloser, connections
from echotw.factory import EchoFactory, ListenerFactory
from echotw.listening import (
    AcceptErrors,
    ListenFailed,
    listenNow,
    logListening,
    stopListening,
    warnIfBacklogCapped,
    watchAcceptErrors,
)
from echotw.protocol import LINGER_TIMEOUT
from echotw.reloads import RuleReloader
from echotw.rules.files import RuleSource
from echotw.rules.policy import AccessRules


class ListenerService(Service):
    """
    Listen on one endpoint, log the address actually bound (so C{tcp:0}
    reports its port), and stop the whole process if listening fails.
    """

    _log = Logger(observer=loglevel.observer)

    def __init__(
        self,
        description: str,
        endpoint: IStreamServerEndpoint,
        factory: Factory,
        backlog: int | None = None,
    ):
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.backlog = backlog
        self.port: IListeningPort | None = None
        self._pending: Deferred[Any] | None = None
        self._acceptErrors: AcceptErrors | None = None

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        port, pending = listenNow(self.description, self.endpoint, self.factory)
        if pending is not None:
            # An endpoint that binds later (no built-in one does).
            self._pending = pending
            pending.addBoth(self._listening)
            return
        self._listening(port)

    def _listening(self, port: Any) -> Any:
        if isinstance(port, Failure):
            self._log.critical("{message}", message=str(ListenFailed(self.description, port)))
            os._exit(1)
        self.port = port
        factory = self.factory
        if isinstance(factory, ListenerFactory):
            if _noDelayOnListeningSocket(port):
                factory.acceptedInheritNoDelay()
            echo = factory.echo
            self._acceptErrors = watchAcceptErrors(
                port, self.description, echo.clock, echo.refusalLog, echo.countRefusal
            )
        logListening(self._log, self.description, port.getHost())
        warnIfBacklogCapped(self._log, self.description, self.backlog)
        return port

    def startService(self) -> None:
        Service.startService(self)
        if self.port is None and self._pending is None:
            self.privilegedStartService()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        if self._acceptErrors is not None:
            self._acceptErrors.stop()
        port, self.port = self.port, None
        return stopListening(port)


def _noDelayOnListeningSocket(port: Any) -> bool:
    """
    Set C{TCP_NODELAY} on a TCP listening socket, for the connections it
    accepts to inherit (as Linux does): one system call per listener instead
    of one per connection.
    """
    if not sys.platform.startswith("linux"):
        return False
    sock = getattr(port, "socket", None)
    if not isinstance(sock, socket.socket) or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return False
    return True


class EchoService(MultiService):
    """
    All of one server's listeners, sharing one L{EchoFactory}, and the
    housekeeping that spans connections.

    Idle connections: one sweep every C{idleTimeout / 4} seconds (5 at most)
    aborts connections on which nothing has moved (bytes received, or the
    echo leaving: Twisted's buffer, on Linux the kernel's send queue) for
    C{idleTimeout} seconds, so a connection costs no timer of its own and a read costs
    nothing extra; the timeout is honoured to within one sweep.  Abort, not
    a graceful close: a peer that stopped reading would hold that open.

    Rules: L{requestReload} (on SIGHUP) re-reads the rule files through
    C{ruleSource}, in a thread of C{threads} if given, so a big file does
    not stall the echo; L{reloads} (an L{echotw.reloads.RuleReloader})
    coalesces the requests and closes what the new rules deny, with the
    same L{closer} as the drain.

    Stopping it (L{stopService}): readiness (L{ready}) turns false at once;
    the listeners keep accepting for C{drainDelay} seconds (so a balancer
    or a Kubernetes Service can stop sending new clients), then close; open
    connections are kept echoing until each is quiet and then closed
    gracefully; those still busy after most of C{shutdownTimeout} are closed
    gracefully anyway, and whatever is still open at C{shutdownTimeout} is
    aborted.  Children marked C{servesThroughDrain} (metrics, health) stop
    last.  L{stopNow} (a second SIGTERM or SIGINT) aborts what is left.
    """

    _log = Logger(observer=loglevel.observer)

    def __init__(
        self,
        factory: EchoFactory,
        clock: IReactorTime,
        shutdownTimeout: float,
        idleTimeout: float = 0,
        statsInterval: float = 0,
        ruleSource: RuleSource | None = None,
        drainDelay: float = 0,
        threads: IReactorThreads | None = None,
    ) -> None:
        super().__init__()
        self.factory = factory
        self.clock = clock
        self.shutdownTimeout = shutdownTimeout
        self.idleTimeout = idleTimeout
        self.statsInterval = statsInterval
        self.drainDelay = drainDelay
        self.ready = False
        self.closer = QuietCloser(clock)
        self.reloads = RuleReloader(factory, self.closer, ruleSource, threads, self._log)
        self._loops: list[LoopingCall] = []
        self._delay: Deferred[None] | None = None
        self._stoppingNow = False

    def startService(self) -> None:
        MultiService.startService(self)
        if self.idleTimeout:
            self._every(min(self.idleTimeout / 4, 5.0), self.sweepIdle)
        if self.statsInterval:
            self._every(self.statsInterval, self.logStats, now=False)
        # A flood's count of unlogged refusals and connections is logged
        # even if it stops.
        refusalLog = self.factory.refusalLog
        self._every(refusalLog.interval, refusalLog.flush, now=False)
        self._every(1.0, self.factory.flushConnectionLog, now=False)
        self.ready = True

    def isReady(self) -> bool:
        """
        Whether the server accepts connections and is not shutting down
        (C{/readyz}).
        """
        return self.ready

    def _every(self, interval: float, f: Any, now: bool = True) -> None:
        loop = LoopingCall(f)
        loop.clock = self.clock
        loop.start(interval, now=now)
        self._loops.append(loop)

    def stopService(self) -> Deferred[None]:
        """
        Stop as the class docstring says; fires when every connection is
        closed and every child stopped.
        """
        Service.stopService(self)
        self.ready = False
        for loop in self._loops:
            loop.stop()
        self._loops = []
        if self.drainDelay and not self._stoppingNow:
            self._log.info(
                "Shutting down: not ready any more, still accepting for {delay}s",
                event="drain-delay",
                delay=self.drainDelay,
            )
            self._delay = deferLater(self.clock, self.drainDelay)
            d: Deferred[Any] = self._delay
            # Once over, it waits on the drain, which stopNow must not cancel.
            d.addBoth(self._delayOver)
            d.addErrback(lambda f: f.trap(CancelledError))
        else:
            d = succeed(None)
        d.addCallback(lambda _: self._stopChildren(lambda s: not _servesThroughDrain(s)))
        d.addCallback(lambda _: self.drain())
        d.addCallback(lambda _: self._stopChildren(_servesThroughDrain))
        return d

    def _delayOver(self, result: Any) -> Any:
        self._delay = None
        return result

    def _stopChildren(self, which: Callable[[IService], bool]) -> Deferred[Any]:
        stopping = [
            maybeDeferred(child.stopService)
            for child in reversed(list(self))
            if which(child) and child.running
        ]
        return DeferredList(stopping)

    def stopNow(self, why: str = "second signal") -> None:
        """
        Abort every connection now and let the shutdown finish at once.
        """
        if self._stoppingNow:
            return
        self._stoppingNow = True
        self._log.warn(
            "Stopping now ({why}): aborting {count} {connections}",
            event="stop-now",
            why=why,
            count=len(self.factory.protocols),
            connections=connections(len(self.factory.protocols)),
        )
        delay, self._delay = self._delay, None
        if delay is not None:
            delay.cancel()
        self.closer.stop()
        for p in list(self.factory.protocols):
            p.abort("server shutdown")
        for child in self:
            stopNow = getattr(child, "stopNow", None)
            if stopNow is not None:
                stopNow()

    def sweepIdle(self) -> None:
        """
        Abort connections idle for C{idleTimeout} seconds.
        """
        now = self.clock.seconds()
        timeout = self.idleTimeout
        for p in list(self.factory.protocols):
            if p.isIdle(now, timeout):
                p.abort("timeout")

    def logStats(self) -> None:
        """
        One summary line: what the server has done so far.
        """
        factory = self.factory
        self._log.info(
            "Stats: {open} open, {total} accepted, {refused} refused, {bytes} bytes echoed",
            event="stats",
            open=factory.openConnections,
            total=factory.connectionsTotal,
            refused=sum(factory.refusals.values()),
            bytes=factory.sentBytes(),
            refusals=dict(factory.refusals),
        )

    def requestReload(self) -> Deferred[bool]:
        """
        Reload the rule files (SIGHUP) off the reactor thread, coalesced
        (L{RuleReloader.requestReload}).
        """
        return self.reloads.requestReload()

    def reload(self) -> bool:
        """
        Re-read the rule files now (L{RuleReloader.reload}).
        """
        return self.reloads.reload()

    def applyRules(self, rules: AccessRules) -> None:
        """
        Put C{rules} in force (L{RuleReloader.applyRules}).
        """
        self.reloads.applyRules(rules)

    def drain(self) -> Deferred[None]:
        """
        Close every open connection as described above; fires when all are.
        """
        factory = self.factory
        if not factory.protocols:
            return succeed(None)
        timeout = self.shutdownTimeout
        self._log.info(
            "Draining {count} {connections} for up to {timeout}s",
            event="draining",
            count=len(factory.protocols),
            connections=connections(len(factory.protocols)),
            timeout=timeout,
        )
        deadline = self.clock.seconds() + timeout
        # Busy connections are closed gracefully with time left to read
        # what was echoed, before the deadline aborts what remains.
        grace = timeout - min(timeout / 2, LINGER_TIMEOUT)

        def tick() -> None:
            if not factory.protocols:
                loop.stop()
                return
            if self._stoppingNow or self.clock.seconds() >= deadline:
                for p in list(factory.protocols):
                    p.abort("server shutdown")
                return
            # Connections that finished a PROXY header meanwhile join too.
            self.closer.close(factory.protocols, "server shutdown", grace, deadline)

        loop = LoopingCall(tick)
        loop.clock = self.clock
        done = loop.start(TICK, now=True)
        return done.addCallback(lambda _: None)


def _servesThroughDrain(service: IService) -> bool:
    return bool(getattr(service, "servesThroughDrain", False))
