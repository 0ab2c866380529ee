"""
The native lane and the Python path, side by side: two real servers, one
with C{--native on} and one with C{--native off}, driven over loopback by
the same random scripts (chunkings, pauses where the client does not read,
and an ending: half-close, close or reset), must send the same bytes back,
end each connection the same way, and log the same reason and byte count.
"""

from __future__ import annotations

import errno
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

from echotw.nativelane import unavailableBecause
from tests.process import LOOPBACK, EchoServer, ServerTestCase
from tests.properties import PROPERTIES

LIMIT = 60000
"""Both servers' C{--max-session-bytes}: some scripts send more."""

DEADLINE = 30.0
"""Seconds any one step of a script may take."""

Step = tuple[str, int]
"""C{("send", n)}: send n bytes, reading meanwhile; C{("pause", n)}: send n
bytes without reading; C{("drain", 0)}: read everything echoed so far."""

steps = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(1, 20000)),
        st.tuples(st.just("pause"), st.integers(1, 16000)),
        st.tuples(st.just("drain"), st.just(0)),
    ),
    min_size=1,
    max_size=6,
)
endings = st.sampled_from(["halfclose", "close", "reset"])


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

    def __init__(self, port: int, payload: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
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

    def send(self, size: int, reading: bool) -> None:
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
                else:
                    select.select([], [self.sock], [], 0.01)
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


def runScript(server: EchoServer, script: list[Step], ending: str, seed: int) -> tuple:
    """
    Run C{script} against C{server}: what the client saw, and the server's
    close line (reason, bytes).
    """
    total = sum(n for _, n in script)
    payload = random.Random(seed).randbytes(total)
    client = Client(server.port, payload)
    clientPort = client.sock.getsockname()[1]
    try:
        for kind, n in script:
            if kind == "drain":
                client.drain(min(client.outcome.sent, LIMIT))
            else:
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
    return (received, out.eof, out.reset, closed["reason"], int(closed["bytes"]))


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
    @given(steps, endings, st.integers(0, 2**32))
    def test_sameEcho(self, script: list[Step], ending: str, seed: int) -> None:
        """Both lanes send the same bytes back, end the same way and log
        the same reason and count; a half-closed or closed connection gets
        everything it sent back, up to --max-session-bytes, then EOF."""
        native = runScript(self.servers["on"], script, ending, seed)
        python = runScript(self.servers["off"], script, ending, seed)
        self.assertEqual(native, python)
        if ending != "reset":
            total = sum(n for _, n in script)
            received, eof, _, reason, count = native
            self.assertEqual(len(received), min(total, LIMIT))
            self.assertTrue(eof)
            self.assertEqual(count, min(total, LIMIT))
            self.assertEqual(reason, "max-session-bytes" if total >= LIMIT else "client closed")
