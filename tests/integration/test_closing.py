"""
Integration tests over real loopback sockets in the test's reactor of how
connections end: the lingering close delivers everything echoed before
its EOF, and connections the kernel queued when a listener stops are
accepted and echoed.
"""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from echotw.factory import EchoFactory


class LingeringCloseTests(TestCase):
    """
    The lingering close on real loopback sockets, in the test's reactor.
    """

    timeout = 60

    async def listen(self, factory: EchoFactory) -> int:
        port: IListeningPort = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            factory.forListener("l")
        )
        self.addCleanup(port.stopListening)
        return port.getHost().port  # type: ignore[attr-defined, no-any-return]

    async def test_finishDeliversEchoedThenEOF(self) -> None:
        """A client that sent far more than it read gets everything echoed
        before the close, then EOF (no reset); the rest is discarded and
        counted."""
        factory = EchoFactory(maxSessionBytes=256 * 1024)
        port = await self.listen(factory)
        client = socket.create_connection(("127.0.0.1", port))
        self.addCleanup(client.close)
        client.setblocking(False)
        payload = bytes(range(256)) * 4096 * 8  # 8 MiB
        sent = 0
        while sent < len(payload):
            try:
                sent += client.send(payload[sent : sent + 65536])
            except BlockingIOError:
                await deferLater(reactor, 0.005)
        received = bytearray()
        while True:
            try:
                chunk = client.recv(65536)
            except BlockingIOError:
                await deferLater(reactor, 0.005)
                continue
            if not chunk:
                break
            received += chunk
        client.close()
        self.assertGreaterEqual(len(received), 256 * 1024)
        self.assertTrue(bytes(received) == payload[: len(received)])
        while factory.protocols:
            await deferLater(reactor, 0.01)
        self.assertEqual(factory.stats.sentClosed, len(received))
        self.assertEqual(factory.stats.discardedClosed + len(received), len(payload))


class BacklogTests(TestCase):
    timeout = 30

    async def test_backlogAcceptedBeforeClosing(self) -> None:
        """Connections the kernel completed but the server had not accepted
        yet when its listener stops are accepted and echoed, not reset."""
        from echotw.service import ListenerService

        factory = EchoFactory()
        endpoint = serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        service = ListenerService("l", endpoint, factory.forListener("l"))
        service.startService()
        port = service.port
        assert port is not None
        port.stopReading()  # type: ignore[attr-defined]
        client = socket.create_connection(("127.0.0.1", port.getHost().port))  # type: ignore[attr-defined]
        self.addCleanup(client.close)
        client.sendall(b"in the backlog")
        await service.stopService()
        self.assertEqual(factory.stats.connectionsTotal, 1)
        client.setblocking(False)
        received = b""
        for _ in range(200):
            try:
                received += client.recv(100)
            except BlockingIOError:
                await deferLater(reactor, 0.01)
            if received == b"in the backlog":
                break
        self.assertEqual(received, b"in the backlog")
        for p in list(factory.protocols):
            p.abort("test over")
        while factory.protocols:
            await deferLater(reactor, 0.01)
