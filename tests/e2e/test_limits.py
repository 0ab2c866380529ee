"""
End-to-end tests of where a real C{twistd -n echo} process's limits fall: a
client reading its echo slowly is busy, not idle, however long the echo
takes (C{--idle-timeout}); C{--max-session-bytes} echoes exactly that many
bytes, then ends the stream cleanly.
"""

from __future__ import annotations

import random
import select
import socket
import time

from tests.support.process import LOOPBACK, ServerTestCase, connect

SLOW_READ_BYTES = 2_000_000
SLOW_READ_RATE = 500_000
"""Bytes a second the slow reader takes: the echo takes about 4 s to read,
four times the idle timeout."""


def paced(sock: socket.socket, payload: bytes, rate: float, timeout: float) -> tuple[bytes, str]:
    """
    Send C{payload} as fast as the socket takes it, while reading the echo
    at C{rate} bytes a second at most, without pausing longer than the pace
    asks; half-close once all of it came back.  Return what came back and
    how the stream ended (C{"eof"}, C{"reset"} or C{"timeout"}).

    The client keeps its sending side open while it reads: once the server
    has read everything, only the echo leaving shows the connection is in
    use.  (A client that half-closes at once lets the server close its
    socket as soon as Twisted's buffer is with the kernel.)
    """
    sock.setblocking(False)
    view = memoryview(payload)
    sent = 0
    received = bytearray()
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        allowed = int((time.monotonic() - started) * rate) - len(received)
        writers = [sock] if sent < len(payload) else []
        readers = [sock] if allowed > 0 else []
        wait = 0.05 if allowed <= 0 else 1.0
        readable, writable, _ = select.select(readers, writers, [], wait)
        if writable:
            try:
                sent += sock.send(view[sent : sent + 65536])
            except BlockingIOError:
                pass
        if readable:
            try:
                chunk = sock.recv(min(allowed, 16384))
            except BlockingIOError:
                continue
            except ConnectionResetError:
                return bytes(received), "reset"
            if not chunk:
                return bytes(received), "eof"
            received += chunk
            if len(received) == len(payload):
                sock.shutdown(socket.SHUT_WR)
    return bytes(received), "timeout"


def readUntilEnd(sock: socket.socket, timeout: float = 20.0) -> tuple[bytes, str]:
    """
    Read C{sock} until EOF or a reset; return what came and how it ended.
    """
    sock.settimeout(timeout)
    received = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(received), "reset"
        except TimeoutError:
            return bytes(received), "timeout"
        if not chunk:
            return bytes(received), "eof"
        received += chunk


class SlowReaderTests(ServerTestCase):
    def test_slowReaderIsNotIdle(self) -> None:
        """With --idle-timeout 1, a client that sends 2 MB at once and reads
        the echo at 500 kB/s (about 4 s) is not idle: it gets every byte,
        half-closes, and gets EOF; the server logs a client close, not a
        timeout."""
        server = self.start("--port", LOOPBACK, "--idle-timeout", "1")
        payload = random.Random(3).randbytes(SLOW_READ_BYTES)
        started = time.monotonic()
        with connect(server.port) as sock:
            got, how = paced(sock, payload, SLOW_READ_RATE, timeout=60)
        elapsed = time.monotonic() - started
        self.assertEqual((how, len(got)), ("eof", len(payload)))
        self.assertTrue(got == payload, "bytes differ")
        self.assertGreater(elapsed, 2.0, "the client did not read slowly")
        closed = server.waitFor(r"closed \((.*?)\) after (\d+) bytes")
        self.assertEqual(closed.groups(), ("client closed", str(SLOW_READ_BYTES)))


class SessionBytesTests(ServerTestCase):
    def checkExact(self, *options: str) -> None:
        """
        With --max-session-bytes 1000, a client that sends 200,000 bytes in
        one write and keeps reading gets exactly the first 1000, then EOF;
        the close event counts 1000 echoed and the rest discarded.
        """
        server = self.start("--port", LOOPBACK, "--max-session-bytes", "1000", *options)
        payload = random.Random(4).randbytes(200_000)
        with connect(server.port) as sock:
            sock.sendall(payload)
            got, how = readUntilEnd(sock)
        self.assertEqual((how, len(got)), ("eof", 1000))
        self.assertTrue(got == payload[:1000], "bytes differ")
        closed = server.waitFor(r"closed \(max-session-bytes\) after (\d+) bytes")
        self.assertEqual(closed.group(1), "1000")
        self.assertNotIn("Traceback", server.output())

    def test_exactLimit(self) -> None:
        """The plain echo stops at the limit, not at the end of a read."""
        self.checkExact()

    def test_exactLimitImpaired(self) -> None:
        """So does the echo with --delay and --bandwidth."""
        self.checkExact("--delay", "0.05", "--bandwidth", "1000000")
