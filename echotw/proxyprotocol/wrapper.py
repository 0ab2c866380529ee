"""
Twisted's side of the PROXY protocol: a protocol that reads the header
(with L{echotw.proxyprotocol.parser}) before handing the connection to the
protocol the wrapped factory builds for the client.  The package docstring
says why and in what order.
"""

from __future__ import annotations

from enum import Enum
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from echotw import loglevel
from echotw.proxyprotocol.parser import MalformedProxyHeader, ProxyHeader, ProxyHeaderParser
from echotw.rules.addresses import clientFields, describeAddress, formatAddress
from echotw.throttlelog import LogThrottle, unloggedNote

DEFAULT_HEADER_TIMEOUT = 5.0
"""
Seconds a trusted balancer has to send the whole header.  A balancer sends it
with its first segment, so anything slower is a stuck or misdirected peer.
"""


def _abort(transport: ITransport) -> None:
    """
    Close at once, dropping anything queued: a peer that sent no valid
    header gets nothing, and must not hold the connection by not reading.
    """
    abortConnection = getattr(transport, "abortConnection", None)
    if abortConnection is None:
        transport.loseConnection()
    else:
        abortConnection()


class HeaderPolicy(TypingProtocol):
    """
    What a L{ProxyProtocolWrapper} needs from the factory that made it
    (L{echotw.proxyprotocol.factory.ProxyProtocolFactory}).
    """

    wrappedFactory: IProtocolFactory
    timeout: float
    clock: IReactorTime
    listener: str
    problemLog: LogThrottle

    def logPrefix(self) -> str: ...

    def reject(self, reason: str) -> None: ...

    def releasePending(self) -> None: ...


class WrapperState(Enum):
    """
    Where a L{ProxyProtocolWrapper}'s connection is in its life.
    """

    AWAITING_HEADER = "awaiting header"
    """Reading the header, under the deadline."""
    RELAYING = "relaying"
    """The header was accepted: the wrapped protocol has the connection."""
    REJECTED = "rejected"
    """The header failed or the client was refused; the connection is aborted."""
    CLOSED = "closed"
    """The connection is gone."""


@implementer(IHalfCloseableProtocol)
class ProxyProtocolWrapper(Protocol):
    """
    One connection from a trusted balancer: read the PROXY header, then hand
    the connection to the protocol the wrapped factory builds for the client.

    The wrapped protocol is connected to the real transport (not a wrapper of
    it), so it can register that transport as its producer and close it as
    usual; this wrapper stays the transport's protocol and forwards the
    transport's events, half-close included, to it.

    Its life is one L{WrapperState}: C{AWAITING_HEADER}, then C{RELAYING}
    (L{_relay}) or C{REJECTED} (L{_reject}, L{_refused}), then C{CLOSED}
    (L{connectionLost}).  Only C{RELAYING} connections pass bytes on, one
    check per read.

    @ivar state: the current L{WrapperState}.
    @ivar wrapped: the wrapped protocol while relaying; L{None} before.
    @ivar header: the parsed header, once there is one.
    @ivar rejectedBecause: why this wrapper ended the connection before a
        wrapped protocol took it, if it did.
    """

    _log = Logger(observer=loglevel.observer)

    def __init__(self, proxyFactory: HeaderPolicy) -> None:
        self.proxyFactory = proxyFactory
        self.parser = ProxyHeaderParser()
        self.state = WrapperState.AWAITING_HEADER
        self.wrapped: IProtocol | None = None
        self.header: ProxyHeader | None = None
        self.rejectedBecause: str | None = None
        self._deadline: IDelayedCall | None = None
        self._released = False

    def logPrefix(self) -> str:
        return self.proxyFactory.logPrefix()

    def connectionMade(self) -> None:
        factory = self.proxyFactory
        self._deadline = factory.clock.callLater(factory.timeout, self._headerTimedOut)

    def dataReceived(self, data: bytes) -> None:
        wrapped = self.wrapped
        if wrapped is not None:
            wrapped.dataReceived(data)
            return
        if self.state is not WrapperState.AWAITING_HEADER:
            return
        try:
            parsed = self.parser.feed(data)
        except MalformedProxyHeader as e:
            self._reject("malformed header", str(e))
            return
        if parsed is not None:
            self._headerReceived(*parsed)

    def _headerReceived(self, header: ProxyHeader, rest: bytes) -> None:
        """
        Build the wrapped protocol for the client the header names and give
        it the connection, then the bytes that followed the header.
        """
        self._cancelDeadline()
        self._releasePending()
        self.header = header
        transport = self.transport
        assert transport is not None
        balancer = transport.getPeer()
        client: IAddress = header.source if header.source is not None else balancer
        proxyHost, proxyPort = describeAddress(balancer)
        self._log.debug(
            "PROXY v{version} header from {proxy} on {listener}: client {client}",
            event="proxy-header",
            proxy=formatAddress(balancer),
            version=header.version,
            proxy_host=proxyHost,
            proxy_port=proxyPort,
            **clientFields(client, self.proxyFactory.listener),
            proxied=header.source is not None,
        )
        wrappedFactory = self.proxyFactory.wrappedFactory
        healthCheck = getattr(wrappedFactory, "buildHealthCheckProtocol", None)
        if healthCheck is not None and (
            client is balancer or describeAddress(client) == describeAddress(balancer)
        ):
            # The (trusted) balancer's own connection, not a relayed client:
            # a LOCAL (v2) or UNKNOWN (v1) header, or one naming the very
            # connection it arrived on (HAProxy's v1 checks).  A health
            # check: client rules are not meant for it.
            wrapped = healthCheck(client)
        else:
            wrapped = wrappedFactory.buildProtocol(client)
        if wrapped is None:
            self._refused()
            return
        self._relay(wrapped, rest)

    def _relay(self, wrapped: IProtocol, rest: bytes) -> None:
        """
        AWAITING_HEADER -> RELAYING: the wrapped protocol takes the
        connection, then the bytes that followed the header.
        """
        self.state = WrapperState.RELAYING
        self.wrapped = wrapped
        assert self.transport is not None
        wrapped.makeConnection(self.transport)
        if rest and self.state is WrapperState.RELAYING:
            wrapped.dataReceived(rest)

    def _refused(self) -> None:
        """
        AWAITING_HEADER -> REJECTED: the wrapped factory refused the client
        (and logged why).
        """
        self.state = WrapperState.REJECTED
        self.rejectedBecause = "refused by the wrapped factory"
        assert self.transport is not None
        _abort(self.transport)

    def _reject(self, reason: str, detail: str) -> None:
        """
        AWAITING_HEADER -> REJECTED: the header failed; count it, log it,
        abort the connection.
        """
        self.state = WrapperState.REJECTED
        self.rejectedBecause = reason
        self._cancelDeadline()
        self._releasePending()
        factory = self.proxyFactory
        factory.reject(reason)
        host, port, proxy = self._balancer()
        held = factory.problemLog.admit(host, f"{reason} on {factory.listener}")
        if held is not None:
            self._log.warn(
                "Aborted connection from {proxy} on {listener}: {reason} ({detail})"
                + unloggedNote(held),
                event="proxy-rejected",
                proxy=proxy,
                proxy_host=host,
                proxy_port=port,
                listener=factory.listener,
                reason=reason,
                detail=detail,
                received=self.parser.bytesReceived,
                unlogged=held,
            )
        assert self.transport is not None
        _abort(self.transport)

    def readConnectionLost(self) -> None:
        """
        The peer half-closed: a client's half-close goes to the wrapped
        protocol (the echo finishes, then closes); before the header it
        means the header will never be complete.
        """
        wrapped = self.wrapped
        transport = self.transport
        assert transport is not None
        if wrapped is None:
            transport.loseConnection()
            return
        halfCloseable = IHalfCloseableProtocol(wrapped, None)
        if halfCloseable is not None:
            halfCloseable.readConnectionLost()
        else:
            # What the transport itself does for such a protocol: close.
            transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """
        Nothing can be sent any more: tell a half-closeable wrapped protocol;
        before the header there is nothing worth keeping the connection for.
        """
        wrapped = self.wrapped
        if wrapped is None:
            assert self.transport is not None
            _abort(self.transport)
            return
        halfCloseable = IHalfCloseableProtocol(wrapped, None)
        if halfCloseable is not None:
            halfCloseable.writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Any state -> CLOSED.
        """
        previous, self.state = self.state, WrapperState.CLOSED
        self._cancelDeadline()
        wrapped = self.wrapped
        if wrapped is not None:
            wrapped.connectionLost(reason)
        elif previous is WrapperState.AWAITING_HEADER:
            self._releasePending()
            self._logClosedEarly()

    def _logClosedEarly(self) -> None:
        """
        The peer went away before its header was complete.  With nothing
        sent at all this is usually a balancer's health check (HAProxy's
        C{check} connects and closes without a header), so it is logged at
        debug level; a partial header is worth an info line.
        """
        received = self.parser.bytesReceived
        host, port, proxy = self._balancer()
        if received:
            held = self.proxyFactory.problemLog.admit(
                host, f"PROXY header cut short on {self.proxyFactory.listener}"
            )
            if held is None:
                return
            log = self._log.info
        else:
            held, log = 0, self._log.debug
        log(
            "Connection from {proxy} on {listener} closed "
            "after {received} bytes of PROXY header" + unloggedNote(held),
            proxy=proxy,
            event="proxy-closed-early",
            proxy_host=host,
            proxy_port=port,
            listener=self.proxyFactory.listener,
            received=received,
            unlogged=held,
        )

    def _headerTimedOut(self) -> None:
        self._deadline = None
        self._reject(
            "header timeout",
            f"no complete PROXY header after {self.proxyFactory.timeout:g}s",
        )

    def _releasePending(self) -> None:
        if not self._released:
            self._released = True
            self.proxyFactory.releasePending()

    def _balancer(self) -> tuple[str, int | None, str]:
        assert self.transport is not None
        peer = self.transport.getPeer()
        return (*describeAddress(peer), formatAddress(peer))

    def _cancelDeadline(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()
