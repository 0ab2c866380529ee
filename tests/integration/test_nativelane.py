"""
The native lane's two sides: the C lane itself on socket pairs (partial
writes kept and drained, the byte limit exact, ends and errors reported,
a descriptor closed before it is removed), and L{LaneEchoProtocol} on real
loopback connections in the test's reactor (who joins, the counts read
from the lane, leaving for Python's closes, the reactor stopping); then the
selection: C{--native} and C{ECHOTW_NATIVE}.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionLost
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from echotw.config import NATIVE_ENVIRONMENT, EchoConfig, nativeDefault
from echotw.factory import EchoFactory
from echotw.options import EchoOptions
from echotw.protocol import EchoProtocol
from echotw.transport import lane as nativelane
from echotw.transport.lane import LaneEchoProtocol, defaultProtocol, laneServes

try:
    from echotw.transport import _lane
except ImportError:
    _lane = None  # type: ignore[assignment]


def needLane() -> None:
    if _lane is None:
        raise SkipTest(nativelane.unavailableBecause())


def checkPartialWriteKeptThenDrained(
    test: SynchronousTestCase,
    lane: Any,
    a: socket.socket,
    b: socket.socket,
    serve: Callable[[], object],
) -> None:
    """
    With C{a} (non-blocking) in C{lane} and served by C{serve}, and C{b} its
    client, which sends until the kernel refuses and does not read: what
    the kernel does not take is kept (at most one read) and C{a} is not read
    until it has gone; then reading resumes, and the echo is exact.
    """
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    lane.add(a.fileno())
    data = os.urandom(60000)
    sent = 0
    while sent < len(data):
        try:
            sent += b.send(data[sent:])
        except BlockingIOError:
            break
    for _ in range(5):
        serve()
    pending = lane.pending(a.fileno())
    test.assertGreater(pending, 0)
    test.assertLessEqual(pending, _lane.MAX_PENDING)
    received = bytearray()
    for _ in range(10000):
        if len(received) >= sent:
            break
        try:
            received += b.recv(65536)
        except BlockingIOError:
            serve()
    test.assertEqual(bytes(received), data[:sent])
    test.assertEqual(lane.pending(a.fileno()), 0)


def laneWatched(reactor: Any, reader: Any) -> bool:
    """
    Whether C{reactor} waits on C{reader}'s lane: as its own loop's wait,
    where the lane is in its epoll set (echotw's reactor), or as a reader.
    """
    if reader.shared:
        return bool(getattr(reactor, "laneReader", None) is reader)
    return reader in reactor.getReaders()


async def turn() -> None:
    await deferLater(reactor, 0.001)


class CLaneTests(SynchronousTestCase):
    """
    The C lane on socket pairs: C{a} in the lane, C{b} the client.
    """

    def setUp(self) -> None:
        needLane()
        self.lane = _lane.Lane()
        self.addCleanup(self.lane.close)
        self.a, self.b = socket.socketpair()
        self.addCleanup(self.a.close)
        self.addCleanup(self.b.close)
        self.a.setblocking(False)
        self.b.setblocking(False)

    def test_echoes(self) -> None:
        """What arrives is sent back, and counted."""
        self.lane.add(self.a.fileno())
        self.b.send(b"hello")
        self.assertIsNone(self.lane.serve())
        self.assertEqual(self.b.recv(100), b"hello")
        self.assertEqual(self.lane.received(self.a.fileno()), 5)
        self.assertEqual(self.lane.pending(self.a.fileno()), 0)

    def test_partialWriteKeptThenDrained(self) -> None:
        """What the kernel does not take is kept (at most one read) and the
        connection is not read until it has gone; then reading resumes."""
        checkPartialWriteKeptThenDrained(self, self.lane, self.a, self.b, self.lane.serve)

    def test_limitExact(self) -> None:
        """A limited connection is read up to its limit, no further, and
        reported once it is reached."""
        self.lane.add(self.a.fileno(), 7)
        self.b.send(b"0123456789")
        self.assertEqual(self.lane.serve(), [(self.a.fileno(), _lane.LIMIT, 0, 0)])
        self.assertEqual(self.b.recv(100), b"0123456")
        self.assertEqual(self.lane.remove(self.a.fileno()), (7, b""))
        self.assertEqual(self.a.recv(100), b"789")

    def test_endReported(self) -> None:
        """The client's half-close is reported, and the connection has left
        the set: it is not reported again."""
        self.lane.add(self.a.fileno())
        self.b.shutdown(socket.SHUT_WR)
        self.assertEqual(self.lane.serve(), [(self.a.fileno(), _lane.EOF, 0, 0)])
        self.assertIsNone(self.lane.serve())
        self.assertEqual(self.lane.remove(self.a.fileno()), (0, b""))
        self.assertEqual(len(self.lane), 0)

    def test_resetReported(self) -> None:
        """A reset is an error, with its errno; no SIGPIPE kills anyone."""
        server, client = self._tcpPair()
        self.lane.add(server.fileno())
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        client.close()
        for _ in range(100):
            report = self.lane.serve()
            if report:
                break
        self.assertEqual(report, [(server.fileno(), _lane.ERROR, 104, 0)])  # ECONNRESET

    def _tcpPair(self) -> tuple[socket.socket, socket.socket]:
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        client = socket.create_connection(listener.getsockname())
        self.addCleanup(client.close)
        server, _ = listener.accept()
        self.addCleanup(server.close)
        server.setblocking(False)
        return server, client

    def test_closedBeforeRemoved(self) -> None:
        """A descriptor closed while in the lane can still be removed, and
        its number joins again for a new socket."""
        fd = self.a.fileno()
        self.lane.add(fd)
        self.a.close()
        self.assertEqual(self.lane.remove(fd), (0, b""))
        c, d = socket.socketpair()
        self.addCleanup(c.close)
        self.addCleanup(d.close)
        self.assertEqual(c.fileno(), fd)
        self.lane.add(c.fileno())
        self.assertEqual(len(self.lane), 1)

    def test_twiceRefused(self) -> None:
        """A descriptor already in the lane is refused, not served twice."""
        self.lane.add(self.a.fileno())
        self.assertRaises(ValueError, self.lane.add, self.a.fileno())
        self.assertRaises(KeyError, self.lane.remove, self.b.fileno())


class LaneProtocolTests(TestCase):
    """
    L{LaneEchoProtocol} on real loopback connections in this reactor.
    """

    timeout = 60

    def setUp(self) -> None:
        needLane()

    async def connected(self, **kw: Any) -> tuple[EchoFactory, LaneEchoProtocol, socket.socket]:
        factory = EchoFactory(protocol=LaneEchoProtocol, **kw)
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            factory.forListener("tcp")
        )
        self.addCleanup(port.stopListening)
        sock = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
        self.addCleanup(sock.close)
        for _ in range(10000):
            if factory.protocols:
                [protocol] = factory.protocols
                assert isinstance(protocol, LaneEchoProtocol)
                return factory, protocol, sock
            await turn()
        raise AssertionError("never accepted")

    async def until(self, predicate: Any) -> None:
        for _ in range(20000):
            if predicate():
                return
            await turn()
        raise AssertionError("never happened")

    async def test_joinsAndCounts(self) -> None:
        """A plain TCP connection is served by the lane, which the reactor
        watches only while it serves one (or accepts a port's connections),
        or for good where its set is the reactor's own; its counts come
        from the lane."""
        factory, protocol, sock = await self.connected()
        self.assertTrue(protocol.inLane)
        reader = nativelane.readerFor(reactor)
        assert reader is not None
        self.assertTrue(laneWatched(reactor, reader))
        self.assertNotIn(protocol.transport, reactor.getReaders())
        sock.sendall(b"x" * 1000)
        await self.until(lambda: protocol.bytesReceived == 1000)
        self.assertEqual(protocol.pendingBytes(), 0)
        self.assertEqual(factory.stats.sentBytes(), 1000)
        sock.close()
        await self.until(lambda: protocol.closed)
        # Still watched if it accepts this port's connections or is in the
        # reactor's set (echotw's reactor).
        self.assertEqual(laneWatched(reactor, reader), bool(reader.listeners) or reader.shared)
        self.assertEqual(factory.stats.sentClosed, 1000)

    async def test_finishLeavesLane(self) -> None:
        """Python's graceful close (the drain, a reload's deny) takes the
        connection out of the lane first: the echo comes back, then EOF."""
        _, protocol, sock = await self.connected()
        sock.sendall(b"abc")
        await self.until(lambda: protocol.bytesReceived == 3)
        protocol.finish("shutdown")
        self.assertFalse(protocol.inLane)
        self.assertIn(protocol.transport, reactor.getReaders())
        sock.settimeout(10)
        received = b""
        while True:
            chunk = await deferLater(reactor, 0.01, sock.recv, 100)
            if not chunk:
                break
            received += chunk
        self.assertEqual(received, b"abc")
        sock.close()
        await self.until(lambda: protocol.closed)
        self.assertEqual(protocol.closeReason, "shutdown")

    async def test_abortLeavesLane(self) -> None:
        """An abort (the idle sweep, the drain's deadline) leaves the lane and
        closes at once."""
        _, protocol, _ = await self.connected()
        protocol.abort("idle")
        self.assertFalse(protocol.inLane)
        await self.until(lambda: protocol.closed)
        self.assertEqual(protocol.closeReason, "idle")

    async def test_limitLeavesLane(self) -> None:
        """The session byte limit is exact: the lane echoes up to it, then
        Python's lingering close ends the connection."""
        _, protocol, sock = await self.connected(maxSessionBytes=10)
        sock.sendall(b"0123456789abc")
        await self.until(lambda: not protocol.inLane)
        self.assertEqual(protocol.bytesReceived, 10)
        sock.shutdown(socket.SHUT_WR)
        await self.until(lambda: protocol.closed)
        self.assertEqual(protocol.closeReason, "max-session-bytes")
        self.assertEqual(sock.recv(100), b"0123456789")
        self.assertEqual(protocol.bytesDiscarded, 3)

    async def test_reactorStopping(self) -> None:
        """When the reactor stops, a connection in the lane is lost with the
        lane's reader, as the reactor loses the ones it watches."""
        _, protocol, _ = await self.connected()
        reader = nativelane.readerFor(reactor)
        assert reader is not None
        reactor.removeReader(reader)
        reader.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(protocol.closed)
        self.assertFalse(protocol.inLane)


class JoiningTests(SynchronousTestCase):
    """
    Who joins the lane.
    """

    def test_notPlainStaysPython(self) -> None:
        """A connection whose transport is not Twisted's TCP or Unix server
        (TLS, a PROXY wrapper, a test's) stays on the Python path."""
        factory = EchoFactory(protocol=LaneEchoProtocol, clock=MemoryReactorClock())
        protocol = factory.buildProtocol(None)  # type: ignore[arg-type]
        assert isinstance(protocol, LaneEchoProtocol)
        protocol.makeConnection(StringTransport())
        self.assertFalse(protocol.inLane)
        protocol.dataReceived(b"abc")
        self.assertEqual(protocol.bytesReceived, 3)
        self.assertEqual(protocol.transport.value(), b"abc")  # type: ignore[attr-defined]


class SelectionTests(SynchronousTestCase):
    """
    C{--native} and C{ECHOTW_NATIVE}.
    """

    def environment(self, value: str | None) -> None:
        old = os.environ.get(NATIVE_ENVIRONMENT)

        def restore() -> None:
            if old is None:
                os.environ.pop(NATIVE_ENVIRONMENT, None)
            else:
                os.environ[NATIVE_ENVIRONMENT] = old

        self.addCleanup(restore)
        if value is None:
            os.environ.pop(NATIVE_ENVIRONMENT, None)
        else:
            os.environ[NATIVE_ENVIRONMENT] = value

    def test_environmentDefault(self) -> None:
        """C{ECHOTW_NATIVE} gives the default, else C{auto}; C{off} makes
        factories use the Python path."""
        self.environment(None)
        self.assertEqual(nativeDefault(), "auto")
        self.environment("off")
        self.assertEqual(EchoConfig().native, "off")
        self.assertIs(defaultProtocol(), EchoProtocol)
        self.assertIs(EchoFactory().protocol, EchoProtocol)

    def test_offNeverServes(self) -> None:
        self.assertFalse(laneServes("off"))
        self.assertEqual(laneServes("auto"), _lane is not None)

    def test_badSettingRefused(self) -> None:
        """A bad value, from the command line or the environment, is one
        clear line at start-up."""
        e = self.assertRaises(usage.UsageError, EchoOptions().parseOptions, ["--native", "yes"])
        self.assertIn("auto, on, off", str(e))
        # The default (from ECHOTW_NATIVE) is not coerced, so it is checked too.
        options = EchoOptions()
        options.arguments = []
        options["native"] = "fast"
        e = self.assertRaises(usage.UsageError, options.postOptions)
        self.assertIn("--native: 'fast'", str(e))

    def test_onRefusedWithoutLane(self) -> None:
        """C{--native on} refuses to start where the lane cannot load."""
        self.patch(nativelane, "_unavailable", "the native lane is not built (no module)")
        e = self.assertRaises(usage.UsageError, EchoOptions().parseOptions, ["--native", "on"])
        self.assertEqual(str(e), "--native on: the native lane is not built (no module)")
        self.assertEqual(EchoOptions().parseOptions(["--native", "off"]), None)
