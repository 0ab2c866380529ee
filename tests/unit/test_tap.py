"""
Tests for the C{twistd echo} options and the service tree they build.
"""

from __future__ import annotations

import re
import socket

from twisted.application.service import IServiceCollection
from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail, succeed
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock as MemoryReactor
from twisted.internet.testing import StringTransport, StringTransportWithDisconnection
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from echotw.endpoints import listenerDescription
from echotw.factory import EchoFactory
from echotw.listening import ListenFailed
from echotw.options import EchoOptions
from echotw.proxyprotocol import ProxyProtocolEndpoint, ProxyProtocolFactory
from echotw.service import EchoService, ListenerService
from echotw.tap import Options, makeService
from echotw.udp import UDPListenerService
from tests.support.fakes import AbortableTransport, FakeDatagramTransport, FakePort


def parse(*args: str) -> EchoOptions:
    options = EchoOptions()
    options.parseOptions(list(args))
    return options


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """With no options: TCP 8080 on all interfaces, no limits, no rules,
        a backlog that absorbs bursts."""
        options = parse()
        self.assertEqual(
            list(options.config.listeners), [("tcp:8080", f"tcp:8080:backlog={socket.SOMAXCONN}")]
        )
        self.assertEqual(options["allow"], [])
        self.assertEqual(options["deny"], [])
        self.assertEqual(options["max-connections"], 0)
        self.assertEqual(options["max-per-ip"], 0)
        self.assertEqual(options["ipv6-prefix"], 64)
        self.assertEqual(options["shutdown-timeout"], 10.0)
        self.assertGreaterEqual(options["backlog"], 1024)

    def test_repeatablePorts(self) -> None:
        """--port and -p add listeners; bare numbers get --interface and
        --backlog, endpoint strings keep their own settings."""
        options = parse(
            "-p", "7", "--port", "tcp:9:backlog=5", "-p", "unix:/tmp/x.sock",
            "--interface", "127.0.0.1", "--backlog", "100",
        )  # fmt: skip
        self.assertEqual(
            list(options.config.listeners),
            [
                ("tcp:7:interface=127.0.0.1", "tcp:7:interface=127.0.0.1:backlog=100"),
                ("tcp:9:backlog=5", "tcp:9:backlog=5"),
                ("unix:/tmp/x.sock", "unix:/tmp/x.sock"),
            ],
        )

    def test_udpAloneNoDefaultPort(self) -> None:
        """--udp alone means no TCP listener; with neither, TCP 8080."""
        self.assertEqual(parse("--udp", "7").config.listeners, ())
        self.assertEqual(parse().config.listeners[0].name, "tcp:8080")

    def test_listenerNames(self) -> None:
        """name= names a listener (and is not passed to Twisted); a TLS
        listener's name leaves out its key and certificate paths."""
        [named] = parse("-p", "tcp:7:interface=127.0.0.1:name=edge").config.listeners
        self.assertEqual(named, ("edge", "tcp:7:interface=127.0.0.1:backlog=4096"))
        [proxied] = parse("-p", "haproxy:tcp:7:name=lb").config.listeners
        self.assertEqual(proxied, ("lb", "haproxy:tcp:7:backlog=4096"))
        for bad in ["tcp:7:name=", "tcp:7:name=a:name=b"]:
            with self.assertRaises(UsageError, msg=bad):
                parse("-p", bad)

    def test_systemdNameIsTheSocketsName(self) -> None:
        """In a systemd: string name= names the inherited socket and stays."""
        from echotw.endpoints import _takeName

        description = "systemd:domain=INET:name=echo"
        self.assertEqual(_takeName(description), (description, description))

    def test_tlsNameLeavesOutPaths(self) -> None:
        """A TLS listener is named by its port, not its key files."""
        from echotw.endpoints import _takeName

        self.assertEqual(
            _takeName("ssl:8443:privateKey=/k.pem:certKey=/c.pem:interface=127.0.0.1")[0],
            "ssl:8443:interface=127.0.0.1",
        )

    def test_endpointBacklogChecked(self) -> None:
        """backlog= inside an endpoint string is a whole number 1-65535."""
        for bad in ["tcp:7:backlog=0", "tcp:7:backlog=99999999999999", "tcp:7:backlog=x"]:
            with self.assertRaises(UsageError, msg=bad) as ctx:
                parse("-p", bad)
            self.assertIn("backlog", str(ctx.exception))

    def test_ipv6Interface(self) -> None:
        """An IPv6 interface makes bare ports tcp6 with escaped colons."""
        options = parse("-p", "7", "-i", "::1")
        self.assertEqual(options.config.listeners[0].name, "tcp6:7:interface=\\:\\:1")

    def test_rules(self) -> None:
        """--allow and --deny repeat and take both families."""
        options = parse("--allow", "10.0.0.0/8", "--allow", "2001:db8::/32", "--deny", "10.1.1.1")
        self.assertEqual([str(n) for n in options["allow"]], ["10.0.0.0/8", "2001:db8::/32"])
        self.assertEqual([str(n) for n in options["deny"]], ["10.1.1.1/32"])

    def test_mappedRules(self) -> None:
        """A rule written in IPv4-mapped form is the IPv4 rule it means."""
        options = parse("--deny", "::ffff:127.0.0.0/104", "--allow", "::ffff:10.0.0.1")
        self.assertEqual([str(n) for n in options["deny"]], ["127.0.0.0/8"])
        self.assertEqual([str(n) for n in options["allow"]], ["10.0.0.1/32"])

    def test_limits(self) -> None:
        """Numeric options are coerced."""
        options = parse(
            "--max-connections", "5", "--max-per-ip", "2", "--ipv6-prefix", "56",
            "--shutdown-timeout", "1.5",
        )  # fmt: skip
        self.assertEqual(
            (options["max-connections"], options["max-per-ip"], options["ipv6-prefix"]),
            (5, 2, 56),
        )
        self.assertEqual(options["shutdown-timeout"], 1.5)

    def test_badValuesNameTheOption(self) -> None:
        """Every bad value is a UsageError that names its option."""
        cases = [
            (["--allow", "10.1.2.3/8"], "--allow"),
            (["--deny", "nonsense"], "--deny"),
            (["--max-connections", "-1"], "--max-connections"),
            (["--max-per-ip", "many"], "--max-per-ip"),
            (["--backlog", "0"], "--backlog"),
            (["--ipv6-prefix", "129"], "--ipv6-prefix"),
            (["--shutdown-timeout", "-2"], "--shutdown-timeout"),
            (["--shutdown-timeout", "nan"], "--shutdown-timeout"),
            (["--port", "foo:1"], "--port"),
            (["--port", "tcp:notaport"], "--port"),
            (["--port", "haproxy:haproxy:tcp:7"], "--port"),
            (["--port", "tcp:80:bogus=1"], "--port"),
            (["--port", "70000"], "--port"),
            (["--port", "tcp6:99999"], "--port"),
            (["--port", ""], "--port"),
            (["--udp", "udp:notaport"], "--udp"),
            (["--udp", "tcp:7"], "--udp"),
            (["--udp", "udp:7:bogus=1"], "--udp"),
            (["--udp-rate", "-1"], "--udp-rate"),
            (["--udp-burst", "0"], "--udp-burst"),
            (["--trusted-proxy", "10.0.0.1/8"], "--trusted-proxy"),
            (["--proxy-timeout", "0"], "--proxy-timeout"),
            (["--log-level", "loud"], "--log-level"),
            (["--metrics", "nonsense:1"], "--metrics"),
            (["--workers", "65"], "--workers"),
        ]
        for args, option in cases:
            with self.assertRaises(UsageError, msg=args) as ctx:
                parse(*args)
            self.assertIn(option, str(ctx.exception))
            self.assertNotIn("\n", str(ctx.exception))

    def test_optionErrorsWholeLine(self) -> None:
        """A value that fails its parser gives one line: the option, the
        value where the parser's message does not quote it, the reason."""
        cases = [
            (["--port", "tcp:7x"], "--port: 'tcp:7x': invalid literal for int()"),
            (["--udp", "tcp:7"], "--udp: 'tcp:7': unknown UDP listener type 'tcp'"),
            (["--metrics", "nonsense:1"], "--metrics: 'nonsense:1': Unknown endpoint type"),
            (["--health", "nonsense:1"], "--health: 'nonsense:1': Unknown endpoint type"),
            (["--verifier", "os"], "--verifier: 'os' is not callable"),
            (["--allow", "nonsense"], "--allow: 'nonsense' is not an IP address"),
            (["--trusted-proxy", "10.0.0.1/8"], "--trusted-proxy: '10.0.0.1/8' is not an IP"),
        ]
        for args, start in cases:
            with self.assertRaises(UsageError, msg=args) as ctx:
                parse(*args)
            self.assertTrue(str(ctx.exception).startswith(start), str(ctx.exception))

    def test_udpAndProxyOptions(self) -> None:
        """UDP listeners take --interface for bare numbers; PROXY settings
        are parsed."""
        options = parse(
            "--udp", "7", "--udp", "udp6:9:interface=\\:\\:1", "-i", "127.0.0.1",
            "--udp-rate", "5/s", "--udp-burst", "10",
            "--trusted-proxy", "10.0.0.0/8", "--proxy-timeout", "2.5",
        )  # fmt: skip
        self.assertEqual(
            [(u.port, u.interface, u.ipv6) for u in options.config.udpListeners],
            [(7, "127.0.0.1", False), (9, "::1", True)],
        )
        self.assertEqual((options["udp-rate"], options["udp-burst"]), (5.0, 10.0))
        self.assertEqual([str(n) for n in options["trusted-proxy"]], ["10.0.0.0/8"])
        self.assertEqual(options["proxy-timeout"], 2.5)

    def test_commandLineErrorIsOneLine(self) -> None:
        """The twistd-facing Options end with a one-line message, not a page
        of usage text."""
        with self.assertRaises(SystemExit) as ctx:
            Options().parseOptions(["--max-per-ip", "-3"])
        message = str(ctx.exception.code)
        self.assertIn("--max-per-ip", message)
        self.assertNotIn("\n", message)

    def test_listenerDescriptionKeepsExplicitBacklog(self) -> None:
        """A backlog given in the endpoint string is left alone."""
        self.assertEqual(
            listenerDescription("tcp:1:backlog=3", "", 99).description, "tcp:1:backlog=3"
        )
        self.assertEqual(
            listenerDescription("haproxy:tcp:1", "", 99).description, "haproxy:tcp:1:backlog=99"
        )


class DocumentedDefaultsTests(SynchronousTestCase):
    """
    Defaults docs/options.md promises, checked on what a server built from an empty
    command line does (on a fake reactor that is also its clock).
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactor()

    def build(self, *args: str, listen: bool = True) -> EchoService:
        top = makeService(parse(*args), self.reactor)
        if listen:
            top.privilegedStartService()
        return top

    def test_logConnections100(self) -> None:
        """--log-connections defaults to 100: the 101st connection in a
        second is not logged one by one, and the next second says so."""
        factory = self.build("-p", "tcp:7001").factory
        with capturedLogs() as events:
            for port in range(101):
                p = factory.buildProtocolFor(IPv4Address("TCP", "10.0.0.1", port), "tcp:7001")
                assert p is not None
                p.makeConnection(StringTransport())
            self.reactor.advance(1)
            p = factory.buildProtocolFor(IPv4Address("TCP", "10.0.0.1", 999), "tcp:7001")
            assert p is not None
            p.makeConnection(StringTransport())
        named = [e["event"] for e in events]
        self.assertEqual(named[:100], ["connected"] * 100)
        self.assertEqual(named[100:], ["connections-unlogged", "connected"])
        self.assertEqual(events[100]["unlogged"], 1)

    def test_udpBurst200(self) -> None:
        """--udp-burst defaults to 200: a source gets 200 replies at once,
        then none until the rate refills."""
        top = self.build("-p", "tcp:7001", "--udp", "udp:7002", listen=False)
        [udp] = [child for child in top if isinstance(child, UDPListenerService)]
        protocol = udp.protocol
        transport = FakeDatagramTransport()
        protocol.transport = transport  # type: ignore[assignment]
        sent = transport.written
        for _ in range(250):
            protocol.datagramReceived(b"x", ("192.0.2.1", 40000))
        self.assertEqual(len(sent), 200)

    def test_proxyTimeout5(self) -> None:
        """--proxy-timeout defaults to 5 seconds: a trusted balancer that
        sends no PROXY header is aborted 5 seconds after connecting."""
        self.build("-p", "haproxy:tcp:7001")
        [(_, factory, _, _)] = self.reactor.tcpServers
        balancer = IPv4Address("TCP", "127.0.0.1", 40000)
        protocol = factory.buildProtocol(balancer)
        transport = StringTransportWithDisconnection(peerAddress=balancer)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.reactor.advance(4.99)
        self.assertTrue(transport.connected)
        self.reactor.advance(0.01)
        self.assertFalse(transport.connected)


class MakeServiceTests(SynchronousTestCase):
    def test_serviceTree(self) -> None:
        """One ListenerService per listener under an EchoService, sharing one
        factory; nothing listens until started."""
        reactor = MemoryReactor()
        options = parse("-p", "tcp:7001:interface=127.0.0.1", "-p", "7002", "--max-per-ip", "3")
        top = makeService(options, reactor)
        self.assertIsInstance(top, EchoService)
        children = list(IServiceCollection(top))
        self.assertEqual(
            [c.description for c in children], ["tcp:7001:interface=127.0.0.1", "tcp:7002"]
        )
        self.assertEqual(reactor.tcpServers, [])
        factories = [c.factory for c in children]
        self.assertIs(factories[0].echo, factories[1].echo)
        self.assertEqual(factories[0].echo.maxPerSource, 3)

        top.privilegedStartService()
        top.startService()
        ports = [(port, backlog, interface) for port, _, backlog, interface in reactor.tcpServers]
        self.assertEqual(
            ports, [(7001, socket.SOMAXCONN, "127.0.0.1"), (7002, socket.SOMAXCONN, "")]
        )

    def test_udpAndProxyListeners(self) -> None:
        """--udp adds UDP listener services; haproxy: listeners use echotw's
        PROXY protocol wrapper with the trusted networks and timeout."""
        reactor = MemoryReactor()
        options = parse(
            "-p", "haproxy:tcp:7001", "--udp", "udp:7002:interface=127.0.0.1",
            "--trusted-proxy", "192.0.2.0/24", "--proxy-timeout", "3",
        )  # fmt: skip
        top = makeService(options, reactor)
        children = list(IServiceCollection(top))
        self.assertIsInstance(children[0].endpoint, ProxyProtocolEndpoint)
        self.assertEqual(children[0].endpoint.timeout, 3.0)
        self.assertIsInstance(children[1], UDPListenerService)
        children[0].privilegedStartService()
        [(port, proxyFactory, _, _)] = reactor.tcpServers
        self.assertEqual(port, 7001)
        self.assertIsInstance(proxyFactory, ProxyProtocolFactory)
        self.assertFalse(proxyFactory.isTrusted(IPv4Address("TCP", "127.0.0.1", 1)))
        self.assertTrue(proxyFactory.isTrusted(IPv4Address("TCP", "192.0.2.9", 1)))
        self.assertEqual(children[1].listener[:2], (7002, "127.0.0.1"))
        self.assertEqual(children[1].protocol.rateLimiter.rate, 100.0)

    def test_listenerNamesInConnections(self) -> None:
        """Connections built by a listener's factory carry its name."""
        reactor = MemoryReactor()
        top = makeService(parse("-p", "tcp:7001"), reactor)
        top.privilegedStartService()
        factory = reactor.tcpServers[0][1]
        p = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5))
        self.assertEqual(p.listener, "tcp:7001")


class FakeEndpoint:
    def __init__(self, result: object) -> None:
        self.result = result

    def listen(self, factory: object) -> object:
        return self.result


class ListenerServiceTests(SynchronousTestCase):
    def test_logsBoundAddress(self) -> None:
        """The address actually bound is logged (tcp:0 reports its port)."""
        svc = ListenerService("tcp:0", FakeEndpoint(succeed(FakePort())), EchoFactory())  # type: ignore[arg-type]
        with capturedLogs() as events:
            svc.privilegedStartService()
        [event] = events
        self.assertEqual(
            (event["event"], event["port"], event["listener"]), ("listening", 43210, "tcp:0")
        )
        self.assertEqual(event["address"], "127.0.0.1:43210")

    def test_failureIsOneLineExit(self) -> None:
        """A listener that cannot bind stops start-up with a one-line message
        naming it."""
        why = CannotListenError("127.0.0.1", 7, OSError(98, "Address already in use"))
        svc = ListenerService("tcp:7", FakeEndpoint(fail(why)), EchoFactory())  # type: ignore[arg-type]
        with self.assertRaises(ListenFailed) as ctx:
            svc.privilegedStartService()
        self.assertIsInstance(ctx.exception, SystemExit)
        message = str(ctx.exception.code)
        self.assertIn("tcp:7", message)
        self.assertIn("Address already in use", message)
        self.assertNotIn("\n", message)

    def test_noDelaySetOnListeningSocket(self) -> None:
        """On Linux TCP_NODELAY is set once on the listening socket (accepted
        sockets inherit it), so connections skip setting it themselves."""
        import sys

        if not sys.platform.startswith("linux"):
            raise SkipTest("Linux copies TCP_NODELAY to accepted sockets")
        port = FakePort()
        port.socket = socket.socket()  # type: ignore[attr-defined]
        self.addCleanup(port.socket.close)  # type: ignore[attr-defined]
        listener = EchoFactory().forListener("tcp:0")
        ListenerService("tcp:0", FakeEndpoint(succeed(port)), listener).privilegedStartService()  # type: ignore[arg-type]
        self.assertEqual(port.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)  # type: ignore[attr-defined]
        p = listener.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        self.assertFalse(p.noDelay)

    def test_stopStopsListening(self) -> None:
        """Stopping the service closes the port."""
        port = FakePort()
        svc = ListenerService("tcp:0", FakeEndpoint(succeed(port)), EchoFactory())  # type: ignore[arg-type]
        svc.startService()
        self.successResultOf(svc.stopService())
        self.assertTrue(port.stopped)


class DrainTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.factory = EchoFactory()
        self.service = EchoService(self.factory, self.clock, shutdownTimeout=2.0)

    def connect(self) -> tuple[object, AbortableTransport]:
        p = self.factory.buildProtocolFor(IPv4Address("TCP", "10.0.0.1", 1), "l")
        assert p is not None
        t = AbortableTransport()
        p.makeConnection(t)
        return p, t

    def test_noConnections(self) -> None:
        """With nothing open, stopping is immediate."""
        self.successResultOf(self.service.stopService())

    def test_quietConnectionsFinishBusyOnesLater(self) -> None:
        """Quiet connections close gracefully at once; one still receiving
        data is left to echo it; once most of the timeout has passed it is
        closed gracefully too (what follows is discarded, not echoed); at
        the deadline the rest are aborted."""
        quiet, quietT = self.connect()
        busy, busyT = self.connect()
        d = self.service.stopService()
        self.assertNoResult(d)
        for _ in range(5):
            busy.dataReceived(b"more")  # type: ignore[attr-defined]
            self.clock.advance(0.1)
        self.assertTrue(quietT.disconnecting)
        self.assertEqual(quiet.closeReason, "server shutdown")  # type: ignore[attr-defined]
        self.assertFalse(busyT.disconnecting)
        quiet.connectionLost(Failure(ConnectionDone()))  # type: ignore[attr-defined]
        for _ in range(4):
            busy.dataReceived(b"more")  # type: ignore[attr-defined]
            self.clock.advance(0.1)
        self.assertFalse(busyT.disconnecting)
        for _ in range(16):
            busy.dataReceived(b"more")  # type: ignore[attr-defined]
            self.clock.advance(0.1)
        self.assertTrue(busyT.disconnecting)
        self.assertTrue(busyT.aborted)
        busy.connectionLost(Failure(ConnectionDone()))  # type: ignore[attr-defined]
        self.clock.advance(0.1)
        self.successResultOf(d)
        echoed = busyT.value()
        self.assertIn(echoed, [b"more" * 9, b"more" * 10, b"more" * 11])
        self.assertEqual(len(echoed) + busy.bytesDiscarded, 4 * 25)  # type: ignore[attr-defined]


class HelpTests(SynchronousTestCase):
    def usage(self) -> str:
        return EchoOptions().getUsage(width=80)

    def test_groups(self) -> None:
        """--help lists the options under docs/options.md's groups, in order."""
        text = self.usage()
        headings = [
            "Listeners (echotw ",
            "Who may connect:",
            "Limits:",
            "Shutdown:",
            "Logs and metrics:",
            "Impairment (",
            "Other:",
        ]
        positions = [text.index(heading) for heading in headings]
        self.assertEqual(positions, sorted(positions))

    def test_everyOptionOnce(self) -> None:
        """Every option is in exactly one group; one left out is an error."""
        from echotw.helptext import HELP_GROUPS, groupedUsage

        text = self.usage()
        for opt in EchoOptions().longOpt:
            label = rf"^  (?:-\w, |    )--{re.escape(opt.rstrip('='))}(?: |$)"
            self.assertEqual(len(re.findall(label, text, re.MULTILINE)), 1, opt)
        with self.assertRaises(ValueError):
            groupedUsage(EchoOptions(), HELP_GROUPS[:-1])

    def test_defaultsAsPeopleWriteThem(self) -> None:
        """Whole-number defaults show as integers, empty ones not at all,
        and the help points at nothing a pip user does not have."""
        text = self.usage()
        self.assertRegex(text, r"--burst N\s+New connections[^\[]*\[default: 10\]\.")
        self.assertRegex(text, r"--udp-rate N\[/s\][^\[]*\[default:\s+100\]\.")
        self.assertNotIn("[default: ]", text)
        self.assertNotRegex(text, r"\[default: \d+\.0\]")
        self.assertNotIn("README", text)
