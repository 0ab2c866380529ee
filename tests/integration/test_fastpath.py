"""
Direct tests of L{echotw.transport.fastpath} against a real L{tcp.Connection} on a
socket pair, so that a Twisted whose internals moved fails here first.
"""

from __future__ import annotations

import socket
import sys

from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from echotw.transport.fastpath import canWriteDirectly, closeIfFlushed, writeDirectly


class FastPathTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.near, self.far = socket.socketpair()
        self.addCleanup(self.near.close)
        self.addCleanup(self.far.close)
        self.near.setblocking(False)
        self.far.settimeout(5)
        self.transport = tcp.Connection(self.near, Protocol(), MemoryReactor())
        self.transport.connected = True
        self.transport.startWriting = lambda: None  # type: ignore[method-assign]

    def read(self, n: int) -> bytes:
        got = b""
        while len(got) < n:
            got += self.far.recv(n - len(got))
        return got

    def test_recognisesPlainTCP(self) -> None:
        """A plain TCP connection qualifies; other transports do not."""
        self.assertTrue(canWriteDirectly(self.transport))
        self.assertFalse(canWriteDirectly(StringTransport()))
        self.assertFalse(canWriteDirectly(object()))

    def test_sendsAtOnceWhenNothingQueued(self) -> None:
        """With an empty buffer the bytes reach the socket immediately."""
        writeDirectly(self.transport, b"hello")
        self.assertEqual(self.read(5), b"hello")
        self.assertEqual((self.transport.dataBuffer, self.transport._tempDataLen), (b"", 0))

    def test_queuesBehindPendingData(self) -> None:
        """If anything is queued, new bytes queue behind it (order kept)."""
        self.transport.write(b"first")
        writeDirectly(self.transport, b"second")
        self.assertEqual(self.transport._tempDataBuffer, [b"first", b"second"])
        self.transport.doWrite()
        self.assertEqual(self.read(11), b"firstsecond")

    def test_remainderQueuedWhenKernelFull(self) -> None:
        """What the kernel does not take is queued, and pauses a streaming
        producer like any other write."""
        paused = []

        class Producer:
            def pauseProducing(self) -> None:
                paused.append(True)

            def resumeProducing(self) -> None:
                pass

            def stopProducing(self) -> None:
                pass

        self.transport.registerProducer(Producer(), True)
        payload = bytes(range(256)) * 40_000
        writeDirectly(self.transport, payload)
        queued = self.transport._tempDataLen
        self.assertGreater(queued, 0)
        self.assertLess(queued, len(payload))
        self.assertEqual(paused, [True])
        received = b""
        while len(received) < len(payload):
            received += self.far.recv(1 << 20)
            self.transport.doWrite()
        self.assertEqual(received, payload)

    def test_disconnectingUsesOrdinaryPath(self) -> None:
        """Once loseConnection was called, writes go through Twisted."""
        self.transport.disconnecting = True
        writeDirectly(self.transport, b"late")
        self.assertEqual(self.transport._tempDataBuffer, [b"late"])

    def test_socketErrorLeftToTwisted(self) -> None:
        """A send error is not raised; Twisted meets it on its own write."""
        self.far.close()
        writeDirectly(self.transport, b"x" * 10)
        self.assertEqual(self.transport._tempDataLen, 10)


class CloseIfFlushedTests(SynchronousTestCase):
    """
    L{closeIfFlushed} closes a connection whose client has finished at once,
    and only when nothing of the echo would be lost by it.
    """

    def setUp(self) -> None:
        self.near, self.far = socket.socketpair()
        self.addCleanup(self.near.close)
        self.addCleanup(self.far.close)
        self.far.settimeout(5)
        self.lost: list[Failure] = []
        protocol = Protocol()
        protocol.connectionLost = self.lost.append  # type: ignore[method-assign]
        self.transport = tcp.Connection(self.near, protocol, MemoryReactor())
        self.transport.connected = True

    def test_closesAtOnceWhenNothingQueued(self) -> None:
        """With nothing queued the protocol hears a clean close before the
        call returns, and the client reads the end of the stream."""
        if not sys.platform.startswith("linux"):
            raise SkipTest("closes early only where the kernel's queue can be read")
        self.near.send(b"echoed")
        self.assertEqual(self.far.recv(100), b"echoed")
        self.assertTrue(closeIfFlushed(self.transport))
        [reason] = self.lost
        self.assertIsInstance(reason.value, ConnectionDone)
        self.assertEqual(self.far.recv(100), b"")

    def test_waitsForTheKernelsQueue(self) -> None:
        """Echo the client has not taken yet, still in the kernel, keeps the
        connection open (and counted) rather than left to the kernel alone."""
        self.near.send(b"echoed")
        self.assertFalse(closeIfFlushed(self.transport))
        self.assertEqual(self.lost, [])
        self.assertEqual(self.far.recv(100), b"echoed")

    def test_waitsForQueuedBytes(self) -> None:
        """Bytes still queued in the transport, a producer, or a close under
        way leave the connection to Twisted's own close."""
        self.transport.startWriting = lambda: None  # type: ignore[method-assign]
        self.transport.write(b"queued")
        self.assertFalse(closeIfFlushed(self.transport))
        self.transport.doWrite()
        self.transport.registerProducer(self.transport, True)
        self.assertFalse(closeIfFlushed(self.transport))
        self.transport.unregisterProducer()
        self.transport._writeDisconnecting = True
        self.assertFalse(closeIfFlushed(self.transport))
        self.transport._writeDisconnecting = False
        self.transport.disconnecting = True
        self.assertFalse(closeIfFlushed(self.transport))
        self.assertEqual(self.lost, [])
        self.assertEqual(self.far.recv(100), b"queued")
