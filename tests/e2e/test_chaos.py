"""
A bounded chaos test against a real C{twistd -n echo} process: many clients
at once, each doing a random mix of what real peers do (verified echoes of
random sizes, resets mid-stream, half-closes, stalls, connections that
vanish), with SIGHUP reloads in between.  Afterwards every verified echo was
exact, the server's open connections and its file descriptors are back where
they started, and its log holds no traceback.

The mix is drawn from a seed, new on each run and named in every failure
(set C{ECHOTW_CHAOS_SEED} to replay one); thread scheduling still varies.
Everything is bounded: the number of clients, the actions each may take, the
time the chaos runs, and every socket operation.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import struct
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support.process import LOOPBACK, EchoServer, ServerTestCase, echo

CLIENTS = 80
"""Client threads at once."""
CHAOS_SECONDS = 8.0
"""How long the clients keep starting new actions."""
MAX_ACTIONS = 60
"""The most actions one client takes."""
RELOAD_EVERY = 1.5
"""Seconds between SIGHUP reloads during the chaos."""
IO_TIMEOUT = 20.0
"""The longest any one socket operation may wait."""
SETTLE_SECONDS = 20.0
"""How long the server has to release every connection afterwards."""


class ChaosFailure(Exception):
    """
    A client saw something a correct echo server never does.
    """


def payloadSize(rng: random.Random) -> int:
    """
    Mostly small, sometimes hundreds of KiB, now and then a few MiB.
    """
    roll = rng.random()
    if roll < 0.7:
        return rng.randint(1, 4096)
    if roll < 0.95:
        return rng.randint(4096, 256 * 1024)
    return rng.randint(256 * 1024, 2 * 1024 * 1024)


def sendWithoutWaiting(sock: socket.socket, payload: bytes) -> int:
    """
    Send as much of C{payload} as the connection takes without waiting;
    return how much.  Leaves the socket non-blocking.
    """
    sock.setblocking(False)
    sent = 0
    while sent < len(payload):
        try:
            sent += sock.send(payload[sent : sent + 262144])
        except BlockingIOError:
            break
    return sent


def expectExact(received: bytes, payload: bytes) -> None:
    if received != payload:
        at = next(
            (i for i, (a, b) in enumerate(zip(received, payload, strict=False)) if a != b), None
        )
        raise ChaosFailure(
            f"echo differs: {len(received)} bytes back for {len(payload)} sent, "
            f"first difference at {at}"
        )


class Client:
    """
    One client thread's actions, drawn from its own generator.
    """

    def __init__(self, port: int, rng: random.Random, stop: float) -> None:
        self.port = port
        self.rng = rng
        self.stop = stop
        self.done: Counter[str] = Counter()
        self.verifiedBytes = 0

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=IO_TIMEOUT)
        sock.settimeout(IO_TIMEOUT)
        return sock

    def run(self) -> None:
        actions: dict[str, Callable[[], None]] = {
            "echo": self.echo,
            "ping-pong": self.pingPong,
            "reset mid-stream": self.resetMidStream,
            "half-close then read": self.halfCloseThenRead,
            "stall then read": self.stallThenRead,
            "connect and vanish": self.vanish,
        }
        names = list(actions)
        weights = [30, 15, 15, 15, 10, 15]
        for _ in range(MAX_ACTIONS):
            if time.monotonic() >= self.stop:
                return
            name = self.rng.choices(names, weights)[0]
            try:
                actions[name]()
            except (ChaosFailure, OSError, AssertionError) as e:
                raise ChaosFailure(f"{name}: {type(e).__name__}: {e}") from None
            self.done[name] += 1

    def echo(self) -> None:
        """Verified echo of a random payload, sent and read at once, then
        a half-close and EOF."""
        payload = self.rng.randbytes(payloadSize(self.rng))
        with self.connect() as sock:
            expectExact(echo(sock, payload, timeout=IO_TIMEOUT), payload)
        self.verifiedBytes += len(payload)

    def pingPong(self) -> None:
        """A few verified round trips on one connection, then a plain close."""
        with self.connect() as sock:
            for _ in range(self.rng.randint(1, 5)):
                payload = self.rng.randbytes(self.rng.randint(1, 8192))
                sock.sendall(payload)
                received = bytearray()
                while len(received) < len(payload):
                    chunk = sock.recv(len(payload) - len(received))
                    if not chunk:
                        raise ChaosFailure(f"EOF after {len(received)} of {len(payload)} bytes")
                    received += chunk
                expectExact(bytes(received), payload)
                self.verifiedBytes += len(payload)

    def resetMidStream(self) -> None:
        """Send part of a stream (as much as goes without waiting), read a
        little or nothing, then reset."""
        with self.connect() as sock:
            sendWithoutWaiting(sock, self.rng.randbytes(payloadSize(self.rng)))
            if self.rng.random() < 0.5:
                sock.settimeout(IO_TIMEOUT)
                sock.recv(self.rng.randint(1, 4096))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def halfCloseThenRead(self) -> None:
        """Send everything, half-close, and only then read it all back."""
        payload = self.rng.randbytes(self.rng.randint(0, 128 * 1024))
        with self.connect() as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            received = bytearray()
            while chunk := sock.recv(262144):
                received += chunk
        expectExact(bytes(received), payload)
        self.verifiedBytes += len(payload)

    def stallThenRead(self) -> None:
        """Send without reading until the server stops taking more (it has
        paused reading) or all is sent, wait, then read everything back
        while sending the rest."""
        payload = self.rng.randbytes(self.rng.randint(64 * 1024, 4 * 1024 * 1024))
        with self.connect() as sock:
            sent = sendWithoutWaiting(sock, payload)
            time.sleep(self.rng.uniform(0.1, 1.0))
            received = bytearray()
            while True:
                try:
                    chunk = sock.recv(262144)
                except BlockingIOError:
                    break
                if not chunk:
                    raise ChaosFailure("EOF while stalled")
                received += chunk
            received += echo(sock, payload[sent:], timeout=IO_TIMEOUT)
        expectExact(bytes(received), payload)
        self.verifiedBytes += len(payload)

    def vanish(self) -> None:
        """Connect and go: at once, after a few bytes, or with a reset."""
        sock = self.connect()
        roll = self.rng.random()
        if roll < 0.3:
            sock.send(self.rng.randbytes(self.rng.randint(1, 1024)))
        elif roll < 0.6:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def openConnections(metrics: str) -> float:
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "echotw_connections_open"
    )


def descriptors(server: EchoServer) -> dict[int, str]:
    """
    The server's open descriptors, each with what it is (C{socket:[...]},
    C{anon_inode:[eventpoll]}, a path).
    """
    found = {}
    for name in os.listdir(f"/proc/{server.pid}/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/{server.pid}/fd/{name}")
        except FileNotFoundError:  # closed while listed
            pass
    return found


def laneDescriptors(server: EchoServer) -> int:
    """
    The descriptors the native lane keeps once it has served a connection:
    its epoll set, made at the first connection it serves and kept as long
    as the reactor runs, however many connections come and go.
    """
    lane = server.waitFor(r"served by the (\w+) lane").group(1)
    return 1 if lane == "native" else 0


class ChaosTests(ServerTestCase):
    def test_chaos(self) -> None:
        """Many clients at once doing a random mix of verified echoes,
        resets, half-closes, stalls and vanishing, with reloads in between:
        every verified echo is exact, and afterwards the server holds no
        connection and no descriptor more than before, and logged no
        traceback."""
        seed = int(os.environ.get("ECHOTW_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
        where = f"(seed {seed}; replay with ECHOTW_CHAOS_SEED={seed})"
        denyFile = Path(tempfile.mkdtemp()) / "deny.rules"
        denyFile.write_text("192.0.2.0/24\n")
        server = self.start(
            "--port", LOOPBACK, "--metrics", LOOPBACK, "--deny-file", str(denyFile)
        )  # fmt: skip
        metrics = server.waitFor(r"Serving metrics on \S+ at (127\.0\.0\.1:\d+)").group(1)
        before = descriptors(server)
        # Taken before any connection, so that a descriptor kept by the
        # first one counts; the lane's own, made then, is expected.
        baseline = len(before) + laneDescriptors(server)
        self.assertEqual(openConnections(metrics), 0)

        stop = time.monotonic() + CHAOS_SECONDS
        clients = [Client(server.port, random.Random(seed + i), stop) for i in range(CLIENTS)]
        failures: list[str] = []

        def run(i: int, client: Client) -> None:
            try:
                client.run()
            except Exception as e:
                failures.append(f"client {i}: {e}")

        threads = [
            threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(clients)
        ]
        for thread in threads:
            thread.start()
        reloads = 0
        reloader = random.Random(seed)
        while time.monotonic() < stop:
            time.sleep(min(RELOAD_EVERY, max(0.0, stop - time.monotonic())))
            if time.monotonic() >= stop:
                break
            # A permissive file, rewritten whole (a reload never sees half a file).
            entries = [
                f"198.51.100.{reloader.randrange(256)}" for _ in range(reloader.randint(1, 50))
            ]
            fresh = denyFile.with_suffix(".new")
            fresh.write_text("\n".join(["# permissive", "192.0.2.0/24", *entries, ""]))
            os.replace(fresh, denyFile)
            os.kill(server.pid, signal.SIGHUP)
            reloads += 1
            server.waitForCount("Rules reloaded", reloads, timeout=IO_TIMEOUT)
        for thread in threads:
            thread.join(IO_TIMEOUT * 3)
        stuck = [i for i, thread in enumerate(threads) if thread.is_alive()]
        self.assertEqual(stuck, [], f"clients still running {where}")
        self.assertEqual(failures, [], f"{where}\n" + "\n".join(failures[:20]))

        done = sum((c.done for c in clients), Counter())
        self.assertEqual(len(done), 6, f"not every kind of action ran: {done} {where}")
        self.assertGreater(reloads, 0)

        # Each scrape is itself a connection to the server for a moment, so
        # the counts are read until both are back, within a bound.
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            left, after = openConnections(metrics), descriptors(server)
            if (left, len(after)) == (0, baseline) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.assertEqual(left, 0, f"connections left open {where}")
        new = [f"{fd}: {what}" for fd, what in after.items() if before.get(fd) != what]
        self.assertEqual(len(after), baseline, f"descriptors leaked {where}: new {new[:20]}")
        output = server.output()
        for bad in (r"Traceback", r"#critical", r"CRITICAL", r"Unhandled", r"Rules not reloaded"):
            self.assertIsNone(re.search(bad, output), f"{bad!r} in the log {where}")
        self.assertEqual(server.process.poll(), None, f"the server died {where}")
