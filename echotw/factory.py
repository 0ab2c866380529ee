"""
The state shared by every connection of one echo server, and the decision to
accept each of them (the asyncore original's C{verify_request}).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory, ServerFactory
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from echotw import loglevel
from echotw.counters import ConnectionStats
from echotw.protocol import EchoProtocol
from echotw.ratelimit import PerSecondBudget, TokenBuckets, defaultClock
from echotw.rules.addresses import clientFields, describeAddress, sourceKey
from echotw.rules.policy import AccessRules, Verifier, refusalReason
from echotw.throttlelog import LINES_PER_SECOND, RefusalLog, logVerifierFailure
from echotw.transport.lane import defaultProtocol
from echotw.transport.laneport import LaneListener, laneListener
from echotw.workers.sharedcount import ServerCount

Maker = Callable[[], EchoProtocol]
"""What builds a connection's protocol."""


class EchoFactory(ServerFactory):
    """
    Builds an L{EchoProtocol} for each accepted connection, or refuses it,
    and logs connections; what it counts is kept in one L{ConnectionStats}
    (C{stats}), which its limits and metrics read.

    Verification happens in L{buildProtocol}, when the connection arrives: a
    refused connection gets no protocol, so Twisted closes it at once.  The
    order is the IP rules, the source's rate (a connection that passes the
    rules spends a token even if a limit then refuses it), the total and
    then the per-source connection limit, then each of C{verifiers} (the
    pluggable hook: any C{(address, listener) -> Verdict} callable, see
    L{echotw.rules.policy}), which see only connections all of those accepted.

    One factory may serve several listeners: L{forListener} gives each its
    own small factory that names the listener in logs and to verifiers, while
    the limits and counters stay shared.

    @ivar stats: the counts of open, pending, accepted and refused
        connections and of their bytes and durations, which the limits read
        and metrics read as a whole (L{ConnectionStats}).
    @ivar protocol: builds each connection's protocol: L{EchoProtocol}, or
        an impaired one (L{echotw.impairment}).
    @ivar serverCount: where several processes serve one server, their
        shared count: told of each change to this process's open and
        pending connections, and what C{maxConnections} is checked against.
    """

    protocol = EchoProtocol  # type: ignore[assignment]
    noisy = False
    _log = Logger(observer=loglevel.observer)

    def __init__(
        self,
        rules: AccessRules | None = None,
        verifiers: Iterable[Verifier] = (),
        maxConnections: int = 0,
        maxPerSource: int = 0,
        ipv6Prefix: int = 64,
        connectionRate: TokenBuckets | None = None,
        maxSessionBytes: int = 0,
        maxSessionSeconds: float = 0,
        clock: IReactorTime | None = None,
        logConnections: int = 100,
        protocol: Callable[[], EchoProtocol] | None = None,
        serverCount: ServerCount | None = None,
        refusalLines: int = LINES_PER_SECOND,
    ) -> None:
        # Unless told otherwise, plain connections go to the native lane
        # where it serves (see echotw.transport.lane).
        self.protocol = protocol if protocol is not None else defaultProtocol()  # type: ignore[assignment]
        self.rules = rules if rules is not None else AccessRules()
        self.verifiers = list(verifiers)
        self.maxConnections = maxConnections
        self.maxPerSource = maxPerSource
        self.ipv6Prefix = ipv6Prefix
        self.connectionRate = connectionRate
        self.maxSessionBytes = maxSessionBytes
        self.maxSessionSeconds = maxSessionSeconds
        self.clock = clock if clock is not None else defaultClock()
        self.refusalLog = RefusalLog(self.clock, self._log, refusalLines)
        self.connectionLog = PerSecondBudget(logConnections, self.clock)
        self.stats = ConnectionStats()
        self.serverCount = serverCount

    # What the service's periodic summary and shutdown read; everything
    # else reads self.stats.

    @property
    def protocols(self) -> set[EchoProtocol]:
        """
        The open connections (L{ConnectionStats.protocols}).
        """
        return self.stats.protocols

    @property
    def openConnections(self) -> int:
        return self.stats.openConnections

    @property
    def connectionsTotal(self) -> int:
        return self.stats.connectionsTotal

    @property
    def refusals(self) -> dict[str, int]:
        return self.stats.refusals

    def sentBytes(self) -> int:
        """
        See L{ConnectionStats.sentBytes}.
        """
        return self.stats.sentBytes()

    def forListener(self, listener: str) -> ListenerFactory:
        """
        A factory for one listener, sharing this one's rules and counts.
        """
        return ListenerFactory(self, listener)

    def buildProtocol(self, addr: IAddress) -> EchoProtocol | None:  # type: ignore[override]
        return self.buildProtocolFor(addr, "")

    def buildHealthCheckProtocol(
        self, addr: IAddress, listener: str, noDelay: bool = True, protocol: Maker | None = None
    ) -> EchoProtocol:
        """
        A protocol for a trusted balancer's health check: not subject to the
        client rules and limits, counted as a connection, logged at debug.
        """
        p = (protocol or self.protocol)()
        p.admit(self, listener, addr, healthCheck=True, noDelay=noDelay)
        return p

    def buildProtocolFor(
        self,
        addr: IAddress,
        listener: str,
        noDelay: bool = True,
        protocol: Maker | None = None,
        source: str | None = None,
    ) -> EchoProtocol | None:
        """
        Verify a new connection; return its protocol (made by C{protocol},
        if given: a listener's own kind), or L{None} to refuse it.
        C{source}: its L{sourceKey}, where the caller knows it already (an
        IPv4 listener: the host); else it is worked out when needed.
        """
        # The rules answer None at once when there are none.
        reason = self.rules.reasonFor(addr, listener)
        rate = self.connectionRate
        if reason is None and source is None and (self.maxPerSource or rate is not None):
            source = sourceKey(addr, self.ipv6Prefix)
        if reason is None and source is not None and rate is not None:
            if not rate.allow(source):
                reason = "rate"
        if reason is None and self.maxConnections:
            if self.inUse() >= self.maxConnections:
                reason = "max-connections"
        if reason is None and self.maxPerSource and source is not None:
            if self.stats.perSource.get(source, 0) >= self.maxPerSource:
                reason = "max-per-ip"
        if reason is None and self.verifiers:
            reason = self._consultVerifiers(addr, listener)
        if reason is not None:
            self.refuse(addr, listener, reason, source)
            return None
        p = (protocol or self.protocol)()
        counted = source if self.maxPerSource else None
        p.admit(self, listener, addr, counted, self.maxSessionBytes, noDelay)
        return p

    def checkAddress(self, addr: IAddress, listener: str) -> str | None:
        """
        The IP rules and the verifiers, without the connection limits: what
        applies to a UDP datagram.
        """
        reason = self.rules(addr, listener) if self.rules else None
        if reason is None and self.verifiers:
            reason = self._consultVerifiers(addr, listener)
        return reason

    def addressCheck(self) -> AddressCheck:
        """
        L{checkAddress} as a verifier that is false while there is nothing to
        check, so per-datagram callers can skip it; it follows later changes
        to the rules (a reload).
        """
        return AddressCheck(self)

    def _consultVerifiers(self, addr: IAddress, listener: str) -> str | None:
        for verifier in self.verifiers:
            try:
                reason = refusalReason(verifier(addr, listener), "verifier")
            except Exception:
                # A verifier that fails for every connection must not write
                # a traceback for each: one per source a second.
                host, _ = describeAddress(addr)
                held = self.refusalLog.admit(("verifier error", host), "verifier error")
                logVerifierFailure(self._log, held, verifier, addr, listener)
                return "verifier error"
            if reason is not None:
                return reason
        return None

    def holdPending(self, addr: IAddress, listener: str) -> bool:
        """
        Count a connection that is not verified yet (a PROXY listener's,
        waiting for its header) against C{--max-connections}, or refuse it.
        """
        if self.maxConnections and self.inUse() >= self.maxConnections:
            self.refuse(addr, listener, "max-connections")
            return False
        self.stats.pendingConnections += 1
        self._publish()
        return True

    def releasePending(self) -> None:
        """
        A connection counted by L{holdPending} is verified now, or gone.
        """
        self.stats.pendingConnections -= 1
        self._publish()

    def inUse(self) -> int:
        """
        Connections that count against C{maxConnections}, open and pending:
        over the whole server where a C{serverCount} is shared.
        """
        if self.serverCount is None:
            return self.stats.inUse()
        return self.serverCount.total()

    def _publish(self) -> None:
        if self.serverCount is not None:
            self.serverCount.publish(self.stats.inUse())

    def countRefusal(self, reason: str) -> None:
        """
        Count a connection refused for C{reason} (logged by the caller).
        """
        self.stats.refused(reason)

    def refuse(self, addr: IAddress, listener: str, reason: str, source: str | None = None) -> None:
        """
        Count and log a refused connection; from one source, at most one line
        a second, and L{echotw.throttlelog.LINES_PER_SECOND} over all (a
        flood must not flood the log), with the count of those not logged.
        """
        self.countRefusal(reason)
        self.refusalLog.refused(addr, listener, reason, source)

    def connectionOpened(self, p: EchoProtocol) -> None:
        """
        Count a connection whose protocol has just been connected.
        """
        self.stats.opened(p)
        if self.serverCount is not None:
            self._publish()
        if self.maxSessionSeconds:
            p.limitDuration(self.clock, self.maxSessionSeconds)
        level = "debug" if p.healthCheck else "info"
        if not loglevel.enabled[level]:
            return
        logged, unlogged = self.connectionLog.take()
        if unlogged:
            self._logUnlogged(unlogged)
        if not logged:
            return
        p.logEvents()
        self._log.emit(
            LogLevel.levelWithName(level),
            "Connection from {client} on {listener}",
            event="connected",
            **clientFields(p.peer, p.listener),
        )

    def flushConnectionLog(self) -> None:
        """
        Log how many connections of a second that has ended were not logged
        one by one, even if no connection follows to say so (the echo
        service calls this every second): the end of a flood is counted too.
        """
        unlogged = self.connectionLog.roll()
        if unlogged:
            self._logUnlogged(unlogged)

    def _logUnlogged(self, unlogged: int) -> None:
        self._log.info(
            "{unlogged} more connections in the last second were not logged "
            "one by one (--log-connections {limit})",
            event="connections-unlogged",
            unlogged=unlogged,
            limit=self.connectionLog.limit,
        )

    def connectionClosed(
        self, p: EchoProtocol, why: Failure, now: float | None = None, sent: int | None = None
    ) -> None:
        """
        Release a closed connection's counts and log how it ended; C{now}
        and C{sent}: when it ended (C{time.monotonic}) and the bytes it
        echoed, where the caller knows them (see L{ConnectionStats.closed}).
        """
        counted = self.stats.closed(p, now, sent)
        if counted is None:
            return
        if self.serverCount is not None:
            self._publish()
        if not p.logged:
            return
        sent, duration = counted
        reason = p.closeReason or closeReason(why)
        self._log.emit(
            LogLevel.debug if p.healthCheck else LogLevel.info,
            "Connection from {client} on {listener} closed "
            "({reason}) after {bytes} bytes in {duration}s",
            event="closed",
            **clientFields(p.peer, p.listener),
            bytes=sent,
            unsent=p.bytesUnsent,
            discarded=p.bytesDiscarded,
            duration=round(duration, 6),
            reason=reason,
        )


def closeReason(why: Failure) -> str:
    """
    The close reason for a connection the server did not end itself.
    (C{isinstance}, not C{Failure.check}, which compares qualified names.)
    """
    if isinstance(why.value, ConnectionDone):
        return "client closed"
    if isinstance(why.value, ConnectionLost):
        return "client reset"
    return "error"


class AddressCheck:
    """
    See L{EchoFactory.addressCheck}.
    """

    def __init__(self, factory: EchoFactory) -> None:
        self.factory = factory

    def __bool__(self) -> bool:
        return bool(self.factory.rules) or bool(self.factory.verifiers)

    def __call__(self, addr: IAddress, listener: str) -> str | None:
        return self.factory.checkAddress(addr, listener)


class ListenerFactory(Factory):
    """
    One listener's view of an L{EchoFactory}: names the listener, shares
    everything else.
    """

    noisy = False

    def __init__(self, echo: EchoFactory, listener: str) -> None:
        self.echo = echo
        self.listener = listener
        # An instance's own attribute, which CPython reads faster than a
        # class's on every connection.
        self.noDelayOnListener = False

    def logPrefix(self) -> str:
        return "echotw"

    def acceptedInheritNoDelay(self) -> None:
        """
        The listening socket has C{TCP_NODELAY}, which Linux copies to each
        accepted socket: connections need not set it again.
        """
        self.noDelayOnListener = True

    def buildProtocol(self, addr: IAddress) -> EchoProtocol | None:  # type: ignore[override]
        return self.echo.buildProtocolFor(addr, self.listener, not self.noDelayOnListener)

    def laneListener(self, port: Any) -> LaneListener | None:
        """
        What accepts C{port}'s connections in the native lane, admitting
        them with L{EchoFactory.buildProtocolFor}, where they may go
        (L{echotw.transport.laneport}); asked by the port once.
        """
        if type(self).buildProtocol is not ListenerFactory.buildProtocol:
            return None  # a listener of its own kind (WebSocket)
        return laneListener(port, self)

    def buildHealthCheckProtocol(self, addr: IAddress) -> EchoProtocol:
        return self.echo.buildHealthCheckProtocol(addr, self.listener, not self.noDelayOnListener)

    def holdPending(self, addr: IAddress) -> bool:
        return self.echo.holdPending(addr, self.listener)

    def releasePending(self) -> None:
        self.echo.releasePending()
