"""
End-to-end tests of a server's life as an operator sees it: the signals that
stop it, and what C{--log-level warn} leaves in its log.
"""

from __future__ import annotations

import os
import random
import re
import select
import signal
import socket
import time

from tests.support.process import (
    LOOPBACK,
    ServerTestCase,
    connect,
    echo,
    freePort,
    refusedFrom,
    temporaryDirectory,
)

ALLOW_LINES = 20_000
"""A large allow file: reloads take a while, and SIGHUPs come during them."""


def fill(sock: socket.socket, limit: int = 256 * 1024 * 1024) -> int:
    """
    Send on C{sock} without reading until the kernel takes no more for a
    second (the server has stopped reading it); return the bytes sent.
    """
    sock.setblocking(False)
    chunk = b"f" * 65536
    sent = 0
    deadline = time.monotonic() + 30
    while sent < limit and time.monotonic() < deadline:
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            _, writable, _ = select.select([], [sock], [], 1.0)
            if not writable:
                return sent
    raise AssertionError(f"the server kept reading: {sent} bytes sent without reading")


class SignalTests(ServerTestCase):
    def test_sigintStopsCleanly(self) -> None:
        """SIGINT (Ctrl-C) stops the server as SIGTERM does: bytes in flight
        are echoed, the connection is closed for the shutdown, and twistd
        ends itself by SIGINT."""
        server = self.start("--port", LOOPBACK, "--shutdown-timeout", "30")
        payload = random.Random(2).randbytes(64 * 1024)
        with connect(server.port) as sock:
            sock.sendall(payload)
            # Accepted, not only queued by the kernel (closing the listener
            # would reset a connection still queued).
            server.waitFor(r"Connection from")
            server.process.send_signal(signal.SIGINT)
            received = bytearray()
            sock.settimeout(20)
            while chunk := sock.recv(65536):
                received += chunk
        self.assertEqual(bytes(received), payload)
        self.assertEqual(server.wait(), -signal.SIGINT)
        output = server.output()
        self.assertIn("Received SIGINT", output)
        self.assertIn("closed (server shutdown)", output)
        self.assertNotIn("Traceback", output)

    def test_listenersCloseAtOnce(self) -> None:
        """On SIGTERM the listeners close at once: while the drain is held
        open by a client that is still sending (and not reading, so its
        echo cannot be flushed), a new connection is refused; once that
        client goes, the server ends by SIGTERM."""
        server = self.start("--port", LOOPBACK, "--shutdown-timeout", "60")
        held = socket.socket()
        self.addCleanup(held.close)
        # A small receive buffer: the server's echo is stuck sooner.
        held.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        held.settimeout(10)
        held.connect(("127.0.0.1", server.port))
        server.waitFor(r"Connection from")
        self.assertGreater(fill(held), 1024 * 1024)
        server.process.send_signal(signal.SIGTERM)
        server.waitFor(r"Draining 1 connection ", timeout=20)
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=10).close()
        self.assertIsNone(server.process.poll(), "the drain was over before the check")
        held.close()
        self.assertEqual(server.wait(timeout=30), -signal.SIGTERM)
        self.assertNotIn("Traceback", server.output())


class LogLevelTests(ServerTestCase):
    def test_warnLogsOnlyProblems(self) -> None:
        """With --log-level warn, connections, refusals and the listening
        line are not logged, while a problem (a rule file that fails to
        reload) is."""
        deny = temporaryDirectory(self) / "deny.rules"
        deny.write_text("127.0.0.2\n")
        port = freePort()
        listener = f"tcp:{port}:interface=127.0.0.1"
        server = self.start(
            "--port", listener, "--deny-file", str(deny), "--log-level", "warn", listeners=0
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                sock = connect(port)
                break
            except ConnectionRefusedError:
                self.assertLess(time.monotonic(), deadline, server.output())
                time.sleep(0.02)
        with sock:
            self.assertEqual(echo(sock, b"quiet"), b"quiet")
        self.assertTrue(refusedFrom(port, "127.0.0.2"))
        deny.write_text("not an address\n")
        os.kill(server.pid, signal.SIGHUP)
        server.waitFor(r"#error\] Rules not reloaded.*deny\.rules:1:")
        output = server.output()
        echotwInfo = re.findall(r".*\[echotw[^\]]*#(?:debug|info)\].*", output)
        self.assertEqual(echotwInfo, [])
        for quiet in ("Listening on", "Connection from", "Refused connection"):
            self.assertNotIn(quiet, output)


class HangupAtStartTests(ServerTestCase):
    def test_hangupWhileStarting(self) -> None:
        """SIGHUPs sent from the moment twistd says it starts (its options
        are parsed by then) until well after the server says it listens,
        with a large allow file, never kill it: each time it survives,
        reloads, and echoes."""
        allow = temporaryDirectory(self) / "allow"
        lines = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(ALLOW_LINES)]
        allow.write_text("\n".join(["127.0.0.0/8", *lines]) + "\n")
        for _ in range(3):
            server = self.start("--port", LOOPBACK, "--allow-file", str(allow), listeners=0)
            # Polled often: the first SIGHUP must come as soon as it may.
            deadline = time.monotonic() + 60
            while "starting up" not in server.output():
                self.assertIsNone(server.process.poll(), server.output())
                self.assertLess(time.monotonic(), deadline, server.output())
                time.sleep(0.0005)
            # Signals until some 100 after "Listening on", for 60 s at most.
            after = 0
            deadline = time.monotonic() + 60
            while after < 100 and server.process.poll() is None:
                self.assertLess(time.monotonic(), deadline, server.output())
                os.kill(server.pid, signal.SIGHUP)
                after += "Listening on" in server.output()
                time.sleep(0.0005)
            self.assertIsNone(server.process.poll(), server.output())
            server.waitFor(r"Rules reloaded", timeout=60)
            port = int(server.waitFor(r"Listening on \S+ at 127\.0\.0\.1:(\d+)").group(1))
            with connect(port) as sock:
                self.assertEqual(echo(sock, b"still here"), b"still here")
            self.assertEqual(server.stop(), -signal.SIGTERM)
