"""
Integration tests of UDP echo over real loopback sockets in the test's
reactor, IPv4 and IPv6: what comes back, to whom, and what is dropped.
"""

from __future__ import annotations

import socket
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime, IReactorUDP
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase

from echotw.endpoints import parseUDPListener
from echotw.rules.addresses import parseNetwork
from echotw.rules.policy import AccessRules
from echotw.udp import (
    MAX_DATAGRAM,
    UDPEchoProtocol,
    UDPListenerService,
)
from tests.unit.test_udp import MAX_IPV4_PAYLOAD

udpReactor = cast(IReactorUDP, reactor)


class EchoClient(DatagramProtocol):
    """
    Collects the datagrams it receives; L{waitFor} fires when there are enough.
    """

    noisy = False

    def __init__(self) -> None:
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self._waiting: list[tuple[int, Deferred[None]]] = []

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:
        self.received.append((datagram, addr))
        for n, d in list(self._waiting):
            if len(self.received) >= n:
                self._waiting.remove((n, d))
                d.callback(None)

    def waitFor(self, count: int, timeout: float = 5.0) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if len(self.received) >= count:
            d.callback(None)
            return d
        self._waiting.append((count, d))
        return d.addTimeout(timeout, reactor)

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.write(data, addr)


async def waitUntil(condition: Any, what: str, timeout: float = 5.0) -> None:
    """
    Poll C{condition} every few milliseconds until true; fail after C{timeout}.
    """
    clock: IReactorTime = reactor
    deadline = clock.seconds() + timeout
    while not condition():
        if clock.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(clock, 0.005)


async def anyReplyArrived() -> None:
    """
    Called once a datagram sent after another has been answered: the server
    handles datagrams in the order they arrive on its socket, so a reply to
    the earlier one would have been sent first, and loopback delivers one
    sender's datagrams in order.  One more reactor turn dispatches whatever
    was ready when that answer was, so a client has then received every
    reply it will ever get to the earlier datagram: a fixed wait would only
    guess at that.
    """
    await deferLater(reactor, 0)


class UDPLoopbackTests(TestCase):
    """
    UDP echo over real sockets on loopback.
    """

    timeout = 30
    host = "127.0.0.1"
    listener = "udp:0:interface=127.0.0.1"
    directedBroadcast: str | None = "127.255.255.255"
    """The loopback network's broadcast address (IPv6 has none)."""
    otherHost: str | None = "127.0.0.2"
    """Another loopback address (IPv6 has only one)."""

    def setUp(self) -> None:
        self.requireFamily()

    def requireFamily(self) -> None:
        pass

    def serve(self, **kwargs: Any) -> tuple[UDPEchoProtocol, tuple[str, int]]:
        proto = UDPEchoProtocol(**kwargs)
        service = UDPListenerService(parseUDPListener(self.listener), proto, udpReactor)
        service.startService()
        self.addCleanup(service.stopService)
        assert service.port is not None
        return proto, (self.host, service.port.getHost().port)  # type: ignore[attr-defined]

    def client(self, host: str | None = None, port: int = 0) -> EchoClient:
        client = EchoClient()
        try:
            listening = udpReactor.listenUDP(
                port, client, interface=host or self.host, maxPacketSize=MAX_DATAGRAM
            )
        except CannotListenError as e:
            raise SkipTest(f"cannot bind a client to {host or self.host}:{port}: {e}") from None
        self.addCleanup(listening.stopListening)
        return client

    async def test_echo(self) -> None:
        """Datagrams come back intact, to the port they came from."""
        _, server = self.serve()
        client = self.client()
        payloads = [b"hello", b"", bytes(range(256)) * 8, b"\x00" * 9000]
        for payload in payloads:
            client.send(payload, server)
        await client.waitFor(len(payloads))
        self.assertEqual(sorted(d for d, _ in client.received), sorted(payloads))
        self.assertEqual({a[1] for _, a in client.received}, {server[1]})

    async def test_largestDatagram(self) -> None:
        """A 65,507-byte datagram, the IPv4 maximum, is echoed whole."""
        proto, server = self.serve()
        client = self.client()
        payload = bytes(range(251)) * 260 + bytes(range(247))
        self.assertEqual(len(payload), MAX_IPV4_PAYLOAD)
        client.send(payload, server)
        await client.waitFor(1)
        self.assertEqual(client.received[0][0], payload)
        self.assertEqual(proto.bytesEchoed, MAX_IPV4_PAYLOAD)

    async def test_deny(self) -> None:
        """A denied source gets no reply while an allowed one does."""
        denied, allowed = self.twoSources()
        proto, server = self.serve(rules=AccessRules(deny=[parseNetwork(denied)]))
        deniedClient = self.client(denied)
        allowedClient = self.client(allowed)
        deniedClient.send(b"refused", server)
        allowedClient.send(b"accepted", server)
        await allowedClient.waitFor(1)
        await waitUntil(lambda: proto.dropped["denied"] == 1, "the denied datagram")
        await anyReplyArrived()
        self.assertEqual(deniedClient.received, [])
        self.assertEqual(allowedClient.received[0][0], b"accepted")

    async def test_denyByVerifier(self) -> None:
        """A verifier's refusal drops the datagram; other sources are still echoed."""
        refused = self.client()
        assert refused.transport is not None
        refusedPort = refused.transport.getHost().port

        def verifier(address: Any, listener: str) -> str | None:
            return "test refusal" if address.port == refusedPort else None

        proto, server = self.serve(rules=verifier)
        other = self.client()
        refused.send(b"refused", server)
        other.send(b"accepted", server)
        await other.waitFor(1)
        await waitUntil(lambda: proto.dropped["denied"] == 1, "the denied datagram")
        await anyReplyArrived()
        self.assertEqual(refused.received, [])

    def test_broadcastNeverEnabled(self) -> None:
        """The listening socket never has SO_BROADCAST, so the kernel refuses
        to send to a directed-broadcast address, and such a datagram is
        counted as a broadcast drop."""
        proto, _ = self.serve()
        assert proto.transport is not None
        sock = proto.transport.socket  # type: ignore[attr-defined]
        self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST), 0)
        if self.directedBroadcast is None:
            return
        proto.datagramReceived(b"x", (self.directedBroadcast, 40000))
        self.assertEqual(proto.dropped["broadcast"], 1)
        self.assertEqual(proto.datagramsEchoed, 0)

    def twoSources(self) -> tuple[str, str]:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.bind(("127.0.0.2", 0))
        except OSError as e:
            raise SkipTest(f"127.0.0.2 is not usable on this machine: {e}") from None
        finally:
            probe.close()
        return "127.0.0.2", "127.0.0.1"

    async def assertNoReply(
        self, blocked: EchoClient, proto: UDPEchoProtocol, server: tuple[str, int]
    ) -> None:
        """
        C{blocked}'s datagram gets no reply and counts as a loop-port drop,
        while another client's is echoed meanwhile.
        """
        other = self.client()
        blocked.send(b"loop?", server)
        other.send(b"fine", server)
        await other.waitFor(1)
        await waitUntil(lambda: proto.dropped["loop-port"] == 1, "the loop-port drop")
        self.assertEqual(blocked.received, [])

    async def test_ownPortDropped(self) -> None:
        """A datagram from another address on the listener's own port number
        (another echo server on the same port, as in a fleet) gets no reply."""
        if self.otherHost is None:
            raise SkipTest("loopback has only one address in this family")
        proto, server = self.serve()
        twin = self.client(host=self.otherHost, port=server[1])
        await self.assertNoReply(twin, proto, server)

    async def test_loopPortDropped(self) -> None:
        """A datagram from a source port on the loop list gets no reply."""
        blocked = self.client()
        assert blocked.transport is not None
        blockedPort = blocked.transport.getHost().port
        proto, server = self.serve(loopPorts={blockedPort})
        await self.assertNoReply(blocked, proto, server)

    async def test_privilegedSourcePortDropped(self) -> None:
        """With the default list, a datagram from a port below 1024 gets no reply."""
        proto, server = self.serve()
        for port in (1023, 1000, 999):
            try:
                blocked = self.client(port=port)
                break
            except SkipTest:
                continue
        else:
            raise SkipTest("cannot bind a client to a port below 1024 (needs root)")
        await self.assertNoReply(blocked, proto, server)

    async def test_rateLimit(self) -> None:
        """Fifty datagrams at rate 5, burst 5 get about five replies."""
        proto, server = self.serve(rate=5, burst=5)
        client = self.client()
        started = reactor.seconds()
        for i in range(50):
            client.send(b"%d" % i, server)
        await waitUntil(
            lambda: proto.datagramsEchoed + proto.dropped["rate-limited"] == 50,
            "the server to see all 50 datagrams",
        )
        elapsed = reactor.seconds() - started
        echoed = proto.datagramsEchoed
        self.assertGreaterEqual(echoed, 5)
        self.assertLessEqual(echoed, 5 + int(5 * elapsed) + 1)
        await client.waitFor(echoed)
        # A later datagram from the same source, answered once its bucket
        # has a token again: every reply to the fifty has arrived before it.
        deadline = reactor.seconds() + 10
        while not any(data == b"after" for data, _ in client.received):
            self.assertLess(reactor.seconds(), deadline, "no token came back")
            client.send(b"after", server)
            await deferLater(reactor, 0.1)
        await anyReplyArrived()
        client.received = [r for r in client.received if r[0] != b"after"]
        self.assertEqual(len(client.received), echoed)


class UDP6LoopbackTests(UDPLoopbackTests):
    """
    The same over IPv6 loopback, where the machine has it.
    """

    host = "::1"
    listener = r"udp6:0:interface=\:\:1"
    directedBroadcast = None
    otherHost = None

    def requireFamily(self) -> None:
        if not socket.has_ipv6:
            raise SkipTest("Python was built without IPv6")
        probe = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            probe.bind(("::1", 0))
        except OSError as e:
            raise SkipTest(f"IPv6 loopback (::1) is not usable on this machine: {e}") from None
        finally:
            probe.close()

    def twoSources(self) -> tuple[str, str]:
        raise SkipTest("IPv6 loopback has one address (::1), so no second source to allow")
