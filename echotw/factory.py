"""
The state shared by every connection of one echo server, and the decision to
accept each of them (the asyncore original's C{verify_request}).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from time import monotonic

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory, ServerFactory
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from echotw import loglevel
from echotw.addresses import describeAddress, formatAddress, sourceKey
from echotw.nativelane import defaultProtocol
from echotw.policy import AccessRules, Verifier, refusalReason
from echotw.protocol import EchoProtocol
from echotw.ratelimit import PerSecondBudget, TokenBuckets, defaultClock
from echotw.sharedcount import ServerCount
from echotw.throttlelog import LINES_PER_SECOND, RefusalLog, unloggedNote

DURATION_BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 600.0, 3600.0)
"""Upper bounds (seconds) of the connection duration histogram."""

Maker = Callable[[], EchoProtocol]
"""What builds a connection's protocol."""


class EchoFactory(ServerFactory):
    """
    Builds an L{EchoProtocol} for each accepted connection and keeps the
    counts the limits need.

    Verification happens in L{buildProtocol}, when the connection arrives: a
    refused connection gets no protocol, so Twisted closes it at once.  The
    order is the IP rules, the source's rate (a connection that passes the
    rules spends a token even if a limit then refuses it), the total and
    then the per-source connection limit, then each of C{verifiers} (the
    pluggable hook: any C{(address, listener) -> Verdict} callable, see
    L{echotw.policy}), which see only connections all of those accepted.

    One factory may serve several listeners: L{forListener} gives each its
    own small factory that names the listener in logs and to verifiers, while
    the limits and counters stay shared.

    @ivar openConnections: connections currently open.
    @ivar pendingConnections: connections accepted but not verified yet
        (PROXY listeners waiting for the header), which count against
        C{maxConnections} too.
    @ivar perSource: open connections by source key (see L{sourceKey}).
    @ivar connectionsTotal: connections accepted since start.
    @ivar refusals: refused connections since start, by reason.
    @ivar bytesEchoedTotal: bytes echoed (handed to the kernel) by
        connections that have closed.
    @ivar bytesDiscardedTotal: bytes received and not echoed by connections
        that have closed, because the server was closing them.
    @ivar protocols: the open connections' protocols.
    @ivar openByListener: open connections per listener name.
    @ivar totalByListener: accepted connections per listener name.
    @ivar protocol: builds each connection's protocol: L{EchoProtocol}, or
        an impaired one (L{echotw.impairment}).
    @ivar durationCounts: closed connections per L{DURATION_BUCKETS} bucket
        (one more for longer ones); with C{durationSum}, a histogram that
        metrics can read without costing anything per connection.
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
        # where it serves (see echotw.nativelane).
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
        self.openConnections = 0
        self.pendingConnections = 0
        self.perSource: dict[str, int] = {}
        self.connectionsTotal = 0
        self.refusals: dict[str, int] = {}
        self.bytesEchoedTotal = 0
        self.bytesDiscardedTotal = 0
        self.protocols: set[EchoProtocol] = set()
        self.openByListener: dict[str, int] = {}
        self.totalByListener: dict[str, int] = {}
        self.durationCounts = [0] * (len(DURATION_BUCKETS) + 1)
        self.durationSum = 0.0
        self.serverCount = serverCount

    def echoedBytes(self) -> int:
        """
        Bytes echoed so far, closed and open connections together: handed to
        the kernel, not merely received.
        """
        open_ = sum(p.bytesEchoed - p.pendingBytes() for p in list(self.protocols))
        return self.bytesEchoedTotal + open_

    def discardedBytes(self) -> int:
        """
        Bytes received and not echoed because the server was closing their
        connection, closed and open connections together.
        """
        return self.bytesDiscardedTotal + sum(p.bytesDiscarded for p in list(self.protocols))

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
        self, addr: IAddress, listener: str, noDelay: bool = True, protocol: Maker | None = None
    ) -> EchoProtocol | None:
        """
        Verify a new connection; return its protocol (made by C{protocol},
        if given: a listener's own kind), or L{None} to refuse it.
        """
        reason = self.rules(addr, listener) if self.rules else None
        source = None
        rate = self.connectionRate
        if reason is None and (self.maxPerSource or rate is not None):
            source = sourceKey(addr, self.ipv6Prefix)
        if reason is None and source is not None and rate is not None:
            if not rate.allow(source):
                reason = "rate"
        if reason is None and self.maxConnections:
            if self.inUse() >= self.maxConnections:
                reason = "max-connections"
        if reason is None and self.maxPerSource and source is not None:
            if self.perSource.get(source, 0) >= self.maxPerSource:
                reason = "max-per-ip"
        if reason is None and self.verifiers:
            reason = self._consultVerifiers(addr, listener)
        if reason is not None:
            self.refuse(addr, listener, reason, source)
            return None
        p = (protocol or self.protocol)()
        p.admit(
            self,
            listener,
            addr,
            source=source if self.maxPerSource else None,
            byteLimit=self.maxSessionBytes,
            noDelay=noDelay,
        )
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
                host, port = describeAddress(addr)
                # A verifier that fails for every connection must not write
                # a traceback for each: one per source a second.
                held = self.refusalLog.admit(("verifier error", host), "verifier error")
                if held is not None:
                    self._log.failure(
                        "Verifier {verifier!r} failed for {client}"
                        + unloggedNote(held, "failures for this source"),
                        verifier=verifier,
                        client=formatAddress(addr),
                        client_host=host,
                        client_port=port,
                        listener=listener,
                        unlogged=held,
                    )
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
        self.pendingConnections += 1
        self._publish()
        return True

    def releasePending(self) -> None:
        """
        A connection counted by L{holdPending} is verified now, or gone.
        """
        self.pendingConnections -= 1
        self._publish()

    def inUse(self) -> int:
        """
        Connections that count against C{maxConnections}, open and pending:
        over the whole server where a C{serverCount} is shared.
        """
        if self.serverCount is None:
            return self.openConnections + self.pendingConnections
        return self.serverCount.total()

    def _publish(self) -> None:
        if self.serverCount is not None:
            self.serverCount.publish(self.openConnections + self.pendingConnections)

    def countRefusal(self, reason: str) -> None:
        """
        Count a connection refused for C{reason} (logged by the caller).
        """
        self.refusals[reason] = self.refusals.get(reason, 0) + 1

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
        self.openConnections += 1
        if self.serverCount is not None:
            self._publish()
        self.connectionsTotal += 1
        self.protocols.add(p)
        listener = p.listener
        self.openByListener[listener] = self.openByListener.get(listener, 0) + 1
        self.totalByListener[listener] = self.totalByListener.get(listener, 0) + 1
        if self.maxSessionSeconds:
            p.limitDuration(self.clock, self.maxSessionSeconds)
        source = p.source
        if source is not None:
            self.perSource[source] = self.perSource.get(source, 0) + 1
        level = "debug" if p.healthCheck else "info"
        if not loglevel.enabled[level]:
            return
        logged, unlogged = self.connectionLog.take()
        if unlogged:
            self._logUnlogged(unlogged)
        if not logged:
            return
        p.logEvents()
        host, port = describeAddress(p.peer)
        self._log.emit(
            LogLevel.levelWithName(level),
            "Connection from {client} on {listener}",
            event="connected",
            client=formatAddress(p.peer),
            client_host=host,
            client_port=port,
            listener=p.listener,
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

    def connectionClosed(self, p: EchoProtocol, why: Failure) -> None:
        """
        Release a closed connection's counts and log how it ended.
        """
        if p not in self.protocols:
            return
        self.protocols.discard(p)
        self.openConnections -= 1
        if self.serverCount is not None:
            self._publish()
        self.openByListener[p.listener] -= 1
        source = p.source
        if source is not None:
            left = self.perSource[source] - 1
            if left:
                self.perSource[source] = left
            else:
                del self.perSource[source]
        sent = p.bytesEchoed - p.bytesUnsent
        self.bytesEchoedTotal += sent
        self.bytesDiscardedTotal += p.bytesDiscarded
        duration = monotonic() - p.startedAt
        self.durationCounts[bisect_left(DURATION_BUCKETS, duration)] += 1
        self.durationSum += duration
        if not p.logged:
            return
        reason = p.closeReason or closeReason(why)
        host, port = describeAddress(p.peer)
        self._log.emit(
            LogLevel.debug if p.healthCheck else LogLevel.info,
            "Connection from {client} on {listener} closed "
            "({reason}) after {bytes} bytes in {duration}s",
            event="closed",
            client=formatAddress(p.peer),
            client_host=host,
            client_port=port,
            listener=p.listener,
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
    noDelayOnListener = False

    def __init__(self, echo: EchoFactory, listener: str) -> None:
        self.echo = echo
        self.listener = listener

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

    def buildHealthCheckProtocol(self, addr: IAddress) -> EchoProtocol:
        return self.echo.buildHealthCheckProtocol(addr, self.listener, not self.noDelayOnListener)

    def holdPending(self, addr: IAddress) -> bool:
        return self.echo.holdPending(addr, self.listener)

    def releasePending(self) -> None:
        self.echo.releasePending()
