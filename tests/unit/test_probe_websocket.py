"""
C{echotw-probe --websocket}: L{WebSocketProbe} on a fake transport and a
L{Clock} against a wsproto server held in memory (what it sends, how it
verifies each message, closes, fails); the whole run over loopback is in
L{tests.e2e.test_probe_websocket}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)

from echotw.probe.clients import CHUNK
from echotw.probe.command import probe as startProbe
from echotw.probe.command import report as makeReport
from echotw.probe.options import ProbeOptions
from echotw.probe.pattern import StreamCheck
from echotw.probe.proxyheader import v1Header
from echotw.probe.stats import ProbeRun, Report, Thresholds
from echotw.probe.timing import Flow
from echotw.probe.websocket import WebSocketProbe, describeClose
from tests.unit.test_probe_clients import PausingTransport, plan

reactor: Any = _reactor

Echo = Callable[[bytes], list[Event]]
"""What the server sends back for one whole message it received."""


def echoBinary(message: bytes) -> list[Event]:
    return [BytesMessage(data=message)]


class ServerPeer:
    """
    The server's side of one WebSocket connection, in memory: wsproto
    parses what the probe wrote and frames what the test sends back.
    """

    def __init__(self, echo: Echo = echoBinary) -> None:
        self.ws = WSConnection(ConnectionType.SERVER)
        self.echo = echo
        self.requests: list[Request] = []
        self.messages: list[bytes] = []
        self.frames: list[int] = []
        self.closes: list[int] = []
        self.pongs: list[bytes] = []
        self._partial = b""

    def receive(self, data: bytes) -> bytes:
        """
        Take what the probe wrote; what the server answers.
        """
        self.ws.receive_data(data)
        out = b""
        for event in self.ws.events():
            if isinstance(event, Request):
                self.requests.append(event)
                out += self.ws.send(AcceptConnection())
            elif isinstance(event, BytesMessage):
                self.frames.append(len(event.data))
                self._partial += event.data
                if event.message_finished:
                    message, self._partial = self._partial, b""
                    self.messages.append(message)
                    for answer in self.echo(message):
                        out += self.ws.send(answer)
            elif isinstance(event, CloseConnection):
                self.closes.append(event.code)
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    out += self.ws.send(event.response())
            elif isinstance(event, Pong):
                self.pongs.append(bytes(event.payload))
        return out


class ClosingServerPeer(ServerPeer):
    """Swallows the probe's Close: never answers it."""

    def receive(self, data: bytes) -> bytes:
        out = super().receive(data)
        return b"" if self.closes else out


class WebSocketProbeTests(SynchronousTestCase):
    def connect(self, transport: StringTransport | None = None, **changes: object) -> None:
        self.clock = Clock()
        self.run = ProbeRun(self.clock.seconds)
        self.plan = plan(**changes)
        self.probe = WebSocketProbe(
            Flow(0, self.plan, self.run, self.clock, self.clock.seconds),
            "echo.example:8080",
            "/echo?x=1",
            origin="http://page.example",
        )
        self.transport = StringTransport() if transport is None else transport
        self.probe.makeConnection(self.transport)
        self.done: list[None] = []
        self.probe.finished.addCallback(self.done.append)

    def written(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def exchange(
        self, server: ServerPeer, cut: Callable[[bytes], list[bytes]] | None = None
    ) -> None:
        """
        Pass bytes both ways until neither side has more to say.
        """
        for _ in range(10_000):
            sent = self.written()
            if not sent or self.transport.disconnected:
                return
            answer = server.receive(sent)
            for piece in cut(answer) if cut else [answer]:
                self.probe.dataReceived(piece)
        raise AssertionError("the exchange did not settle")

    def report(self) -> Report:
        return self.run.report("ws", "ws://x:7/", 1, self.plan.size, self.plan.seed, Thresholds())

    def test_verifiedMessagesAndCloseHandshake(self) -> None:
        """The upgrade asks for the path, with the Host and Origin given;
        then each message goes out as one binary message carrying the
        probe's stream, each echo is verified, and the probe closes with
        1000, ending the TCP connection once the server's Close came back."""
        self.connect()
        server = ServerPeer()
        self.exchange(server)
        [request] = server.requests
        self.assertEqual((request.host, request.target), ("echo.example:8080", "/echo?x=1"))
        self.assertIn((b"origin", b"http://page.example"), request.extra_headers)
        self.assertEqual(server.messages, [StreamCheck(11, 0).nextBytes(100)] + [
            StreamCheck(11, 0).nextBytes(300)[100 * i : 100 * (i + 1)] for i in (1, 2)
        ])  # fmt: skip
        self.assertEqual(server.closes, [1000])
        self.assertTrue(self.transport.disconnecting)
        self.probe.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.done, [None])
        result = self.report()
        self.assertEqual(
            (result.exitCode, result.messagesEchoed, result.verifiedBytes), (0, 3, 300)
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @settings(max_examples=50, deadline=None)
    @given(
        st.lists(st.integers(min_value=1, max_value=299), max_size=8),
        st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
    )
    def test_anyFramingAndChunkingVerifies(self, fragments: list[int], cuts: list[int]) -> None:
        """However the server splits each echo into frames (fragments)
        and however its bytes are cut into reads, every message verifies."""

        def fragmented(message: bytes) -> list[Event]:
            points = sorted({p for p in fragments if p < len(message)})
            pieces = [
                message[a:b] for a, b in zip([0, *points], [*points, len(message)], strict=True)
            ]
            return [
                BytesMessage(data=piece, message_finished=i == len(pieces) - 1)
                for i, piece in enumerate(pieces)
            ]

        def cut(data: bytes) -> list[bytes]:
            points = sorted({p for p in cuts if 0 < p < len(data)})
            return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]

        self.connect(size=300, count=3)
        server = ServerPeer(fragmented)
        self.exchange(server, cut)
        result = self.report()
        self.assertEqual((result.exitCode, result.verifiedBytes), (0, 900), result.lines())
        self.assertEqual(server.closes, [1000])

    def test_largeMessageInFrames(self) -> None:
        """A message bigger than a chunk goes out as frames of at most a
        chunk, written only while the transport takes more."""
        transport = PausingTransport()
        self.connect(transport, size=3 * CHUNK + 5, count=1)
        server = ServerPeer()
        self.probe.dataReceived(server.receive(self.written()))  # the upgrade
        self.assertLess(len(self.transport.value()), PausingTransport.limit + CHUNK + 100)
        answer = server.receive(self.written())
        self.probe.resumeProducing()
        answer += server.receive(self.written())
        self.assertEqual(server.frames, [CHUNK, CHUNK, CHUNK, 5])
        self.probe.dataReceived(answer)
        self.assertEqual(self.report().verifiedBytes, 3 * CHUNK + 5)

    def assertMismatch(self, echo: Echo, detail: str) -> None:
        self.connect()
        self.exchange(ServerPeer(echo))
        self.assertTrue(self.transport.disconnected)
        result = self.report()
        self.assertEqual((result.exitCode, result.mismatches), (2, 1))
        assert result.firstMismatch is not None
        self.assertIn(detail, result.firstMismatch[1].describe())

    def test_flippedByte(self) -> None:
        """A changed byte in an echo is a mismatch at its offset."""

        def flip(message: bytes) -> list[Event]:
            return [BytesMessage(data=message[:42] + bytes([message[42] ^ 1]) + message[43:])]

        self.assertMismatch(flip, "byte offset 42: different byte")

    def test_textForBinary(self) -> None:
        """The payload back in a text message is not an echo of a binary one."""
        self.assertMismatch(
            lambda m: [TextMessage(data=m.decode("latin-1"))], "a text message came back"
        )

    def test_shortMessage(self) -> None:
        """A message echoed with bytes missing is a mismatch, even though
        every byte that came back is right."""
        self.assertMismatch(
            lambda m: [BytesMessage(data=m[:60])], "a message came back with 60 of the 100 bytes"
        )

    def test_longMessage(self) -> None:
        """Two messages' worth in one message is a mismatch at the first
        byte past the message: boundaries are part of the echo."""
        self.assertMismatch(
            lambda m: [BytesMessage(data=m + m)], "byte offset 100: a message came back longer"
        )

    def test_serverClosesWithAnError(self) -> None:
        """A server that closes with an error code fails the connection
        (exit 2) with the code in words; the probe answers the Close with
        the same code and ends the TCP connection."""
        self.connect()
        server = ServerPeer(lambda m: [CloseConnection(code=1009, reason="too big")])
        self.exchange(server)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(server.ws.state, ConnectionState.CLOSED)
        self.assertEqual(server.closes, [1009])
        result = self.report()
        self.assertEqual(result.exitCode, 2)
        self.assertEqual(
            result.failures,
            [(0, "the server closed the WebSocket: 1009 (MESSAGE_TOO_BIG): too big")],
        )

    def test_upgradeRefused(self) -> None:
        """An HTTP answer other than 101 fails the connection, naming it."""
        self.connect()
        server = ServerPeer()
        server.ws.receive_data(self.written())
        [_request] = server.ws.events()
        self.probe.dataReceived(server.ws.send(RejectConnection(status_code=404)))
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(
            self.report().failures,
            [(0, "the server refused the WebSocket upgrade: HTTP status 404")],
        )

    def test_notHTTP(self) -> None:
        """A server that answers the upgrade with something else than HTTP
        fails the handshake."""
        self.connect()
        self.probe.dataReceived(b"\x00\x01 this is an echo of nothing\r\n\r\n")
        self.assertTrue(self.transport.disconnected)
        [(_, reason)] = self.report().failures
        self.assertIn("the WebSocket handshake failed", reason)

    def test_handshakeTimesOut(self) -> None:
        """No answer to the upgrade fails the connection after the timeout."""
        self.connect()
        self.clock.advance(self.plan.timeout)
        self.assertTrue(self.transport.disconnected)
        self.assertIn(
            "the WebSocket handshake not completed within 5 s", "\n".join(self.report().lines())
        )

    def test_pingAnswered(self) -> None:
        """A ping from the server gets a pong with its payload."""
        self.connect(count=1)
        server = ServerPeer(lambda m: [Ping(payload=b"are you there"), BytesMessage(data=m)])
        self.exchange(server)
        self.assertEqual(server.pongs, [b"are you there"])
        self.assertEqual(self.report().exitCode, 0)

    def test_invalidFrame(self) -> None:
        """A frame that breaks RFC 6455 (here a reserved opcode) fails the
        connection at once."""
        self.connect()
        server = ServerPeer(lambda m: [])
        self.exchange(server)
        self.probe.dataReceived(b"\x83\x00")
        self.assertTrue(self.transport.disconnected)
        [(_, reason)] = self.report().failures
        self.assertIn("the server broke the WebSocket protocol", reason)

    def test_closeNeverAnswered(self) -> None:
        """A Close the server never answers is dropped after the timeout;
        the run, verified, still counts as verified."""
        self.connect(count=1)
        server = ClosingServerPeer()
        self.exchange(server)
        self.assertEqual(server.closes, [1000])
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(self.plan.timeout)
        self.assertTrue(self.transport.disconnected)
        self.probe.connectionLost(Failure(ConnectionAborted()))
        self.assertEqual((self.report().exitCode, self.done), (0, [None]))

    def test_proxyHeaderFirst(self) -> None:
        """With --proxy-v1 the PROXY header goes first, then the upgrade."""
        self.clock = Clock()
        self.run = ProbeRun(self.clock.seconds)
        self.plan = plan()
        probe = WebSocketProbe(
            Flow(0, self.plan, self.run, self.clock, self.clock.seconds), "h:7", "/", None, v1Header
        )
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 40000),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 7),
        )
        probe.makeConnection(transport)
        self.assertTrue(
            transport.value().startswith(
                b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 7\r\nGET / HTTP/1.1\r\n"
            ),
            transport.value(),
        )

    def test_describeClose(self) -> None:
        self.assertEqual(describeClose(1001, None), "1001 (GOING_AWAY)")
        self.assertEqual(describeClose(4321, "custom"), "4321: custom")


async def runProbe(*args: str) -> Report:
    options = ProbeOptions()
    options.parseOptions(list(args))
    config = options["config"]
    run, finished = startProbe(reactor, config)
    await finished
    return makeReport(run, config)
