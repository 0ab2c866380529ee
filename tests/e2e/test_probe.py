"""
End-to-end tests of the real C{echotw-probe} command (a subprocess) against
a real C{twistd -n echo} over TCP, UDP, TLS and a PROXY-protocol listener,
and against small peers run by the test itself: a plain echo, one that
corrupts a byte, one that never answers.  Loopback only; every wait has a
deadline.  Probes a test needs several of run side by side.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from unittest import SkipTest

from twisted.trial.unittest import SynchronousTestCase

from tests.support.process import (
    BIN,
    LOOPBACK,
    ServerTestCase,
    environmentWithRoot,
    freePort,
    serverDirectory,
)

PROBE = [sys.executable, "-m", "echotw.probe"]
PROBE_TIMEOUT = 60.0


class Probe:
    """
    A running C{echotw-probe} whose output is collected when it ends.
    """

    def __init__(self, *args: str, command: list[str] = PROBE) -> None:
        self.process = subprocess.Popen(
            [*command, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=serverDirectory(),
            env=environmentWithRoot(),
        )

    def finish(self) -> tuple[int, str, str]:
        """
        Wait for the probe; its exit status, standard output and error.
        """
        try:
            out, err = self.process.communicate(timeout=PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, err = self.process.communicate(timeout=5)
            raise AssertionError(
                f"echotw-probe still running after {PROBE_TIMEOUT}s:\n{out}\n{err}"
            ) from None
        return self.process.returncode, out, err


def probe(*args: str, command: list[str] = PROBE) -> tuple[int, str, str]:
    return Probe(*args, command=command).finish()


def summary(out: str) -> dict[str, Any]:
    """
    The JSON object on the last line of the probe's output.
    """
    document: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return document


class EchotwTests(ServerTestCase):
    """
    The probe against echotw itself.
    """

    def test_tcp(self) -> None:
        """Against a clean server: exit 0, every byte of every connection
        verified, round trips reported."""
        server = self.start("--port", LOOPBACK)
        code, out, err = probe(
            "--json", "-C", "3", "-c", "20", "-s", "3000", "127.0.0.1", str(server.port)
        )
        self.assertEqual(code, 0, out + err)
        result = summary(out)
        self.assertEqual(
            (result["mismatches"], result["messages_verified"], result["verified_bytes"]),
            (0, 60, 180000),
        )
        self.assertEqual(result["failures"], [])
        self.assertTrue(0 < result["rtt_p50_ms"] <= result["rtt_p99_ms"] <= result["rtt_max_ms"])
        self.assertGreater(result["throughput_bytes_per_s"], 0)
        self.assertIn("result: ok (exit 0)", out)

    def test_delayedServer(self) -> None:
        """Against --delay 0.05 the probe measures what the server adds:
        round trips of at least 45 ms at the median, every byte verified."""
        server = self.start("--port", LOOPBACK, "--delay", "0.05")
        code, out, err = probe("--json", "-c", "10", "-s", "512", "127.0.0.1", str(server.port))
        self.assertEqual(code, 0, out + err)
        result = summary(out)
        self.assertEqual(result["mismatches"], 0)
        self.assertGreaterEqual(result["rtt_p50_ms"], 45)

    def test_udp(self) -> None:
        """Over UDP each flow's datagrams come back verified, none lost."""
        server = self.start("--port", LOOPBACK, "--udp", "udp:0:interface=127.0.0.1", listeners=2)
        [address] = re.findall(r"Listening on udp:\S+ at (\S+)", server.output())
        port = address.rsplit(":", 1)[1]
        code, out, err = probe(
            "--udp", "--json", "-C", "2", "-c", "20", "-s", "512", "127.0.0.1", port
        )
        self.assertEqual(code, 0, out + err)
        result = summary(out)
        self.assertEqual(
            (result["transport"], result["lost"], result["mismatches"], result["verified_bytes"]),
            ("udp", 0, 0, 20480),
        )

    def test_tls(self) -> None:
        """Over TLS: verified against the CA given with --ca, by the name
        given with --sni, 20 kB messages byte-exact; refused when the
        certificate is not trusted.  (--insecure and a wrong --sni are
        covered in test_probe_loopback.)"""
        try:
            import OpenSSL  # noqa: F401
            import trustme
        except ImportError as e:
            raise SkipTest(f"TLS needs pyOpenSSL and trustme: {e}") from None
        directory = Path(tempfile.mkdtemp(prefix="echotw-probe-"))
        self.addCleanup(shutil.rmtree, directory, True)
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        key, chain, caFile = directory / "key.pem", directory / "cert.pem", directory / "ca.pem"
        cert.private_key_pem.write_to_path(str(key))
        cert.cert_chain_pems[0].write_to_path(str(chain))
        ca.cert_pem.write_to_path(str(caFile))
        server = self.start("--port", f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={chain}")
        target = ["127.0.0.1", str(server.port)]
        verified = Probe(
            "--json", "--tls", "--ca", str(caFile), "--sni", "localhost", "-s", "20k", *target
        )
        untrusted = Probe("--json", "--tls", *target)
        code, out, err = verified.finish()
        self.assertEqual(code, 0, out + err)
        result = summary(out)
        self.assertEqual((result["transport"], result["verified_bytes"]), ("tls", 200000))
        code, out, err = untrusted.finish()
        self.assertEqual(code, 2, out + err)
        result = summary(out)
        self.assertEqual(result["verified_bytes"], 0)
        self.assertIn("certificate verify failed", result["failures"][0]["reason"])

    def test_tlsCertificateMustNameTheServer(self) -> None:
        """A trusted certificate that does not name the server is refused,
        exit 2 with one line saying so: one for other names, and one
        without subjectAltName (made as README's openssl recipe without
        -addext), whose common name RFC 6125 clients do not use."""
        try:
            import trustme
            from cryptography.hazmat.primitives import serialization
        except ImportError as e:
            raise SkipTest(f"TLS needs pyOpenSSL and trustme: {e}") from None
        directory = self.temporaryDirectory()
        ca = trustme.CA()
        issued = ca.issue_cert("localhost", "127.0.0.1")
        key, chain, caFile = directory / "key.pem", directory / "cert.pem", directory / "ca.pem"
        issued.private_key_pem.write_to_path(str(key))
        issued.cert_chain_pems[0].write_to_path(str(chain))
        ca.cert_pem.write_to_path(str(caFile))
        commonKey, commonOnly = commonNameOnlyCertificate("localhost")
        commonKeyFile, commonFile = directory / "cn-key.pem", directory / "cn.pem"
        commonKeyFile.write_bytes(
            commonKey.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        commonFile.write_bytes(commonOnly.public_bytes(serialization.Encoding.PEM))
        server = self.start(
            "--port", f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={chain}",
            "--port", f"ssl:0:interface=127.0.0.1:privateKey={commonKeyFile}:certKey={commonFile}",
            listeners=2,
        )  # fmt: skip
        sanPort, commonPort = (address.rsplit(":", 1)[1] for address in server.addresses)
        wrongName = Probe(
            "--json", "--tls", "--ca", str(caFile), "--sni", "wrong.example", "127.0.0.1", sanPort
        )
        named = Probe(
            "--json", "--tls", "--ca", str(caFile), "--sni", "localhost", "127.0.0.1", sanPort
        )
        commonName = Probe(
            "--json",
            "--tls",
            "--ca",
            str(commonFile),
            "--sni",
            "localhost",
            "127.0.0.1",
            commonPort,
        )
        insecure = Probe("--json", "--tls", "--insecure", "127.0.0.1", commonPort)
        for p, expected in [
            (wrongName, "not for 'wrong.example': it names DNS:localhost, IP:127.0.0.1"),
            (commonName, "no subjectAltName"),
        ]:
            code, out, err = p.finish()
            self.assertEqual(code, 2, out + err)
            self.assertEqual(summary(out)["verified_bytes"], 0)
            [failure] = [line for line in out.splitlines() if line.startswith("FAILED")]
            self.assertIn(expected, failure)
            self.assertIn("result: FAILED (exit 2)", out)
            self.assertEqual(err, "")
        for p in (named, insecure):
            code, out, err = p.finish()
            self.assertEqual(code, 0, out + err)

    def test_proxyProtocol(self) -> None:
        """With --proxy-v1 or --proxy-v2 the probe gets through a haproxy:
        listener, whose log shows the header naming the probe's own
        address; without a header the same listener refuses it."""
        server = self.start("--port", "haproxy:tcp:0:interface=127.0.0.1", "--log-level", "debug")
        target = ["127.0.0.1", str(server.port)]
        probes = [Probe("--json", version, *target) for version in ("--proxy-v1", "--proxy-v2")]
        plain = Probe("--json", "--timeout", "10", *target)
        for p in probes:
            code, out, err = p.finish()
            self.assertEqual(code, 0, out + err)
            self.assertEqual(summary(out)["verified_bytes"], 10240)
        code, out, err = plain.finish()
        self.assertEqual(code, 2, out + err)
        for version in (1, 2):
            match = server.waitFor(
                rf"PROXY v{version} header from 127\.0\.0\.1:(\d+) on \S+: client 127\.0\.0\.1:(\d+)"
            )
            self.assertEqual(match[1], match[2])


def commonNameOnlyCertificate(name: str) -> tuple[Any, Any]:
    """
    A self-signed certificate (and its key) naming C{name} in its subject's
    common name alone, with no subjectAltName, as C{openssl req -x509
    -subj /CN=NAME} makes.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


class EchoPeer:
    """
    A plain echo server on loopback run by the test in threads, that can
    flip one byte at a given offset of each connection's echo.
    """

    def __init__(self, corruptAt: int | None = None) -> None:
        self._corruptAt = corruptAt
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._stopping = threading.Event()
        self.connections = 0
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            thread = threading.Thread(target=self._serve, args=(connection,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, connection: socket.socket) -> None:
        deadline = time.monotonic() + 30
        offset = 0
        self.connections += 1
        with connection:
            connection.settimeout(0.2)
            while not self._stopping.is_set() and time.monotonic() < deadline:
                try:
                    data = connection.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                at = self._corruptAt
                if at is not None and offset <= at < offset + len(data):
                    chunk = bytearray(data)
                    chunk[at - offset] ^= 0x01
                    data = bytes(chunk)
                offset += len(data)
                connection.sendall(data)

    def stop(self) -> None:
        self._stopping.set()
        self._listener.close()
        for thread in self._threads:
            thread.join(5)


class OtherPeerTests(SynchronousTestCase):
    """
    The probe against peers that are not echotw, good and bad.
    """

    def peer(self, corruptAt: int | None = None) -> int:
        self.peer_ = EchoPeer(corruptAt)
        self.addCleanup(self.peer_.stop)
        return self.peer_.port

    def test_corruptingPeer(self) -> None:
        """A peer that flips one byte: exit 2, a mismatch reported at that
        byte's offset on that connection."""
        port = self.peer(corruptAt=4321)
        code, out, err = probe("--json", "-c", "10", "-s", "1000", "127.0.0.1", str(port))
        self.assertEqual(code, 2, out + err)
        result = summary(out)
        self.assertGreaterEqual(result["mismatches"], 1)
        self.assertEqual(result["first_mismatch"]["connection"], 0)
        self.assertEqual(result["first_mismatch"]["offset"], 4321)
        self.assertEqual(result["verified_bytes"], 4000)
        self.assertIn("connection 0, byte offset 4321", out)

    def test_rttThreshold(self) -> None:
        """An absurdly small --max-rtt-p99 exits 1 though every byte was
        verified (run as the installed console script)."""
        script = BIN / "echotw-probe"
        if not script.exists():
            raise AssertionError(f"{script} is not installed: pip install -e . again")
        port = self.peer()
        code, out, err = probe(
            "--json", "--max-rtt-p99", "0.000000001", "127.0.0.1", str(port), command=[str(script)]
        )
        self.assertEqual(code, 1, out + err)
        result = summary(out)
        self.assertEqual(result["mismatches"], 0)
        self.assertEqual(len(result["thresholds_exceeded"]), 1)
        self.assertIn("THRESHOLD EXCEEDED (exit 1)", out)

    def test_interrupted(self) -> None:
        """Stopped before the end (SIGTERM, or Ctrl-C), the probe prints what
        it found so far, once, and exits 2."""
        port = self.peer()
        running = Probe("--json", "-d", "60", "-i", "0.01", "127.0.0.1", str(port))
        deadline = time.monotonic() + 30
        while self.peer_.connections == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        running.process.send_signal(signal.SIGTERM)
        code, out, err = running.finish()
        self.assertEqual(code, 2, out + err)
        self.assertEqual(out.count("INTERRUPTED before the run was over"), 1, out)
        result = summary(out)
        self.assertTrue(result["interrupted"])
        self.assertEqual(result["mismatches"], 0)

    def test_connectionRefused(self) -> None:
        """Nothing listening: exit 2, the refusal reported."""
        code, out, err = probe("--json", "127.0.0.1", str(freePort()))
        self.assertEqual(code, 2, out + err)
        [failure] = summary(out)["failures"]
        self.assertIn("refused", failure["reason"])

    def test_reportCannotBeWritten(self) -> None:
        """Standard output that cannot be written (a full disk here; a
        closed pipe alike) costs the report, not the verdict: the exit
        status is still the run's, with one line on standard error."""
        if not os.path.exists("/dev/full"):
            raise SkipTest("no /dev/full")
        port = self.peer(corruptAt=10)
        for args, expected in [((), 2), (("--json",), 2)]:
            with open("/dev/full", "w") as full:
                result = subprocess.run(
                    [*PROBE, *args, "-c", "2", "127.0.0.1", str(port)],
                    stdout=full,
                    stderr=subprocess.PIPE,
                    stdin=subprocess.DEVNULL,
                    text=True,
                    cwd=serverDirectory(),
                    env=environmentWithRoot(),
                    timeout=PROBE_TIMEOUT,
                )
            self.assertEqual(result.returncode, expected, result.stderr)
            self.assertEqual(
                result.stderr, "echotw-probe: cannot write the report: No space left on device\n"
            )

    def test_silentPeer(self) -> None:
        """A peer that accepts and never answers: exit 2 after --timeout."""
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        started = time.monotonic()
        code, out, err = probe(
            "--json", "--timeout", "0.5", "127.0.0.1", str(listener.getsockname()[1])
        )
        self.assertEqual(code, 2, out + err)
        self.assertGreater(time.monotonic() - started, 0.5)
        [failure] = summary(out)["failures"]
        self.assertEqual(failure["reason"], "timed out: byte offset 0 not echoed within 0.5 s")

    def test_peerThatStopsReadingBoundsMemory(self) -> None:
        """Messages due on an interval while the peer reads nothing wait
        their turn instead of piling up in the probe: 128 kB every 2 ms for
        2 s is 128 MB due, and the probe stays far below that (its
        peak resident memory, read while it runs), then fails
        on the timeout with exit 2."""
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        running = Probe(
            *("--json", "-s", "128k", "-i", "2ms", "-t", "2", "-c", "100000"),
            *("127.0.0.1", str(listener.getsockname()[1])),
        )
        # The peak of the probe's own memory, read while it runs: the
        # exited child's ru_maxrss would also count the test runner's, which
        # it was forked from.
        peakKiB = 0
        deadline = time.monotonic() + PROBE_TIMEOUT
        while running.process.poll() is None and time.monotonic() < deadline:
            peakKiB = max(peakKiB, highWaterKiB(running.process.pid))
            time.sleep(0.02)
        code, out, err = running.finish()
        self.assertEqual(code, 2, out + err)
        [failure] = summary(out)["failures"]
        self.assertEqual(failure["reason"], "timed out: byte offset 0 not echoed within 2 s")
        # Seen: 46 MiB, and 166 MiB when every message due was built.
        self.assertGreater(peakKiB, 0)
        self.assertLess(peakKiB, 90 * 1024)


def highWaterKiB(pid: int) -> int:
    """
    The peak resident memory of a running process so far, in KiB (0 once
    it is gone).
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0
