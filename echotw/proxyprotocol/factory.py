"""
The factory that puts the PROXY protocol in front of another: it refuses
balancers it does not trust and builds a L{ProxyProtocolWrapper} for each
connection from one it does.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from twisted.internet.interfaces import IAddress, ILoggingContext, IProtocolFactory, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from echotw import loglevel
from echotw.proxyprotocol.wrapper import DEFAULT_HEADER_TIMEOUT, ProxyProtocolWrapper
from echotw.rules.addresses import IPNetwork, NetworkSet, clientIP, describeAddress, formatAddress
from echotw.throttlelog import LogThrottle, RefusalLog, unloggedNote

DEFAULT_TRUSTED_PROXIES: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
"""The balancers trusted when none are configured: this host only."""


class ProxyProtocolFactory(Factory):
    """
    Put the PROXY protocol in front of C{wrappedFactory}: refuse untrusted
    balancers, then let each connection's header name the client that
    C{wrappedFactory} builds a protocol for.

    Twisted's own C{haproxy:} endpoint is not enough for echotw: it builds the
    wrapped protocol (and so echotw would verify the client) with the balancer's
    address before the header is parsed, drops a header whose first segment is
    shorter than the v2 signature, waits for the header forever, trusts a header
    from anyone, and its wrapper does not forward half-close.  Here, in order:

     1. L{ProxyProtocolFactory} accepts a connection only from a trusted balancer;
        anyone else could otherwise forge the address the access rules and the
        per-IP limits see.  Refusals are logged and the socket closed at once.
     2. L{ProxyHeaderParser<echotw.proxyprotocol.parser.ProxyHeaderParser>}
        reads the header incrementally, split at any byte boundary, and
        refuses anything malformed or larger than the protocol allows (107
        bytes for v1,
        L{MAX_V2_HEADER_SIZE<echotw.proxyprotocol.parser.MAX_V2_HEADER_SIZE>}
        for v2).
     3. The header must be complete within a deadline, or the connection is
        aborted: a silent peer must not hold a connection open.
     4. Only then is the wrapped factory's C{buildProtocol} called, with the
        client address from the header (or the real peer for a v2 C{LOCAL} or v1
        C{UNKNOWN} header), so verification, the per-IP limits and the logs see
        the real client.  L{EchoProtocol<echotw.protocol.EchoProtocol>} keeps
        that address as C{peer}; C{transport.getPeer()} still names the balancer.
     5. The wrapped protocol is connected to the real transport, so it can
        register that transport as its own producer (backpressure) exactly as
        without the PROXY protocol; bytes that followed the header reach it
        first, and half-close is forwarded.

    Trusted balancers: an B{empty} list of trusted networks means B{loopback only}
    (C{127.0.0.0/8} and C{::1}, see L{DEFAULT_TRUSTED_PROXIES}).  The usual
    deployment runs HAProxy on the same host, and that works without further
    options; trusting everyone (what Twisted does) would let any client choose the
    address it is verified with, and refusing everyone would make a PROXY
    listener useless until configured.  A balancer on another host is named with
    C{--trusted-proxy}, and each refusal's log line says which address was not
    trusted.  Peers without an IP address (a PROXY listener on a Unix socket) are
    trusted: as for the access rules, file permissions decide who reaches them.

    @ivar wrappedFactory: the factory for the proxied connections.
    @ivar trusted: the balancers' networks; see above for what an empty
        list means.
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
        self.problemLog = problemLog if problemLog is not None else RefusalLog(clock, self._log)
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
            held = self.problemLog.admit(host, f"{reason} on {self.listener}")
            if held is not None:
                self._log.warn(
                    "Refused connection from {proxy} on {listener}: {reason}"
                    " (trust it with --trusted-proxy)" + unloggedNote(held),
                    event="proxy-untrusted",
                    proxy=formatAddress(addr),
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
