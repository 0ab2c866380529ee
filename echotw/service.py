"""
The service tree: one L{ListenerService} per listening endpoint under an
L{EchoService} that drains open connections on shutdown.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IReactorTime, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from echotw import loglevel
from echotw.factory import EchoFactory, ListenerFactory
from echotw.listening import ListenFailed, listenNow, logListening, stopListening
from echotw.protocol import Connection
from echotw.rulefiles import RuleFileError, RuleSource


class ListenerService(Service):
    """
    Listen on one endpoint, log the address actually bound (so C{tcp:0}
    reports its port), and stop the whole process if listening fails.
    """

    _log = Logger(observer=loglevel.observer)

    def __init__(self, description: str, endpoint: IStreamServerEndpoint, factory: Factory):
        self.description = description
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None
        self._pending: Deferred[Any] | None = None

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
        if _noDelayOnListeningSocket(port) and isinstance(self.factory, ListenerFactory):
            self.factory.acceptedInheritNoDelay()
        logListening(self._log, self.description, port.getHost())
        return port

    def startService(self) -> None:
        Service.startService(self)
        if self.port is None and self._pending is None:
            self.privilegedStartService()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
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
    aborts connections whose byte count has not moved for C{idleTimeout}
    seconds, so a connection costs no timer of its own and a read costs
    nothing extra; the timeout is honoured to within one sweep.  Abort, not
    a graceful close: a peer that stopped reading would hold that open.

    Rules: L{reload} (on SIGHUP) re-reads the rule files through
    C{ruleSource}; a file that fails keeps the old rules in force, and open
    connections that the new rules deny are closed after echoing what they
    already received.

    Stopping it closes the listeners at once, then gives open connections up
    to C{shutdownTimeout} seconds: each is closed, after echoing what it
    already received, as soon as it has been quiet for one C{drainTick}; any
    still open at the deadline is aborted (a peer that does not read would
    otherwise hold a graceful close open for ever).
    """

    _log = Logger(observer=loglevel.observer)
    drainTick = 0.1

    def __init__(
        self,
        factory: EchoFactory,
        clock: IReactorTime,
        shutdownTimeout: float,
        idleTimeout: float = 0,
        statsInterval: float = 0,
        ruleSource: RuleSource | None = None,
        handleHangup: bool = False,
    ) -> None:
        super().__init__()
        self.factory = factory
        self.clock = clock
        self.shutdownTimeout = shutdownTimeout
        self.idleTimeout = idleTimeout
        self.statsInterval = statsInterval
        self.ruleSource = ruleSource
        self.handleHangup = handleHangup
        self._loops: list[LoopingCall] = []

    def startService(self) -> None:
        MultiService.startService(self)
        if self.idleTimeout:
            self._every(min(self.idleTimeout / 4, 5.0), self.sweepIdle)
        if self.statsInterval:
            self._every(self.statsInterval, self.logStats, now=False)
        if self.handleHangup:
            signal.signal(signal.SIGHUP, self._hangup)

    def _hangup(self, signum: int, frame: Any) -> None:
        # Not in the middle of whatever the reactor was doing: on its next turn.
        self.clock.callFromThread(self.reload)  # type: ignore[attr-defined]

    def _every(self, interval: float, f: Any, now: bool = True) -> None:
        loop = LoopingCall(f)
        loop.clock = self.clock
        loop.start(interval, now=now)
        self._loops.append(loop)

    def stopService(self) -> Deferred[None]:
        for loop in self._loops:
            loop.stop()
        self._loops = []
        d: Deferred[Any] = MultiService.stopService(self)
        d.addCallback(lambda _: self.drain())
        return d

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
            bytes=factory.bytesEchoedTotal + sum(p.bytesEchoed for p in factory.protocols),
            refusals=dict(factory.refusals),
        )

    def reload(self) -> bool:
        """
        Re-read the rule files; return whether the new rules are in force.
        """
        if self.ruleSource is None or not self.ruleSource.hasFiles:
            self._log.info("SIGHUP: no rule files to reload", event="reload-skipped")
            return False
        try:
            rules = self.ruleSource.load()
        except RuleFileError as e:
            self._log.error(
                "Rules not reloaded, the previous ones stay in force: {error}",
                event="reload-failed",
                error=str(e),
            )
            return False
        factory = self.factory
        factory.rules = rules
        closed = 0
        for p in list(factory.protocols):
            if p.peer is not None and rules(p.peer, p.listener) is not None:
                p.finish("denied by reload")
                closed += 1
        self._log.info(
            "Rules reloaded: {allow} allow and {deny} deny networks; "
            "closed {closed} connections they deny",
            event="reloaded",
            allow=len(rules.allow),
            deny=len(rules.deny),
            closed=closed,
        )
        return True

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
        seen: dict[Connection, int] = {}

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
