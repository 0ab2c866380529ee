"""
End-to-end tests of the operator's controls against a real C{twistd -n echo}
process: reloads on SIGHUP, graceful drain, idle timeout, rates, session
limits, a custom verifier and the stats line.
"""

from __future__ import annotations

import os
import signal
import socket
import textwrap
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.support.process import (
    LOOPBACK,
    EchoServer,
    ServerTestCase,
    connect,
    echo,
    isClosedByServer,
    refusedFrom,
    run,
    temporaryDirectory,
)


class OperationsEndToEndTests(ServerTestCase):
    def served(self, server: EchoServer) -> bool:
        with connect(server.port) as sock:
            return echo(sock, b"ping", timeout=10) == b"ping"

    def test_sighupReload(self) -> None:
        """SIGHUP re-reads the deny file: allowed, then denied (an open
        connection of the denied address is closed), then a broken file
        keeps the deny in force, then allowed again."""
        deny = temporaryDirectory(self) / "deny.rules"
        deny.write_text("# nobody denied yet\n")
        server = self.start("--port", LOOPBACK, "--deny-file", str(deny))
        self.assertTrue(self.served(server))
        held = connect(server.port)
        self.assertEqual(echo_once(held, b"before"), b"before")

        deny.write_text("127.0.0.0/8\n")
        os.kill(server.pid, signal.SIGHUP)
        server.waitFor(
            r"Rules reloaded: 0 allow and 1 deny networks; closing 1 connection they deny"
        )
        self.assertTrue(isClosedByServer(held))
        held.close()
        self.assertFalse(self.served(server))

        deny.write_text("127.0.0.0/8\nthis is not an address\n")
        os.kill(server.pid, signal.SIGHUP)
        server.waitFor(rf"Rules not reloaded.*{deny.name}:2:")
        self.assertFalse(self.served(server))

        deny.write_text("")
        os.kill(server.pid, signal.SIGHUP)
        server.waitFor(r"(Rules reloaded[^\n]*\n(.|\n)*){2}")
        self.assertTrue(self.served(server))

    def test_badRuleFileAtStart(self) -> None:
        """A bad rule file at start-up is one line naming file and line, and
        exit status 1."""
        bad = temporaryDirectory(self) / "allow.rules"
        bad.write_text("10.0.0.0/8\n10.0.0.1/8\n")
        result = run("--allow-file", str(bad))
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"{bad}:2:", result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1)

    def test_drainDeadlineBeatsStalledPeer(self) -> None:
        """A peer that never reads cannot hold the process past
        --shutdown-timeout: it is aborted and the process exits.  (Without
        the deadline it would hold it for ever; the bound below leaves a
        loaded machine 8 s to exit and is still under the 10 s default, so
        a deadline taken from elsewhere fails too.)"""
        server = self.start("--port", LOOPBACK, "--shutdown-timeout", "1")
        stalled = connect(server.port)
        stalled.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                sent += stalled.send(b"z" * 65536)
            except BlockingIOError:
                break
        server.waitFor(r"Connection from")
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        self.assertEqual(server.wait(timeout=30), -signal.SIGTERM)
        self.assertLess(time.monotonic() - started, 9)
        self.assertIn("closed (server shutdown)", server.output())
        stalled.close()

    def test_idleTimeout(self) -> None:
        """A silent connection is closed after --idle-timeout, reason
        timeout; a chatty one stays.  The chatty one echoes continuously
        until the silent one is closed: a gap between its echoes is one
        round trip and 20 ms, not the 1 s that would make it idle."""
        server = self.start("--port", LOOPBACK, "--idle-timeout", "1")
        silent = connect(server.port)
        chatty = connect(server.port)
        silent.setblocking(False)
        deadline = time.monotonic() + 20
        while stillOpen(silent):
            self.assertLess(time.monotonic(), deadline, "the silent connection was left open")
            self.assertEqual(echo_once(chatty, b"k"), b"k")
            time.sleep(0.02)
        server.waitFor(r"closed \(timeout\) after 0 bytes")
        self.assertEqual(echo_once(chatty, b"still"), b"still")
        silent.close()
        chatty.close()

    def test_connectionRate(self) -> None:
        """Past --burst, a fast source is refused at accept time, with the
        reason logged.  (One token every 1,000 s: however slow the machine,
        none comes back during the test.)"""
        server = self.start("--port", LOOPBACK, "--rate", "0.001", "--burst", "2")
        self.assertTrue(self.served(server))
        self.assertTrue(self.served(server))
        with connect(server.port) as third:
            self.assertTrue(isClosedByServer(third))
        server.waitFor(r"Refused connection from 127\.0\.0\.1:\d+ on \S+: rate")

    def test_sessionLimits(self) -> None:
        """--max-session-bytes closes after echoing; --max-session-seconds
        closes an open session on time."""
        server = self.start(
            "--port", LOOPBACK, "--max-session-bytes", "1000", "--max-session-seconds", "1"
        )
        with connect(server.port) as sock:
            sock.sendall(b"a" * 1500)
            received = read_until_eof(sock)
        self.assertEqual(received, b"a" * len(received))
        self.assertGreaterEqual(len(received), 1000)
        server.waitFor(r"closed \(max-session-bytes\)")
        with connect(server.port) as sock:
            self.assertEqual(echo_once(sock, b"t"), b"t")
            self.assertTrue(isClosedByServer(sock, timeout=5))
        server.waitFor(r"closed \(max-session-seconds\)")

    def test_customVerifier(self) -> None:
        """--verifier consults a user's callable: its refusal reason is
        logged; a verifier that raises refuses without crashing."""
        directory = temporaryDirectory(self)
        (directory / "site_rules.py").write_text(
            textwrap.dedent(
                """
                calls = []

                def verify(address, listener):
                    calls.append(address)
                    if len(calls) == 2:
                        raise RuntimeError("verifier bug")
                    return None if len(calls) == 1 else "third strike"
                """
            )
        )
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([str(directory), os.environ.get("PYTHONPATH", "")]),
        )
        server = self.start("--port", LOOPBACK, "--verifier", "site_rules:verify", env=env)
        self.assertTrue(self.served(server))
        self.assertFalse(self.served(server))
        self.assertFalse(self.served(server))
        server.waitFor(r"Refused connection from 127\.0\.0\.1:\d+ on \S+: verifier error")
        server.waitFor(r"RuntimeError: verifier bug")
        self.assertEqual(server.process.poll(), None)

    def test_verifierImportError(self) -> None:
        """An unimportable verifier is a one-line start-up error."""
        result = run("--verifier", "no_such_module_here:verify")
        self.assertEqual(result.returncode, 1)
        self.assertIn("--verifier", result.stderr)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1)

    def test_mappedAddressIsOneSource(self) -> None:
        """127.0.0.1 and ::ffff:127.0.0.1 (an IPv4 client of a dual-stack
        tcp6 listener) are one source for --max-per-ip."""
        server = self.start(
            "--port", LOOPBACK, "--port", "tcp6:0:interface=\\:\\:", "--max-per-ip", "1",
            listeners=2,
        )  # fmt: skip
        v4, v6 = (int(a.rsplit(":", 1)[1]) for a in server.addresses[:2])
        first = connect(v4)
        self.assertEqual(echo_once(first, b"one"), b"one")
        with connect(v6) as second:
            self.assertTrue(isClosedByServer(second))
        server.waitFor(
            r"Refused connection from \[::ffff:127\.0\.0\.1\]:\d+ on tcp6:0\S*: max-per-ip"
        )
        first.close()

    def test_metricsScrape(self) -> None:
        """--metrics serves Prometheus text that the client library parses;
        counters move as connections are made and refused."""
        server = self.start(
            "--port", LOOPBACK, "--metrics", LOOPBACK, "--deny", "127.0.0.2"
        )  # fmt: skip
        address = server.waitFor(r"Serving metrics on \S+ at (127\.0\.0\.1:\d+)").group(1)

        def scrape() -> dict[str, float]:
            url = f"http://{address}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
            samples = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    samples[f"{sample.name}{{{labels}}}"] = sample.value
            return samples

        before = scrape()
        self.assertIn("process_resident_memory_bytes{}", before)
        self.assertTrue(self.served(server))
        self.assertTrue(refusedFrom(server.port, "127.0.0.2"))
        server.waitFor("Refused connection")
        server.waitFor(r"closed \(client closed\) after 4 bytes")
        after = scrape()
        listener = "listener=tcp:0:interface=127.0.0.1"
        self.assertEqual(after[f"echotw_connections_total{{{listener}}}"], 1)
        self.assertEqual(after[f"echotw_connections_open{{{listener}}}"], 0)
        self.assertEqual(after["echotw_connections_refused_total{reason=denied}"], 1)
        self.assertEqual(after["echotw_bytes_echoed_total{}"], 4)
        self.assertEqual(after["echotw_connection_duration_seconds_count{}"], 1)

    def test_statsLine(self) -> None:
        """--stats-interval logs a summary line periodically."""
        server = self.start("--port", LOOPBACK, "--stats-interval", "1", "--deny", "127.0.0.2")
        self.assertTrue(self.served(server))
        self.assertTrue(refusedFrom(server.port, "127.0.0.2"))
        server.waitFor(r"Stats: 0 open, 1 accepted, 1 refused, 4 bytes echoed")


def echo_once(sock: socket.socket, data: bytes) -> bytes:
    """Send C{data} on an open connection and read the same length back."""
    sock.settimeout(10)
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(len(data) - len(got))
        if not chunk:
            break
        got += chunk
    return got


def stillOpen(sock: socket.socket) -> bool:
    """Whether the server has not closed non-blocking C{sock} (which it never sends to)."""
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False


def read_until_eof(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    got = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk
