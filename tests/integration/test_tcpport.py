"""
Tests for L{echotw.transport.tcpport}: the listening port L{echotw.transport.reactor.EchoReactor}
uses accepts as Twisted's does, with real loopback sockets.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import struct
import sys
import tempfile
from typing import Any

from twisted.internet import tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import MemoryReactor
from twisted.python import context, log
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface import implementer

from echotw.factory import EchoFactory
from echotw.protocol import EchoProtocol
from echotw.transport.state import kernelPendingBytes
from echotw.transport.tcpport import EchoPort, EchoServer
from tests.integration.test_reactor import newReactor, spinUntil


class Recorder(Protocol):
    def __init__(self) -> None:
        self.systems: list[str] = []

    def connectionMade(self) -> None:
        self.systems.append(context.get(log.ILogContext)["system"])


class RecordingFactory(Factory):
    """Accept every other connection; remember the addresses and protocols."""

    def __init__(self, refuseEvery: int = 0) -> None:
        self.addresses: list[Any] = []
        self.protocols: list[Recorder] = []
        self.refuseEvery = refuseEvery

    def buildProtocol(self, addr: Any) -> Recorder | None:  # type: ignore[override]
        self.addresses.append(addr)
        if self.refuseEvery and len(self.addresses) % self.refuseEvery == 0:
            return None
        p = Recorder()
        p.factory = self
        self.protocols.append(p)
        return p


class EchoPortTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = newReactor(self)

    def listen(self, factory: Factory, interface: str = "127.0.0.1") -> EchoPort:
        port = self.reactor.listenTCP(0, factory, interface=interface)
        self.addCleanup(port.stopListening)
        self.assertIsInstance(port, EchoPort)
        return port  # type: ignore[no-any-return]

    def connect(self, port: EchoPort, count: int, host: str = "127.0.0.1") -> list[socket.socket]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        clients = []
        for _ in range(count):
            client = socket.socket(family)
            self.addCleanup(client.close)
            client.settimeout(5)
            client.connect((host, port.getHost().port))
            clients.append(client)
        return clients

    def test_acceptsABatch(self) -> None:
        """Connections waiting together are accepted in one read, each with
        its client's address, and refused ones are closed."""
        factory = RecordingFactory(refuseEvery=3)
        port = self.listen(factory)
        clients = self.connect(port, 6)
        port.doRead()
        self.assertEqual(len(factory.addresses), 6)
        self.assertEqual(
            [(a.type, a.host, a.port) for a in factory.addresses],
            [("TCP", "127.0.0.1", c.getsockname()[1]) for c in clients],
        )
        self.assertTrue(all(isinstance(a, IPv4Address) for a in factory.addresses))
        self.assertEqual(len(factory.protocols), 4)
        for refused in (clients[2], clients[5]):
            self.assertEqual(refused.recv(1), b"")
        transport = factory.protocols[0].transport
        self.assertIsInstance(transport, EchoServer)
        self.assertEqual(transport.getPeer().port, clients[0].getsockname()[1])  # type: ignore[union-attr]

    def test_likeTwistedsTransport(self) -> None:
        """The transport's log prefix and repr read as Twisted's own."""
        factory = RecordingFactory()
        port = self.listen(factory)
        self.connect(port, 1)
        port.doRead()
        transport: Any = factory.protocols[0].transport
        self.assertEqual(transport.logstr, "Recorder,0,127.0.0.1")
        self.assertEqual(transport.logPrefix(), "Recorder,0,127.0.0.1")
        self.assertEqual(repr(transport), f"<Recorder #0 on {port.getHost().port}>")

    def test_ipv6(self) -> None:
        """IPv6 clients get IPv6 addresses."""
        try:
            factory = RecordingFactory()
            port = self.listen(factory, interface="::1")
        except Exception:
            raise SkipTest("no IPv6 loopback") from None
        self.connect(port, 1, "::1")
        port.doRead()
        [address] = factory.addresses
        self.assertIsInstance(address, IPv6Address)
        self.assertEqual(address.host, "::1")

    def test_dispatchedWithoutLogContext(self) -> None:
        """The reactor runs the port's accepts without the legacy log context."""
        factory = RecordingFactory()
        port = self.listen(factory)
        self.connect(port, 1)
        for _ in range(10):
            if factory.protocols:
                break
            self.reactor.doIteration(0.5)
        self.assertEqual(factory.protocols[0].systems, ["-"])

    def test_acceptErrorsGoToTwisted(self) -> None:
        """An accept error other than "nothing to accept" is left to
        Twisted's own loop."""
        port = self.listen(RecordingFactory())
        calls: list[Any] = []
        self.patch(tcp.Port, "doRead", calls.append)

        class Failing:
            def _accept(self) -> Any:
                raise OSError(24, "Too many open files")

        real = port.socket
        port.socket = Failing()  # type: ignore[assignment]
        try:
            port.doRead()
        finally:
            port.socket = real
        self.assertEqual(calls, [port])

    def test_batchSizeAdapts(self) -> None:
        """A full batch lets the next one grow; a short one shrinks it."""
        port = self.listen(RecordingFactory())
        port.numberAccepts = 2
        self.connect(port, 3)
        port.doRead()
        self.assertEqual(port.numberAccepts, 22)
        port.doRead()
        self.assertEqual(port.numberAccepts, 1)

    def adopt(self, family: int, address: Any) -> Any:
        """Listen on a new socket of C{family} at C{address} and adopt it."""
        with socket.socket(family) as sock:
            sock.bind(address)
            sock.listen()
            sock.setblocking(False)
            port = self.reactor.adoptStreamPort(sock.fileno(), family, RecordingFactory())
        self.addCleanup(port.stopListening)
        return port

    def test_adoptedSockets(self) -> None:
        """Adopted TCP sockets listen with an EchoPort, Unix ones as Twisted does."""
        self.assertIsInstance(self.adopt(socket.AF_INET, ("127.0.0.1", 0)), EchoPort)
        directory = tempfile.mkdtemp(prefix="echotw-tcpport-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        path = os.path.join(directory, "echo.sock")
        self.assertNotIsInstance(self.adopt(socket.AF_UNIX, path), EchoPort)


class EchoServerTests(SynchronousTestCase):
    def test_sameAttributesAsTwisteds(self) -> None:
        """The transport's constructor sets what Twisted's tcp.Server's does
        (but the two strings it makes on demand), to the same values: a
        Twisted that sets more fails here rather than in production."""
        made = []
        for cls in (tcp.Server, EchoServer):
            near, far = socket.socketpair()
            self.addCleanup(near.close)
            self.addCleanup(far.close)
            reactor = MemoryReactor()
            transport = cls(near, Recorder(), ("10.0.0.1", 5), None, 7, reactor)
            self.assertEqual(reactor.readers, {transport})  # type: ignore[attr-defined]
            made.append(vars(transport))
        theirs, ours = made
        self.assertEqual(set(theirs) - {"logstr", "repstr"}, set(ours))
        for name in ("client", "sessionno", "hostname", "connected", "disconnected"):
            self.assertEqual(theirs.get(name), ours.get(name), name)

    def test_registersProducersAsTwistedDoes(self) -> None:
        """The transport as its own streaming producer, another producer, a
        second one, and one on a closed transport: as Twisted's transport."""
        near, far = socket.socketpair()
        self.addCleanup(far.close)
        transport = EchoServer(near, Recorder(), ("10.0.0.1", 5), None, 7, MemoryReactor())
        transport.registerProducer(transport, True)
        self.assertIs(transport.producer, transport)
        self.assertTrue(transport.streamingProducer)
        self.assertRaises(RuntimeError, transport.registerProducer, transport, True)
        transport.unregisterProducer()
        other = Recorder()
        transport.registerProducer(other, True)  # type: ignore[arg-type]
        self.assertIs(transport.producer, other)
        transport.unregisterProducer()
        transport.connectionLost(Failure(ConnectionDone()))
        stopped = []
        transport.stopProducing = lambda: stopped.append(True)  # type: ignore[method-assign]
        transport.registerProducer(transport, True)
        self.assertIsNone(transport.producer)
        self.assertEqual(stopped, [True])

    def test_stringsAfterClose(self) -> None:
        """The log prefix and repr still read once the protocol is gone."""
        near, far = socket.socketpair()
        self.addCleanup(far.close)
        transport = EchoServer(near, Recorder(), ("10.0.0.1", 5), None, 7, MemoryReactor())
        transport.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(transport.logstr, "NoneType,7,10.0.0.1")
        self.assertEqual(repr(transport), "<NoneType #7 on None>")


@implementer(IHalfCloseableProtocol)
class Ending(Protocol):
    """
    Records how its connection ends; dispatched as echo connections are.
    C{onData} decides what each read does.
    """

    dispatchWithoutLogContext = True

    def __init__(self) -> None:
        self.received = b""
        self.lost: list[Failure] = []
        self.readLost = 0
        self.onData: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.onData is not None:
            self.onData(self)

    def readConnectionLost(self) -> None:
        self.readLost += 1

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.append(reason)


class EchoServerEndingTests(SynchronousTestCase):
    """
    An L{EchoServer} driven by an L{echotw.transport.reactor.EchoReactor} over real
    loopback TCP ends each way as Twisted's transport does, and leaves the
    reactor in one step.
    """

    def setUp(self) -> None:
        self.reactor = newReactor(self)
        self.protocols: list[Ending] = []

        class Building(Factory):
            def buildProtocol(inner, addr: Any) -> Ending:
                p = Ending()
                self.protocols.append(p)
                return p

        self.port = self.reactor.listenTCP(0, Building(), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    def connected(self) -> tuple[socket.socket, Ending, EchoServer]:
        client = socket.create_connection(("127.0.0.1", self.port.getHost().port), timeout=5)
        self.addCleanup(client.close)
        spinUntil(self.reactor, lambda: self.protocols)
        protocol = self.protocols[-1]
        transport = protocol.transport
        assert isinstance(transport, EchoServer)
        return client, protocol, transport

    def assertForgotten(self, fd: int) -> None:
        """The reactor watches the descriptor no more."""
        self.assertNotIn(fd, self.reactor._selectables)
        self.assertNotIn(fd, self.reactor._reads)
        self.assertNotIn(fd, self.reactor._writes)

    def test_resetByClient(self) -> None:
        """A client's reset reaches the protocol once, as C{ConnectionLost},
        and the socket is closed and forgotten."""
        client, protocol, transport = self.connected()
        fd = transport.fileno()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        spinUntil(self.reactor, lambda: protocol.lost)
        [reason] = protocol.lost
        self.assertIsInstance(reason.value, ConnectionLost)
        self.assertTrue(transport.disconnected)
        self.assertEqual(transport.fileno(), -1)
        self.assertRaises(OSError, os.fstat, fd)
        self.assertForgotten(fd)

    def test_orderlyClose(self) -> None:
        """C{loseConnection} after a write: the client reads every byte, then
        the end of the stream, never a reset."""
        client, protocol, transport = self.connected()
        fd = transport.fileno()
        protocol.onData = lambda p: (p.transport.write(p.received), p.transport.loseConnection())
        client.sendall(b"x" * 1000)
        spinUntil(self.reactor, lambda: protocol.lost)
        self.assertIsInstance(protocol.lost[0].value, ConnectionDone)
        got = b""
        while chunk := client.recv(4096):
            got += chunk
        self.assertEqual(got, b"x" * 1000)
        self.assertForgotten(fd)

    def test_abort(self) -> None:
        """C{abortConnection} resets the client, as with Twisted's transport."""
        client, protocol, _ = self.connected()
        protocol.onData = lambda p: p.transport.abortConnection()
        client.sendall(b"x")
        spinUntil(self.reactor, lambda: protocol.lost)
        self.assertIsInstance(protocol.lost[0].value, ConnectionAborted)
        self.assertRaises(ConnectionResetError, client.recv, 10)

    def test_errorInProtocol(self) -> None:
        """An exception from C{dataReceived} is logged once and ends only that
        connection, with the end of the stream for its client."""
        client, protocol, _ = self.connected()
        other, _, _ = self.connected()

        def broken(p: Ending) -> None:
            raise ZeroDivisionError()

        protocol.onData = broken
        client.sendall(b"x")
        spinUntil(self.reactor, lambda: protocol.lost)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertIsInstance(protocol.lost[0].value, ZeroDivisionError)
        self.assertEqual(client.recv(10), b"")
        other.sendall(b"still here")
        spinUntil(self.reactor, lambda: self.protocols[1].received == b"still here")

    def test_halfClose(self) -> None:
        """The client's half-close goes to the protocol and leaves the
        connection open for the rest of the echo."""
        client, protocol, transport = self.connected()
        client.shutdown(socket.SHUT_WR)
        spinUntil(self.reactor, lambda: protocol.readLost)
        self.assertEqual(protocol.lost, [])
        transport.write(b"late")
        transport.loseConnection()
        spinUntil(self.reactor, lambda: protocol.lost)
        self.assertEqual(client.recv(10), b"late")
        self.assertEqual(client.recv(10), b"")

    def test_echoClosedAtOnceAfterHalfClose(self) -> None:
        """An echo connection whose client half-closes with everything echoed
        is closed in the same turn, without waiting to be writable; the
        client reads its echo, then the end of the stream."""
        # The Python path's transport: the native lane closes in C.
        factory = EchoFactory(logConnections=0, protocol=EchoProtocol)
        port = self.reactor.listenTCP(0, factory.forListener("l"), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        writers: list[object] = []
        addWriter = self.reactor.addWriter
        self.patch(self.reactor, "addWriter", lambda w: (writers.append(w), addWriter(w)))
        client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
        self.addCleanup(client.close)
        client.sendall(b"hello")
        spinUntil(
            self.reactor, lambda: factory.stats.openConnections and factory.stats.sentBytes() == 5
        )
        [protocol] = factory.protocols
        fd = protocol.transport.fileno()  # type: ignore[union-attr]
        client.shutdown(socket.SHUT_WR)
        spinUntil(self.reactor, lambda: not factory.stats.openConnections)
        self.assertEqual(writers, [])
        self.assertForgotten(fd)
        self.assertEqual(client.recv(10), b"hello")
        self.assertEqual(client.recv(10), b"")

    def test_echoStillInTheKernelKeepsTheConnection(self) -> None:
        """A client that half-closes before reading its echo, while the
        kernel still holds some of it, keeps its connection open and counted
        until it reads, then gets every byte and the end of the stream."""
        if not sys.platform.startswith("linux"):
            raise SkipTest("the kernel's send queue is read on Linux only")
        # The Python path's transport: the native lane closes in C.
        factory = EchoFactory(logConnections=0, protocol=EchoProtocol)
        port = self.reactor.listenTCP(0, factory.forListener("l"), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.socket()
        self.addCleanup(client.close)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.settimeout(5)
        client.connect(("127.0.0.1", port.getHost().port))
        spinUntil(self.reactor, lambda: factory.protocols)
        [protocol] = factory.protocols
        server = protocol.transport.socket  # type: ignore[union-attr]
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        sent = 0
        for _ in range(200):
            client.sendall(b"e" * 500)
            sent += 500
            spinUntil(self.reactor, lambda target=sent: protocol.bytesReceived == target)
            writable = select.select([], [server], [], 0)[1]
            if not protocol.pendingBytes() and kernelPendingBytes(protocol.transport):
                if not writable:
                    # What Twisted's own close would wait on: it stays open.
                    break
        else:
            self.fail("the kernel never held echo that Twisted did not")
        client.shutdown(socket.SHUT_WR)
        spinUntil(self.reactor, lambda: protocol.finishing)
        for _ in range(5):
            self.reactor.iterate(0.01)
        self.assertEqual(factory.stats.openConnections, 1)
        client.setblocking(False)
        got = b""
        for _ in range(2000):
            try:
                chunk = client.recv(65536)
            except BlockingIOError:
                self.reactor.iterate(0.005)
                continue
            if not chunk:
                break
            got += chunk
        self.assertEqual(got, b"e" * sent)
        self.assertEqual(factory.stats.openConnections, 0)
