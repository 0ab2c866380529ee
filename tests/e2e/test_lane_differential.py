"""
The native lane and the Python path, side by side: two real servers, one
with C{--native on} and one with C{--native off}, driven over loopback by
the same random scripts (chunkings, pauses where the client does not read,
and an ending: half-close, close or reset), must send the same bytes back,
end each connection the same way, and log the same reason and byte count.
"""

from __future__ import annotations

import errno
import hashlib
import random
import re
import select
import socket
import struct
import time
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest

from echotw.transport.lane import unavailableBecause
from tests.support.process import LOOPBACK, EchoServer, ServerTestCase
from tests.support.properties import PROPERTIES

LIMIT = 6_000_000
"""Both servers' C{--max-session-bytes}: scripts with two floods may send more."""

DEADLINE = 30.0
"""Seconds any one step of a script may take."""

Step = tuple[str, int]
"""C{("send", n)}: send n bytes, reading meanwhile; C{("pause", n)}: send n
bytes without reading; C{("drain", 0)}: read everything echoed so far;
C{("flood", n)}: drain, then send up to n bytes without reading, until the
kernel takes no more (the server's echo then stops short, is kept, and the
server stops reading: how much is taken depends on the kernel's buffers)."""

steps = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(1, 20000)),
        st.tuples(st.just("pause"), st.integers(1, 16000)),
        st.tuples(st.just("drain"), st.just(0)),
        st.tuples(st.just("flood"), st.integers(1_000_000, 4_000_000)),
    ),
    min_size=1,
    max_size=6,
)
endings = st.sampled_from(["halfclose", "close", "reset"])
windows = st.sampled_from([0, 2048, 8192])
"""The client's receive buffer (0: the kernel's default)."""


@dataclass
class Outcome:
    """What one script saw on one server."""

    received: bytearray = field(default_factory=bytearray)
    eof: bool = False
    reset: bool = False
    sent: int = 0


class Client:
    """
    A non-blocking client socket that runs one script; every wait has a
    deadline.
    """

    def __init__(self, port: int, payload: bytes, window: int) -> None:
        self.sock = socket.socket()
        if window:
            # A small receive window: the server's sends stop short while
            # the client pauses, so partial writes and backpressure happen.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.payload = payload
        self.outcome = Outcome()

    def readSome(self, wait: float) -> bool:
        """
        Read what is there (waiting up to C{wait}); whether anything happened.
        """
        out = self.outcome
        if out.eof or out.reset:
            return False
        readable, _, _ = select.select([self.sock], [], [], wait)
        if not readable:
            return False
        try:
            chunk = self.sock.recv(262144)
        except BlockingIOError:
            return False
        except ConnectionResetError:
            out.reset = True
            return True
        if chunk:
            out.received += chunk
        else:
            out.eof = True
        return True

    def send(self, size: int, reading: bool, untilFull: bool = False) -> None:
        out = self.outcome
        end = out.sent + size
        deadline = time.monotonic() + DEADLINE
        while out.sent < end:
            assert time.monotonic() < deadline, f"stuck sending at {out.sent} of {end}"
            try:
                out.sent += self.sock.send(self.payload[out.sent : end])
            except BlockingIOError:
                if reading:
                    self.readSome(0.01)
                elif not select.select([], [self.sock], [], 0.3)[1] and untilFull:
                    return
            except (BrokenPipeError, ConnectionResetError):
                out.reset = True
                return
            if reading:
                while self.readSome(0):
                    pass

    def drain(self, expected: int) -> None:
        deadline = time.monotonic() + DEADLINE
        out = self.outcome
        while len(out.received) < expected and not (out.eof or out.reset):
            assert time.monotonic() < deadline, f"got {len(out.received)} of {expected}"
            self.readSome(0.05)

    def finish(self, ending: str) -> None:
        out = self.outcome
        if ending == "reset":
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()
            return
        if ending == "close":
            self.drain(min(out.sent, LIMIT))
            self.sock.shutdown(socket.SHUT_WR)
        else:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError as e:
                if e.errno != errno.ENOTCONN:
                    raise
        deadline = time.monotonic() + DEADLINE
        while not (out.eof or out.reset):
            assert time.monotonic() < deadline, "the server never ended the connection"
            self.readSome(0.05)
        self.sock.close()


def runScript(
    server: EchoServer, script: list[Step], ending: str, seed: int, window: int
) -> tuple[object, ...]:
    """
    Run C{script} against C{server}: what the client saw, and the server's
    close line (reason, bytes).
    """
    total = sum(n for _, n in script)
    payload = random.Random(seed).randbytes(total)
    client = Client(server.port, payload, window)
    clientPort = client.sock.getsockname()[1]
    try:
        for kind, n in script:
            if kind in ("drain", "flood"):
                client.drain(min(client.outcome.sent, LIMIT))
            if kind == "flood":
                client.send(n, reading=False, untilFull=True)
            elif kind != "drain":
                client.send(n, reading=kind == "send")
        client.finish(ending)
    finally:
        client.sock.close()
    closed = server.waitFor(
        rf"Connection from 127\.0\.0\.1:{clientPort} on \S+ closed "
        r"\((?P<reason>[^)]*)\) after (?P<bytes>\d+) bytes",
        timeout=DEADLINE,
    )
    out = client.outcome
    received = bytes(out.received)
    assert received == payload[: len(received)], "the echo differs from what was sent"
    if ending == "reset":
        # What was in flight when the client reset may or may not have
        # been echoed: only the reason is the same on every run.
        return ("reset", closed["reason"])
    # A flood sends as much as the kernel takes, which differs from run to
    # run: the bytes back are compared with what this run sent.
    expected = min(out.sent, LIMIT)
    return (
        hashlib.sha256(received).hexdigest() == hashlib.sha256(payload[:expected]).hexdigest(),
        out.eof,
        out.reset,
        closed["reason"] == ("max-session-bytes" if out.sent >= LIMIT else "client closed"),
        int(closed["bytes"]) - expected,
        closed["reason"] if any(kind == "flood" for kind, _ in script) else out.sent,
    )


class LaneDifferentialTests(ServerTestCase):
    """
    The same scripts against both lanes.
    """

    def setUp(self) -> None:
        if unavailableBecause():
            raise SkipTest(unavailableBecause())
        common = ("--max-session-bytes", str(LIMIT), "--log-connections", "100000")
        self.servers = {
            lane: self.start("--port", LOOPBACK, "--native", lane, *common)
            for lane in ("on", "off")
        }
        for lane, server in self.servers.items():
            served = "native" if lane == "on" else "python"
            self.assertTrue(re.search(rf"served by the {served} lane", server.output()))

    @settings(PROPERTIES, max_examples=30)
    @given(steps, endings, st.integers(0, 2**32), windows)
    def test_sameEcho(self, script: list[Step], ending: str, seed: int, window: int) -> None:
        """Both lanes send the same bytes back, end the same way and log
        the same reason and count; a half-closed or closed connection gets
        everything it sent back, up to --max-session-bytes, then EOF."""
        native = runScript(self.servers["on"], script, ending, seed, window)
        python = runScript(self.servers["off"], script, ending, seed, window)
        self.assertEqual(native, python)
        if ending != "reset":
            self.assertEqual(native[:5], (True, True, False, True, 0))
