"""
Unit tests of what counts as activity for C{--idle-timeout} and for a
lingering close: the echo leaving (Twisted's buffer emptying, the kernel's
send queue shrinking as the client reads), not only bytes arriving.  On a
real socket pair driven by a fake reactor; no sleeps.
"""

from __future__ import annotations

import socket
import sys

from twisted.internet import tcp
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from echotw.factory import EchoFactory
from echotw.protocol import LINGER_TIME, LINGER_TIMEOUT, EchoProtocol
from echotw.service import EchoService
from echotw.transport.state import kernelPendingBytes
from tests.unit.test_housekeeping import client

LINUX = sys.platform.startswith("linux")
CHUNK = 4096


class Server:
    """
    One echo connection on the near end of a Unix socket pair, its idle
    sweep every 0.5 s (timeout 2 s), driven by a fake reactor; the test
    plays the client on the far end.
    """

    def __init__(self, test: SynchronousTestCase, idleTimeout: float = 2.0) -> None:
        self.reactor = MemoryReactorClock()
        self.factory = EchoFactory(clock=self.reactor)
        service = EchoService(self.factory, self.reactor, 1.0, idleTimeout=idleTimeout)
        service.startService()
        test.addCleanup(service.stopService)
        near, self.far = socket.socketpair()
        test.addCleanup(near.close)
        test.addCleanup(self.far.close)
        near.setblocking(False)
        self.far.setblocking(False)
        protocol = self.factory.buildProtocolFor(client(), "l", noDelay=False)
        assert protocol is not None
        self.protocol = protocol
        self.transport = tcp.Connection(near, protocol, self.reactor)
        self.transport.connected = True
        protocol.makeConnection(self.transport)
        self.received = bytearray()

    def receive(self, chunks: int) -> None:
        """The client sends C{chunks} of L{CHUNK} bytes; each goes out as
        its own write (a socket pair frees its send memory per write read)."""
        for i in range(chunks):
            self.protocol.dataReceived(bytes([i % 256]) * CHUNK)

    def tick(self, read: int = 0) -> None:
        """Half a second passes (one sweep); the client reads C{read}
        bytes and Twisted writes what the kernel now takes."""
        while read:
            try:
                got = self.far.recv(min(read, 65536))
            except BlockingIOError:
                break
            if not got:
                break
            self.received += got
            read -= len(got)
        if self.transport in self.reactor.getWriters():
            # What the reactor does when the socket is writable.
            why = self.transport.doWrite()
            if why is not None:
                self.transport.connectionLost(Failure(why))
        self.reactor.advance(0.5)

    @property
    def open(self) -> bool:
        return self.factory.stats.openConnections == 1


class IdleOutputTests(SynchronousTestCase):
    def setUp(self) -> None:
        if not LINUX:
            self.skipTest("the kernel's send queue is read on Linux only")

    def test_kernelQueueDrainingIsActivity(self) -> None:
        """All of the echo is with the kernel, none in Twisted's buffer, and
        no byte arrives: a client reading it, one write every sweep, keeps
        the connection open for five times the timeout; once it stops
        reading, the connection is aborted within the timeout and a sweep."""
        server = Server(self)
        server.receive(24)
        self.assertEqual(server.protocol.pendingBytes(), 0)
        self.assertGreater(kernelPendingBytes(server.transport), 0)
        for _ in range(20):
            server.tick(read=CHUNK)
            self.assertTrue(server.open, f"aborted after {len(server.received)} bytes")
        for _ in range(5):
            server.tick()
        self.assertFalse(server.open)
        self.assertEqual(server.protocol.closeReason, "timeout")

    def test_slowReaderGetsEverything(self) -> None:
        """A client that sent 2 MiB at once and reads 64 KiB a sweep, for
        eight times the timeout, is never aborted, and gets every byte."""
        server = Server(self)
        server.receive(512)
        self.assertGreater(server.protocol.pendingBytes(), 1024 * 1024)
        for _ in range(31):
            server.tick(read=64 * 1024)
            self.assertTrue(server.open, f"aborted after {len(server.received)} bytes")
        server.tick(read=1024 * 1024)
        self.assertEqual(len(server.received), 512 * CHUNK)
        self.assertEqual(server.protocol.pendingBytes(), 0)
        self.assertEqual(kernelPendingBytes(server.transport), 0)

    def test_lingerWaitsForAReader(self) -> None:
        """A lingering close (here at the session byte limit) lasts past
        L{LINGER_TIMEOUT} while the client reads what the kernel holds,
        and ends once it stops: no byte is lost to an early close."""
        server = Server(self, idleTimeout=0)
        server.protocol.byteLimit = 24 * CHUNK
        server.receive(24)
        self.assertTrue(server.protocol.finishing)
        ticks = int(2 * LINGER_TIMEOUT / 0.5)
        for _ in range(ticks):
            server.tick(read=CHUNK)
        self.assertTrue(server.open)
        for _ in range(int(2 * LINGER_TIMEOUT / 0.5) + 4):
            server.tick()
        self.assertFalse(server.open)
        self.assertLess(ticks * 0.5, LINGER_TIME)


class KernelPendingBytesTests(SynchronousTestCase):
    def test_noSocket(self) -> None:
        """A transport without a socket of its own reports nothing queued."""
        self.assertEqual(kernelPendingBytes(StringTransport()), 0)
        self.assertEqual(kernelPendingBytes(None), 0)

    def test_closedSocket(self) -> None:
        """A closed socket reports nothing queued rather than failing."""
        server = Server(self)
        server.receive(2)
        server.transport.socket.close()
        self.assertEqual(kernelPendingBytes(server.transport), 0)

    def test_throughTLS(self) -> None:
        """A TLS connection's queue is its own transport's (the ciphertext)."""
        if not LINUX:
            self.skipTest("the kernel's send queue is read on Linux only")
        server = Server(self)
        server.receive(2)

        class TLSLike:
            _appSendBuffer: list[bytes] = []
            transport = server.transport

        self.assertEqual(kernelPendingBytes(TLSLike()), kernelPendingBytes(server.transport))
        self.assertGreater(kernelPendingBytes(TLSLike()), 0)

    def test_idleWithoutOutput(self) -> None:
        """The sweep's view of a connection that neither sends nor has
        anything queued: idle after the timeout, as before."""
        p = EchoProtocol()
        p.factory = EchoFactory()  # type: ignore[assignment]
        p.makeConnection(StringTransport())
        self.assertFalse(p.isIdle(0.0, 2.0))
        self.assertFalse(p.isIdle(1.0, 2.0))
        self.assertTrue(p.isIdle(2.0, 2.0))
