"""
C{--websocket} with C{--workers}: which WebSocket listeners may be shared
(the same as C{--port}), and a worker serving the WebSocket sockets it
inherited after the TCP ones; end to end in
C{tests.e2e.test_workers_websocket}.
"""

from __future__ import annotations

import socket

from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from echotw import systemd
from echotw.build import makeService
from echotw.factory import ListenerFactory
from echotw.options import EchoOptions
from echotw.websocket.listener import WebSocketListenerFactory
from echotw.workers.main import workerConfig
from tests.support.process import temporaryDirectory


def parse(*args: str) -> EchoOptions:
    options = EchoOptions()
    options.parseOptions(list(args))
    return options


class SharingOptionsTests(SynchronousTestCase):
    def test_shareableWebSocketListeners(self) -> None:
        """--websocket on tcp:, tcp6:, unix: and haproxy: over those is
        accepted with --workers, as --port is."""
        for value in ["9000", "tcp6:9000", "unix:/tmp/ws.sock", "haproxy:tcp:9000"]:
            options = parse("--workers", "2", "--websocket", value)
            self.assertEqual(len(options.config.webSocket.listeners), 1, value)
            self.assertEqual(options.config.workers, 2)

    def test_unshareableWebSocketListenersRefused(self) -> None:
        """ssl: and systemd: WebSocket listeners are one clear line with
        --workers, as they are for --port."""
        try:
            import trustme
        except ImportError as e:
            raise SkipTest(f"a valid ssl: listener needs trustme and pyOpenSSL: {e}") from None
        key = temporaryDirectory(self) / "key.pem"
        cert = trustme.CA().issue_cert("localhost")
        cert.private_key_and_cert_chain_pem.write_to_path(str(key))
        # As if systemd had passed one socket, so that only sharing is wrong.
        self.patch(systemd, "_inherited", systemd.ListenFDs((3,), ("unknown",)))
        for value in [f"ssl:8443:privateKey={key}", "systemd:domain=INET:index=0"]:
            with self.assertRaises(UsageError, msg=value) as caught:
                parse("--workers", "2", "--websocket", value)
            self.assertIn("cannot be shared between workers", str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))


class WorkerListenersTests(SynchronousTestCase):
    def test_workerAdoptsWebSocketSockets(self) -> None:
        """A worker serves its inherited sockets in the supervisor's order,
        TCP listeners first, then WebSocket ones, and binds nothing itself."""
        options = parse(
            "--workers", "2", "--port", "tcp:0", "--websocket", "tcp:0:name=ws",
        )  # fmt: skip
        reactor = MemoryReactorClock()
        # Adopting a socket closes its descriptor, as a worker's are once served.
        inherited = [(socket.socket().detach(), socket.AF_INET) for _ in range(2)]
        service = makeService(workerConfig(options.config), reactor, inherited, worker=True)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(reactor.tcpServers, [])
        self.assertEqual([(fd, family) for fd, family, _ in reactor.adoptedPorts], inherited)
        tcp, ws = (factory for _, _, factory in reactor.adoptedPorts)
        self.assertIsInstance(tcp, ListenerFactory)
        self.assertNotIsInstance(tcp, WebSocketListenerFactory)
        self.assertIsInstance(ws, WebSocketListenerFactory)
        self.assertEqual(ws.listener, "ws")
