"""
Tests of C{echotw-probe --websocket} over loopback against a small wsproto
echo server in the test, ws:// and wss://, the command included.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from unittest import SkipTest

from twisted.internet import reactor as _reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Request,
)

from tests.support.process import environmentWithRoot, serverDirectory
from tests.unit.test_probe_websocket import runProbe

reactor: Any = _reactor

"""What the server sends back for one whole message it received."""


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
        from tests.integration.test_probe import _ContextFactory

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
