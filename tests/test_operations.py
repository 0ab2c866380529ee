"""
Unit tests for the controls an operator relies on: idle timeouts, session
limits, connection rates, rule files and their reload, custom verifiers,
the stats line.  Clock-driven, no network.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import textwrap

from twisted.internet import tcp
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from echotw.factory import EchoFactory
from echotw.options import EchoOptions
from echotw.policy import loadVerifier
from echotw.protocol import EchoProtocol
from echotw.ratelimit import TokenBuckets
from echotw.rulefiles import RuleFileError, RuleSource, readRuleFile
from echotw.service import EchoService
from tests.fakes import AbortableTransport
from tests.process import temporaryDirectory


def client(host: str = "10.0.0.1", port: int = 40000) -> IPv4Address:
    return IPv4Address("TCP", host, port)


def connect(factory: EchoFactory, addr: object = None) -> tuple[EchoProtocol, AbortableTransport]:
    p = factory.buildProtocolFor(addr or client(), "l")  # type: ignore[arg-type]
    assert p is not None
    t = AbortableTransport()
    p.makeConnection(t)
    return p, t


def writeFile(test: SynchronousTestCase, text: str) -> str:
    """
    A rule file with C{text}, removed when C{test} ends.
    """
    fd, path = tempfile.mkstemp(suffix=".rules")
    test.addCleanup(os.remove, path)
    with os.fdopen(fd, "w") as f:
        f.write(textwrap.dedent(text))
    return path


class IdleTimeoutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.factory = EchoFactory(clock=self.clock)
        self.service = EchoService(self.factory, self.clock, 1.0, idleTimeout=10.0)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def test_idleConnectionAborted(self) -> None:
        """A connection with no traffic is aborted, reason 'timeout', within
        one sweep (2.5 s here) after the timeout."""
        p, t = connect(self.factory)
        self.clock.advance(2.5)
        self.clock.advance(2.5)
        self.clock.advance(2.5)
        self.assertFalse(t.aborted)
        for _ in range(4):
            self.clock.advance(2.5)
        self.assertTrue(t.aborted)
        self.assertEqual(p.closeReason, "timeout")

    def test_trafficKeepsItOpen(self) -> None:
        """Echoed bytes reset the idle clock."""
        p, t = connect(self.factory)
        for _ in range(20):
            p.dataReceived(b"x")
            self.clock.advance(2.5)
        self.assertFalse(t.aborted)

    def test_stalledReaderAborted(self) -> None:
        """A peer that stopped reading while its echo is queued (so the
        server has paused reading from it) is idle too, and is aborted: a
        graceful close could never finish.  On a real socket whose other
        end never reads, driven by a fake reactor."""
        reactor = MemoryReactorClock()
        factory = EchoFactory(clock=reactor)
        service = EchoService(factory, reactor, 1.0, idleTimeout=10.0)
        service.startService()
        near, far = socket.socketpair()
        self.addCleanup(near.close)
        self.addCleanup(far.close)
        near.setblocking(False)
        # (No TCP_NODELAY: a socket pair is not TCP.)
        p = factory.buildProtocolFor(client(), "l", noDelay=False)
        assert p is not None
        transport = tcp.Connection(near, p, reactor)
        transport.connected = True
        p.makeConnection(transport)
        p.dataReceived(b"y" * 4 * 1024 * 1024)
        self.assertTrue(transport.producerPaused, "the echo should be stuck in the buffer")
        with capturedLogs() as events:
            for _ in range(6):
                reactor.advance(2.5)
        self.assertEqual(factory.stats.openConnections, 0)
        [closed] = [e for e in events if e.get("event") == "closed"]
        self.assertEqual(closed["reason"], "timeout")

    def test_disabled(self) -> None:
        """With 0 there is no sweep at all."""
        service = EchoService(self.factory, self.clock, 1.0, idleTimeout=0)
        service.startService()
        self.assertNotIn(service.sweepIdle, [loop.f for loop in service._loops])


class SessionLimitTests(SynchronousTestCase):
    def test_maxBytesClosesAfterEchoing(self) -> None:
        """At the byte limit the connection closes gracefully, having echoed
        exactly the limit: the read that crosses it is echoed up to it, and
        the rest counted as discarded."""
        factory = EchoFactory(maxSessionBytes=10, clock=Clock())
        p, t = connect(factory)
        p.dataReceived(b"12345")
        self.assertFalse(t.disconnecting)
        p.dataReceived(b"6789012")
        self.assertEqual(t.value(), b"1234567890")
        self.assertTrue(t.disconnecting)
        self.assertFalse(t.aborted)
        self.assertEqual(p.closeReason, "max-session-bytes")
        self.assertEqual((p.bytesReceived, p.bytesDiscarded), (10, 2))

    def test_maxSecondsClosesAndTimerCancelled(self) -> None:
        """After the session time the connection closes gracefully; a
        connection that closed earlier leaves no timer behind."""
        clock = Clock()
        factory = EchoFactory(maxSessionSeconds=30, clock=clock)
        p, t = connect(factory)
        early, _ = connect(factory)
        early.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(29.9)
        self.assertFalse(t.disconnecting)
        clock.advance(0.2)
        self.assertTrue(t.disconnecting)
        self.assertEqual(p.closeReason, "max-session-seconds")
        with capturedLogs() as events:
            p.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(events[0]["reason"], "max-session-seconds")


class ConnectionRateTests(SynchronousTestCase):
    def test_rateRefusesAndRefills(self) -> None:
        """Past the burst, connections from a source are refused until the
        bucket refills; other sources are unaffected."""
        clock = Clock()
        factory = EchoFactory(connectionRate=TokenBuckets(2, 3, clock), clock=clock)
        built = [factory.buildProtocolFor(client(), "l") for _ in range(5)]
        self.assertEqual([p is not None for p in built], [True] * 3 + [False] * 2)
        self.assertEqual(factory.stats.refusals, {"rate": 2})
        self.assertIsNotNone(factory.buildProtocolFor(client("10.0.0.2"), "l"))
        clock.advance(0.5)
        self.assertIsNotNone(factory.buildProtocolFor(client(), "l"))
        self.assertIsNone(factory.buildProtocolFor(client(), "l"))

    def test_ipv6ByPrefixAndMappedAsIPv4(self) -> None:
        """IPv6 sources share a bucket per /64; ::ffff:127.0.0.1 and
        127.0.0.1 are one source."""
        clock = Clock()
        factory = EchoFactory(connectionRate=TokenBuckets(1, 1, clock), clock=clock)
        self.assertIsNotNone(factory.buildProtocolFor(IPv6Address("TCP", "2001:db8::1", 1), "l"))
        self.assertIsNone(factory.buildProtocolFor(IPv6Address("TCP", "2001:db8::2", 1), "l"))
        self.assertIsNotNone(factory.buildProtocolFor(client("127.0.0.1"), "l"))
        self.assertIsNone(factory.buildProtocolFor(IPv6Address("TCP", "::ffff:127.0.0.1", 1), "l"))

    def test_refusalLogThrottledPerSource(self) -> None:
        """A flood of refusals logs one line per source per second, then
        says how many it held back."""
        clock = Clock()
        factory = EchoFactory(connectionRate=TokenBuckets(1, 1, clock), clock=clock)
        with capturedLogs() as events:
            for _ in range(100):
                factory.buildProtocolFor(client(), "l")
            factory.buildProtocolFor(client("10.0.0.9"), "l")
            factory.buildProtocolFor(client("10.0.0.9"), "l")
            clock.advance(1.0)
            factory.buildProtocolFor(client(), "l")
            factory.buildProtocolFor(client(), "l")
        refused = [e for e in events if e.get("event") == "refused"]
        self.assertEqual(
            [(e["client_host"], e["unlogged"]) for e in refused],
            [("10.0.0.1", 0), ("10.0.0.9", 0), ("10.0.0.1", 98)],
        )
        self.assertEqual(factory.stats.refusals, {"rate": 101})

    def test_quietFloodStillReported(self) -> None:
        """When a flood of refusals stops, the running server logs how many
        it held back within two seconds, with the last one's reason."""
        clock = Clock()
        factory = EchoFactory(connectionRate=TokenBuckets(1, 1, clock), clock=clock)
        service = EchoService(factory, clock, 1.0)
        service.startService()
        with capturedLogs() as events:
            for _ in range(100):
                factory.buildProtocolFor(client(), "tcp:7")
            clock.advance(2.0)
        self.assertEqual(
            [(e["event"], e["unlogged"]) for e in events],
            [("refused", 0), ("unlogged", 98)],  # 99 refused: one line, 98 held
        )
        self.assertEqual(
            (events[1]["source"], events[1]["last"]), ("10.0.0.1", "refused on tcp:7: rate")
        )
        service.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_unixClientsNotRateLimited(self) -> None:
        """Clients without an IP have no source to rate-limit."""
        clock = Clock()
        factory = EchoFactory(connectionRate=TokenBuckets(1, 1, clock), clock=clock)
        for _ in range(5):
            self.assertIsNotNone(factory.buildProtocolFor(UNIXAddress(b"/s"), "unix:/s"))


class RuleFileTests(SynchronousTestCase):
    def test_parse(self) -> None:
        """Addresses and networks of both families, comments and blank lines."""
        path = writeFile(
            self,
            """
            # office
            192.0.2.0/24   # the LAN
            2001:db8::/32

            203.0.113.7
            """,
        )
        self.assertEqual(
            [str(n) for n in readRuleFile(path)],
            ["192.0.2.0/24", "2001:db8::/32", "203.0.113.7/32"],
        )

    def test_errorNamesFileAndLine(self) -> None:
        """A bad line is an error naming the file and the line number."""
        path = writeFile(self, "10.0.0.0/8\n\n10.1.2.3/8\n")
        with self.assertRaises(RuleFileError) as ctx:
            readRuleFile(path)
        self.assertIn(f"{path}:3:", str(ctx.exception))
        missing = path + ".missing"
        with self.assertRaises(RuleFileError) as ctx:
            readRuleFile(missing)
        self.assertIn(missing, str(ctx.exception))

    def test_emptyAllowFileAdmitsNobody(self) -> None:
        """An allow file with no entries still restricts to those listed."""
        rules = RuleSource(allowFiles=[writeFile(self, "# nobody yet\n")]).load()
        self.assertEqual(rules(client(), "l"), "not allowed")

    def test_largeFile(self) -> None:
        """100,000 networks load and match exactly."""
        path = writeFile(
            self,
            "".join(f"10.{i >> 8 & 255}.{i & 255}.{i >> 16 << 7}/25\n" for i in range(100_000)),
        )
        rules = RuleSource(allowFiles=[path]).load()
        self.assertEqual(len(rules.allow), 100_000)
        self.assertIsNone(rules(client("10.3.7.100"), "l"))
        self.assertEqual(rules(client("11.3.7.100"), "l"), "not allowed")

    def test_optionsCombineFilesAndFlags(self) -> None:
        """--allow-file and --deny-file combine with --allow and --deny."""
        allow = writeFile(self, "10.0.0.0/8\n")
        deny = writeFile(self, "10.6.0.0/16\n")
        options = EchoOptions()
        options.parseOptions(
            [
                "--allow",
                "192.0.2.1",
                "--allow-file",
                allow,
                "--deny-file",
                deny,
                "--deny",
                "10.7.7.7",
            ]
        )
        rules = options.config.rules
        self.assertIsNone(rules(client("192.0.2.1"), "l"))
        self.assertIsNone(rules(client("10.1.1.1"), "l"))
        self.assertEqual(rules(client("10.6.1.1"), "l"), "denied")
        self.assertEqual(rules(client("10.7.7.7"), "l"), "denied")
        self.assertEqual(rules(client("192.0.2.2"), "l"), "not allowed")

    def test_badFileAtStartIsUsageError(self) -> None:
        """A bad file at start-up is a one-line usage error naming the option,
        the file and the line."""
        path = writeFile(self, "nonsense\n")
        for option in ["--allow-file", "--deny-file"]:
            with self.assertRaises(UsageError) as ctx:
                EchoOptions().parseOptions([option, path])
            message = str(ctx.exception)
            self.assertTrue(message.startswith(option), message)
            self.assertIn(f"{path}:1:", message)
            self.assertNotIn("\n", message)


class ReloadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.deny = writeFile(self, "")
        self.source = RuleSource(denyFiles=[self.deny])
        self.clock = Clock()
        self.factory = EchoFactory(rules=self.source.load(), clock=self.clock)
        self.service = EchoService(self.factory, self.clock, 1.0, ruleSource=self.source)

    def test_reloadDeniesAndClosesOpenConnection(self) -> None:
        """After a reload that denies an open connection's address, it is
        closed (gracefully, reason logged); others stay; new ones refused."""
        victim, victimT = connect(self.factory, client("10.6.6.6"))
        _, otherT = connect(self.factory, client("10.1.1.1"))
        with open(self.deny, "w") as f:
            f.write("10.6.0.0/16\n")
        with capturedLogs() as events:
            self.assertTrue(self.service.reload())
        self.assertFalse(victimT.disconnecting)
        self.clock.advance(0.1)  # quiet for a tick: closed
        self.assertTrue(victimT.disconnecting)
        self.assertEqual(victim.closeReason, "denied by reload")
        self.assertFalse(otherT.disconnecting)
        self.assertEqual(events[-1]["event"], "reloaded")
        self.assertEqual(events[-1]["closed"], 1)
        self.assertIsNone(self.factory.buildProtocolFor(client("10.6.0.1"), "l"))

    def test_brokenFileKeepsOldRules(self) -> None:
        """A file that fails to parse keeps the previous rules and logs one
        error naming the file and line."""
        with open(self.deny, "w") as f:
            f.write("10.6.0.0/16\n")
        self.service.reload()
        with open(self.deny, "w") as f:
            f.write("10.6.0.0/16\n300.1.1.1\n")
        with capturedLogs() as events:
            self.assertFalse(self.service.reload())
        [event] = events
        self.assertEqual(event["event"], "reload-failed")
        self.assertIn(f"{self.deny}:2:", event["error"])
        self.assertIsNone(self.factory.buildProtocolFor(client("10.6.0.1"), "l"))
        self.assertIsNotNone(self.factory.buildProtocolFor(client("10.5.0.1"), "l"))

    def test_noFilesNothingToReload(self) -> None:
        """Without rule files a reload changes nothing."""
        service = EchoService(self.factory, Clock(), 1.0, ruleSource=RuleSource())
        rules = self.factory.rules
        self.assertFalse(service.reload())
        self.assertIs(self.factory.rules, rules)


class VerifierTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = str(temporaryDirectory(self))
        with open(os.path.join(self.directory, "my_verifiers.py"), "w") as f:
            f.write(
                textwrap.dedent(
                    """
                    def evenPorts(address, listener):
                        return None if address.port % 2 == 0 else "odd port"

                    class OnlyListener:
                        def __init__(self):
                            self.allowed = "tcp:7"
                        def __call__(self, address, listener):
                            return listener == self.allowed

                    notCallable = 3
                    """
                )
            )
        sys.path.insert(0, self.directory)
        self.addCleanup(sys.path.remove, self.directory)
        self.addCleanup(sys.modules.pop, "my_verifiers", None)

    def test_function(self) -> None:
        """A function is used as it is."""
        verifier = loadVerifier("my_verifiers:evenPorts")
        factory = EchoFactory(verifiers=[verifier], clock=Clock())
        self.assertIsNotNone(factory.buildProtocolFor(client(port=2), "l"))
        self.assertIsNone(factory.buildProtocolFor(client(port=3), "l"))
        self.assertEqual(factory.stats.refusals, {"odd port": 1})

    def test_classInstantiated(self) -> None:
        """A class is instantiated and its instance called."""
        verifier = loadVerifier("my_verifiers:OnlyListener")
        self.assertTrue(verifier(client(), "tcp:7"))
        self.assertFalse(verifier(client(), "tcp:8"))
        self.assertTrue(callable(loadVerifier("my_verifiers.evenPorts")))

    def test_errors(self) -> None:
        """Import problems are one-line errors."""
        for name in [
            "nosuchmodule_xyz:f",
            "my_verifiers:missing",
            "my_verifiers:notCallable",
            "nocolon",
        ]:
            with self.assertRaises(ValueError, msg=name) as ctx:
                loadVerifier(name)
            self.assertNotIn("\n", str(ctx.exception))
        with self.assertRaises(UsageError) as ctx2:
            EchoOptions().parseOptions(["--verifier", "nosuchmodule_xyz:f"])
        self.assertIn("--verifier", str(ctx2.exception))


class StatsTests(SynchronousTestCase):
    def test_periodicSummary(self) -> None:
        """Every --stats-interval seconds one line sums up the server."""
        clock = Clock()
        factory = EchoFactory(rules=None, clock=clock)
        factory.stats.refusals["denied"] = 2
        p, _ = connect(factory)
        p.dataReceived(b"abc")
        service = EchoService(factory, clock, 1.0, statsInterval=60)
        service.startService()
        self.addCleanup(service.stopService)
        with capturedLogs() as events:
            clock.advance(59)
            self.assertEqual(events, [])
            clock.advance(1)
        [event] = events
        self.assertEqual(
            (event["event"], event["open"], event["total"], event["refused"], event["bytes"]),
            ("stats", 1, 1, 2, 3),
        )


class OptionTests(SynchronousTestCase):
    def test_operationsOptions(self) -> None:
        """The operator's options parse with their documented defaults."""
        options = EchoOptions()
        options.parseOptions([])
        self.assertEqual(
            (options["idle-timeout"], options["rate"], options["burst"], options["stats-interval"]),
            (300.0, 0.0, 10.0, 0.0),
        )
        options = EchoOptions()
        options.parseOptions(
            ["--idle-timeout", "0", "--rate", "5/s", "--burst", "2", "--max-session-bytes", "100",
             "--max-session-seconds", "1.5", "--stats-interval", "30"]
        )  # fmt: skip
        self.assertEqual(
            (options["idle-timeout"], options["rate"], options["burst"]), (0.0, 5.0, 2.0)
        )
        self.assertEqual((options["max-session-bytes"], options["max-session-seconds"]), (100, 1.5))

    def test_badValues(self) -> None:
        """Bad values name their option."""
        for args in (
            ["--idle-timeout", "-1"], ["--rate", "fast"], ["--burst", "0"],
            ["--max-session-bytes", "-5"], ["--max-session-seconds", "inf"],
            ["--stats-interval", "x"],
        ):  # fmt: skip
            with self.assertRaises(UsageError) as ctx:
                EchoOptions().parseOptions(args)
            self.assertIn(args[0], str(ctx.exception))
