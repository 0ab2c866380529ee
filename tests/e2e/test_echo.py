"""
End-to-end tests: a real C{twistd -n echo} process on loopback, driven by
plain sockets.  Each test is bounded by socket and process timeouts.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from echotw.options import EchoOptions
from tests.support.process import (
    LOOPBACK,
    ROOT,
    TWISTD,
    ServerTestCase,
    connect,
    echo,
    isClosedByServer,
    refusedFrom,
    run,
    temporaryDirectory,
    twistdCommand,
)

CONNECTED = r"(?m)Connection from \S+ on \S+$"
"""A connection's opening log line (its closing line goes on after the listener)."""


def totalRetransmits(sock: socket.socket) -> int:
    """
    The segments C{sock}'s kernel has retransmitted, its SYN included
    (C{tcpi_total_retrans}, at offset 100 of Linux's C{struct tcp_info}).
    """
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("I", info, 100)[0])


class EchoEndToEndTests(ServerTestCase):
    def test_byteExactManyConnections(self) -> None:
        """Random binary payloads up to several MiB, on 40 connections at
        once, come back byte-exact, each followed by EOF after a half-close."""
        server = self.start("--port", LOOPBACK)
        rng = random.Random(7)
        payloads = [rng.randbytes(n) for n in [0, 1, 4096, 3 * 1024 * 1024, 5 * 1024 * 1024]]
        payloads += [rng.randbytes(rng.randrange(1, 400_000)) for _ in range(35)]

        def roundTrip(payload: bytes) -> bool:
            with connect(server.port) as sock:
                return echo(sock, payload) == payload

        with ThreadPoolExecutor(max_workers=len(payloads)) as pool:
            self.assertEqual(list(pool.map(roundTrip, payloads)), [True] * len(payloads))
        server.waitFor(r"closed \(client closed\) after 5242880 bytes")

    def test_backpressureBoundsMemory(self) -> None:
        """A client that writes 200 MiB without reading for seconds does not
        grow the server by 32 MiB, and then gets all 200 MiB back exactly."""
        server = self.start("--port", LOOPBACK)
        total = 200 * 1024 * 1024
        chunk = 1024 * 1024
        rng = random.Random(200)
        blocks = [rng.randbytes(chunk) for _ in range(8)]
        sent_hash, recv_hash = hashlib.sha256(), hashlib.sha256()
        time.sleep(0.2)
        baseline = server.rssKiB()
        peak = baseline
        sock = connect(server.port)
        sock.setblocking(False)
        sent = received = 0
        pending = memoryview(b"")
        flood_until = time.monotonic() + 4.0
        deadline = time.monotonic() + 120.0
        while received < total:
            self.assertLess(time.monotonic(), deadline, "backpressure round trip timed out")
            flooding = time.monotonic() < flood_until
            if not pending and sent < total:
                block = blocks[(sent // chunk) % len(blocks)] + sent.to_bytes(8, "big")
                block = block[: min(chunk, total - sent)]
                sent_hash.update(block)
                pending = memoryview(block)
            readers = [] if flooding else [sock]
            writers = [sock] if pending else []
            r, w, _ = select.select(readers, writers, [], 0.05)
            if w:
                try:
                    n = sock.send(pending)
                    pending = pending[n:]
                    sent += n
                except BlockingIOError:
                    pass
            if r:
                data = sock.recv(1 << 20)
                self.assertTrue(data, "server closed early")
                recv_hash.update(data)
                received += len(data)
            if flooding:
                peak = max(peak, server.rssKiB())
        sock.close()
        growth = (peak - baseline) / 1024
        self.assertLess(growth, 32, f"server RSS grew {growth:.1f} MiB")
        self.assertEqual(sent_hash.hexdigest(), recv_hash.hexdigest())
        print(f"\nbackpressure: peak RSS growth {growth:.2f} MiB during the flood")

    def test_halfClose(self) -> None:
        """Data pending when the client shuts down writing is all echoed,
        then EOF."""
        server = self.start("--port", LOOPBACK)
        payload = random.Random(1).randbytes(2 * 1024 * 1024)
        with connect(server.port) as sock:
            sock.sendall(payload[:1000])
            self.assertEqual(echo(sock, payload[1000:]), payload)

    def test_denyAndAllow(self) -> None:
        """A denied client is closed without an echo and the refusal is
        logged with its address; an allowed one is served."""
        server = self.start("--port", LOOPBACK, "--deny", "127.0.0.2", "--allow", "127.0.0.0/8")
        with connect(server.port) as sock:
            self.assertEqual(echo(sock, b"ok"), b"ok")
        self.assertTrue(refusedFrom(server.port, "127.0.0.2"))
        server.waitFor(
            r"Refused connection from 127\.0\.0\.2:\d+ on tcp:0:interface=127\.0\.0\.1: denied"
        )

    def test_maxConnections(self) -> None:
        """--max-connections refuses past the limit and frees slots on close."""
        server = self.start("--port", LOOPBACK, "--max-connections", "2")
        first, second = connect(server.port), connect(server.port)
        self.assertEqual(echo(second, b"x"), b"x")
        second = connect(server.port)
        server.waitForCount(CONNECTED, 3)
        third = connect(server.port)
        self.assertTrue(isClosedByServer(third))
        server.waitFor("max-connections")
        first.close()
        server.waitFor(r"closed \(client (closed|reset)\) after 0 bytes")
        with connect(server.port) as again:
            self.assertEqual(echo(again, b"y"), b"y")
        second.close()
        third.close()

    def test_severalListenersAndUnix(self) -> None:
        """One process serves several listeners, Unix sockets included."""
        path = temporaryDirectory(self) / "echo.sock"
        server = self.start("-p", LOOPBACK, "-p", LOOPBACK, "-p", f"unix:{path}", listeners=3)
        ports = {int(a.rsplit(":", 1)[1]) for a in server.addresses[:2]}
        self.assertEqual(len(ports), 2)
        for port in ports:
            with connect(port) as sock:
                self.assertEqual(echo(sock, b"tcp"), b"tcp")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            self.assertEqual(echo(sock, b"unix"), b"unix")

    def test_burstOfConnections(self) -> None:
        """1,000 connections opened back to back all connect without a SYN
        retransmit (which would take a second): the backlog absorbs them.
        Each client's kernel counts its retransmissions (TCP_INFO), so no
        clock is involved."""
        if not hasattr(socket, "TCP_INFO"):
            raise SkipTest("TCP_INFO (Linux) tells whether a SYN was retransmitted")
        server = self.start("--port", LOOPBACK, "--log-connections", "0")
        socks = []
        try:
            for _ in range(1000):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", server.port))
                socks.append(s)
            pending = set(socks)
            deadline = time.monotonic() + 60
            with selectors.DefaultSelector() as poller:
                for s in socks:
                    poller.register(s, selectors.EVENT_WRITE)
                while pending and time.monotonic() < deadline:
                    for key, _ in poller.select(0.5):
                        s = key.fileobj  # type: ignore[assignment]
                        self.assertEqual(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), 0)
                        poller.unregister(s)
                        pending.discard(s)
            self.assertEqual(len(pending), 0)
            retransmitted = [s for s in socks if totalRetransmits(s)]
            self.assertEqual(len(retransmitted), 0, "connections waited for a SYN retransmit")
            server.waitForCount(CONNECTED, 1000, timeout=60)
        finally:
            for s in socks:
                s.close()

    def test_sigtermStopsCleanly(self) -> None:
        """SIGTERM closes listeners, echoes bytes already in flight, then
        the process ends by SIGTERM after a clean shutdown (twistd's
        convention)."""
        server = self.start("--port", LOOPBACK, "--shutdown-timeout", "5")
        sock = connect(server.port)
        payload = random.Random(3).randbytes(64 * 1024)
        sock.sendall(payload)
        server.waitFor(r"Connection from")  # accepted, not only queued by the kernel
        server.process.send_signal(signal.SIGTERM)
        received = bytearray()
        sock.settimeout(10)
        while True:
            data = sock.recv(65536)
            if not data:
                break
            received += data
        self.assertEqual(bytes(received), payload)
        self.assertEqual(server.wait(), -signal.SIGTERM)
        output = server.output()
        self.assertIn("closed (server shutdown)", output)
        self.assertIn("Server Shut Down", output)
        self.assertNotIn("Traceback", output)

    def test_reactorChoice(self) -> None:
        """twistd runs echotw's epoll reactor unless told otherwise (or when
        told C{-r echotw}); with C{-r epoll} or C{-r asyncio} that reactor
        serves the same echo."""
        payload = random.Random(11).randbytes(300_000)
        choices = [
            ("", "echotw.transport.reactor.EchoReactor"),
            ("echotw", "echotw.transport.reactor.EchoReactor"),
            ("epoll", "EPollReactor"),
            ("asyncio", "AsyncioSelectorReactor"),
        ]
        for chosen, expected in choices:
            server = self.start("--port", LOOPBACK, reactor=chosen)
            with connect(server.port) as sock:
                self.assertEqual(echo(sock, payload), payload)
            server.waitFor(r"reactor class: \S*" + expected.replace(".", r"\."))
            server.stop()

    def test_twistRunner(self) -> None:
        """Twisted's newer runner, twist, runs the same plugin."""
        server = self.start("--port", LOOPBACK, runner="twist")
        with connect(server.port) as sock:
            self.assertEqual(echo(sock, b"twist"), b"twist")
        self.assertIn(server.stop(), (0, -signal.SIGTERM))

    def test_twistWithEchotwReactor(self) -> None:
        """twist installs its own default reactor first, so --reactor=echotw
        is how it runs echotw's (docs/performance.md): it is found, and echoes; a name
        twist does not know is refused, so the option is really read."""
        payload = random.Random(12).randbytes(300_000)
        server = self.start("--port", LOOPBACK, runner="twist", reactor="echotw")
        with connect(server.port) as sock:
            self.assertEqual(echo(sock, payload), payload)
        self.assertIn(server.stop(), (0, -signal.SIGTERM))
        self.assertNotIn("Traceback", server.output())
        unknown = subprocess.run(
            twistdCommand("--port", LOOPBACK, runner="twist", reactor="no-such-reactor"),
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        self.assertNotEqual(unknown.returncode, 0)
        self.assertIn("no-such-reactor", unknown.stdout + unknown.stderr)


class StartupErrorTests(SynchronousTestCase):
    def assertOneLineError(self, result: subprocess.CompletedProcess[str], *needles: str) -> None:
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if "error" in line]
        self.assertEqual(len(errors), 1, result.stdout + result.stderr)
        for needle in needles:
            self.assertIn(needle, errors[0])

    def test_badOptions(self) -> None:
        """Bad values exit with status 1 and one line naming the option,
        before anything listens."""
        cases = [
            (["--allow", "10.0.0.1/8"], "--allow"),
            (["--max-per-ip", "-1"], "--max-per-ip"),
            (["--port", "nosuchtype:1"], "--port"),
            (["--port", "tcp:1:bogus=2"], "--port"),
        ]
        with ThreadPoolExecutor(max_workers=len(cases)) as pool:
            results = list(pool.map(lambda case: run(*case[0]), cases))
        for (_, option), result in zip(cases, results, strict=True):
            self.assertOneLineError(result, option)
            self.assertNotIn("Listening on", result.stdout)

    def test_portInUse(self) -> None:
        """A busy port exits with status 1 and one line naming the address,
        and no other listener is left serving."""
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            result = run("--port", LOOPBACK, "--port", f"tcp:{port}:interface=127.0.0.1")
        self.assertEqual(result.returncode, 1)
        output = result.stdout + result.stderr
        self.assertNotIn("Traceback", output)
        [line] = [line for line in output.splitlines() if "cannot listen" in line]
        self.assertIn(f"tcp:{port}:interface=127.0.0.1", line)
        self.assertIn("Address already in use", line)

    def test_unixPathTakenLeavesNoLock(self) -> None:
        """A Unix listener whose path is an ordinary file exits with status 1
        and one line, and leaves no PATH.lock behind (Twisted's, naming the
        exited process)."""
        directory = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, directory)
        path = directory / "taken"
        path.write_text("not a socket\n")
        result = run("--port", f"unix:{path}")
        self.assertEqual(result.returncode, 1)
        output = result.stdout + result.stderr
        [line] = [line for line in output.splitlines() if "cannot listen" in line]
        self.assertIn("Address already in use", line)
        self.assertEqual(sorted(os.listdir(directory)), ["taken"])

    def test_listenerErrorsExitWith1(self) -> None:
        """Every way a listener can fail to start (docs/operations.md: "Start-up
        errors exit with status 1") ends twistd with status 1 and one line naming
        it: a busy UDP port, a busy metrics port, a busy port the --workers
        supervisor binds.  (Option errors are test_badOptions, a busy TCP
        port test_portInUse.)"""
        with (
            socket.socket() as busyTCP,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busyUDP,
        ):
            busyTCP.bind(("127.0.0.1", 0))
            busyTCP.listen()
            busyUDP.bind(("127.0.0.1", 0))
            tcp = f"tcp:{busyTCP.getsockname()[1]}:interface=127.0.0.1"
            udp = f"udp:{busyUDP.getsockname()[1]}:interface=127.0.0.1"
            cases = [
                (["--port", LOOPBACK, "--udp", udp], udp),
                (["--port", LOOPBACK, "--metrics", tcp], tcp),
                (["--workers", "2", "--port", tcp], tcp),
            ]
            with ThreadPoolExecutor(max_workers=len(cases)) as pool:
                results = list(pool.map(lambda case: run(*case[0]), cases))
        for (args, needle), result in zip(cases, results, strict=True):
            output = result.stdout + result.stderr
            self.assertEqual(result.returncode, 1, f"{args}: {output}")
            self.assertNotIn("Traceback", output, args)
            errors = [line for line in output.splitlines() if f"cannot listen on {needle}" in line]
            self.assertEqual(len(errors), 1, f"{args}: {output}")

    def test_helpListsEveryOption(self) -> None:
        """twistd --help lists echo; twistd echo --help documents every
        option echo has (taken from the options class, so a new option
        without help fails), each with help text and its default, and
        the option reference in docs/options.md lists the same options."""
        result = subprocess.run(
            [sys.executable, "-c", TWISTD, "--help"], capture_output=True, text=True, timeout=30
        )
        self.assertRegex(result.stdout, r"\n\s+echo\s+")
        help = run("--help")
        self.assertEqual(help.returncode, 0)
        options = EchoOptions()
        twisteds = {"help", "version"}
        names = {name.rstrip("=") for name in options.longOpt} - twisteds
        documented = helpByOption(help.stdout)
        self.assertEqual(set(documented) - twisteds, names)
        for name in names:
            self.assertRegex(documented[name], r"\w.*\[default: [^]]*\]", name)
        for short in options.shortOpt.replace(":", ""):
            self.assertIn(f"-{short}, --{options.synonyms[short]} ", help.stdout)
        self.assertIn("[default: 8080", help.stdout)
        self.assertEqual(documentedOptions() - twisteds, names)


def helpByOption(text: str) -> dict[str, str]:
    """
    The help text of each option in Twisted's usage output, by long name.
    """
    documented: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        option = re.match(r"  (?:-\w, |    )--([\w-]+)=?(?: +(.*))?$", line)
        if option:
            current = option[1]
            documented[current] = option[2] or ""
        elif current is not None and line.startswith(" " * 8) and line.strip():
            documented[current] += " " + line.strip()
        else:
            current = None
    return documented


def documentedOptions() -> set[str]:
    """
    The long options in the option tables of docs/options.md (rows whose
    first cell names one).
    """
    names = set()
    for line in (ROOT / "docs" / "options.md").read_text().splitlines():
        cells = line.split("|")
        if line.startswith("| `-") and len(cells) > 2:
            names.update(re.findall(r"`--([\w-]+)", cells[1]))
    return names
