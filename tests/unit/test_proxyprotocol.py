"""
Tests for L{echotw.proxyprotocol}: the PROXY header parser, the wrapper that
verifies the real client only after the header, and a loopback round trip.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol, IListeningPort
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport, StringTransportWithDisconnection
from twisted.logger import LogEvent, LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from echotw.factory import EchoFactory
from echotw.loglevel import setLogLevel
from echotw.protocol import EchoProtocol
from echotw.proxyprotocol import (
    MAX_V1_HEADER_SIZE,
    MAX_V2_HEADER_SIZE,
    V2_SIGNATURE,
    MalformedProxyHeader,
    ProxyHeaderParser,
    ProxyProtocolEndpoint,
    ProxyProtocolFactory,
    ProxyProtocolWrapper,
)
from echotw.rules.addresses import IPNetwork, NetworkSet, parseNetwork
from echotw.rules.policy import AccessRules

BALANCER = IPv4Address("TCP", "127.0.0.1", 40000)
TIMEOUT = 3.0

V1_IPV4 = b"PROXY TCP4 10.1.2.3 192.0.2.9 56324 7\r\n"
V1_IPV6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 56324 7\r\n"
V1_UNKNOWN = b"PROXY UNKNOWN anything at all\r\n"


def v2Header(
    command: int = 0x21,
    family: int = 0x11,
    addresses: bytes | None = None,
    tlvs: bytes = b"",
    length: int | None = None,
) -> bytes:
    """
    A v2 header: C{command} is the version and command byte, C{family} the
    family and protocol byte; C{length} overrides the length field.
    """
    if addresses is None:
        addresses = v2IPv4Addresses("10.1.2.3", "192.0.2.9", 56324, 7)
    block = addresses + tlvs
    if length is None:
        length = len(block)
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", length) + block


def v2IPv4Addresses(source: str, destination: str, sourcePort: int, destinationPort: int) -> bytes:
    return (
        socket.inet_aton(source)
        + socket.inet_aton(destination)
        + struct.pack("!HH", sourcePort, destinationPort)
    )


def v2IPv6Addresses(source: str, destination: str, sourcePort: int, destinationPort: int) -> bytes:
    return (
        socket.inet_pton(socket.AF_INET6, source)
        + socket.inet_pton(socket.AF_INET6, destination)
        + struct.pack("!HH", sourcePort, destinationPort)
    )


V2_IPV4 = v2Header()
V2_IPV6 = v2Header(family=0x21, addresses=v2IPv6Addresses("2001:db8::1", "2001:db8::2", 56324, 7))
V2_LOCAL = v2Header(command=0x20, family=0x00, addresses=b"")

MALFORMED_V1 = {
    "port out of range": b"PROXY TCP4 10.1.2.3 192.0.2.9 65536 7\r\n",
    "port not a number": b"PROXY TCP4 10.1.2.3 192.0.2.9 -1 7\r\n",
    "port missing": b"PROXY TCP4 10.1.2.3 192.0.2.9  7\r\n",
    "bad IPv4": b"PROXY TCP4 10.1.2.300 192.0.2.9 56324 7\r\n",
    "IPv4 with leading zero": b"PROXY TCP4 010.1.2.3 192.0.2.9 56324 7\r\n",
    "IPv6 under TCP4": b"PROXY TCP4 2001:db8::1 192.0.2.9 56324 7\r\n",
    "IPv4 under TCP6": b"PROXY TCP6 10.1.2.3 2001:db8::2 56324 7\r\n",
    "IPv6 zone": b"PROXY TCP6 fe80::1%eth0 2001:db8::2 56324 7\r\n",
    "unknown protocol": b"PROXY UDP4 10.1.2.3 192.0.2.9 56324 7\r\n",
    "too few fields": b"PROXY TCP4 10.1.2.3 192.0.2.9 56324\r\n",
    "bare LF": b"PROXY TCP4 10.1.2.3 192.0.2.9 56324 7\n",
    "no CRLF within 107 bytes": b"PROXY UNKNOWN " + b"x" * 200,
    "not ASCII": b"PROXY TCP4 10.1.2.3 192.0.2.\xb9 56324 7\r\n",
    "lower case": b"proxy TCP4 10.1.2.3 192.0.2.9 56324 7\r\n",
}

MALFORMED_V2 = {
    "version 1": v2Header(command=0x11),
    "version 3": v2Header(command=0x31),
    "command 2": v2Header(command=0x22),
    "family AF_UNIX": v2Header(family=0x31, addresses=b"\x00" * 216),
    "family 4": v2Header(family=0x41),
    "datagram over IPv4": v2Header(family=0x12),
    "AF_UNSPEC with STREAM": v2Header(family=0x01),
    "addresses too short": v2Header(addresses=b"\x00" * 11),
    "IPv6 addresses too short": v2Header(family=0x21, addresses=b"\x00" * 35),
    "length too large": v2Header(length=MAX_V2_HEADER_SIZE),
    "length at maximum of field": v2Header(length=0xFFFF),
    "damaged signature": b"\r\n\r\n\x00\r\nQUIT\r" + V2_IPV4[12:],
}


def connect(
    factory: ProxyProtocolFactory, peer: IAddress = BALANCER
) -> tuple[ProxyProtocolWrapper, StringTransportWithDisconnection]:
    """
    Connect a wrapper built by C{factory} for C{peer} to a string transport
    that reports connection loss back to it.
    """
    protocol = factory.buildProtocol(peer)
    assert protocol is not None
    transport = StringTransportWithDisconnection(peerAddress=peer)
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return protocol, transport


def eventsNamed(events: Sequence[LogEvent], name: str) -> list[LogEvent]:
    return [event for event in events if event.get("event") == name]


class ProxyHeaderParserTests(SynchronousTestCase):
    """
    Tests for L{ProxyHeaderParser}.
    """

    def assertParses(self, data: bytes, host: str | None, port: int | None = None) -> None:
        """
        C{data} parses, at once and byte by byte, to a source of C{host} and
        C{port} (no source if C{host} is None), and nothing follows it.
        """
        for segments in ([data], [data[i : i + 1] for i in range(len(data))]):
            parser = ProxyHeaderParser()
            results = [parser.feed(segment) for segment in segments]
            self.assertEqual(results[:-1], [None] * (len(segments) - 1))
            result = results[-1]
            assert result is not None
            header, rest = result
            self.assertEqual(rest, b"")
            self.assertEqual(header.size, len(data))
            if host is None:
                self.assertIsNone(header.source)
            else:
                assert header.source is not None
                self.assertEqual((header.source.host, header.source.port), (host, port))

    def test_v1IPv4(self) -> None:
        """A v1 TCP4 header gives the client's IPv4 address and port."""
        self.assertParses(V1_IPV4, "10.1.2.3", 56324)

    def test_v1IPv6(self) -> None:
        """A v1 TCP6 header gives the client's IPv6 address and port."""
        self.assertParses(V1_IPV6, "2001:db8::1", 56324)

    def test_v1AddressTypes(self) -> None:
        """v1 addresses are Twisted IPv4Address and IPv6Address over TCP."""
        header4 = ProxyHeaderParser().feed(V1_IPV4)
        header6 = ProxyHeaderParser().feed(V1_IPV6)
        assert header4 is not None and header6 is not None
        self.assertEqual(header4[0].source, IPv4Address("TCP", "10.1.2.3", 56324))
        self.assertEqual(header4[0].destination, IPv4Address("TCP", "192.0.2.9", 7))
        self.assertEqual(header6[0].source, IPv6Address("TCP", "2001:db8::1", 56324))

    def test_v1Unknown(self) -> None:
        """A v1 UNKNOWN header carries no address: the real peer is the client."""
        self.assertParses(V1_UNKNOWN, None)

    def test_v1AtMaximumLength(self) -> None:
        """A v1 header of exactly 107 bytes, CRLF included, is accepted."""
        header = b"PROXY UNKNOWN "
        header += b"x" * (MAX_V1_HEADER_SIZE - len(header) - 2) + b"\r\n"
        self.assertEqual(len(header), MAX_V1_HEADER_SIZE)
        self.assertParses(header, None)

    def test_v2IPv4(self) -> None:
        """A v2 PROXY header over TCP/IPv4 gives the client's address and port."""
        self.assertParses(V2_IPV4, "10.1.2.3", 56324)

    def test_v2IPv6(self) -> None:
        """A v2 PROXY header over TCP/IPv6 gives the client's address and port."""
        self.assertParses(V2_IPV6, "2001:db8::1", 56324)
        result = ProxyHeaderParser().feed(V2_IPV6)
        assert result is not None
        self.assertIsInstance(result[0].source, IPv6Address)

    def test_v2TLVsSkipped(self) -> None:
        """TLVs after the v2 addresses are skipped, not taken as data."""
        tlvs = b"\x05\x00\x03abc" + b"\x04\x00\x00"
        self.assertParses(v2Header(tlvs=tlvs), "10.1.2.3", 56324)

    def test_v2Local(self) -> None:
        """A v2 LOCAL header carries no address, whatever its family byte says."""
        self.assertParses(V2_LOCAL, None)
        self.assertParses(v2Header(command=0x20), None)

    def test_v2Unspecified(self) -> None:
        """A v2 PROXY header with AF_UNSPEC carries no address."""
        self.assertParses(v2Header(family=0x00, addresses=b""), None)

    def test_v2AtMaximumSize(self) -> None:
        """A v2 header of exactly the maximum size is accepted."""
        tlvs = b"\x00" * (MAX_V2_HEADER_SIZE - len(V2_IPV4))
        self.assertParses(v2Header(tlvs=tlvs), "10.1.2.3", 56324)

    def test_firstSegmentShorterThanSignature(self) -> None:
        """A v2 header whose first segment is 5 bytes is still read whole."""
        parser = ProxyHeaderParser()
        self.assertIsNone(parser.feed(V2_IPV4[:5]))
        self.assertIsNone(parser.feed(V2_IPV4[5:14]))
        self.assertEqual(parser.bytesReceived, 14)
        result = parser.feed(V2_IPV4[14:] + b"hello")
        assert result is not None
        self.assertEqual(result[1], b"hello")

    def test_bytesAfterHeaderReturned(self) -> None:
        """The bytes after the header in the same segment are returned, whole."""
        for header in (V1_IPV4, V2_IPV4):
            result = ProxyHeaderParser().feed(header + b"PROXY \r\n\x00data")
            assert result is not None
            self.assertEqual(result[1], b"PROXY \r\n\x00data")

    def test_malformedV1(self) -> None:
        """Malformed v1 headers raise MalformedProxyHeader."""
        for name, data in MALFORMED_V1.items():
            with self.assertRaises(MalformedProxyHeader, msg=name):
                ProxyHeaderParser().feed(data)

    def test_malformedV2(self) -> None:
        """Malformed v2 headers raise MalformedProxyHeader."""
        for name, data in MALFORMED_V2.items():
            with self.assertRaises(MalformedProxyHeader, msg=name):
                ProxyHeaderParser().feed(data)

    def test_malformedByteByByte(self) -> None:
        """Fed byte by byte, a malformed header fails rather than waits."""
        for name, data in {**MALFORMED_V1, **MALFORMED_V2}.items():
            parser = ProxyHeaderParser()
            with self.assertRaises(MalformedProxyHeader, msg=name):
                for i in range(len(data)):
                    parser.feed(data[i : i + 1])

    def test_notProxyFailsAtFirstByte(self) -> None:
        """A client speaking directly (no PROXY header) fails at its first byte."""
        with self.assertRaises(MalformedProxyHeader):
            ProxyHeaderParser().feed(b"G")

    def test_oversizedV2FailsAtLengthField(self) -> None:
        """An oversized v2 length is refused once 16 bytes are in, not buffered."""
        parser = ProxyHeaderParser()
        header = v2Header(length=MAX_V2_HEADER_SIZE)
        self.assertIsNone(parser.feed(header[:15]))
        with self.assertRaises(MalformedProxyHeader):
            parser.feed(header[15:16])

    def test_badVersionFailsAtVersionByte(self) -> None:
        """A bad v2 version fails at the 13th byte."""
        parser = ProxyHeaderParser()
        self.assertIsNone(parser.feed(V2_SIGNATURE))
        with self.assertRaises(MalformedProxyHeader):
            parser.feed(b"\x11")


class ProxyProtocolFactoryTests(SynchronousTestCase):
    """
    Tests for L{ProxyProtocolFactory} and L{ProxyProtocolWrapper} in front of
    an L{EchoFactory}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.echo = EchoFactory()
        self.factory = ProxyProtocolFactory(self.echo.forListener("x"), [], TIMEOUT, self.clock)

    def test_v1EchoesForRealClient(self) -> None:
        """After a v1 header the echo protocol is built for the header's client."""
        wrapper, transport = connect(self.factory)
        wrapper.dataReceived(V1_IPV4)
        self.assertIsInstance(wrapper.wrapped, EchoProtocol)
        self.assertEqual(
            [p.peer for p in self.echo.protocols], [IPv4Address("TCP", "10.1.2.3", 56324)]
        )
        wrapper.dataReceived(b"hello")
        self.assertEqual(transport.value(), b"hello")

    def test_v2IPv4EchoesForRealClient(self) -> None:
        """After a v2 IPv4 header the echo protocol is built for the header's client."""
        wrapper, _ = connect(self.factory)
        wrapper.dataReceived(V2_IPV4)
        self.assertEqual(
            [p.peer for p in self.echo.protocols], [IPv4Address("TCP", "10.1.2.3", 56324)]
        )

    def test_v2IPv6EchoesForRealClient(self) -> None:
        """After a v2 IPv6 header the echo protocol is built for the header's client."""
        wrapper, _ = connect(self.factory)
        wrapper.dataReceived(V2_IPV6)
        self.assertEqual(
            [p.peer for p in self.echo.protocols], [IPv6Address("TCP", "2001:db8::1", 56324)]
        )

    def test_headerByteByByte(self) -> None:
        """A header split into single bytes is read; nothing is built before its end."""
        for header in (V1_IPV6, V2_IPV4):
            wrapper, transport = connect(self.factory)
            for i in range(len(header) - 1):
                wrapper.dataReceived(header[i : i + 1])
            self.assertIsNone(wrapper.wrapped)
            wrapper.dataReceived(header[-1:])
            self.assertIsInstance(wrapper.wrapped, EchoProtocol)
            for byte in b"echo":
                wrapper.dataReceived(bytes([byte]))
            self.assertEqual(transport.value(), b"echo")
            self.assertTrue(transport.connected)

    def test_firstSegmentShorterThanSignature(self) -> None:
        """A first segment shorter than the v2 signature does not end the connection."""
        wrapper, transport = connect(self.factory)
        wrapper.dataReceived(V2_IPV4[:3])
        self.assertTrue(transport.connected)
        wrapper.dataReceived(V2_IPV4[3:])
        self.assertEqual(len(self.echo.protocols), 1)

    def test_dataAfterHeaderEchoed(self) -> None:
        """Bytes in the header's segment after the header are echoed, first."""
        wrapper, transport = connect(self.factory)
        wrapper.dataReceived(V2_IPV4 + b"first ")
        wrapper.dataReceived(b"second")
        self.assertEqual(transport.value(), b"first second")
        self.assertEqual(self.echo.protocols.pop().bytesReceived, 12)

    def test_localFallsBackToRealPeer(self) -> None:
        """A v2 LOCAL header gets the connection's real peer as client."""
        wrapper, transport = connect(self.factory)
        wrapper.dataReceived(V2_LOCAL + b"ping")
        self.assertEqual([p.peer for p in self.echo.protocols], [BALANCER])
        self.assertEqual(transport.value(), b"ping")

    def test_balancersOwnConnectionsAreHealthChecks(self) -> None:
        """LOCAL headers and v1 headers naming the connection itself (how
        HAProxy's checks look) mark the connection as a health check, whose
        events are logged at debug level; relayed clients are not marked."""
        own = b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 7\r\n"
        for header, expected in [(V2_LOCAL, True), (own, True), (V1_IPV4, False)]:
            wrapper, transport = connect(self.factory)
            with capturedLogs() as events:
                wrapper.dataReceived(header)
                transport.loseConnection()
            [p] = [w for w in [wrapper.wrapped] if w is not None]
            self.assertEqual(p.healthCheck, expected, header)
            levels = {e["log_level"] for e in events if e.get("event") in ("connected", "closed")}
            # Debug events are dropped at the default --log-level of info.
            self.assertEqual(levels, set() if expected else {LogLevel.info})

    def test_healthChecksBypassClientRules(self) -> None:
        """A trusted balancer's health check is served even when the allow
        rules (meant for clients) leave the balancer out, and nothing is
        refused or logged at info level."""
        echo = EchoFactory(rules=AccessRules(allow=[parseNetwork("10.0.0.0/8")]))
        factory = ProxyProtocolFactory(echo.forListener("x"), [], TIMEOUT, self.clock)
        wrapper, transport = connect(factory)
        with capturedLogs() as events:
            wrapper.dataReceived(V2_LOCAL + b"ok?")
        self.assertEqual(transport.value(), b"ok?")
        self.assertEqual(echo.stats.refusals, {})
        self.assertEqual([e for e in events if e["log_level"] != LogLevel.debug], [])
        wrapper2, _ = connect(factory)
        wrapper2.dataReceived(V1_IPV4.replace(b"10.1.2.3", b"192.0.2.1"))
        self.assertEqual(echo.stats.refusals, {"not allowed": 1})

    def test_unknownFallsBackToRealPeer(self) -> None:
        """A v1 UNKNOWN header gets the connection's real peer as client."""
        wrapper, transport = connect(self.factory)
        wrapper.dataReceived(V1_UNKNOWN + b"ping")
        self.assertEqual([p.peer for p in self.echo.protocols], [BALANCER])
        self.assertEqual(transport.value(), b"ping")

    def test_echoProtocolGetsRealTransport(self) -> None:
        """The echo protocol registers the real transport as its producer."""
        wrapper, transport = connect(self.factory)
        wrapper.dataReceived(V2_IPV4)
        assert wrapper.wrapped is not None
        self.assertIs(wrapper.wrapped.transport, transport)  # type: ignore[attr-defined]
        self.assertIs(transport.producer, transport)
        self.assertTrue(transport.streaming)

    def test_untrustedSenderRefused(self) -> None:
        """A connection from outside the trusted networks gets no protocol, and is logged."""
        factory = ProxyProtocolFactory(
            self.echo.forListener("x"), [parseNetwork("192.0.2.0/24")], TIMEOUT, self.clock
        )
        with capturedLogs() as events:
            self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "198.51.100.7", 1234)))
        [event] = eventsNamed(events, "proxy-untrusted")
        self.assertEqual(
            (event["proxy_host"], event["proxy_port"], event["listener"]),
            ("198.51.100.7", 1234, "x"),
        )
        self.assertEqual(factory.rejections, {"untrusted proxy": 1})
        self.assertIsInstance(factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1)), Protocol)

    def test_emptyTrustedMeansLoopback(self) -> None:
        """With no trusted networks configured, only loopback peers are trusted."""
        trusted = [
            IPv4Address("TCP", "127.0.0.1", 1),
            IPv4Address("TCP", "127.8.9.10", 1),
            IPv6Address("TCP", "::1", 1),
            IPv6Address("TCP", "::ffff:127.0.0.1", 1),
        ]
        untrusted = [IPv4Address("TCP", "10.0.0.1", 1), IPv6Address("TCP", "2001:db8::1", 1)]
        nothing: list[list[IPNetwork] | NetworkSet] = [[], NetworkSet()]
        for trust in nothing:
            factory = ProxyProtocolFactory(self.echo, trust, TIMEOUT, self.clock)
            self.assertEqual([factory.isTrusted(a) for a in trusted], [True] * len(trusted))
            self.assertEqual([factory.isTrusted(a) for a in untrusted], [False] * len(untrusted))

    def test_configuredTrustedReplacesLoopback(self) -> None:
        """Configured trusted networks replace the loopback default."""
        factory = ProxyProtocolFactory(
            self.echo, NetworkSet([parseNetwork("10.0.0.0/8")]), TIMEOUT, self.clock
        )
        self.assertTrue(factory.isTrusted(IPv4Address("TCP", "10.9.9.9", 1)))
        self.assertFalse(factory.isTrusted(IPv4Address("TCP", "127.0.0.1", 1)))

    def test_unixPeerTrusted(self) -> None:
        """A peer on a Unix socket is trusted: file permissions govern it."""
        self.assertTrue(self.factory.isTrusted(UNIXAddress(b"/run/echotw.sock")))

    def test_headerNeverComesAbortedAtDeadline(self) -> None:
        """A connection without a complete header is aborted at the deadline, and logged."""
        wrapper, transport = connect(self.factory)
        wrapper.dataReceived(V2_IPV4[:10])
        self.clock.advance(TIMEOUT - 0.01)
        self.assertTrue(transport.connected)
        with capturedLogs() as events:
            self.clock.advance(0.01)
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.echo.protocols, set())
        [event] = eventsNamed(events, "proxy-rejected")
        self.assertEqual((event["reason"], event["received"]), ("header timeout", 10))
        self.assertEqual(self.factory.rejections, {"header timeout": 1})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_deadlineCancelledAfterHeader(self) -> None:
        """The deadline is cancelled once the header is parsed."""
        wrapper, transport = connect(self.factory)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        wrapper.dataReceived(V1_IPV4)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(TIMEOUT * 2)
        self.assertTrue(transport.connected)

    def test_deadlineCancelledOnConnectionLost(self) -> None:
        """The deadline is cancelled when the connection ends before the header."""
        wrapper, _ = connect(self.factory)
        wrapper.connectionLost(Failure(Exception("reset")))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_malformedAborted(self) -> None:
        """Malformed and oversized headers abort the connection, logged with a reason."""
        for name, data in {**MALFORMED_V1, **MALFORMED_V2}.items():
            echo = EchoFactory()
            factory = ProxyProtocolFactory(echo.forListener("x"), [], TIMEOUT, self.clock)
            wrapper, transport = connect(factory)
            with capturedLogs() as events:
                wrapper.dataReceived(data + b"data")
            self.assertTrue(transport.disconnected, name)
            self.assertEqual(transport.value(), b"", name)
            self.assertEqual(echo.protocols, set(), name)
            [event] = eventsNamed(events, "proxy-rejected")
            self.assertEqual(event["reason"], "malformed header", name)
            self.assertEqual(event["log_level"], LogLevel.warn, name)
            self.assertEqual(self.clock.getDelayedCalls(), [], name)

    def test_verificationSeesRealClient(self) -> None:
        """The access rules judge the header's client: 192.0.2.1 refused, 10.1.2.3 echoed."""
        echo = EchoFactory(rules=AccessRules(allow=[parseNetwork("10.0.0.0/8")]))
        factory = ProxyProtocolFactory(echo.forListener("x"), [], TIMEOUT, self.clock)

        refusedWrapper, refused = connect(factory)
        with capturedLogs() as events:
            refusedWrapper.dataReceived(
                v2Header(addresses=v2IPv4Addresses("192.0.2.1", "192.0.2.9", 5, 7)) + b"data"
            )
        self.assertTrue(refused.disconnected)
        self.assertEqual(refused.value(), b"")
        [event] = eventsNamed(events, "refused")
        self.assertEqual(event["client_host"], "192.0.2.1")
        self.assertEqual(echo.stats.refusals, {"not allowed": 1})

        acceptedWrapper, accepted = connect(factory)
        acceptedWrapper.dataReceived(V2_IPV4 + b"data")
        self.assertEqual(accepted.value(), b"data")
        self.assertTrue(accepted.connected)

    def test_halfCloseThroughWrapper(self) -> None:
        """The client's half-close reaches the echo protocol, which closes after echoing."""
        self.assertTrue(IHalfCloseableProtocol.providedBy(ProxyProtocolWrapper(self.factory)))
        wrapper, transport = connect(self.factory)
        wrapper.dataReceived(V1_IPV4 + b"last words")
        [echoProtocol] = self.echo.protocols
        with capturedLogs() as events:
            wrapper.readConnectionLost()
        self.assertEqual(transport.value(), b"last words")
        self.assertIsNone(transport.producer)
        self.assertFalse(transport.connected)
        self.assertEqual(echoProtocol.closeReason, None)
        self.assertEqual(self.echo.stats.openConnections, 0)
        [closed] = eventsNamed(events, "closed")
        self.assertEqual((closed["client_host"], closed["bytes"]), ("10.1.2.3", 10))

    def test_halfCloseBeforeHeaderCloses(self) -> None:
        """A half-close before the header is complete closes the connection."""
        wrapper, transport = connect(self.factory)
        wrapper.dataReceived(V1_IPV4[:10])
        wrapper.readConnectionLost()
        self.assertFalse(transport.connected)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_halfCloseToPlainProtocolCloses(self) -> None:
        """A wrapped protocol without half-close support sees the connection close."""
        factory = ProxyProtocolFactory(Factory.forProtocol(Protocol), [], TIMEOUT, self.clock)
        wrapper, transport = connect(factory)
        wrapper.dataReceived(V1_IPV4)
        wrapper.readConnectionLost()
        self.assertFalse(transport.connected)

    def test_writeConnectionLostForwarded(self) -> None:
        """The sending side's end reaches the echo protocol."""
        wrapper, _ = connect(self.factory)
        wrapper.dataReceived(V1_IPV4)
        [echoProtocol] = self.echo.protocols
        seen: list[bool] = []
        echoProtocol.writeConnectionLost = lambda: seen.append(True)  # type: ignore[method-assign]
        wrapper.writeConnectionLost()
        self.assertEqual(seen, [True])

    def test_connectionLostForwarded(self) -> None:
        """The echo protocol learns the connection is gone and releases its counts."""
        wrapper, _ = connect(self.factory)
        wrapper.dataReceived(V2_IPV4)
        self.assertEqual(self.echo.stats.openConnections, 1)
        wrapper.connectionLost(Failure(Exception("reset")))
        self.assertEqual(self.echo.stats.openConnections, 0)

    def test_silentCloseLoggedAtDebug(self) -> None:
        """A connection closed with nothing sent (a health check) is logged
        at debug, hidden at the default --log-level."""
        _, transport = connect(self.factory)
        with capturedLogs() as events:
            transport.loseConnection()
        self.assertEqual(eventsNamed(events, "proxy-closed-early"), [])
        setLogLevel("debug")
        self.addCleanup(setLogLevel, "info")
        _, transport = connect(self.factory)
        with capturedLogs() as events:
            transport.loseConnection()
        [event] = eventsNamed(events, "proxy-closed-early")
        self.assertEqual((event["log_level"], event["received"]), (LogLevel.debug, 0))

    def test_partialHeaderCloseLoggedAtInfo(self) -> None:
        """A connection closed mid-header is logged at info with the bytes received."""
        wrapper, transport = connect(self.factory)
        wrapper.dataReceived(b"PROXY TCP4")
        with capturedLogs() as events:
            transport.loseConnection()
        [event] = eventsNamed(events, "proxy-closed-early")
        self.assertEqual((event["log_level"], event["received"]), (LogLevel.info, 10))

    def test_startAndStopReachWrappedFactory(self) -> None:
        """Starting and stopping the wrapper starts and stops the wrapped factory."""
        wrapped = Factory.forProtocol(Protocol)
        factory = ProxyProtocolFactory(wrapped, [], TIMEOUT, self.clock)
        factory.doStart()
        self.assertEqual(wrapped.numPorts, 1)
        factory.doStop()
        self.assertEqual(wrapped.numPorts, 0)

    def test_timeoutMustBePositive(self) -> None:
        """A zero or negative header timeout is refused."""
        for timeout in (0, -1.0, float("nan")):
            with self.assertRaises(ValueError):
                ProxyProtocolFactory(self.echo, [], timeout, self.clock)

    def test_logPrefixNamesWrapped(self) -> None:
        """The wrapper's log prefix is the wrapped factory's, marked as PROXY."""
        self.assertEqual(self.factory.logPrefix(), "echotw (PROXY)")
        wrapper, _ = connect(self.factory)
        self.assertEqual(wrapper.logPrefix(), "echotw (PROXY)")

    def test_plainTransportWithoutAbort(self) -> None:
        """On a transport without abortConnection, a rejection falls back to loseConnection."""

        class NoAbortTransport(StringTransport):
            abortConnection = None  # type: ignore[assignment]

        wrapper = self.factory.buildProtocol(BALANCER)
        assert wrapper is not None
        transport = NoAbortTransport(peerAddress=BALANCER)
        wrapper.makeConnection(transport)
        wrapper.dataReceived(b"GET / HTTP/1.0\r\n")
        self.assertTrue(transport.disconnecting)


@implementer(IHalfCloseableProtocol)
class HalfClosingClient(Protocol):
    """
    Send everything, half-close, and collect the reply until the server
    closes.
    """

    def __init__(self, toSend: bytes) -> None:
        self.toSend = toSend
        self.received: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()
        self.gotEOF = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.toSend)
        self.transport.loseWriteConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def readConnectionLost(self) -> None:
        self.gotEOF = True
        assert self.transport is not None
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(b"".join(self.received))


class ProxyProtocolLoopbackTests(TestCase):
    """
    A real TCP round trip through L{ProxyProtocolEndpoint} on loopback.
    """

    timeout = 30

    async def test_v2HeaderThenHalfCloseEchoed(self) -> None:
        """A client behind a v2 header is verified as itself and echoed byte-exact, then EOF."""
        echo = EchoFactory(rules=AccessRules(allow=[parseNetwork("10.0.0.0/8")]))
        endpoint = ProxyProtocolEndpoint(
            serverFromString(reactor, "tcp:0:interface=127.0.0.1"), [], 5.0, reactor
        )
        port: IListeningPort = await endpoint.listen(echo.forListener("proxied"))
        self.addCleanup(port.stopListening)
        listening = port.getHost()
        assert isinstance(listening, IPv4Address)
        payload = os.urandom(300_000)
        client = HalfClosingClient(V2_IPV4 + payload)
        with capturedLogs() as events:
            await TCP4ClientEndpoint(reactor, "127.0.0.1", listening.port).connect(
                Factory.forProtocol(lambda: client)
            )
            echoed = await client.done.addTimeout(20, reactor)
        self.assertEqual(len(echoed), len(payload))
        self.assertTrue(echoed == payload, "echo differs from what was sent")
        self.assertTrue(client.gotEOF)
        [connected] = eventsNamed(events, "connected")
        self.assertEqual(connected["client_host"], "10.1.2.3")
        self.assertEqual(echo.stats.sentClosed, len(payload))

    async def test_untrustedPeerRefused(self) -> None:
        """A loopback client not among the trusted networks is closed without an echo."""
        echo = EchoFactory()
        endpoint = ProxyProtocolEndpoint(
            serverFromString(reactor, "tcp:0:interface=127.0.0.1"),
            [parseNetwork("192.0.2.0/24")],
            5.0,
            reactor,
        )
        port: IListeningPort = await endpoint.listen(echo.forListener("proxied"))
        self.addCleanup(port.stopListening)
        listening = port.getHost()
        assert isinstance(listening, IPv4Address)
        client = HalfClosingClient(V2_IPV4 + b"hello")
        with capturedLogs() as events:
            await TCP4ClientEndpoint(reactor, "127.0.0.1", listening.port).connect(
                Factory.forProtocol(lambda: client)
            )
            echoed = await client.done.addTimeout(20, reactor)
        self.assertEqual(echoed, b"")
        [event] = eventsNamed(events, "proxy-untrusted")
        self.assertEqual(event["proxy_host"], "127.0.0.1")
        self.assertEqual(echo.stats.connectionsTotal, 0)
