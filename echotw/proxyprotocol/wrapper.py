"""
Twisted's side of the PROXY protocol: a protocol that reads the header
(with L{echotw.proxyprotocol.parser}) before handing the connection to the
protocol the wrapped factory builds for the client, the factory that refuses
untrusted balancers, and an endpoint that puts both in front of any
listening endpoint.  The package docstring says why and in what order.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from enum import Enum

from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    ILoggingContext,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from echotw import loglevel
from echotw.addresses import IPNetwork, NetworkSet, clientIP, describeAddress
from echotw.proxyprotocol.parser import MalformedProxyHeader, ProxyHeader, ProxyHeaderParser
from echotw.ratelimit import LogThrottle

DEFAULT_TRUSTED_PROXIES: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
"""The balancers trusted when none are configured: this host only."""

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

    def __init__(self, proxyFactory: ProxyProtocolFactory) -> None:
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
        clientHost, clientPort = describeAddress(client)
        self._log.debug(
            "PROXY v{version} header from {proxy_host}:{proxy_port} on {listener}: "
            "client {client_host}:{client_port}",
            event="proxy-header",
            version=header.version,
            proxy_host=proxyHost,
            proxy_port=proxyPort,
            client_host=clientHost,
            client_port=clientPort,
            listener=self.proxyFactory.listener,
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
        host, port = self._balancer()
        held = factory.problemLog.admit(host)
        if held is not None:
            self._log.warn(
                "Aborted connection from {proxy_host}:{proxy_port} on {listener}: {reason}"
                " ({detail}; {unlogged} more from this source not logged)",
                event="proxy-rejected",
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
        host, port = self._balancer()
        if received:
            held = self.proxyFactory.problemLog.admit(host)
            if held is None:
                return
            log = self._log.info
        else:
            held, log = 0, self._log.debug
        log(
            "Connection from {proxy_host}:{proxy_port} on {listener} closed "
            "after {received} bytes of PROXY header",
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

    def _balancer(self) -> tuple[str, int | None]:
        assert self.transport is not None
        return describeAddress(self.transport.getPeer())

    def _cancelDeadline(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()


class ProxyProtocolFactory(Factory):
    """
    Put the PROXY protocol in front of C{wrappedFactory}: refuse untrusted
    balancers, then let each connection's header name the client that
    C{wrappedFactory} builds a protocol for.

    @ivar wrappedFactory: the factory for the proxied connections.
    @ivar trusted: the balancers' networks; see the module docstring for
        what an empty list means.
    @ivar timeout: seconds a connection has to send its complete header.
    @ivar clock: schedules the header deadline.
    @ivar listener: the wrapped factory's listener name, for the logs.
    @ivar rejections: connections this factory refused or aborted, by
        reason; pass the server's refusal counts to count them there.
    @ivar problemLog: the per-source throttle its warnings go through (one
        line per source a second, with the count held back); pass the
        server's refusal throttle to share it.

    A wrapped factory with C{holdPending(address)} and C{releasePending()}
    is asked to count each connection while its header is awaited
    (C{--max-connections} then covers those too).
    """

    noisy = False
    _log = Logger(observer=loglevel.observer)

    def __init__(
        self,
        wrapped: IProtocolFactory,
        trusted: NetworkSet | Iterable[IPNetwork] = (),
        timeout: float = DEFAULT_HEADER_TIMEOUT,
        clock: IReactorTime | None = None,
        problemLog: LogThrottle | None = None,
        rejections: dict[str, int] | None = None,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"PROXY header timeout must be positive, not {timeout!r}")
        self.wrappedFactory = wrapped
        self.trusted = trustedNetworks(trusted)
        self.timeout = timeout
        if clock is None:
            from twisted.internet import reactor

            clock = reactor
        assert clock is not None
        self.clock: IReactorTime = clock
        self.listener = str(getattr(wrapped, "listener", ""))
        self.rejections = rejections if rejections is not None else {}
        self.problemLog = problemLog if problemLog is not None else LogThrottle(1.0, clock)
        self._holdPending = getattr(wrapped, "holdPending", None)
        self._releasePending = getattr(wrapped, "releasePending", None)

    def reject(self, reason: str) -> None:
        """
        Count a connection refused or aborted before its header was accepted.
        """
        self.rejections[reason] = self.rejections.get(reason, 0) + 1

    def releasePending(self) -> None:
        """
        A connection whose header was awaited has its header now, or is gone.
        """
        if self._releasePending is not None:
            self._releasePending()

    def logPrefix(self) -> str:
        wrapped = self.wrappedFactory
        if ILoggingContext.providedBy(wrapped):
            prefix = wrapped.logPrefix()
        else:
            prefix = type(wrapped).__name__
        return f"{prefix} (PROXY)"

    def doStart(self) -> None:
        self.wrappedFactory.doStart()
        super().doStart()

    def doStop(self) -> None:
        super().doStop()
        self.wrappedFactory.doStop()

    def isTrusted(self, address: IAddress) -> bool:
        """
        May this peer send a PROXY header?  Peers without an IP (Unix
        sockets) may: file permissions decide who reaches them.
        """
        ip = clientIP(address)
        return ip is None or ip in self.trusted

    def buildProtocol(self, addr: IAddress) -> ProxyProtocolWrapper | None:  # type: ignore[override]
        """
        Refuse an untrusted peer at once (Twisted closes the socket), else
        start reading its header.
        """
        if not self.isTrusted(addr):
            reason = "untrusted proxy"
            self.reject(reason)
            host, port = describeAddress(addr)
            held = self.problemLog.admit(host)
            if held is not None:
                self._log.warn(
                    "Refused connection from {proxy_host}:{proxy_port} on {listener}: "
                    "{reason} (trust it with --trusted-proxy; {unlogged} more from "
                    "this source not logged)",
                    event="proxy-untrusted",
                    proxy_host=host,
                    proxy_port=port,
                    listener=self.listener,
                    reason=reason,
                    unlogged=held,
                )
            return None
        if self._holdPending is not None and not self._holdPending(addr):
            return None
        protocol = ProxyProtocolWrapper(self)
        protocol.factory = self
        return protocol


def trustedNetworks(trusted: NetworkSet | Iterable[IPNetwork] = ()) -> NetworkSet:
    """
    The balancers to trust: C{trusted}, or this host's loopback addresses
    (L{DEFAULT_TRUSTED_PROXIES}) if it is empty.
    """
    if isinstance(trusted, NetworkSet):
        return trusted if trusted else NetworkSet(DEFAULT_TRUSTED_PROXIES)
    networks = list(trusted)
    return NetworkSet(networks or DEFAULT_TRUSTED_PROXIES)
