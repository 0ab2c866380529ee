"""
The PROXY protocol (versions 1 and 2): the real client address that a load
balancer such as HAProxy sends at the start of each connection it relays.

Twisted's own C{haproxy:} endpoint is not enough for echotw: it builds the
wrapped protocol (and so echotw would verify the client) with the balancer's
address before the header is parsed, drops a header whose first segment is
shorter than the v2 signature, waits for the header forever, trusts a header
from anyone, and its wrapper does not forward half-close.  Here, in order:

 1. L{ProxyProtocolFactory} accepts a connection only from a trusted balancer;
    anyone else could otherwise forge the address the access rules and the
    per-IP limits see.  Refusals are logged and the socket closed at once.
 2. L{ProxyHeaderParser} reads the header incrementally, split at any byte
    boundary, and refuses anything malformed or larger than the protocol
    allows (107 bytes for v1, L{MAX_V2_HEADER_SIZE} for v2).
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
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IListeningPort,
    ILoggingContext,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from echotw import loglevel
from echotw.addresses import IPNetwork, NetworkSet, clientIP
from echotw.factory import describeAddress

__all__ = [
    "DEFAULT_TRUSTED_PROXIES",
    "MAX_V1_HEADER_SIZE",
    "MAX_V2_HEADER_SIZE",
    "V2_SIGNATURE",
    "MalformedProxyHeader",
    "ProxyHeader",
    "ProxyHeaderParser",
    "ProxyProtocolEndpoint",
    "ProxyProtocolFactory",
    "ProxyProtocolWrapper",
]

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED_SIZE = 16

MAX_V1_HEADER_SIZE = 107
"""The v1 line's maximum, CRLF included, as the specification sets it."""

MAX_V2_HEADER_SIZE = _V2_FIXED_SIZE + 2048
"""
The largest v2 header accepted.  The addresses take at most 216 bytes; the
rest leaves room for the TLVs balancers add (HAProxy's unique ID, authority,
TLS details; cloud endpoint IDs) while a 64 KiB length field from a broken
sender is refused instead of buffered.
"""

DEFAULT_TRUSTED_PROXIES: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
"""The balancers trusted when none are configured: this host only."""

_V2_PROXY = 0x1
_V2_LOCAL = 0x0
_AF_UNSPEC, _AF_INET, _AF_INET6 = 0x0, 0x1, 0x2
_STREAM = 0x1
_V2_INET_ADDRESSES = struct.Struct("!4s4sHH")
_V2_INET6_ADDRESSES = struct.Struct("!16s16sHH")

ProxiedAddress = IPv4Address | IPv6Address


class MalformedProxyHeader(ValueError):
    """
    The bytes received are not a PROXY header echotw accepts; the message
    says why, for the log.
    """


@dataclass(frozen=True)
class ProxyHeader:
    """
    What a complete PROXY header says.

    @ivar version: 1 or 2.
    @ivar source: the client's address, or L{None} when the header carries
        none (v2 C{LOCAL}, v2 C{AF_UNSPEC}, v1 C{UNKNOWN}): the connection's
        real peer is then the client.
    @ivar destination: the address the client connected to, or L{None}.
    @ivar size: the header's length in bytes.
    """

    version: int
    source: ProxiedAddress | None
    destination: ProxiedAddress | None
    size: int


class ProxyHeaderParser:
    """
    Read one PROXY header, v1 or v2, from segments split anywhere.

    Feed it the connection's bytes with L{feed} until it returns the header.
    A malformed header is reported as soon as the bytes received prove it
    (a first byte that starts neither version fails at once), so a client
    that speaks directly to a PROXY listener is turned away without waiting
    for the deadline.
    """

    def __init__(self) -> None:
        self._buffer = b""

    @property
    def bytesReceived(self) -> int:
        """
        Bytes of an incomplete header received so far, for the logs.
        """
        return len(self._buffer)

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        """
        Add the next segment of the connection.

        @return: L{None} while the header is incomplete; then the header and
            the bytes that followed it in the segment (the start of the
            proxied stream, which belongs to the wrapped protocol).

        @raise MalformedProxyHeader: if the bytes so far cannot begin a valid
            header, or the header is malformed or too large.
        """
        buffer = self._buffer = self._buffer + data
        if buffer[:1] == V2_SIGNATURE[:1]:
            return self._feedV2(buffer)
        if buffer[:1] == V1_PREFIX[:1]:
            return self._feedV1(buffer)
        if not buffer:
            return None
        raise MalformedProxyHeader("no PROXY signature")

    def _feedV1(self, buffer: bytes) -> tuple[ProxyHeader, bytes] | None:
        if not buffer.startswith(V1_PREFIX[: len(buffer)]):
            raise MalformedProxyHeader("no PROXY signature")
        end = buffer.find(b"\n", 0, MAX_V1_HEADER_SIZE)
        if end < 0:
            if len(buffer) >= MAX_V1_HEADER_SIZE:
                raise MalformedProxyHeader(f"v1 header without CRLF in {MAX_V1_HEADER_SIZE} bytes")
            return None
        if buffer[end - 1 : end] != b"\r":
            raise MalformedProxyHeader("v1 header ends in LF without CR")
        header = parseV1Line(buffer[: end - 1])
        return self._done(header, end + 1)

    def _feedV2(self, buffer: bytes) -> tuple[ProxyHeader, bytes] | None:
        if not V2_SIGNATURE.startswith(buffer[:12]):
            raise MalformedProxyHeader("no PROXY signature")
        if len(buffer) > 12:
            versionCommand = buffer[12]
            if versionCommand >> 4 != 2:
                raise MalformedProxyHeader(f"v2 header with version {versionCommand >> 4}")
            if versionCommand & 0xF not in (_V2_LOCAL, _V2_PROXY):
                raise MalformedProxyHeader(f"v2 header with command {versionCommand & 0xF}")
        if len(buffer) < _V2_FIXED_SIZE:
            return None
        (length,) = struct.unpack_from("!H", buffer, 14)
        size = _V2_FIXED_SIZE + length
        if size > MAX_V2_HEADER_SIZE:
            raise MalformedProxyHeader(
                f"v2 header of {size} bytes, more than {MAX_V2_HEADER_SIZE} allowed"
            )
        if len(buffer) < size:
            return None
        return self._done(parseV2Header(buffer[:size]), size)

    def _done(self, header: ProxyHeader, size: int) -> tuple[ProxyHeader, bytes]:
        rest = self._buffer[size:]
        self._buffer = b""
        return header, rest


def parseV1Line(line: bytes) -> ProxyHeader:
    """
    Parse a v1 header line without its CRLF:
    C{PROXY TCP4 192.0.2.1 198.51.100.2 56324 443}, C{PROXY TCP6 ...}, or
    C{PROXY UNKNOWN} followed by anything.

    @raise MalformedProxyHeader: for anything else, including addresses of
        the wrong family, IPv6 zone identifiers and ports out of range.
    """
    size = len(line) + 2
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedProxyHeader("v1 header is not ASCII") from None
    fields = text.split(" ")
    if fields[0] != "PROXY" or len(fields) < 2:
        raise MalformedProxyHeader("v1 header without protocol")
    protocol = fields[1]
    if protocol == "UNKNOWN":
        return ProxyHeader(1, None, None, size)
    if protocol not in ("TCP4", "TCP6"):
        raise MalformedProxyHeader(f"v1 header with protocol {protocol[:8]!r}")
    if len(fields) != 6:
        raise MalformedProxyHeader(f"v1 header with {len(fields)} fields, not 6")
    _, _, sourceHost, destinationHost, sourcePort, destinationPort = fields
    if protocol == "TCP4":
        source: ProxiedAddress = IPv4Address("TCP", _v1IPv4(sourceHost), _v1Port(sourcePort))
        destination: ProxiedAddress = IPv4Address(
            "TCP", _v1IPv4(destinationHost), _v1Port(destinationPort)
        )
    else:
        source = IPv6Address("TCP", _v1IPv6(sourceHost), _v1Port(sourcePort))
        destination = IPv6Address("TCP", _v1IPv6(destinationHost), _v1Port(destinationPort))
    return ProxyHeader(1, source, destination, size)


def _v1IPv4(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ipaddress.AddressValueError:
        raise MalformedProxyHeader(f"v1 header with bad IPv4 address {text[:40]!r}") from None


def _v1IPv6(text: str) -> str:
    if "%" not in text:
        try:
            return str(ipaddress.IPv6Address(text))
        except ipaddress.AddressValueError:
            pass
    raise MalformedProxyHeader(f"v1 header with bad IPv6 address {text[:40]!r}")


def _v1Port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 5 and int(text) <= 65535):
        raise MalformedProxyHeader(f"v1 header with bad port {text[:8]!r}")
    return int(text)


def parseV2Header(header: bytes) -> ProxyHeader:
    """
    Parse a complete v2 header (signature, fixed part, addresses, TLVs).

    C{LOCAL} headers and C{AF_UNSPEC} carry no client address.  TCP over IPv4
    and IPv6 carry one; TLVs after the addresses are skipped.  Unix-socket and
    datagram addresses are refused: this is a TCP service, and an address
    without an IP would escape the IP access rules.

    @raise MalformedProxyHeader: if it is not such a header.
    """
    if header[:12] != V2_SIGNATURE or len(header) < _V2_FIXED_SIZE:
        raise MalformedProxyHeader("no PROXY signature")
    versionCommand, familyProtocol, length = struct.unpack_from("!BBH", header, 12)
    if versionCommand >> 4 != 2:
        raise MalformedProxyHeader(f"v2 header with version {versionCommand >> 4}")
    command = versionCommand & 0xF
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise MalformedProxyHeader(f"v2 header with command {command}")
    if len(header) != _V2_FIXED_SIZE + length:
        raise MalformedProxyHeader("v2 header length does not match")
    if command == _V2_LOCAL:
        # The specification: the receiver must ignore the address block,
        # family included, and use the real connection's endpoints.
        return ProxyHeader(2, None, None, len(header))
    family, protocol = familyProtocol >> 4, familyProtocol & 0xF
    if family == _AF_UNSPEC and protocol == 0:
        return ProxyHeader(2, None, None, len(header))
    addresses = header[_V2_FIXED_SIZE:]
    if family == _AF_INET and protocol == _STREAM:
        layout = _V2_INET_ADDRESSES
    elif family == _AF_INET6 and protocol == _STREAM:
        layout = _V2_INET6_ADDRESSES
    else:
        raise MalformedProxyHeader(
            f"v2 header with unsupported address family 0x{familyProtocol:02x}"
        )
    if len(addresses) < layout.size:
        raise MalformedProxyHeader(f"v2 header with {len(addresses)} bytes of addresses")
    sourceIP, destinationIP, sourcePort, destinationPort = layout.unpack_from(addresses)
    if family == _AF_INET:
        return ProxyHeader(
            2,
            IPv4Address("TCP", str(ipaddress.IPv4Address(sourceIP)), sourcePort),
            IPv4Address("TCP", str(ipaddress.IPv4Address(destinationIP)), destinationPort),
            len(header),
        )
    return ProxyHeader(
        2,
        IPv6Address("TCP", str(ipaddress.IPv6Address(sourceIP)), sourcePort),
        IPv6Address("TCP", str(ipaddress.IPv6Address(destinationIP)), destinationPort),
        len(header),
    )


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


@implementer(IHalfCloseableProtocol)
class ProxyProtocolWrapper(Protocol):
    """
    One connection from a trusted balancer: read the PROXY header, then hand
    the connection to the protocol the wrapped factory builds for the client.

    The wrapped protocol is connected to the real transport (not a wrapper of
    it), so it can register that transport as its producer and close it as
    usual; this wrapper stays the transport's protocol and forwards the
    transport's events, half-close included, to it.

    @ivar wrapped: the wrapped protocol, once the header is parsed and the
        wrapped factory accepted the client; L{None} before.
    @ivar header: the parsed header, once there is one.
    @ivar rejectedBecause: why this wrapper ended the connection before a
        wrapped protocol took it, if it did.
    """

    _log = Logger(observer=loglevel.observer)

    def __init__(self, proxyFactory: ProxyProtocolFactory) -> None:
        self.proxyFactory = proxyFactory
        self.parser = ProxyHeaderParser()
        self.wrapped: IProtocol | None = None
        self.header: ProxyHeader | None = None
        self.rejectedBecause: str | None = None
        self._deadline: IDelayedCall | None = None
        self._lost = False

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
        if self.rejectedBecause is not None or self.header is not None:
            return
        try:
            parsed = self.parser.feed(data)
        except MalformedProxyHeader as e:
            self._reject("malformed header", str(e))
            return
        if parsed is not None:
            self._cancelDeadline()
            self._handOver(*parsed)

    def _handOver(self, header: ProxyHeader, rest: bytes) -> None:
        """
        Build the wrapped protocol for the client the header names and give
        it the connection, then the bytes that followed the header.
        """
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
            # The wrapped factory refused the client and logged why.
            self.rejectedBecause = "refused by the wrapped factory"
            _abort(transport)
            return
        self.wrapped = wrapped
        wrapped.makeConnection(transport)
        if rest and not self._lost:
            wrapped.dataReceived(rest)

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
        self._lost = True
        self._cancelDeadline()
        wrapped = self.wrapped
        if wrapped is not None:
            wrapped.connectionLost(reason)
            return
        if self.rejectedBecause is None and self.header is None:
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
        log = self._log.info if received else self._log.debug
        log(
            "Connection from {proxy_host}:{proxy_port} on {listener} closed "
            "after {received} bytes of PROXY header",
            event="proxy-closed-early",
            proxy_host=host,
            proxy_port=port,
            listener=self.proxyFactory.listener,
            received=received,
        )

    def _headerTimedOut(self) -> None:
        self._deadline = None
        self._reject(
            "header timeout",
            f"no complete PROXY header after {self.proxyFactory.timeout:g}s",
        )

    def _reject(self, reason: str, detail: str) -> None:
        """
        End a connection whose header failed: count it, log it, abort it.
        """
        self.rejectedBecause = reason
        self._cancelDeadline()
        factory = self.proxyFactory
        factory.rejections[reason] = factory.rejections.get(reason, 0) + 1
        host, port = self._balancer()
        self._log.warn(
            "Aborted connection from {proxy_host}:{proxy_port} on {listener}: {reason} ({detail})",
            event="proxy-rejected",
            proxy_host=host,
            proxy_port=port,
            listener=factory.listener,
            reason=reason,
            detail=detail,
            received=self.parser.bytesReceived,
        )
        assert self.transport is not None
        _abort(self.transport)

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
    @ivar rejections: connections this factory refused or aborted, by reason.
    """

    noisy = False
    _log = Logger(observer=loglevel.observer)

    def __init__(
        self,
        wrapped: IProtocolFactory,
        trusted: NetworkSet | Iterable[IPNetwork] = (),
        timeout: float = DEFAULT_HEADER_TIMEOUT,
        clock: IReactorTime | None = None,
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
        self.rejections: dict[str, int] = {}

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
            self.rejections[reason] = self.rejections.get(reason, 0) + 1
            host, port = describeAddress(addr)
            self._log.warn(
                "Refused connection from {proxy_host}:{proxy_port} on {listener}: "
                "{reason} (trust it with --trusted-proxy)",
                event="proxy-untrusted",
                proxy_host=host,
                proxy_port=port,
                listener=self.listener,
                reason=reason,
            )
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


@implementer(IStreamServerEndpoint)
class ProxyProtocolEndpoint:
    """
    A server endpoint whose connections speak the PROXY protocol: listens on
    C{wrapped} with a L{ProxyProtocolFactory} around the factory it is given.
    """

    def __init__(
        self,
        wrapped: IStreamServerEndpoint,
        trusted: NetworkSet | Iterable[IPNetwork] = (),
        timeout: float = DEFAULT_HEADER_TIMEOUT,
        clock: IReactorTime | None = None,
    ) -> None:
        self.wrapped = wrapped
        self.trusted = trustedNetworks(trusted)
        self.timeout = timeout
        self.clock = clock

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        factory = ProxyProtocolFactory(protocolFactory, self.trusted, self.timeout, self.clock)
        return self.wrapped.listen(factory)
