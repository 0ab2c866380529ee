"""
Unit tests for the WebSocket echo (L{echotw.websocket}) over in-memory
transports, driven by wsproto's own client.
"""

from __future__ import annotations

import zlib

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate

from echotw.endpoints import DEFAULT_BACKLOG
from echotw.factory import EchoFactory
from echotw.options import EchoOptions
from echotw.web.guard import MAX_HEAD, REQUEST_TIMEOUT
from echotw.websocket.deflate import BoundedDeflate, parseOffer
from echotw.websocket.listener import WebSocketListenerFactory
from echotw.websocket.protocol import WebSocketProtocol
from tests.support.wsclient import maskedHeader


def frame(opcode: int, payload: bytes, fin: bool = True, rsv1: bool = False) -> bytes:
    """
    One masked client frame, built by hand so that tests can send what
    wsproto's client refuses to (broken UTF-8, bad opcodes).
    """
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    mask = b"\x01\x02\x03\x04"
    header = maskedHeader(first, len(payload))
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


class Peer:
    """
    A WebSocket connection on a StringTransport with wsproto's client on
    the other side.
    """

    def __init__(
        self,
        factory: EchoFactory | None = None,
        maxMessage: int = 1 << 20,
        extensions: list[PerMessageDeflate] | None = None,
        upgrade: bool = True,
    ) -> None:
        self.clock = Clock()
        self.echo = factory or EchoFactory(clock=self.clock)
        listener = WebSocketListenerFactory(self.echo, "ws", maxMessage)
        p = listener.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert isinstance(p, WebSocketProtocol)
        self.protocol = p
        self.transport = StringTransport()
        p.makeConnection(self.transport)
        self.client = WSConnection(ConnectionType.CLIENT)
        if upgrade:
            self.send(
                self.client.send(Request(host="localhost", target="/", extensions=extensions or []))
            )
            [accepted] = self.events()
            assert isinstance(accepted, AcceptConnection), accepted

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def events(self) -> list[Event]:
        data = self.transport.value()
        self.transport.clear()
        self.client.receive_data(data)
        return list(self.client.events())


class EchoTests(SynchronousTestCase):
    def test_messagesComeBackWithTheirType(self) -> None:
        """Text and binary messages come back as sent, in order."""
        peer = Peer()
        c = peer.client
        peer.send(c.send(TextMessage("héllo")) + c.send(BytesMessage(b"\x00\xff")))
        self.assertEqual(peer.events(), [TextMessage("héllo"), BytesMessage(b"\x00\xff")])
        self.assertEqual(peer.protocol.messagesEchoed, 2)
        self.assertEqual(peer.protocol.payloadEchoed, len("héllo".encode()) + 2)

    def test_fragmentedMessageEchoedWhole(self) -> None:
        """A message sent in fragments, a ping between them, comes back once complete."""
        peer = Peer()
        c = peer.client
        peer.send(c.send(TextMessage("ab", message_finished=False)))
        peer.send(c.send(Ping(b"x")))
        self.assertEqual(peer.events(), [Pong(b"x")])
        peer.send(c.send(TextMessage("cd", message_finished=True)))
        self.assertEqual(peer.events(), [TextMessage("abcd")])

    def test_closeEchoesCode(self) -> None:
        """The client's close code and reason come back, then the server closes."""
        peer = Peer()
        peer.send(peer.client.send(CloseConnection(4321, "bye")))
        self.assertEqual(peer.events(), [CloseConnection(4321, "bye")])
        self.assertTrue(peer.transport.disconnecting)

    def test_validMessageBeforeBrokenFrame(self) -> None:
        """
        A message is echoed before the broken frame behind it in the same
        read fails the connection with 1002.
        """
        peer = Peer()
        peer.send(frame(0x1, b"ok") + frame(0x3, b""))
        self.assertEqual(peer.events(), [TextMessage("ok"), CloseConnection(1002, "")])
        self.assertTrue(peer.transport.disconnecting)

    def test_invalidUTF8FailsAtOnce(self) -> None:
        """
        A fragment with invalid UTF-8 fails the connection with 1007 when it
        arrives, before the message is complete.
        """
        peer = Peer()
        peer.send(frame(0x1, "κόσμε".encode(), fin=False))
        self.assertEqual(peer.events(), [])
        peer.send(frame(0x0, b"\xf4\x90\x80\x80", fin=False))
        self.assertEqual(peer.events(), [CloseConnection(1007, "")])

    def test_tooBigMessage(self) -> None:
        """A message over maxMessage, even in small fragments, closes with 1009."""
        peer = Peer(maxMessage=100)
        peer.send(frame(0x2, b"x" * 60, fin=False))
        peer.send(frame(0x0, b"x" * 60, fin=True))
        self.assertEqual(peer.events(), [CloseConnection(1009, "")])
        self.assertFalse(peer.protocol.payloadEchoed)

    def test_messageOfExactlyMaxMessage(self) -> None:
        """A message of exactly maxMessage bytes is echoed."""
        peer = Peer(maxMessage=100)
        peer.send(peer.client.send(BytesMessage(b"y" * 100)))
        self.assertEqual(peer.events(), [BytesMessage(b"y" * 100)])

    def test_deflateNegotiatedAndEchoed(self) -> None:
        """A client offering permessage-deflate gets it, and its echoes."""
        peer = Peer(extensions=[PerMessageDeflate()])
        peer.send(peer.client.send(TextMessage("a" * 10_000)))
        compressed = peer.transport.value()
        self.assertLess(len(compressed), 1000)
        self.assertEqual(peer.events(), [TextMessage("a" * 10_000)])

    def test_deflateBomb(self) -> None:
        """
        A small compressed message that inflates past maxMessage closes with
        1009, without inflating all of it.
        """
        peer = Peer(maxMessage=1 << 16, extensions=[PerMessageDeflate()])
        deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
        bomb = deflater.compress(b"\0" * (1 << 24)) + deflater.flush(zlib.Z_SYNC_FLUSH)[:-4]
        self.assertLess(len(bomb), 1 << 16)
        peer.send(frame(0x2, bomb, rsv1=True))
        self.assertEqual(peer.events(), [CloseConnection(1009, "")])

    def test_sessionBytes(self) -> None:
        """--max-session-bytes counts payload: past it, the server closes with 1008."""
        echo = EchoFactory(clock=Clock(), maxSessionBytes=10)
        peer = Peer(echo)
        c = peer.client
        peer.send(c.send(BytesMessage(b"a" * 6)))
        peer.send(c.send(BytesMessage(b"b" * 6)))
        self.assertEqual(
            peer.events(),
            [BytesMessage(b"a" * 6), BytesMessage(b"b" * 6), CloseConnection(1008, "")],
        )


class ClosingTests(SynchronousTestCase):
    def test_shutdownSendsGoingAway(self) -> None:
        """
        finish("server shutdown") sends 1001 and waits for the client's
        close; once it comes, the TCP connection closes.
        """
        peer = Peer()
        peer.protocol.finish("server shutdown")
        [close] = peer.events()
        self.assertEqual(close, CloseConnection(1001, ""))
        self.assertFalse(peer.transport.disconnecting)
        peer.send(peer.client.send(close.response()))
        self.assertTrue(peer.transport.disconnecting)
        self.assertEqual(peer.protocol.closeReason, "server shutdown")

    def test_shutdownGivesUpAtDeadline(self) -> None:
        """A client that never answers the close is closed at the deadline."""
        peer = Peer()
        peer.protocol.finish("server shutdown", deadline=peer.clock.seconds() + 3)
        peer.clock.advance(2.9)
        self.assertFalse(peer.transport.disconnecting)
        peer.clock.advance(0.2)
        self.assertTrue(peer.transport.disconnecting)

    def test_messagesAfterCloseAreNotEchoed(self) -> None:
        """After the server's close frame, messages are read, not echoed."""
        peer = Peer()
        peer.protocol.finish("server shutdown")
        peer.events()
        peer.send(frame(0x2, b"late"))
        self.assertEqual(peer.transport.value(), b"")
        self.assertEqual(peer.protocol.bytesDiscarded, 4)

    def test_pingsCountAsActivity(self) -> None:
        """Pings move the idle sweep's count: a pinging client is not idle."""
        peer = Peer()
        p = peer.protocol
        self.assertFalse(p.isIdle(0, 10))
        self.assertTrue(p.isIdle(10, 10))
        peer.send(peer.client.send(Ping(b"")))
        self.assertFalse(p.isIdle(20, 10))


class HTTPTests(SynchronousTestCase):
    def get(self, request: bytes) -> tuple[bytes, Peer]:
        peer = Peer(upgrade=False)
        peer.send(request)
        return peer.transport.value(), peer

    def test_page(self) -> None:
        """GET / without an upgrade is the page, self-contained."""
        response, peer = self.get(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(response.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertIn(b"new WebSocket(", response)
        self.assertIn(b"echoed", response)
        self.assertNotIn(b"src=", response)
        self.assertTrue(peer.transport.disconnecting)

    def test_notFoundAndNotAllowed(self) -> None:
        """Other paths are 404, other methods 405, a body 413."""
        for request, status in [
            (b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n", b"404"),
            (b"DELETE / HTTP/1.1\r\nHost: x\r\n\r\n", b"405"),
            (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", b"413"),
            (b"garbage\r\n\r\n", b"400"),
        ]:
            response, _ = self.get(request)
            self.assertTrue(response.startswith(b"HTTP/1.1 " + status), (request, response))

    def test_headTooLong(self) -> None:
        """A request head over the health listener's limit is 431."""
        response, _ = self.get(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD)
        self.assertTrue(response.startswith(b"HTTP/1.1 431"), response[:40])

    def test_slowHead(self) -> None:
        """A request head not complete in time is 408."""
        peer = Peer(upgrade=False)
        peer.send(b"GET / HTTP/1.1\r\n")
        peer.clock.advance(REQUEST_TIMEOUT)
        self.assertTrue(peer.transport.value().startswith(b"HTTP/1.1 408"))

    def test_badUpgrade(self) -> None:
        """An upgrade wsproto refuses (no key, a bad Host) is 400, not an exception."""
        for extra in [
            b"Host: x\r\n",
            b"Host: \xff\xfe\r\nSec-WebSocket-Key: a2V5a2V5a2V5a2V5a2V5a2V5\r\n",
        ]:
            response, _ = self.get(
                b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Version: 13\r\n" + extra + b"\r\n"
            )
            self.assertTrue(response.startswith(b"HTTP/1.1 400"), response[:40])


class DeflateTests(SynchronousTestCase):
    def test_parseOffer(self) -> None:
        """Unknown, repeated or malformed parameters make an offer unacceptable."""
        self.assertEqual(parseOffer("permessage-deflate"), {})
        self.assertEqual(
            parseOffer("permessage-deflate; client_max_window_bits; server_max_window_bits=10"),
            {"client_max_window_bits": None, "server_max_window_bits": 10},
        )
        for bad in [
            "permessage-deflate; foo",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=x",
            "permessage-deflate; client_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
        ]:
            self.assertIsNone(parseOffer(bad), bad)

    def test_firstAcceptableOfferWins(self) -> None:
        """Offers are taken in order: the first the server can honour wins."""
        d = BoundedDeflate(100)
        self.assertIsNone(d.accept("permessage-deflate; server_max_window_bits=8"))
        self.assertFalse(d.server_no_context_takeover)
        self.assertEqual(
            d.accept("permessage-deflate; server_no_context_takeover"),
            "server_no_context_takeover",
        )
        self.assertIsNone(d.accept("permessage-deflate"))


class OptionsTests(SynchronousTestCase):
    def parse(self, *args: str) -> EchoOptions:
        options = EchoOptions()
        options.parseOptions(list(args))
        return options

    def test_webSocketListeners(self) -> None:
        """
        --websocket takes what --port takes; alone, it opens no default TCP
        port; --ws-max-message sets the limit.
        """
        config = self.parse("--websocket", "9000", "--websocket", "unix:/tmp/ws.sock").config
        self.assertEqual(config.listeners, ())
        self.assertEqual(
            [listener.description for listener in config.webSocket.listeners],
            [f"tcp:9000:backlog={DEFAULT_BACKLOG}", "unix:/tmp/ws.sock"],
        )
        self.assertEqual(config.webSocket.maxMessage, 16 * 1024 * 1024)
        config = self.parse("--websocket", "9000", "--ws-max-message", "1000").config
        self.assertEqual(config.webSocket.maxMessage, 1000)

    def test_badValues(self) -> None:
        """Bad values are one clear line (unshareable listeners with
        --workers: tests/unit/test_workers_websocket.py)."""
        for args in [
            ["--websocket", "nonsense:1"],
            ["--websocket", "9000", "--ws-max-message", "0"],
        ]:
            with self.assertRaises(UsageError, msg=args):
                self.parse(*args)
