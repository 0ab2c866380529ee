"""
Integration tests of impairment: the impaired echo behind real listening
sockets on loopback (TCP, Unix, PROXY protocol, TLS), driven by Twisted
clients in the same reactor.
"""

from __future__ import annotations

import os
import random
import socket
import tempfile
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    clientFromString,
    connectProtocol,
    serverFromString,
    wrapClientTLS,
)
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from echotw.factory import EchoFactory
from echotw.impairment import PAUSE_ABOVE, impairedProtocols
from echotw.proxyprotocol import ProxyProtocolEndpoint
from tests.integration.test_echo import SendThenRead

DELAY = 0.1


class Flood(Protocol):
    """
    Write as fast as the connection takes it; read only while C{reading}.
    """

    reading = False

    def __init__(self) -> None:
        self.closed: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.paused = True
        self.closed.callback(None)

    def connectionMade(self) -> None:
        self.block = os.urandom(65536)
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self.paused = False
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.transport is not None:
            self.transport.write(self.block)

    def pauseProducing(self) -> None:
        self.paused = True

    def readNow(self, reading: bool) -> None:
        self.reading = reading
        transport = self.transport
        if transport is not None:
            if reading:
                transport.startReading()  # type: ignore[attr-defined]
            else:
                transport.stopReading()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        self.paused = True


class SendAndCollect(Protocol):
    """
    Send a payload; C{done} fires with the bytes received once as many came
    back, or with what came if the connection closed first.
    """

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = bytearray()
        self.done: Deferred[bytes] = Deferred()
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= len(self.payload) and not self.done.called:
            self.done.callback(bytes(self.received))
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.callback(bytes(self.received))
        self.closed.callback(None)


class ImpairedLoopbackTests(TestCase):
    timeout = 60

    def factory(self, **impairment: float) -> EchoFactory:
        return EchoFactory(protocol=impairedProtocols(reactor, **impairment))  # type: ignore[arg-type]

    async def listen(self, factory: EchoFactory, description: str) -> IListeningPort:
        port: IListeningPort = await serverFromString(reactor, description).listen(
            factory.forListener(description)
        )
        self.addCleanup(port.stopListening)
        return port

    async def allClosed(self, factory: EchoFactory) -> None:
        """Wait (10 s at most) until the server side has closed too."""
        for _ in range(200):
            if not factory.protocols:
                return
            await deferLater(reactor, 0.05)
        self.fail("server connections still open")

    async def flooding(self, factory: EchoFactory) -> Flood:
        """
        A L{Flood} client connected to a new listener with C{factory}, once
        the server has its connection; aborted (and waited for) after the test.
        """
        port = await self.listen(factory, "tcp:0:interface=127.0.0.1")
        flood = Flood()
        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),  # type: ignore[attr-defined]
            flood,
        )

        async def stop() -> None:
            flood.transport.abortConnection()  # type: ignore[union-attr]
            await flood.closed
            await self.allClosed(factory)

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        for _ in range(200):
            if factory.protocols:
                return flood
            await deferLater(reactor, 0.05)
        self.fail("the server has no connection")

    async def timedRoundTrip(
        self, client: str | IStreamClientEndpoint, payload: bytes
    ) -> tuple[bytes, float]:
        proto = SendThenRead(payload)
        endpoint = clientFromString(reactor, client) if isinstance(client, str) else client
        await connectProtocol(endpoint, proto)
        started = time.monotonic()
        received = await proto.done
        return received, time.monotonic() - started

    def assertDelayedEcho(self, result: tuple[bytes, float], payload: bytes) -> None:
        received, elapsed = result
        self.assertEqual(len(received), len(payload))
        self.assertTrue(received == payload)
        self.assertGreaterEqual(elapsed, DELAY * 0.95)

    async def test_tcpManyConnections(self) -> None:
        """Over TCP, with delay and jitter, payloads of every size come back
        byte-exact, none sooner than the delay."""
        port = await self.listen(
            self.factory(delay=DELAY, jitter=0.05), "tcp:0:interface=127.0.0.1"
        )
        rng = random.Random(13)
        payloads = [rng.randbytes(n) for n in [1, 1000, 65537, 300_000, 1_000_000]]
        where = f"tcp:127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
        results = await gatherResults(
            [Deferred.fromCoroutine(self.timedRoundTrip(where, p)) for p in payloads]
        )
        for payload, result in zip(payloads, results, strict=True):
            self.assertDelayedEcho(result, payload)

    async def test_unix(self) -> None:
        """A Unix socket listener is impaired too."""
        path = Path(tempfile.mkdtemp()) / "echo.sock"
        await self.listen(self.factory(delay=DELAY), f"unix:{path}")
        payload = os.urandom(5000)
        self.assertDelayedEcho(await self.timedRoundTrip(f"unix:{path}", payload), payload)

    async def test_proxyProtocol(self) -> None:
        """A haproxy: listener's connections are impaired after the header."""
        endpoint = ProxyProtocolEndpoint(
            serverFromString(reactor, "tcp:0:interface=127.0.0.1"), clock=reactor
        )
        port = await endpoint.listen(self.factory(delay=DELAY).forListener("haproxy"))
        self.addCleanup(port.stopListening)
        header = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 80\r\n"
        payload = os.urandom(3000)
        received, elapsed = await self.timedRoundTrip(
            f"tcp:127.0.0.1:{port.getHost().port}",  # type: ignore[attr-defined]
            header + payload,
        )
        self.assertDelayedEcho((header + received, elapsed), header + payload)

    async def test_tls(self) -> None:
        """A TLS listener's echo is impaired, byte-exact."""
        try:
            import trustme
            from twisted.internet.ssl import Certificate, optionsForClientTLS
        except ImportError as e:
            raise SkipTest(f"TLS needs pyOpenSSL and trustme: {e}") from None
        ca = trustme.CA()
        cert = ca.issue_cert("localhost")
        directory = Path(tempfile.mkdtemp())
        key, chain = directory / "key.pem", directory / "cert.pem"
        cert.private_key_pem.write_to_path(str(key))
        cert.cert_chain_pems[0].write_to_path(str(chain))
        factory = self.factory(delay=DELAY)
        port = await self.listen(
            factory,
            f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={chain}",
        )
        options = optionsForClientTLS("localhost", Certificate.loadPEM(ca.cert_pem.bytes()))
        endpoint = wrapClientTLS(
            options,
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),  # type: ignore[attr-defined]
        )
        payload = os.urandom(200_000)
        proto = SendAndCollect(payload)
        started = time.monotonic()
        await connectProtocol(endpoint, proto)
        received = await proto.done
        self.assertDelayedEcho((received, time.monotonic() - started), payload)
        await proto.closed
        await self.allClosed(factory)

    async def test_fastSenderAgainstNarrowPeer(self) -> None:
        """A client that floods a --bandwidth 1k connection for two seconds
        gets no more than about two buffers held by the server."""
        factory = self.factory(bandwidth=1000)
        await self.flooding(factory)
        (server,) = factory.protocols
        peak = 0
        for _ in range(40):
            await deferLater(reactor, 0.05)
            peak = max(peak, server.pendingBytes())
        self.assertLessEqual(peak, PAUSE_ABOVE + 2 * 65536)
        self.assertGreater(peak, PAUSE_ABOVE // 2)

    async def test_readerNowAndThenAgainstNarrowPeer(self) -> None:
        """Against 500 kB/s with small socket buffers, so that the server's
        write buffer fills while the client does not read and drains when it
        does, a flooding client still gets no more than about two buffers
        held: the drain does not resume reading while the shaper is full
        (were the transport its own producer, this held over 1 MB)."""
        factory = self.factory(bandwidth=500_000)
        flood = await self.flooding(factory)
        flood.readNow(False)
        flood.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # type: ignore[union-attr]
        (server,) = factory.protocols
        server.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # type: ignore[union-attr]
        server.transport.bufferSize = 4096  # type: ignore[union-attr]
        peak = 0
        for i in range(60):
            flood.readNow(i // 10 % 2 == 1)
            await deferLater(reactor, 0.05)
            peak = max(peak, server.pendingBytes())
        self.assertLessEqual(peak, PAUSE_ABOVE + 2 * 65536)
