"""
Unit tests for L{echotw.protocol.EchoProtocol} and L{echotw.factory.EchoFactory}
over in-memory transports.
"""

from __future__ import annotations

import ast
import inspect
import os
import sys
import tracemalloc
from unittest import skipIf

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from echotw.factory import EchoFactory
from echotw.protocol import EchoProtocol
from echotw.rules.addresses import formatAddress, parseNetwork
from echotw.rules.policy import AccessRules
from echotw.transport.lane import LaneEchoProtocol
from tests.support.fakes import ClosingTransport


def client(host: str = "10.0.0.1", port: int = 40000) -> IPv4Address:
    return IPv4Address("TCP", host, port)


def connect(
    factory: EchoFactory, addr: IPv4Address | None = None, listener: str = "l"
) -> tuple[EchoProtocol, StringTransport]:
    p = factory.buildProtocolFor(addr or client(), listener)
    assert p is not None
    t = ClosingTransport()
    p.makeConnection(t)
    return p, t


class EchoProtocolTests(SynchronousTestCase):
    def test_echoesAnyChunking(self) -> None:
        """Every byte comes back in order, whatever the chunking."""
        p, t = connect(EchoFactory())
        payload = os.urandom(100_000)
        i = 0
        for size in [1, 2, 3, 1000, 7, 65536, 5, 99999]:
            p.dataReceived(payload[i : i + size])
            i += size
        self.assertEqual(t.value(), payload)
        self.assertEqual(p.bytesReceived, len(payload))

    def test_registersTransportAsStreamingProducer(self) -> None:
        """The transport is its own streaming producer, for backpressure."""
        _, t = connect(EchoFactory())
        self.assertIs(t.producer, t)
        self.assertTrue(t.streaming)

    def test_pausedWhileBufferFull(self) -> None:
        """A full write buffer pauses reading until it drains (real TCP)."""
        from twisted.internet.abstract import FileDescriptor

        fd = FileDescriptor()
        paused = []
        fd.stopReading = lambda: paused.append("stop")  # type: ignore[method-assign]
        fd.startReading = lambda: paused.append("start")  # type: ignore[method-assign]
        fd.startWriting = lambda: None  # type: ignore[method-assign]
        fd.connected = True
        p = EchoFactory().buildProtocolFor(client(), "l")
        assert p is not None
        p.makeConnection(fd)
        p.dataReceived(b"x" * (fd.bufferSize + 1))
        self.assertEqual(paused, ["stop"])
        fd.writeSomeData = lambda data: len(data)  # type: ignore[method-assign]
        fd.doWrite()
        self.assertEqual(paused, ["stop", "start"])

    def test_halfCloseable(self) -> None:
        """The protocol declares half-close support."""
        self.assertTrue(IHalfCloseableProtocol.providedBy(EchoProtocol()))

    def test_halfCloseFinishesAfterEchoing(self) -> None:
        """On the client's EOF the producer is unregistered, then the
        connection closes after the queued bytes."""
        p, t = connect(EchoFactory())
        p.dataReceived(b"pending")
        p.readConnectionLost()
        self.assertIsNone(t.producer)
        self.assertTrue(t.disconnecting)
        self.assertEqual(t.value(), b"pending")

    def test_finishAndAbortRecordReason(self) -> None:
        """Closes the server starts keep the first reason given."""
        p, t = connect(EchoFactory())
        p.finish("server shutdown")
        p.abort("timeout")
        self.assertEqual(p.closeReason, "server shutdown")
        self.assertTrue(t.disconnecting)

    def test_writeConnectionLostKeepsReading(self) -> None:
        """The server's own half-close going out (a lingering close) leaves
        the connection open, to read until the client's EOF."""
        p, t = connect(EchoFactory())
        aborted = []
        t.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        p.writeConnectionLost()
        self.assertEqual(aborted, [])
        self.assertFalse(t.disconnecting)
        self.assertIsNone(p.closeReason)


class EchoFactoryTests(SynchronousTestCase):
    def test_refusedGetsNoProtocolAndIsLogged(self) -> None:
        """A refused connection gets no protocol; the log names the client
        and the reason."""
        factory = EchoFactory(rules=AccessRules(deny=[parseNetwork("10.0.0.0/8")]))
        with capturedLogs() as events:
            self.assertIsNone(factory.forListener("tcp:7").buildProtocol(client("10.9.9.9", 5555)))
        [event] = events
        self.assertEqual(event["event"], "refused")
        self.assertEqual(event["client_host"], "10.9.9.9")
        self.assertEqual(event["client_port"], 5555)
        self.assertEqual(event["listener"], "tcp:7")
        self.assertEqual(event["reason"], "denied")
        self.assertEqual(factory.stats.refusals, {"denied": 1})

    def test_maxConnections(self) -> None:
        """The total limit refuses the next connection and frees a slot when
        one closes, whatever the reason."""
        factory = EchoFactory(maxConnections=2)
        p1, _ = connect(factory, client("10.0.0.1"))
        connect(factory, client("10.0.0.2"))
        self.assertIsNone(factory.buildProtocolFor(client("10.0.0.3"), "l"))
        self.assertEqual(factory.stats.refusals, {"max-connections": 1})
        p1.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(factory.stats.openConnections, 1)
        self.assertIsNotNone(factory.buildProtocolFor(client("10.0.0.3"), "l"))

    def test_maxPerSource(self) -> None:
        """The per-source limit counts each source apart, IPv4-mapped
        clients as their IPv4 address, and releases on close."""
        factory = EchoFactory(maxPerSource=2)
        a1, _ = connect(factory, client("10.0.0.1"))
        connect(factory, IPv6Address("TCP", "::ffff:10.0.0.1", 1))  # type: ignore[arg-type]
        self.assertIsNone(factory.buildProtocolFor(client("10.0.0.1"), "l"))
        self.assertEqual(factory.stats.refusals, {"max-per-ip": 1})
        self.assertIsNotNone(factory.buildProtocolFor(client("10.0.0.2"), "l"))
        a1.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(factory.stats.perSource, {"10.0.0.1": 1})
        self.assertIsNotNone(factory.buildProtocolFor(client("10.0.0.1"), "l"))

    def test_unixClientsCountOnlyInTotal(self) -> None:
        """Unix-socket clients pass IP rules and per-IP limits but count
        towards --max-connections."""
        factory = EchoFactory(
            rules=AccessRules(allow=[parseNetwork("10.0.0.0/8")]),
            maxConnections=2,
            maxPerSource=1,
        )
        unix = UNIXAddress(b"/tmp/echo.sock")
        connect(factory, unix)  # type: ignore[arg-type]
        connect(factory, unix)  # type: ignore[arg-type]
        self.assertEqual(factory.stats.perSource, {})
        self.assertIsNone(factory.buildProtocolFor(unix, "unix:/tmp/echo.sock"))
        self.assertEqual(factory.stats.refusals, {"max-connections": 1})

    def test_verifierHook(self) -> None:
        """Verifiers see the address and listener after the built-in checks;
        a string refuses with that reason, False with 'verifier'."""
        seen = []

        def onlyEvenPorts(addr: IPv4Address, listener: str) -> str | None:
            seen.append((addr.port, listener))
            return None if addr.port % 2 == 0 else "odd port"

        factory = EchoFactory(verifiers=[onlyEvenPorts, lambda a, listener: a.port != 4])
        self.assertIsNotNone(factory.buildProtocolFor(client(port=2), "tcp:7"))
        self.assertIsNone(factory.buildProtocolFor(client(port=3), "tcp:7"))
        self.assertIsNone(factory.buildProtocolFor(client(port=4), "tcp:7"))
        self.assertEqual(factory.stats.refusals, {"odd port": 1, "verifier": 1})
        self.assertEqual(seen, [(2, "tcp:7"), (3, "tcp:7"), (4, "tcp:7")])

    def test_raisingVerifierRefuses(self) -> None:
        """A verifier that raises refuses the connection and logs the error."""

        def broken(addr: IPv4Address, listener: str) -> None:
            raise RuntimeError("boom")

        factory = EchoFactory(verifiers=[broken])
        with capturedLogs() as events:
            self.assertIsNone(factory.buildProtocolFor(client(), "l"))
        self.assertEqual(factory.stats.refusals, {"verifier error": 1})
        failures = [e for e in events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_connectionEventsCarryFields(self) -> None:
        """Open and close events carry client, listener, bytes, duration and
        reason as named fields."""
        factory = EchoFactory()
        with capturedLogs() as events:
            p, _ = connect(factory, client("10.0.0.5", 1234), "tcp:7")
            p.dataReceived(b"12345")
            p.connectionLost(Failure(ConnectionDone()))
        opened, closed = events
        self.assertEqual(
            (opened["event"], opened["client_host"], opened["client_port"], opened["listener"]),
            ("connected", "10.0.0.5", 1234, "tcp:7"),
        )
        self.assertEqual(closed["event"], "closed")
        self.assertEqual(closed["bytes"], 5)
        self.assertEqual(closed["reason"], "client closed")
        self.assertGreaterEqual(closed["duration"], 0)
        self.assertEqual(factory.stats.sentClosed, 5)
        self.assertEqual(factory.stats.connectionsTotal, 1)
        self.assertEqual(factory.stats.openConnections, 0)

    def test_connectionLogBudget(self) -> None:
        """Past --log-connections a second, connections are not logged one by
        one; the next window's first line says how many were not."""
        clock = Clock()
        factory = EchoFactory(logConnections=2, clock=clock)
        with capturedLogs() as events:
            for _ in range(5):
                p, _ = connect(factory)
                p.connectionLost(Failure(ConnectionDone()))
            clock.advance(1)
            connect(factory)
        self.assertEqual(
            [e["event"] for e in events],
            ["connected", "closed", "connected", "closed", "connections-unlogged", "connected"],
        )
        self.assertEqual(events[4]["unlogged"], 3)
        self.assertEqual(factory.stats.connectionsTotal, 6)

    def test_connectionLogBudgetFlushed(self) -> None:
        """The count of connections not logged in a second is logged by the
        periodic flush once that second has ended, though no connection
        follows; a flush within the second, or with nothing held, logs
        nothing."""
        clock = Clock()
        factory = EchoFactory(logConnections=2, clock=clock)
        with capturedLogs() as events:
            for _ in range(5):
                connect(factory)
            factory.flushConnectionLog()
            clock.advance(1)
            factory.flushConnectionLog()
            clock.advance(1)
            factory.flushConnectionLog()
        unlogged = [e for e in events if e["event"] == "connections-unlogged"]
        self.assertEqual([e["unlogged"] for e in unlogged], [3])
        self.assertEqual(len(events), 3)

    def test_closeReasons(self) -> None:
        """The close reason says who ended the connection and how."""
        factory = EchoFactory()
        cases = [
            (None, Failure(ConnectionDone()), "client closed"),
            (None, Failure(ConnectionLost()), "client reset"),
            (None, Failure(RuntimeError()), "error"),
            ("timeout", Failure(ConnectionLost()), "timeout"),
        ]
        for mine, why, expected in cases:
            p, _ = connect(factory)
            p.closeReason = mine
            with capturedLogs() as events:
                p.connectionLost(why)
            self.assertEqual(events[0]["reason"], expected)

    def test_closedTwiceCountsOnce(self) -> None:
        """Counts are released exactly once per connection."""
        factory = EchoFactory(maxPerSource=5)
        p, _ = connect(factory)
        p.connectionLost(Failure(ConnectionDone()))
        p.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((factory.stats.openConnections, factory.stats.perSource), (0, {}))

    def test_formatAddress(self) -> None:
        """Log addresses read naturally for each family."""
        self.assertEqual(formatAddress(client("10.0.0.1", 7)), "10.0.0.1:7")
        self.assertEqual(formatAddress(IPv6Address("TCP", "::1", 7)), "[::1]:7")
        self.assertEqual(formatAddress(UNIXAddress(b"/tmp/s")), "/tmp/s")


SHARED_NAMES = 29
"""Attribute names CPython (3.11 on) enters, at most, in the table a class's
instances share (measured: a 30th makes each instance build a dictionary of
its own)."""


def attributesSet(cls: type) -> set[str]:
    """
    The names C{cls}'s own methods assign on C{self}.
    """
    names = set()
    for node in ast.walk(ast.parse(inspect.getsource(cls))):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        for target in targets:
            for part in ast.walk(target):
                if (
                    isinstance(part, ast.Attribute)
                    and isinstance(part.value, ast.Name)
                    and part.value.id == "self"
                ):
                    names.add(part.attr)
    return names


def dictionaryGrowth(cls: type[EchoProtocol]) -> int:
    """
    Bytes allocated when a protocol made after 40 others sets every name
    in C{cls.instanceNames}: none while all are in the shared table.
    """
    others = [cls() for _ in range(40)]
    sample = cls()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for name in cls.instanceNames:
            if not hasattr(getattr(cls, name, None), "__set__"):
                setattr(sample, name, None)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del others
    return after - before


class ProtocolShapeTests(SynchronousTestCase):
    def test_namesDeclared(self) -> None:
        """
        Every name a protocol's methods set on C{self} is in its
        C{instanceNames}, so that it is in the shared table before the first
        connection (L{echotw.protocol.enterInstanceNames}).
        """
        for cls in (EchoProtocol, LaneEchoProtocol):
            assigned = set().union(
                *(
                    attributesSet(base)
                    for base in cls.__mro__
                    if base.__module__.startswith("echotw.")
                )
            )
            self.assertLessEqual(assigned, set(cls.instanceNames), cls.__name__)

    def test_fewEnoughNames(self) -> None:
        """
        A connection's protocol keeps its state in few enough names for the
        shared table: a state that few connections need goes into one
        attribute (a tuple, an object of its own, as the idle sweep's and
        the lingering close's do).
        """
        self.assertLessEqual(len(set(LaneEchoProtocol.instanceNames)), SHARED_NAMES)

    @skipIf(sys.version_info < (3, 11), "instances share a table of names from CPython 3.11")
    def test_lateNamesBuildNoDictionary(self) -> None:
        """
        A protocol class, once 40 connections have been made, still takes
        every one of its names into the shared table: no connection builds a
        dictionary of its own, whichever names it sets first and when.
        """

        class Subclass(LaneEchoProtocol):
            pass

        self.assertEqual(dictionaryGrowth(EchoProtocol), 0)
        self.assertEqual(dictionaryGrowth(Subclass), 0)
