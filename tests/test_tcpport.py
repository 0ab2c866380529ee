"""
Tests for L{echotw.tcpport}: the listening port L{echotw.reactor.EchoReactor}
uses accepts as Twisted's does, with real loopback sockets.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from typing import Any

from twisted.internet import tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.python import context, log
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from echotw.tcpport import EchoPort, EchoServer
from tests.test_reactor import newReactor


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

    def test_stringsAfterClose(self) -> None:
        """The log prefix and repr still read once the protocol is gone."""
        near, far = socket.socketpair()
        self.addCleanup(far.close)
        transport = EchoServer(near, Recorder(), ("10.0.0.1", 5), None, 7, MemoryReactor())
        transport.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(transport.logstr, "NoneType,7,10.0.0.1")
        self.assertEqual(repr(transport), "<NoneType #7 on None>")
