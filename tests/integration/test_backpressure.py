"""
Backpressure and half-close on real sockets, TCP and Unix, served in the
test's own reactor and driven by plain client sockets: a client that sends
without reading makes the server stop reading (bounded memory), and a
half-close while the server is stopped still gets every byte back, then EOF.
Each runs on both lanes: the Python path and the native lane.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase

from echotw.factory import EchoFactory
from echotw.protocol import EchoProtocol
from echotw.transport.lane import LaneEchoProtocol, unavailableBecause
from tests.support.process import temporaryDirectory

PATTERN = random.Random(64).randbytes(1024 * 1024 + 17)
"""What clients send, over and over (a length that does not divide a buffer's)."""

MOST = 64 * 1024 * 1024
"""A client sending this much without reading shows the server kept reading."""


def pattern(offset: int, size: int) -> bytes:
    """
    C{size} bytes of the endless repetition of L{PATTERN} from C{offset}.
    """
    start = offset % len(PATTERN)
    out = PATTERN[start : start + size]
    while len(out) < size:
        out += PATTERN[: size - len(out)]
    return out


def readingPaused(protocol: EchoProtocol) -> bool:
    """
    Whether the server has stopped reading C{protocol}'s connection: the
    lane while it holds unsent echo, the Python path while Twisted's
    transport has paused itself as its producer.
    """
    if isinstance(protocol, LaneEchoProtocol) and protocol.inLane:
        return protocol.pendingBytes() > 0
    transport: Any = protocol.transport
    return bool(transport.producerPaused)


async def turn() -> None:
    """
    Let the reactor run once (the server lives in this process).
    """
    await deferLater(reactor, 0.001)


class BackpressureTestsMixin(TestCase):
    """
    The tests, for a kind of listener a subclass chooses.
    """

    timeout = 120
    protocolClass: type[EchoProtocol] = EchoProtocol

    def setUp(self) -> None:
        if self.protocolClass is LaneEchoProtocol and unavailableBecause():
            raise SkipTest(unavailableBecause())

    def listener(self) -> str:
        raise NotImplementedError()

    def clientSocket(self, port: IListeningPort) -> socket.socket:
        raise NotImplementedError()

    async def connected(self) -> tuple[EchoProtocol, socket.socket]:
        """
        A client socket connected to a new echo server, and the server's
        protocol for it.
        """
        factory = EchoFactory(protocol=self.protocolClass)
        description = self.listener()
        port: IListeningPort = await serverFromString(reactor, description).listen(
            factory.forListener(description)
        )
        self.addCleanup(port.stopListening)
        sock = self.clientSocket(port)
        self.addCleanup(sock.close)
        sock.setblocking(False)
        deadline = reactor.seconds() + 30
        while reactor.seconds() < deadline:
            if factory.protocols:
                [protocol] = factory.protocols
                if self.protocolClass is LaneEchoProtocol:
                    self.assertTrue(protocol.inLane)  # type: ignore[attr-defined]
                return protocol, sock
            await turn()
        raise AssertionError("the server never accepted the connection")

    async def fill(self, protocol: EchoProtocol, sock: socket.socket) -> int:
        """
        Send without reading until the server has stopped reading (its echo
        is stuck in its buffer) and the kernel takes no more; return the
        bytes sent.
        """
        sent = 0
        deadline = reactor.seconds() + 60
        while sent < MOST and reactor.seconds() < deadline:
            try:
                sent += sock.send(pattern(sent, 65536))
                continue
            except BlockingIOError:
                if readingPaused(protocol):
                    return sent
            await turn()
        raise AssertionError(f"the server kept reading: {sent} bytes sent without reading")

    async def receive(self, sock: socket.socket, size: int, eof: bool) -> bytes:
        """
        Read C{size} bytes, then (if C{eof}) the end of the stream.
        """
        received = bytearray()
        deadline = reactor.seconds() + 60
        while reactor.seconds() < deadline:
            try:
                chunk = sock.recv(1 << 20)
            except BlockingIOError:
                await turn()
                continue
            if not chunk:
                self.assertTrue(eof, f"the server closed after {len(received)} bytes")
                return bytes(received)
            received += chunk
            if len(received) >= size and not eof:
                return bytes(received)
        raise AssertionError(f"read {len(received)} of {size} bytes")

    async def test_nonReadingClientBounded(self) -> None:
        """A client that sends without reading makes the server stop reading
        from it: it cannot send 64 MiB, the server holds at most about two
        buffers of its echo, and then every byte comes back."""
        protocol, sock = await self.connected()
        sent = await self.fill(protocol, sock)
        # Twisted's own buffer (what the fast path reads too), or the
        # lane's: the memory that backpressure bounds.
        held = protocol.pendingBytes()
        self.assertLessEqual(held, 2 * 65536)
        self.assertLess(sent, MOST)
        received = await self.receive(sock, sent, eof=False)
        self.assertEqual(
            hashlib.sha256(received).digest(), hashlib.sha256(pattern(0, sent)).digest()
        )

    async def test_halfCloseWhilePaused(self) -> None:
        """A client that fills the server, so it has stopped reading, then
        half-closes, gets everything it sent back, byte-exact, then EOF."""
        protocol, sock = await self.connected()
        sent = await self.fill(protocol, sock)
        sock.shutdown(socket.SHUT_WR)
        received = await self.receive(sock, sent, eof=True)
        self.assertEqual(len(received), sent)
        self.assertEqual(
            hashlib.sha256(received).digest(), hashlib.sha256(pattern(0, sent)).digest()
        )

    async def test_fastPathUsed(self) -> None:
        """Echoes are sent at once (see echotw.transport.fastpath) on this kind of
        connection too."""
        protocol, sock = await self.connected()
        self.assertTrue(protocol.direct)
        sock.send(b"direct")
        self.assertEqual(await self.receive(sock, 6, eof=False), b"direct")


class TCPBackpressureTests(BackpressureTestsMixin):
    protocolClass = EchoProtocol

    def listener(self) -> str:
        return "tcp:0:interface=127.0.0.1"

    def clientSocket(self, port: IListeningPort) -> socket.socket:
        return socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)  # type: ignore[attr-defined]


class UnixBackpressureTests(BackpressureTestsMixin):
    protocolClass = EchoProtocol

    def listener(self) -> str:
        self.path = os.path.join(temporaryDirectory(self), "echo.sock")
        return f"unix:{self.path}"

    def clientSocket(self, port: IListeningPort) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(10)
        sock.connect(self.path)
        return sock


class TCPLaneBackpressureTests(TCPBackpressureTests):
    protocolClass = LaneEchoProtocol

    async def test_fastPathUsed(self) -> None:
        """Echoes are sent at once by the lane itself (a connection echotw's
        reactor accepted into the lane has no transport to write to)."""
        protocol, sock = await self.connected()
        self.assertTrue(protocol.inLane)
        sock.send(b"direct")
        self.assertEqual(await self.receive(sock, 6, eof=False), b"direct")


class UnixLaneBackpressureTests(UnixBackpressureTests):
    protocolClass = LaneEchoProtocol


del BackpressureTestsMixin
