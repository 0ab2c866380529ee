"""
Tests for UDP echo: listener parsing, the protocol with a fake transport and
a fake clock, the listener service with a fake reactor (real sockets on
loopback: L{tests.integration.test_udp}).
"""

from __future__ import annotations

import errno
from typing import Any, cast

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorUDP, IUDPTransport
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from echotw.build import makeService
from echotw.endpoints import UDPListener, parseUDPListener
from echotw.options import EchoOptions
from echotw.ratelimit import TokenBuckets
from echotw.rules.addresses import ipFromText, parseNetwork
from echotw.rules.policy import AccessRules
from echotw.udp import (
    LOOP_PORTS,
    MAX_DATAGRAM,
    UDPEchoProtocol,
    UDPListenerService,
    isUnicastSource,
)
from tests.support.fakes import FakeDatagramTransport, FakeUDPPort

CLIENT = ("192.0.2.10", 40000)
MAX_IPV4_PAYLOAD = 65507


def echoProtocol(
    clock: Clock | None = None, transport: FakeDatagramTransport | None = None, **kwargs: Any
) -> tuple[UDPEchoProtocol, FakeDatagramTransport, Clock]:
    clock = clock if clock is not None else Clock()
    transport = transport if transport is not None else FakeDatagramTransport()
    proto = UDPEchoProtocol(clock=clock, listener="udp:7", **kwargs)
    proto.makeConnection(cast(IUDPTransport, transport))
    return proto, transport, clock


class ParseUDPListenerTests(SynchronousTestCase):
    """
    L{parseUDPListener} reads the C{--udp} syntax and rejects anything else.
    """

    def test_udp(self) -> None:
        """C{udp:PORT} listens on all IPv4 addresses."""
        self.assertEqual(parseUDPListener("udp:7"), UDPListener(7, "", False, "udp:7"))

    def test_udpInterface(self) -> None:
        """C{udp:PORT:interface=ADDR} binds that IPv4 address."""
        self.assertEqual(
            parseUDPListener("udp:7:interface=127.0.0.1"),
            UDPListener(7, "127.0.0.1", False, "udp:7:interface=127.0.0.1"),
        )

    def test_udpPortKeyword(self) -> None:
        """The port may be given as C{port=}, as in Twisted's endpoint strings."""
        self.assertEqual(parseUDPListener("udp:port=0"), UDPListener(0, "", False, "udp:0"))

    def test_udp6(self) -> None:
        """C{udp6:PORT} listens on all IPv6 addresses."""
        self.assertEqual(parseUDPListener("udp6:7"), UDPListener(7, "::", True, "udp6:7"))

    def test_udp6EscapedInterface(self) -> None:
        """Escaped colons in an IPv6 literal are unescaped; the name keeps them."""
        self.assertEqual(
            parseUDPListener(r"udp6:7:interface=\:\:1"),
            UDPListener(7, "::1", True, r"udp6:7:interface=\:\:1"),
        )

    def test_bareNumber(self) -> None:
        """A bare number is UDP on that port on the default interface."""
        self.assertEqual(
            parseUDPListener(" 7 ", "127.0.0.1"),
            UDPListener(7, "127.0.0.1", False, "udp:7:interface=127.0.0.1"),
        )

    def test_bareNumberNoInterface(self) -> None:
        """A bare number without a default interface is all IPv4 addresses."""
        self.assertEqual(parseUDPListener("9"), UDPListener(9, "", False, "udp:9"))

    def test_bareNumberIPv6Interface(self) -> None:
        """A bare number with an IPv6 default interface is C{udp6:}."""
        self.assertEqual(
            parseUDPListener("7", "::1"), UDPListener(7, "::1", True, r"udp6:7:interface=\:\:1")
        )

    def assertRejected(self, value: str, fragment: str, interface: str = "") -> None:
        with self.assertRaises(ValueError) as raised:
            parseUDPListener(value, interface)
        message = str(raised.exception)
        self.assertIn(fragment, message)
        self.assertNotIn("\n", message)

    def test_empty(self) -> None:
        """An empty value is an error."""
        self.assertRejected("  ", "empty")

    def test_unknownType(self) -> None:
        """A type other than udp/udp6 is an error naming it."""
        self.assertRejected("tcp:7", "unknown UDP listener type 'tcp'")

    def test_noPort(self) -> None:
        """A type without a port is an error."""
        self.assertRejected("udp", "no port given")
        self.assertRejected("udp:", "no port given")
        self.assertRejected("udp:interface=127.0.0.1", "no port given")

    def test_badPort(self) -> None:
        """A port that is not a number is an error."""
        self.assertRejected("udp:echo", "port 'echo' is not a number")
        self.assertRejected("udp:-1", "is not a number")

    def test_portOutOfRange(self) -> None:
        """Ports above 65535 are errors, bare or not."""
        self.assertRejected("udp:65536", "out of range 0-65535")
        self.assertRejected("70000", "out of range 0-65535")

    def test_unknownKeyword(self) -> None:
        """A keyword other than interface= (or port=) is an error naming it."""
        self.assertRejected("udp:7:backlog=5", "unknown option 'backlog'")

    def test_repeatedKeyword(self) -> None:
        """A keyword given twice, or the port given twice, is an error."""
        self.assertRejected("udp:7:interface=127.0.0.1:interface=127.0.0.2", "given twice")
        self.assertRejected("udp:7:port=8", "given twice")

    def test_extraField(self) -> None:
        """A second positional field is an error."""
        self.assertRejected("udp:7:8", "unexpected '8'")

    def test_unescapedIPv6(self) -> None:
        """An IPv6 literal with unescaped colons is an error saying how to escape."""
        self.assertRejected("udp6:7:interface=::1", "unescaped colon")
        self.assertRejected("udp6:7:interface=2001:db8::1", "unescaped colon")

    def test_interfaceNotAnAddress(self) -> None:
        """Host names are rejected: UDP ports bind to addresses."""
        self.assertRejected("udp:7:interface=localhost", "not an IP address")
        self.assertRejected("7", "not an IP address", interface="localhost")

    def test_interfaceWrongFamily(self) -> None:
        """An interface of the other family says which type to use."""
        self.assertRejected(r"udp:7:interface=\:\:1", "use udp6:")
        self.assertRejected("udp6:7:interface=127.0.0.1", "use udp:")

    def test_messageNamesValue(self) -> None:
        """The message starts with the value as given."""
        self.assertRejected("udp:x", "'udp:x': ")


class UDPEchoProtocolTests(SynchronousTestCase):
    """
    L{UDPEchoProtocol} echoes datagrams whole and refuses to loop or reflect.
    """

    def test_echo(self) -> None:
        """A datagram goes back, unchanged, to its source; counters follow."""
        proto, transport, _ = echoProtocol()
        proto.datagramReceived(b"hello", CLIENT)
        proto.datagramReceived(b"", CLIENT)
        self.assertEqual(transport.written, [(b"hello", CLIENT), (b"", CLIENT)])
        self.assertEqual(proto.datagramsEchoed, 2)
        self.assertEqual(proto.bytesEchoed, 5)
        self.assertEqual(sum(proto.dropped.values()), 0)

    def test_maximumDatagramEchoedWhole(self) -> None:
        """A 65,507-byte datagram (the IPv4 maximum) is echoed whole."""
        proto, transport, _ = echoProtocol()
        payload = bytes(range(256)) * 255 + bytes(range(227))
        self.assertEqual(len(payload), MAX_IPV4_PAYLOAD)
        proto.datagramReceived(payload, CLIENT)
        self.assertEqual(transport.written, [(payload, CLIENT)])
        self.assertEqual(proto.bytesEchoed, MAX_IPV4_PAYLOAD)

    def test_replyNeverLargerThanRequest(self) -> None:
        """Every reply is exactly the request, never more."""
        proto, transport, _ = echoProtocol(rate=0)
        for size in (0, 1, 1472, 8192, 8193, 65507):
            proto.datagramReceived(b"x" * size, CLIENT)
        self.assertEqual([len(d) for d, _ in transport.written], [0, 1, 1472, 8192, 8193, 65507])

    def test_denied(self) -> None:
        """A datagram the rules refuse is dropped silently and counted."""
        rules = AccessRules(deny=[parseNetwork("192.0.2.0/24")])
        proto, transport, _ = echoProtocol(rules=rules)
        proto.datagramReceived(b"x", CLIENT)
        proto.datagramReceived(b"y", ("198.51.100.1", 40000))
        self.assertEqual(transport.written, [(b"y", ("198.51.100.1", 40000))])
        self.assertEqual(proto.dropped["denied"], 1)

    def test_rulesSeeUDPAddressAndListener(self) -> None:
        """Verifiers get an IPv4/IPv6 address of type UDP and the listener name."""
        seen: list[tuple[Any, str]] = []

        def verifier(address: Any, listener: str) -> None:
            seen.append((address, listener))

        proto, _, _ = echoProtocol(rules=verifier)
        proto.datagramReceived(b"x", CLIENT)
        proto.datagramReceived(b"x", ("2001:db8::1", 40000))
        self.assertEqual(
            seen,
            [
                (IPv4Address("UDP", *CLIENT), "udp:7"),
                (IPv6Address("UDP", "2001:db8::1", 40000), "udp:7"),
            ],
        )

    def test_allowOnly(self) -> None:
        """With allow rules, sources outside them are dropped as denied."""
        rules = AccessRules(allow=[parseNetwork("10.0.0.0/8")])
        proto, transport, _ = echoProtocol(rules=rules)
        proto.datagramReceived(b"x", CLIENT)
        proto.datagramReceived(b"y", ("10.1.2.3", 40000))
        self.assertEqual(transport.written, [(b"y", ("10.1.2.3", 40000))])
        self.assertEqual(proto.dropped["denied"], 1)

    def test_mappedAddressRules(self) -> None:
        """An IPv4-mapped source on a dual-stack port meets the IPv4 rules."""
        rules = AccessRules(deny=[parseNetwork("192.0.2.0/24")])
        proto, transport, _ = echoProtocol(rules=rules)
        proto.datagramReceived(b"x", ("::ffff:192.0.2.10", 40000))
        self.assertEqual(transport.written, [])
        self.assertEqual(proto.dropped["denied"], 1)

    def test_verifierErrorDenies(self) -> None:
        """A verifier that raises refuses the datagram and logs the failure."""

        def broken(address: Any, listener: str) -> None:
            raise RuntimeError("boom")

        proto, transport, _ = echoProtocol(rules=broken)
        with capturedLogs() as events:
            proto.datagramReceived(b"x", CLIENT)
        self.assertEqual(transport.written, [])
        self.assertEqual(proto.dropped["denied"], 1)
        self.assertTrue([e for e in events if "log_failure" in e])
        self.flushLoggedErrors(RuntimeError)

    def test_loopPortsDropped(self) -> None:
        """Datagrams from echo, daytime, qotd, chargen, time and port 0 are dropped."""
        proto, transport, _ = echoProtocol()
        for port in (0, 7, 13, 17, 19, 37):
            proto.datagramReceived(b"x", ("192.0.2.10", port))
        self.assertEqual(transport.written, [])
        self.assertEqual(proto.dropped["loop-port"], 6)

    def test_privilegedPortsDropped(self) -> None:
        """Every source port below 1024 is dropped; 1024 and ephemeral ports are not."""
        self.assertTrue(set(range(1024)) <= LOOP_PORTS)
        for port in (53, 123, 161, 1023, 11211, 1900, 5353):
            self.assertIn(port, LOOP_PORTS)
        for port in (1024, 32768, 49152, 60999, 65535):
            self.assertNotIn(port, LOOP_PORTS)
        proto, transport, _ = echoProtocol()
        proto.datagramReceived(b"x", ("192.0.2.10", 1023))
        proto.datagramReceived(b"y", ("192.0.2.10", 1024))
        self.assertEqual(transport.written, [(b"y", ("192.0.2.10", 1024))])

    def test_customLoopPorts(self) -> None:
        """The set of refused source ports can be replaced."""
        proto, transport, _ = echoProtocol(
            transport=FakeDatagramTransport(port=7007), loopPorts={40000}
        )
        proto.datagramReceived(b"x", CLIENT)
        proto.datagramReceived(b"y", ("192.0.2.10", 7))
        self.assertEqual(transport.written, [(b"y", ("192.0.2.10", 7))])
        self.assertEqual(proto.dropped["loop-port"], 1)

    def test_nonUnicastSourcesDropped(self) -> None:
        """Broadcast, multicast and unspecified sources, v4, v6 and mapped, are dropped."""
        proto, transport, _ = echoProtocol()
        sources = [
            "255.255.255.255",
            "224.0.0.1",
            "239.255.255.250",
            "0.0.0.0",
            "0.1.2.3",
            "ff02::1",
            "ff05::c",
            "::",
            "::ffff:255.255.255.255",
            "::ffff:224.0.0.251",
        ]
        for host in sources:
            proto.datagramReceived(b"x", (host, 40000))
        self.assertEqual(transport.written, [])
        self.assertEqual(proto.dropped["broadcast"], len(sources))

    def test_isUnicastSource(self) -> None:
        """Ordinary unicast addresses, at the edges of the refused ranges, pass."""
        for host in (
            "1.0.0.0",
            "223.255.255.255",
            "240.0.0.1",
            "255.255.255.254",
            "::1",
            "fe80::1",
        ):
            ip = ipFromText(host)
            assert ip is not None
            self.assertTrue(isUnicastSource(ip), host)

    def test_kernelRefusesBroadcast(self) -> None:
        """EACCES from the kernel (a broadcast destination) counts as broadcast."""
        proto, transport, _ = echoProtocol()
        transport.error = OSError(errno.EACCES, "Permission denied")
        proto.datagramReceived(b"x", ("192.0.2.255", 40000))
        self.assertEqual(proto.dropped["broadcast"], 1)
        self.assertEqual(proto.datagramsEchoed, 0)

    def test_sendFailureCounted(self) -> None:
        """Any other send error is counted, not raised into the reactor."""
        proto, transport, _ = echoProtocol()
        transport.error = OSError(errno.EAGAIN, "Resource temporarily unavailable")
        proto.datagramReceived(b"x", CLIENT)
        self.assertEqual(proto.dropped["send-failed"], 1)
        self.assertEqual(proto.datagramsEchoed, 0)

    def test_rateLimitCapsReplies(self) -> None:
        """A source gets C{burst} replies at once, then nothing until tokens refill."""
        proto, transport, clock = echoProtocol(rate=5, burst=5)
        for _ in range(50):
            proto.datagramReceived(b"x", CLIENT)
        self.assertEqual(len(transport.written), 5)
        self.assertEqual(proto.dropped["rate-limited"], 45)
        clock.advance(0.2)
        for _ in range(10):
            proto.datagramReceived(b"x", CLIENT)
        self.assertEqual(len(transport.written), 6)
        clock.advance(10)
        for _ in range(10):
            proto.datagramReceived(b"x", CLIENT)
        self.assertEqual(len(transport.written), 11)

    def test_rateLimitPerSource(self) -> None:
        """One source's limit does not touch another's."""
        proto, transport, _ = echoProtocol(rate=1, burst=1)
        proto.datagramReceived(b"a", CLIENT)
        proto.datagramReceived(b"a", CLIENT)
        proto.datagramReceived(b"b", ("198.51.100.1", 40000))
        self.assertEqual([d for d, _ in transport.written], [b"a", b"b"])

    def test_rateLimitIPv6Prefix(self) -> None:
        """IPv6 sources in one /64 share a bucket; another /64 has its own."""
        proto, transport, _ = echoProtocol(rate=1, burst=1)
        proto.datagramReceived(b"a", ("2001:db8::1", 40000))
        proto.datagramReceived(b"b", ("2001:db8::2", 40000))
        proto.datagramReceived(b"c", ("2001:db8:0:1::1", 40000))
        self.assertEqual([d for d, _ in transport.written], [b"a", b"c"])

    def test_noRateLimit(self) -> None:
        """A rate of 0 means no limit."""
        proto, transport, _ = echoProtocol(rate=0)
        for _ in range(1000):
            proto.datagramReceived(b"x", CLIENT)
        self.assertEqual(len(transport.written), 1000)

    def test_sharedLimiter(self) -> None:
        """Two listeners sharing a limiter give one source one budget."""
        clock = Clock()
        limiter = TokenBuckets(rate=1, burst=2, clock=clock)
        one, t1, _ = echoProtocol(clock, rateLimiter=limiter)
        two, t2, _ = echoProtocol(clock, rateLimiter=limiter)
        for proto in (one, two, one, two):
            proto.datagramReceived(b"x", CLIENT)
        self.assertEqual(len(t1.written) + len(t2.written), 2)

    def test_echoLoopEnds(self) -> None:
        """Two echo servers on different unlisted ports forged to talk to
        each other stop once the burst is spent."""
        clock = Clock()
        a, ta, _ = echoProtocol(clock, FakeDatagramTransport("192.0.2.1", 8007), burst=20)
        b, tb, _ = echoProtocol(clock, FakeDatagramTransport("192.0.2.2", 8008), burst=20)
        ta.peer, tb.peer = b, a
        a.datagramReceived(b"ping", ("192.0.2.2", 8008))
        self.assertEqual(a.datagramsEchoed + b.datagramsEchoed, 40)
        self.assertEqual(a.dropped["rate-limited"] + b.dropped["rate-limited"], 1)

    def test_sameEchoPortNeverLoops(self) -> None:
        """Two echo servers on the same port, as a fleet runs them, forged to
        talk to each other: the first datagram from the other's port (its
        own port number) gets no reply, so no loop starts, however slowly it
        would have turned."""
        clock = Clock()
        a, ta, _ = echoProtocol(clock, FakeDatagramTransport("192.0.2.1", 8007))
        b, tb, _ = echoProtocol(clock, FakeDatagramTransport("192.0.2.2", 8007))
        ta.peer, tb.peer = b, a
        a.datagramReceived(b"ping", ("192.0.2.2", 8007))
        self.assertEqual(a.datagramsEchoed + b.datagramsEchoed, 0)
        self.assertEqual(a.dropped["loop-port"], 1)

    def test_selfLoopNeverStarts(self) -> None:
        """A datagram forged to come from the listener's own address and
        port gets no reply: the server would be answering itself."""
        transport = FakeDatagramTransport("192.0.2.1", 8007)
        proto, _, _ = echoProtocol(transport=transport)
        transport.peer = proto
        proto.datagramReceived(b"ping", ("192.0.2.1", 8007))
        self.assertEqual((proto.datagramsEchoed, proto.dropped["loop-port"]), (0, 1))
        proto.datagramReceived(b"hello", CLIENT)
        self.assertEqual(transport.written, [(b"hello", CLIENT)])

    def test_slowLoopHeldToTheCap(self) -> None:
        """A loop with an echo server on another port that answers more
        slowly than the cap (20 ms away, 50 a second against 100) is not
        ended by it, but its replies never exceed the burst plus the rate
        over the time it runs."""
        clock = Clock()
        a, ta, _ = echoProtocol(clock, FakeDatagramTransport("192.0.2.1", 8007), rate=10, burst=5)
        slowPeer = ("192.0.2.2", 9000)
        answers: list[bytes] = []
        ta.peer = None

        def echoLater(data: bytes, addr: tuple[str, int]) -> None:
            ta.written.append((data, addr))
            answers.append(data)
            clock.callLater(0.020, a.datagramReceived, data, slowPeer)

        ta.write = echoLater  # type: ignore[method-assign]
        for _ in range(20):
            a.datagramReceived(b"ping", slowPeer)
        for _ in range(10 * 50):
            clock.advance(0.020)
        self.assertLessEqual(len(answers), 5 + 10 * 10)
        self.assertGreater(a.dropped["rate-limited"], 0)

    def test_dropLoggedOncePerInterval(self) -> None:
        """Drops from one source are logged once per interval, with the count unlogged."""
        rules = AccessRules(deny=[parseNetwork("192.0.2.0/24")])
        proto, _, clock = echoProtocol(rules=rules, logInterval=10)
        with capturedLogs() as events:
            for _ in range(5):
                proto.datagramReceived(b"x", CLIENT)
            clock.advance(10)
            proto.datagramReceived(b"x", CLIENT)
        dropped = [e for e in events if e.get("event") == "udp-dropped"]
        self.assertEqual(len(dropped), 2)
        first, second = dropped
        self.assertEqual(first["reason"], "denied")
        self.assertEqual(first["client_host"], "192.0.2.10")
        self.assertEqual(first["client_port"], 40000)
        self.assertEqual(first["listener"], "udp:7")
        self.assertEqual(first["suppressed"], 0)
        [more] = [e for e in events if e.get("event") == "udp-dropped-more"]
        self.assertEqual((more["suppressed"], more["reason"]), (4, "denied"))
        self.assertLess(events.index(more), events.index(second))
        self.assertEqual(second["suppressed"], 0)
        self.assertEqual(proto.dropped["denied"], 6)

    def test_unloggedDropsReportedWhenTheSourceGoesQuiet(self) -> None:
        """A flood that stops still gets its unlogged count in the log, one
        or two intervals later, without any further datagram."""
        proto, _, clock = echoProtocol(logInterval=10)
        with capturedLogs() as events:
            for _ in range(50):
                proto.datagramReceived(b"x", ("192.0.2.1", 19))
            clock.advance(9)
            self.assertEqual([e["event"] for e in events], ["udp-dropped"])
            clock.advance(11)
        self.assertEqual(
            [(e["event"], e["suppressed"]) for e in events],
            [("udp-dropped", 0), ("udp-dropped-more", 49)],
        )
        proto.stopProtocol()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_dropLogDefaultIntervalTenSeconds(self) -> None:
        """By default, drops from one source are logged at most once every
        10 seconds (docs/deployment.md), here and as the server builds the protocol."""
        config = EchoOptions()
        config.parseOptions(["--udp", "udp:7", "--deny", "192.0.2.0/24"])
        clock = MemoryReactorClock()
        top = makeService(config.config, clock)
        [built] = [child.protocol for child in top if isinstance(child, UDPListenerService)]
        built.makeConnection(cast(IUDPTransport, FakeDatagramTransport()))
        plain, _, plainClock = echoProtocol(rules=AccessRules(deny=[parseNetwork("192.0.2.0/24")]))
        for proto, protoClock in ((plain, plainClock), (built, clock)):
            with capturedLogs() as events:
                proto.datagramReceived(b"x", CLIENT)
                protoClock.advance(9.9)
                proto.datagramReceived(b"x", CLIENT)
                protoClock.advance(0.1)
                proto.datagramReceived(b"x", CLIENT)
            dropped = [
                (e["event"], e["suppressed"])
                for e in events
                if e["event"].startswith("udp-dropped")
            ]
            # The one held back is reported when the interval is over, by
            # the periodic flush, then the next drop is logged afresh.
            self.assertEqual(
                dropped, [("udp-dropped", 0), ("udp-dropped-more", 1), ("udp-dropped", 0)]
            )

    def test_unloggedDropsReported(self) -> None:
        """Drops counted but not logged are reported once the source's interval is over."""
        proto, _, clock = echoProtocol(logInterval=10)
        with capturedLogs() as events:
            for _ in range(3):
                proto.datagramReceived(b"x", ("192.0.2.1", 19))
            clock.advance(10)
            proto.datagramReceived(b"x", ("192.0.2.2", 7))
        self.assertEqual(
            [(e["event"], e["client_host"], e["suppressed"]) for e in events],
            [
                ("udp-dropped", "192.0.2.1", 0),
                ("udp-dropped-more", "192.0.2.1", 2),
                ("udp-dropped", "192.0.2.2", 0),
            ],
        )
        self.assertEqual(events[1]["reason"], "loop-port")

    def test_dropLogPerSource(self) -> None:
        """Each source gets its own log line."""
        proto, _, _ = echoProtocol()
        with capturedLogs() as events:
            proto.datagramReceived(b"x", ("192.0.2.1", 7))
            proto.datagramReceived(b"x", ("192.0.2.2", 19))
            proto.datagramReceived(b"x", ("192.0.2.2", 19))
        self.assertEqual(
            [(e["client_host"], e["reason"]) for e in events],
            [("192.0.2.1", "loop-port"), ("192.0.2.2", "loop-port")],
        )

    def test_noLogWhenEchoing(self) -> None:
        """Echoing logs nothing: no per-datagram work beyond counters."""
        proto, _, _ = echoProtocol()
        with capturedLogs() as events:
            for _ in range(10):
                proto.datagramReceived(b"x", CLIENT)
        self.assertEqual(events, [])

    def test_logMemoryBounded(self) -> None:
        """Log throttling tracks at most C{maxSources} sources and forgets stale ones."""
        proto, _, clock = echoProtocol(maxSources=10, logInterval=10)
        with capturedLogs() as events:
            for i in range(100):
                proto.datagramReceived(b"x", (f"192.0.2.{i}", 7))
        self.assertEqual(len(events), 10)
        self.assertEqual(proto.dropped["loop-port"], 100)
        clock.advance(10)
        proto.datagramReceived(b"x", ("198.51.100.1", 7))
        self.assertEqual(len(proto.dropLog), 1)

    def test_stopLogsSummary(self) -> None:
        """Stopping logs the counters as named fields."""
        proto, _, _ = echoProtocol()
        proto.datagramReceived(b"abc", CLIENT)
        proto.datagramReceived(b"x", ("192.0.2.1", 7))
        with capturedLogs() as events:
            proto.doStop()
        [event] = events
        self.assertEqual(event["event"], "udp-stopped")
        self.assertEqual(event["datagrams"], 1)
        self.assertEqual(event["bytes"], 3)
        self.assertEqual(event["dropped_loop_port"], 1)
        self.assertEqual(event["dropped_total"], 1)


class FakeUDPReactor:
    """
    Records C{listenUDP} calls; fails them with C{error} if set.
    """

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.ports: list[FakeUDPPort] = []
        self.error: Exception | None = None

    def listenUDP(
        self, port: int, protocol: DatagramProtocol, interface: str = "", maxPacketSize: int = 8192
    ) -> FakeUDPPort:
        if self.error is not None:
            raise self.error
        self.calls.append(
            {"port": port, "protocol": protocol, "interface": interface, "size": maxPacketSize}
        )
        host = interface or "0.0.0.0"
        address = (IPv6Address if ":" in host else IPv4Address)("UDP", host, port or 43210)
        self.ports.append(FakeUDPPort(address))
        return self.ports[-1]


def asReactor(fake: FakeUDPReactor) -> IReactorUDP:
    return cast(IReactorUDP, fake)


class UDPListenerServiceTests(SynchronousTestCase):
    """
    L{UDPListenerService} listens with the full datagram size, logs the bound
    address and turns a failure into a one-line exit.
    """

    def test_listens(self) -> None:
        """Listening reads whole datagrams on the listener's interface and port."""
        fake = FakeUDPReactor()
        proto = UDPEchoProtocol(clock=Clock())
        service = UDPListenerService(
            parseUDPListener(r"udp6:7:interface=\:\:1"), proto, asReactor(fake)
        )
        service.privilegedStartService()
        service.startService()
        [call] = fake.calls
        self.assertEqual(call["port"], 7)
        self.assertEqual(call["interface"], "::1")
        self.assertIs(call["protocol"], proto)
        self.assertGreaterEqual(call["size"], 65535)
        self.assertEqual(MAX_DATAGRAM, 65535)
        self.assertEqual(proto.listener, r"udp6:7:interface=\:\:1")
        self.assertEqual(service.listener.name, r"udp6:7:interface=\:\:1")

    def test_logsBoundPort(self) -> None:
        """The log names the port actually bound, so port 0 reports its real port."""
        fake = FakeUDPReactor()
        service = UDPListenerService(
            parseUDPListener("udp:0:interface=127.0.0.1"),
            UDPEchoProtocol(clock=Clock()),
            asReactor(fake),
        )
        with capturedLogs() as events:
            service.startService()
        [event] = [e for e in events if e.get("event") == "listening"]
        self.assertEqual(event["listener"], "udp:0:interface=127.0.0.1")
        self.assertEqual(event["host"], "127.0.0.1")
        self.assertEqual(event["port"], 43210)
        self.assertEqual(event["address"], "127.0.0.1:43210")
        self.assertEqual(event["transport"], "udp")

    def test_failureExits(self) -> None:
        """A port that cannot be bound ends the process with a one-line message."""
        fake = FakeUDPReactor()
        fake.error = CannotListenError("127.0.0.1", 7, OSError(errno.EADDRINUSE, "in use"))
        service = UDPListenerService(
            parseUDPListener("udp:7:interface=127.0.0.1"),
            UDPEchoProtocol(clock=Clock()),
            asReactor(fake),
        )
        with self.assertRaises(SystemExit) as raised:
            service.privilegedStartService()
        message = str(raised.exception)
        self.assertTrue(message.startswith("echotw: cannot listen on udp:7:interface=127.0.0.1: "))
        self.assertIn("in use", message)
        self.assertNotIn("\n", message)

    def test_stop(self) -> None:
        """Stopping the service stops listening; stopping twice is harmless."""
        fake = FakeUDPReactor()
        service = UDPListenerService(
            parseUDPListener("udp:7"), UDPEchoProtocol(clock=Clock()), asReactor(fake)
        )
        service.startService()
        self.successResultOf(service.stopService())
        self.assertTrue(fake.ports[0].stopped)
        self.successResultOf(service.stopService())

    def test_keepsGivenListenerName(self) -> None:
        """A protocol that already has a listener name keeps it."""
        proto = UDPEchoProtocol(clock=Clock(), listener="echo")
        UDPListenerService(parseUDPListener("udp:7"), proto, asReactor(FakeUDPReactor()))
        self.assertEqual(proto.listener, "echo")
