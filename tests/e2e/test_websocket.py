"""
End-to-end tests of C{--websocket} against a real C{twistd -n echo}.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.request

from twisted.trial.unittest import SkipTest
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from tests.support.process import ServerTestCase, isClosedByServer
from tests.support.wsclient import WebSocketClient, maskedFrame

LOOPBACK = "tcp:0:interface=127.0.0.1"
MiB = 1024 * 1024


class WebSocketEchoTests(ServerTestCase):
    def test_typesOrderAndFragments(self) -> None:
        """
        Text and binary messages, fragmented or not, a 16 MiB one among
        them, come back in order with their types; pings get pongs.
        """
        server = self.start("--websocket", LOOPBACK)
        client = WebSocketClient(server.port)
        self.addCleanup(client.close)
        big = os.urandom(16 * MiB)
        client.send(TextMessage("één"), BytesMessage(b"\x00\x01"), Ping(b"p"))
        client.send(
            TextMessage("frag", message_finished=False),
            Ping(b"between"),
            TextMessage("mented", message_finished=True),
        )
        client.sendRaw(maskedFrame(0x2, big))
        client.send(TextMessage("last"))
        received = [client.receive() for _ in range(7)]
        self.assertEqual(
            received,
            [
                TextMessage("één"),
                BytesMessage(b"\x00\x01"),
                Pong(b"p"),
                Pong(b"between"),
                TextMessage("fragmented"),
                BytesMessage(big),
                TextMessage("last"),
            ],
        )
        client.send(CloseConnection(1000, "done"))
        self.assertEqual(client.receive(), CloseConnection(1000, "done"))
        self.assertIsNone(client.receive())

    def test_deflate(self) -> None:
        """A client offering permessage-deflate gets it and its echoes."""
        server = self.start("--websocket", LOOPBACK)
        client = WebSocketClient(server.port, deflate=True)
        self.addCleanup(client.close)
        client.send(TextMessage("z" * 100_000), BytesMessage(b"q" * 10))
        self.assertEqual(
            [client.receive(), client.receive()],
            [TextMessage("z" * 100_000), BytesMessage(b"q" * 10)],
        )

    def test_tooBig(self) -> None:
        """A message over --ws-max-message closes with 1009."""
        server = self.start("--websocket", LOOPBACK, "--ws-max-message", "1000")
        client = WebSocketClient(server.port)
        self.addCleanup(client.close)
        client.send(BytesMessage(b"a" * 1000))
        self.assertEqual(client.receive(), BytesMessage(b"a" * 1000))
        client.sendRaw(maskedFrame(0x2, b"b" * 1001))
        self.assertEqual(client.receive(), CloseConnection(1009, ""))
        self.assertIsNone(client.receive())

    def test_goingAwayOnShutdown(self) -> None:
        """
        On SIGTERM a client gets its echo, then 1001; once it answers, the
        connection ends and the server exits.
        """
        server = self.start("--websocket", LOOPBACK)
        client = WebSocketClient(server.port)
        self.addCleanup(client.close)
        client.send(TextMessage("before"))
        self.assertEqual(client.receive(), TextMessage("before"))
        server.process.send_signal(signal.SIGTERM)
        close = client.receive()
        self.assertEqual(close, CloseConnection(1001, ""))
        assert isinstance(close, CloseConnection)
        client.closeWith(close)
        self.assertEqual(server.wait(30), -signal.SIGTERM)
        self.assertIn("closed (server shutdown)", server.output())

    def test_pageAndErrors(self) -> None:
        """GET / is the page; another path is 404."""
        server = self.start("--websocket", LOOPBACK)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/", timeout=10) as r:
            page = r.read()
        self.assertIn(b"new WebSocket(", page)
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/nope", timeout=10)
        except urllib.error.HTTPError as e:
            self.assertEqual(e.code, 404)
        else:
            self.fail("no 404")


class WebSocketMemoryTests(ServerTestCase):
    def test_clientThatDoesNotRead(self) -> None:
        """
        A client that sends 200 MiB of messages and reads nothing stops
        being read: the server grows by 64 MiB at most.
        """
        server = self.start("--websocket", LOOPBACK, "--idle-timeout", "0")
        client = WebSocketClient(server.port)
        self.addCleanup(client.close)
        before = server.rssKiB()
        chunk = maskedFrame(0x2, b"m" * 16 * MiB)
        sock = client.sock
        sock.settimeout(3.0)
        sent = 0
        deadline = time.monotonic() + 120
        try:
            while sent < 200 * MiB and time.monotonic() < deadline:
                # Whole frames: a partial send is finished before the next.
                sent += sock.send(chunk[sent % len(chunk) :])
        except TimeoutError:
            pass  # stalled: the server stopped reading
        self.assertLess(sent, 200 * MiB)
        growth = (server.rssKiB() - before) * 1024
        self.assertLess(growth, 64 * MiB, f"{sent} bytes sent")


class WebSocketAdmissionTests(ServerTestCase):
    def test_rulesAndLimits(self) -> None:
        """--deny and --max-connections apply to WebSocket connections."""
        server = self.start(
            "--websocket", LOOPBACK, "--deny", "127.0.0.2", "--max-connections", "1"
        )
        denied = socket.create_connection(
            ("127.0.0.1", server.port), source_address=("127.0.0.2", 0)
        )
        self.addCleanup(denied.close)
        self.assertTrue(isClosedByServer(denied))
        first = WebSocketClient(server.port)
        self.addCleanup(first.close)
        second = socket.create_connection(("127.0.0.1", server.port))
        self.addCleanup(second.close)
        self.assertTrue(isClosedByServer(second))
        first.send(TextMessage("still here"))
        self.assertEqual(first.receive(), TextMessage("still here"))
        server.waitFor(r"refused|max-connections")

    def test_metricsPerListener(self) -> None:
        """The metrics count WebSocket connections under their listener."""
        server = self.start("--websocket", LOOPBACK, "--metrics", LOOPBACK, listeners=1)
        metrics = server.waitFor(r"Serving metrics on \S+ at (127\.0\.0\.1:\d+)").group(1)
        client = WebSocketClient(server.port)
        self.addCleanup(client.close)
        client.send(TextMessage("x"))
        client.receive()

        def scraped() -> str:
            with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as r:
                return r.read().decode()

        text = scraped()
        self.assertRegex(text, r'echotw_connections_total\{listener="tcp:0[^"]*"\} 1\.0')

    def test_proxyHeader(self) -> None:
        """A haproxy: WebSocket listener takes the client address from the PROXY header."""
        server = self.start("--websocket", "haproxy:" + LOOPBACK)
        client = WebSocketClient(server.port, prefix=b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 80\r\n")
        self.addCleanup(client.close)
        client.send(TextMessage("via proxy"))
        self.assertEqual(client.receive(), TextMessage("via proxy"))
        server.waitFor(r"Connection from 192\.0\.2\.7:5555")

    def test_wss(self) -> None:
        """An ssl: listener serves wss://."""
        try:
            import ssl

            import trustme
        except ImportError as e:
            raise SkipTest(f"TLS needs pyOpenSSL and trustme: {e}") from None
        ca = trustme.CA()
        cert = ca.issue_cert("localhost")
        directory = self.temporaryDirectory()
        key = directory / "key.pem"
        chain = directory / "chain.pem"
        cert.private_key_pem.write_to_path(str(key))
        cert.cert_chain_pems[0].write_to_path(str(chain))
        server = self.start(
            "--websocket", f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={chain}"
        )
        context = ssl.create_default_context()
        ca.configure_trust(context)
        client = WebSocketClient(server.port, context=context)
        self.addCleanup(client.close)
        client.send(BytesMessage(b"secure"))
        self.assertEqual(client.receive(), BytesMessage(b"secure"))

    def test_idleTimeoutCountsPings(self) -> None:
        """A client that only pings is not idle; one that does nothing is."""
        server = self.start("--websocket", LOOPBACK, "--idle-timeout", "1")
        pinging = WebSocketClient(server.port)
        self.addCleanup(pinging.close)
        silent = WebSocketClient(server.port)
        self.addCleanup(silent.close)
        start = time.monotonic()
        while time.monotonic() - start < 4:
            pinging.send(Ping(b"."))
            self.assertEqual(pinging.receive(), Pong(b"."))
            time.sleep(0.3)
        # The silent one was aborted long ago: the end of the stream, at once.
        self.assertIsNone(silent.receive(15))
