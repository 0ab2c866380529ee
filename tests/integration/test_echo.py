"""
Integration tests: the echo factory behind real listening sockets on
loopback, driven by Twisted clients in the same reactor.
"""

from __future__ import annotations

import os
import random
import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import (
    TCP6ClientEndpoint,
    clientFromString,
    connectProtocol,
    serverFromString,
)
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IListeningPort,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import implementer

from echotw.factory import EchoFactory
from echotw.rules.addresses import parseNetwork
from echotw.rules.policy import AccessRules
from tests.support.process import temporaryDirectory


@implementer(IHalfCloseableProtocol)
class SendThenRead(Protocol):
    """
    Send a payload, half-close, and collect everything until the server
    closes; C{done} fires with the bytes received.
    """

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)  # type: ignore[union-attr]
        self.transport.loseWriteConnection()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(b"".join(self.received))


class LoopbackTests(TestCase):
    timeout = 60

    async def listen(
        self, factory: EchoFactory, description: str = "tcp:0:interface=127.0.0.1"
    ) -> IListeningPort:
        port: IListeningPort = await serverFromString(reactor, description).listen(
            factory.forListener(description)
        )
        self.addCleanup(port.stopListening)
        return port

    async def roundTrip(self, client: str | IStreamClientEndpoint, payload: bytes) -> bytes:
        proto = SendThenRead(payload)
        endpoint = clientFromString(reactor, client) if isinstance(client, str) else client
        await connectProtocol(endpoint, proto)
        return await proto.done

    async def test_byteExactManyConnections(self) -> None:
        """Random binary payloads up to several MiB come back byte-exact over
        many concurrent connections, each ending with a half-close."""
        port = await self.listen(EchoFactory())
        rng = random.Random(862)
        sizes = [0, 1, 2, 1023, 65536, 65537, 1_000_000, 4 * 1024 * 1024] + [
            rng.randrange(1, 300_000) for _ in range(22)
        ]
        payloads = [rng.randbytes(n) for n in sizes]
        where = f"tcp:127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
        results = await gatherResults(
            [Deferred.fromCoroutine(self.roundTrip(where, p)) for p in payloads]
        )
        for sent, got in zip(payloads, results, strict=True):
            self.assertEqual(len(got), len(sent))
            self.assertTrue(got == sent)

    async def test_deniedClientGetsNothing(self) -> None:
        """A denied client is disconnected at once, with nothing echoed."""
        factory = EchoFactory(rules=AccessRules(deny=[parseNetwork("127.0.0.0/8")]))
        port = await self.listen(factory)
        got = await self.roundTrip(f"tcp:127.0.0.1:{port.getHost().port}", b"hello")  # type: ignore[attr-defined]
        self.assertEqual(got, b"")
        self.assertEqual(factory.stats.refusals, {"denied": 1})

    async def test_dualStackMappedClientDenied(self) -> None:
        """On a dual-stack tcp6 listener an IPv4 client (seen as
        ::ffff:127.0.0.1) is still caught by an IPv4 deny rule."""
        factory = EchoFactory(rules=AccessRules(deny=[parseNetwork("127.0.0.1")]))
        try:
            port = await self.listen(factory, "tcp6:0:interface=\\:\\:")
        except Exception as e:
            raise SkipTest(f"no dual-stack IPv6 here: {e}") from None
        got = await self.roundTrip(f"tcp:127.0.0.1:{port.getHost().port}", b"hello")  # type: ignore[attr-defined]
        self.assertEqual(got, b"")
        self.assertEqual(factory.stats.refusals, {"denied": 1})

    async def test_ipv6Loopback(self) -> None:
        """IPv6 clients are echoed and matched by IPv6 rules."""
        if not socket.has_ipv6:
            raise SkipTest("no IPv6")
        factory = EchoFactory(rules=AccessRules(allow=[parseNetwork("::1")]))
        try:
            port = await self.listen(factory, "tcp6:0:interface=\\:\\:1")
        except Exception as e:
            raise SkipTest(f"no IPv6 loopback here: {e}") from None
        client = TCP6ClientEndpoint(reactor, "::1", port.getHost().port)  # type: ignore[attr-defined]
        got = await self.roundTrip(client, b"six")
        self.assertEqual(got, b"six")

    async def test_maxPerIPRefusesExtraConnections(self) -> None:
        """Past --max-per-ip, new connections from the same source are closed
        until an open one ends."""
        factory = EchoFactory(maxPerSource=2)
        port = await self.listen(factory)
        where = f"tcp:127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
        held = [Protocol(), Protocol()]
        for proto in held:
            await connectProtocol(clientFromString(reactor, where), proto)
        while factory.stats.openConnections < 2:
            await deferLater(0.01)
        self.assertEqual(await self.roundTrip(where, b"third"), b"")
        self.assertEqual(factory.stats.refusals, {"max-per-ip": 1})
        held[0].transport.loseConnection()  # type: ignore[union-attr]
        while factory.stats.openConnections > 1:
            await deferLater(0.01)
        self.assertEqual(await self.roundTrip(where, b"again"), b"again")
        held[1].transport.loseConnection()  # type: ignore[union-attr]

    async def test_unixSocketIgnoresIPRules(self) -> None:
        """A Unix-socket listener serves its clients under IP allow rules."""
        factory = EchoFactory(rules=AccessRules(allow=[parseNetwork("10.0.0.0/8")]))
        path = os.path.join(temporaryDirectory(self), "echo.sock")
        await self.listen(factory, f"unix:{path}")
        self.assertEqual(await self.roundTrip(f"unix:{path}", b"local"), b"local")


def deferLater(seconds: float) -> Deferred[None]:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds)
