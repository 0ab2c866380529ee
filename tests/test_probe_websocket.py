"""
C{echotw-probe --websocket}: L{WebSocketProbe} on a fake transport and a
L{Clock} against a wsproto server held in memory (what it sends, how it
verifies each message, closes, fails), and the whole run over loopback
against a small wsproto echo server written here, plain and over TLS.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import SkipTest

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
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
from tests.process import environmentWithRoot, serverDirectory
from tests.test_probe_clients import PausingTransport, plan

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


class EchoServerProtocol(Protocol):
    """
    A minimal WebSocket echo server on wsproto: each message back as it
    came, pings answered, the client's Close echoed.  With C{closeWith},
    it closes with that code after echoing the first message.
    """

    def __init__(self, closeWith: int | None = None) -> None:
        self.ws = WSConnection(ConnectionType.SERVER)
        self.closeWith = closeWith
        self.requests: list[Request] = []
        self._partial = b""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, Request):
                self.requests.append(event)
                self.transport.write(self.ws.send(AcceptConnection()))
            elif isinstance(event, BytesMessage) and self.ws.state is ConnectionState.OPEN:
                self._partial += event.data
                if event.message_finished:
                    message, self._partial = self._partial, b""
                    self.transport.write(self.ws.send(BytesMessage(data=message)))
                    if self.closeWith is not None:
                        self.transport.write(self.ws.send(CloseConnection(code=self.closeWith)))
            elif isinstance(event, CloseConnection):
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    self.transport.write(self.ws.send(event.response()))
                self.transport.loseConnection()


class EchoServerFactory(Factory):
    def __init__(self, closeWith: int | None = None) -> None:
        self.closeWith = closeWith
        self.protocols: list[EchoServerProtocol] = []

    def buildProtocol(self, addr: Any) -> EchoServerProtocol:
        protocol = EchoServerProtocol(self.closeWith)
        self.protocols.append(protocol)
        return protocol


async def runProbe(*args: str) -> Report:
    options = ProbeOptions()
    options.parseOptions(list(args))
    config = options["config"]
    run, finished = startProbe(reactor, config)
    await finished
    return makeReport(run, config)


class LoopbackTests(TestCase):
    def listen(self, factory: EchoServerFactory, contextFactory: Any = None) -> str:
        if contextFactory is None:
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        else:
            port = reactor.listenSSL(0, factory, contextFactory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return str(port.getHost().port)

    async def test_ws(self) -> None:
        """Several connections of large messages over ws:// all verify,
        asking for --path with --origin."""
        factory = EchoServerFactory()
        port = self.listen(factory)
        result = await runProbe(
            "--websocket", "--path", "/echo", "--origin", "http://page.example",
            "-C", "2", "-c", "4", "-s", "200k", "127.0.0.1", port,
        )  # fmt: skip
        self.assertEqual((result.exitCode, result.verifiedBytes), (0, 1_600_000), result.lines())
        self.assertEqual((result.transport, result.target), ("ws", f"ws://127.0.0.1:{port}/echo"))
        for protocol in factory.protocols:
            [request] = protocol.requests
            self.assertEqual((request.host, request.target), (f"127.0.0.1:{port}", "/echo"))
            self.assertIn((b"origin", b"http://page.example"), request.extra_headers)
            self.assertEqual(protocol.ws.state, ConnectionState.CLOSED)

    async def test_serverClosesWithAnError(self) -> None:
        """A server that closes with 1011 after the first echo: exit 2,
        the code named."""
        port = self.listen(EchoServerFactory(closeWith=1011))
        result = await runProbe("--websocket", "-c", "3", "127.0.0.1", port)
        self.assertEqual((result.exitCode, result.messagesEchoed), (2, 1))
        self.assertIn("1011 (INTERNAL_ERROR)", result.failures[0][1])

    async def test_plainEchoIsNotWebSocket(self) -> None:
        """A raw TCP echo returns the upgrade request itself: the handshake
        fails, exit 2."""
        from twisted.protocols.wire import Echo

        port = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        result = await runProbe("--websocket", "-t", "2", "127.0.0.1", str(port.getHost().port))
        self.assertEqual(result.exitCode, 2)
        self.assertEqual(len(result.failures), 1, result.lines())

    async def test_wss(self) -> None:
        """wss:// (--websocket --tls) verifies the certificate by --sni,
        which is also the Host the upgrade names."""
        try:
            import trustme
            from OpenSSL import SSL
        except ImportError as e:
            raise SkipTest(f"TLS needs pyOpenSSL and trustme: {e}") from None
        from tests.test_probe_loopback import _ContextFactory

        directory = Path(tempfile.mkdtemp(prefix="echotw-probe-"))
        self.addCleanup(shutil.rmtree, directory, True)
        ca = trustme.CA()
        cert = ca.issue_cert("echo.example")
        key, chain, caFile = directory / "key.pem", directory / "cert.pem", directory / "ca.pem"
        cert.private_key_pem.write_to_path(str(key))
        cert.cert_chain_pems[0].write_to_path(str(chain))
        ca.cert_pem.write_to_path(str(caFile))
        context = SSL.Context(SSL.TLS_METHOD)
        context.use_certificate_chain_file(str(chain))
        context.use_privatekey_file(str(key))
        factory = EchoServerFactory()
        port = self.listen(factory, _ContextFactory(context))
        result = await runProbe(
            "--websocket", "--tls", "--ca", str(caFile), "--sni", "echo.example",
            "-c", "5", "-s", "100k", "127.0.0.1", port,
        )  # fmt: skip
        self.assertEqual((result.exitCode, result.verifiedBytes), (0, 500_000), result.lines())
        self.assertEqual(result.transport, "wss")
        self.assertEqual(factory.protocols[0].requests[0].host, f"echo.example:{port}")
        wrong = await runProbe("--websocket", "--tls", "--ca", str(caFile), "127.0.0.1", port)
        self.assertEqual(wrong.exitCode, 2)

    async def test_command(self) -> None:
        """The echotw-probe command itself, run as a process: --websocket
        reports the ws:// target, every message verified, exit 0; against a
        server that closes with 1011, exit 2 naming it."""
        good = self.listen(EchoServerFactory())
        bad = self.listen(EchoServerFactory(closeWith=1011))

        def probe(port: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "echotw.probe", "--websocket", "--json", "-c", "5",
                 "127.0.0.1", port],
                capture_output=True, text=True, timeout=60, cwd=serverDirectory(),
                env=environmentWithRoot(), stdin=subprocess.DEVNULL,
            )  # fmt: skip

        result = await deferToThread(probe, good)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        summary = json.loads(result.stdout.splitlines()[-1])
        self.assertEqual(
            (summary["transport"], summary["target"], summary["verified_bytes"]),
            ("ws", f"ws://127.0.0.1:{good}/", 5120),
        )
        result = await deferToThread(probe, bad)
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertIn(
            "FAILED connection 0: the server closed the WebSocket: 1011 (INTERNAL_ERROR)",
            result.stdout,
        )
