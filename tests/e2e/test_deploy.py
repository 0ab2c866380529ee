"""
Deployment end-to-end tests: a real C{twistd -n echo} process with the real
components it is deployed with, on loopback only: a verifying TLS client,
HAProxy speaking the PROXY protocol, systemd socket activation and the unit
files in C{contrib/}, and UDP echo.  A test whose system program is missing
skips and says which one; every wait has a deadline.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import SkipTest

from tests.support.process import (
    LOOPBACK,
    ROOT,
    EchoServer,
    ServerTestCase,
    connect,
    echo,
    freePort,
    isClosedByServer,
    temporaryDirectory,
    twistdCommand,
    waitUntil,
)

PROXY_LISTENER = "haproxy:tcp:0:interface=127.0.0.1"
CONTRIB = ROOT / "contrib"
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def program(name: str) -> str:
    """
    The path of system program C{name} (sbin directories included, where
    Debian puts haproxy), or skip the test saying it is missing.
    """
    path = shutil.which(name, path=SBIN_PATH)
    if path is None:
        raise SkipTest(f"{name} is not installed")
    return path


def isListening(port: int) -> bool:
    """
    Whether something listens on TCP 127.0.0.1:C{port}, from the kernel's
    table (connecting to find out would itself be a connection).
    """
    local = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == "0A":
            return True
    return False


def connectFrom(source: str, port: int, timeout: float = 10.0) -> socket.socket:
    """
    A TCP connection to 127.0.0.1:C{port} from loopback address C{source}.
    """
    sock = socket.socket()
    try:
        sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


class LoggedProcess:
    """
    A system program run in the foreground by a test, its output in a file.
    """

    def __init__(self, args: list[str], directory: Path) -> None:
        self.logPath = directory / f"{Path(args[0]).name}.log"
        self._log = self.logPath.open("wb")
        self.process = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def output(self) -> str:
        return self.logPath.read_text(errors="replace")

    def waitFor(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """
        Wait until the output matches C{pattern}; fail early if the program
        exits.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            exited = self.process.poll() is not None
            match = re.search(pattern, self.output())
            if match:
                return match
            if exited:
                break
            time.sleep(0.02)
        raise AssertionError(f"{pattern!r} not in the output within {timeout}s:\n{self.output()}")

    def stop(self, timeout: float = 10.0) -> int | None:
        """
        SIGTERM this process (only ours, by PID) and wait for it; SIGKILL if
        it ignores that.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log.close()
        return self.process.returncode


class DeployTestCase(ServerTestCase):
    def runProgram(self, args: list[str]) -> LoggedProcess:
        """
        Start a system program in the foreground, stopped at clean-up.
        """
        started = LoggedProcess(args, temporaryDirectory(self))
        self.addCleanup(started.stop)
        return started


def tlsEcho(
    sock: ssl.SSLSocket,
    payload: bytes,
    timeout: float = 60.0,
    holdReads: float = 0.0,
    whileHolding: Callable[[], object] = lambda: None,
) -> str:
    """
    Send C{payload} over TLS while reading the echo, until as many bytes came
    back as were sent; return the SHA-256 of what came back.  TLS has no
    half-close, so the echo's length is what ends the exchange.  For the
    first C{holdReads} seconds nothing is read (the server must stop reading
    too), and C{whileHolding} is called meanwhile.
    """
    sock.setblocking(False)
    view = memoryview(payload)
    sent = received = 0
    digest = hashlib.sha256()
    started = time.monotonic()
    deadline = started + timeout
    while received < len(payload):
        if time.monotonic() > deadline:
            raise AssertionError(f"TLS echo timed out: sent {sent}, received {received}")
        writing = [sock] if sent < len(payload) else []
        if time.monotonic() - started < holdReads:
            select.select([], writing, [], 0.05)
            try:
                sent += sock.send(view[sent : sent + 16384])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                pass
            whileHolding()
            continue
        _, writable, _ = select.select([sock], writing, [], 0.5)
        if writable:
            try:
                # The same 16 KiB again after a WantWrite, as OpenSSL needs.
                sent += sock.send(view[sent : sent + 16384])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                pass
        # Drain everything decrypted, including records OpenSSL buffered
        # (which select cannot see).
        while True:
            try:
                chunk = sock.recv(262144)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            if not chunk:
                raise AssertionError(f"server closed after {received} of {len(payload)} bytes")
            digest.update(chunk)
            received += len(chunk)
    return digest.hexdigest()


class TLSTests(DeployTestCase):
    def setUp(self) -> None:
        try:
            import OpenSSL  # noqa: F401
            import trustme
        except ImportError as e:
            raise SkipTest(
                f"TLS needs pyOpenSSL and trustme (pip install -e '.[test]'): {e}"
            ) from None
        directory = temporaryDirectory(self)
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("localhost", "127.0.0.1")
        key, chain = directory / "key.pem", directory / "cert.pem"
        cert.private_key_pem.write_to_path(str(key))
        cert.cert_chain_pems[0].write_to_path(str(chain))
        self.listener = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={chain}"
        self.server = self.start("--port", self.listener)

    def clientContext(self, ca: object = None) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        (ca or self.ca).configure_trust(context)  # type: ignore[attr-defined]
        return context

    def test_verifiedByteExactEcho(self) -> None:
        """A client that verifies the server certificate gets a 4 MiB random
        payload back byte-exact over TLS; after a clean TLS close the log
        counts every byte."""
        payload = random.Random(443).randbytes(4 * 1024 * 1024)
        context = self.clientContext()
        self.assertTrue(context.check_hostname)
        self.assertEqual(context.verify_mode, ssl.CERT_REQUIRED)
        with (
            connect(self.server.port) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as sock,
        ):
            self.assertIsNotNone(sock.getpeercert())
            digest = tlsEcho(sock, payload)
            # A clean TLS close: close_notify each way.
            sock.settimeout(10)
            sock.unwrap()
        self.assertEqual(digest, hashlib.sha256(payload).hexdigest())
        self.server.waitFor(r"closed \(client closed\) after 4194304 bytes")

    def test_backpressure(self) -> None:
        """A TLS client that writes for two seconds without reading does not
        grow the server by 32 MiB, then gets all 48 MiB back byte-exact."""
        payload = random.Random(48).randbytes(48 * 1024 * 1024)
        time.sleep(0.2)
        baseline = peak = self.server.rssKiB()

        def sample() -> None:
            nonlocal peak
            peak = max(peak, self.server.rssKiB())

        with (
            connect(self.server.port) as raw,
            self.clientContext().wrap_socket(raw, server_hostname="localhost") as sock,
        ):
            digest = tlsEcho(sock, payload, holdReads=2.0, whileHolding=sample)
        self.assertEqual(digest, hashlib.sha256(payload).hexdigest())
        growth = (peak - baseline) / 1024
        self.assertLess(growth, 32, f"server RSS grew {growth:.1f} MiB over TLS")

    def test_ipAddressName(self) -> None:
        """The certificate also verifies for the IP address 127.0.0.1."""
        with (
            connect(self.server.port) as raw,
            self.clientContext().wrap_socket(raw, server_hostname="127.0.0.1") as sock,
        ):
            self.assertEqual(tlsEcho(sock, b"ip"), hashlib.sha256(b"ip").hexdigest())

    def test_untrustedCertificateRefused(self) -> None:
        """A client trusting another CA refuses the server: the verification
        in the other tests is real."""
        import trustme

        with connect(self.server.port) as raw:
            context = self.clientContext(trustme.CA())
            with self.assertRaises(ssl.SSLCertVerificationError):
                context.wrap_socket(raw, server_hostname="localhost")

    def test_plaintextClient(self) -> None:
        """A client that speaks plain TCP to the TLS listener gets no echo,
        and the server keeps serving TLS clients."""
        with connect(self.server.port) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n" * 10)
            sock.settimeout(10)
            data = b""
            try:
                while chunk := sock.recv(4096):
                    data += chunk
            except ConnectionResetError:
                pass
            self.assertNotIn(b"GET /", data)
        with (
            connect(self.server.port) as raw,
            self.clientContext().wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            self.assertEqual(tlsEcho(tls, b"still"), hashlib.sha256(b"still").hexdigest())


HAPROXY_CONFIG = """\
global
    maxconn 64

defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout client-fin 10s
    timeout server-fin 10s

frontend echo
    bind 127.0.0.1:{frontend}
    default_backend echotw

backend echotw
    server echo1 127.0.0.1:{backend} {sendProxy} {check}
"""


class HAProxyTestsMixin(DeployTestCase):
    """
    echotw's C{haproxy:} listener behind a real HAProxy sending PROXY
    headers; subclasses choose the protocol version.
    """

    sendProxy = "send-proxy"

    def setUp(self) -> None:
        self.haproxyPath = program("haproxy")

    def startHAProxy(self, backend: int, check: str = "") -> tuple[LoggedProcess, int]:
        """
        Run HAProxy in the foreground relaying a free loopback port to
        echotw's port C{backend}; return it and the port clients use.
        """
        frontend = freePort()
        directory = temporaryDirectory(self)
        config = directory / "haproxy.cfg"
        config.write_text(
            HAPROXY_CONFIG.format(
                frontend=frontend, backend=backend, sendProxy=self.sendProxy, check=check
            )
        )
        haproxy = self.runProgram([self.haproxyPath, "-db", "-f", str(config)])
        waitUntil(
            lambda: isListening(frontend) or haproxy.process.poll() is not None,
            "HAProxy did not listen",
        )
        self.assertIsNone(haproxy.process.poll(), haproxy.output())
        return haproxy, frontend

    def startBehindHAProxy(self, *args: str) -> tuple[EchoServer, int]:
        server = self.start("--port", PROXY_LISTENER, *args)
        _, frontend = self.startHAProxy(server.port)
        return server, frontend

    def test_byteExactEcho(self) -> None:
        """Through HAProxy, 1 MiB of random bytes come back byte-exact, then
        EOF after the client's half-close."""
        server, frontend = self.startBehindHAProxy()
        payload = random.Random(1).randbytes(1024 * 1024)
        with connect(frontend) as sock:
            self.assertEqual(echo(sock, payload), payload)
        server.waitFor(r"closed \(client closed\) after 1048576 bytes")
        self.assertNotIn("Refused", server.output())

    def test_rulesUseClientAddress(self) -> None:
        """--allow is checked against the client address in the PROXY
        header: a client from 127.0.0.1 is refused, and logged with its own
        address and port, while one from the allowed 127.0.0.2 is echoed,
        though HAProxy connects to echotw from 127.0.0.1 both times."""
        server, frontend = self.startBehindHAProxy("--allow", "127.0.0.2")
        with connectFrom("127.0.0.1", frontend) as refused:
            clientPort = refused.getsockname()[1]
            self.assertTrue(isClosedByServer(refused))
        server.waitFor(rf"Refused connection from 127\.0\.0\.1:{clientPort} on ")
        refusals = re.findall(r"Refused connection from (\S+) ", server.output())
        self.assertEqual(refusals, [f"127.0.0.1:{clientPort}"])
        with connectFrom("127.0.0.2", frontend) as allowed:
            allowedPort = allowed.getsockname()[1]
            self.assertEqual(echo(allowed, b"allowed"), b"allowed")
        server.waitFor(rf"Connection from 127\.0\.0\.2:{allowedPort} on .* closed")
        self.assertEqual(len(re.findall("Refused connection", server.output())), 1)

    def test_logNamesClient(self) -> None:
        """The connected and closed log lines name the original client's
        address and source port, not HAProxy's connection."""
        server, frontend = self.startBehindHAProxy()
        clients = []
        for source in ("127.0.0.1", "127.0.0.3"):
            with connectFrom(source, frontend) as sock:
                clients.append("{}:{}".format(*sock.getsockname()))
                self.assertEqual(echo(sock, b"who"), b"who")
        for client in clients:
            line = server.waitFor(rf"Connection from {re.escape(client)} on (\S+)\n")
            self.assertEqual(line[1], PROXY_LISTENER)
            server.waitFor(rf"Connection from {re.escape(client)} on \S+ closed \(client closed\)")
        logged = re.findall(r"Connection from (\S+) on \S+\n", server.output())
        self.assertEqual(logged, clients)

    def assertChecksQuiet(
        self, check: str, *args: str, visible: bool = True, source: str = "127.0.0.1"
    ) -> None:
        """
        Start HAProxy first, so its checks fail and mark echotw DOWN, then
        echotw (with C{--log-level debug} and C{args}): HAProxy marking it UP
        proves checks reach it.  If C{visible}, once five more checks are
        logged at debug level, nothing about them is logged above it; a real
        client from C{source} then logs exactly one connection at info level
        (the count works).
        """
        port = freePort()
        haproxy, frontend = self.startHAProxy(port, check.format(port=port))
        haproxy.waitFor(r"Server echotw/echo1 is DOWN")
        listener = f"haproxy:tcp:{port}:interface=127.0.0.1"
        server = self.start("--port", listener, "--log-level", "debug", *args)
        haproxy.waitFor(r"Server echotw/echo1 is UP")
        checks = r"#debug\] Connection from \S+ on \S+ closed \("
        if visible:
            # Five more checks (one each 200 ms), each logged at debug level.
            seen = len(re.findall(checks, server.output()))
            waitUntil(
                lambda: len(re.findall(checks, server.output())) >= seen + 5,
                "five more health checks logged at debug level",
                timeout=30,
            )
        # Plain TCP checks leave nothing to wait for: HAProxy resets them
        # before its final ACK, so the kernel never hands them to echotw.
        output = server.output()
        noisy = re.findall(
            r".*#(?:info|warn|error|critical)\].*(?:Connection from|connection from).*", output
        )
        self.assertEqual(
            len(noisy), 0, "health checks logged above debug level:\n" + "\n".join(noisy[:6])
        )
        with connectFrom(source, frontend) as sock:
            client = "{}:{}".format(*sock.getsockname())
            self.assertEqual(echo(sock, b"real"), b"real")
        server.waitFor(rf"Connection from {re.escape(client)} on \S+ closed")
        connected = re.findall(r"#info\] Connection from (\S+) on \S+\n", server.output())
        self.assertEqual(connected, [client])
        self.assertIn("is UP", haproxy.output().rsplit("Server echotw/echo1", 1)[1])

    def test_plainHealthChecksQuiet(self) -> None:
        """HAProxy's plain TCP health checks (with check port: connect, then
        reset without a byte) do not log a "Connection from" line each."""
        self.assertChecksQuiet("check port {port} inter 200ms fall 1 rise 1", visible=False)

    def test_proxyHealthChecksQuiet(self) -> None:
        """HAProxy's default checks on a send-proxy server (connect, send a
        PROXY header naming no client, reset) are logged at debug level only."""
        self.assertChecksQuiet("check inter 200ms fall 1 rise 1")

    def test_healthChecksQuietWithAllowRules(self) -> None:
        """With --allow naming only client networks (not the balancer),
        HAProxy's checks are not refused and logged at info level each
        second, and the server stays UP."""
        self.assertChecksQuiet(
            "check inter 200ms fall 1 rise 1", "--allow", "127.0.0.2", source="127.0.0.2"
        )


class HAProxyV1Tests(HAProxyTestsMixin):
    sendProxy = "send-proxy"


class HAProxyV2Tests(HAProxyTestsMixin):
    sendProxy = "send-proxy-v2"


del HAProxyTestsMixin


class HAProxyExampleTests(DeployTestCase):
    """
    contrib/haproxy.cfg (several echotw hosts) and contrib/haproxy-local.cfg
    (HAProxy and echotw on one host): valid, and able to start with few
    descriptors, without privileges and without syslog.
    """

    examples = [CONTRIB / "haproxy.cfg", CONTRIB / "haproxy-local.cfg"]
    # A common soft limit (ulimit -n), and a hard one HAProxy cannot raise.
    descriptors = 1024

    def setUp(self) -> None:
        self.haproxyPath = program("haproxy")

    def runLimited(self, config: str) -> LoggedProcess:
        """
        Run HAProxy in the foreground on C{config} with at most
        C{descriptors} file descriptors.
        """
        path = self.temporaryDirectory() / "haproxy.cfg"
        path.write_text(config)
        limit = f"--nofile={self.descriptors}:{self.descriptors}"
        return self.runProgram(
            [program("prlimit"), limit, self.haproxyPath, "-db", "-f", str(path)]
        )

    def onLoopback(self, frontend: int) -> str:
        """
        contrib/haproxy.cfg with its frontend on loopback port C{frontend}
        and its servers on closed loopback ports (their health checks fail
        quietly, and nothing leaves this machine).
        """
        config = (CONTRIB / "haproxy.cfg").read_text()
        config, binds = re.subn(r"(?m)^(\s+bind) :7007$", rf"\1 127.0.0.1:{frontend}", config)
        config, binds6 = re.subn(r"(?m)^\s+bind :::7007 v6only\n", "", config)
        config, servers = re.subn(
            r"10\.0\.0\.\d+:7007", lambda _: f"127.0.0.1:{freePort()}", config
        )
        self.assertEqual((binds, binds6, servers), (1, 1, 3))
        self.assertNotRegex(re.sub(r"#.*", "", config), r"\b10\.\d+\.\d+\.\d+")
        if os.geteuid() != 0:
            # Only root can switch to the haproxy user, as the file says.
            config = re.sub(r"(?m)^\s+(user|group) haproxy\n", "", config)
        return config

    def test_examplesValid(self) -> None:
        """HAProxy accepts both example configurations."""
        for path in self.examples:
            result = subprocess.run(
                [self.haproxyPath, "-c", "-f", str(path)],
                capture_output=True,
                text=True,
                timeout=30,
                stdin=subprocess.DEVNULL,
            )
            self.assertEqual(result.returncode, 0, f"{path.name}: {result.stdout + result.stderr}")
            self.assertIn("Configuration file is valid", result.stdout + result.stderr)

    def test_examplesUseProxyProtocol(self) -> None:
        """Every server in the examples sends PROXY headers and is checked;
        every frontend binds an unprivileged port; logs go to stdout."""
        for path in self.examples:
            lines = [line.split() for line in path.read_text().splitlines()]
            servers = [line for line in lines if line[:1] == ["server"]]
            self.assertGreaterEqual(len(servers), 1, path.name)
            for server in servers:
                self.assertIn("send-proxy-v2", server)
                self.assertIn("check", server)
            binds = [line[1] for line in lines if line[:1] == ["bind"]]
            self.assertTrue(binds, path.name)
            for bind in binds:
                self.assertGreaterEqual(int(bind.rsplit(":", 1)[1]), 1024, bind)
            self.assertIn(["log", "stdout", "format", "raw", "local0"], lines, path.name)

    def test_startsWithFewDescriptors(self) -> None:
        """contrib/haproxy.cfg (on loopback) starts and listens with 1,024
        descriptors: it asks for no more than it finds."""
        frontend = freePort()
        haproxy = self.runLimited(self.onLoopback(frontend))
        waitUntil(
            lambda: isListening(frontend) or haproxy.process.poll() is not None,
            "HAProxy did not listen",
        )
        self.assertIsNone(haproxy.process.poll(), haproxy.output())
        self.assertNotIn("ALERT", haproxy.output())

    def test_fixedMaxconnNeedsDescriptors(self) -> None:
        """The limit is real: the same configuration with a maxconn that
        needs more descriptors than it may have does not start."""
        config = self.onLoopback(freePort()).replace("global\n", "global\n    maxconn 1000000\n", 1)
        haproxy = self.runLimited(config)
        haproxy.process.wait(30)
        self.assertNotEqual(haproxy.process.returncode, 0)
        self.assertIn("Cannot raise FD limit", haproxy.output())

    def test_localExampleEndToEnd(self) -> None:
        """contrib/haproxy-local.cfg and the twistd command in its comments,
        on free loopback ports: bytes sent to HAProxy come back, echotw logs
        the client's own address from the PROXY header, and HAProxy logs
        the connection on its standard output."""
        text = (CONTRIB / "haproxy-local.cfg").read_text()
        [command] = re.findall(r"(?m)^#\s+twistd -n --pidfile= echo (.*)$", text)
        frontend, backend = freePort(), freePort()
        args = command.replace(":7008:", f":{backend}:").split()
        self.assertEqual(args, ["--port", f"haproxy:tcp:{backend}:interface=127.0.0.1"])
        config = text
        for documented, port in [(7007, frontend), (7008, backend)]:
            config, count = re.subn(
                rf"(?m)^(\s+\S+.*)127\.0\.0\.1:{documented}\b", rf"\g<1>127.0.0.1:{port}", config
            )
            self.assertEqual(count, 1, documented)
        server = self.start(*args)
        haproxy = self.runLimited(config)
        waitUntil(
            lambda: isListening(frontend) or haproxy.process.poll() is not None,
            "HAProxy did not listen",
        )
        payload = random.Random(7007).randbytes(256 * 1024)
        with connectFrom("127.0.0.2", frontend) as sock:
            client = "{}:{}".format(*sock.getsockname())
            self.assertEqual(echo(sock, payload), payload)
        server.waitFor(
            rf"Connection from {re.escape(client)} on \S+ closed \(client closed\) after 262144 bytes"
        )
        haproxy.waitFor(rf"{re.escape(client)} .*echo echotw/echo1 ")


class SocketActivationTests(DeployTestCase):
    def activate(self, *args: str, fdname: bool = True) -> tuple[LoggedProcess, int]:
        """
        Run C{systemd-socket-activate} on a free loopback port, to start
        C{twistd -n echo ARGS} on the first connection; with C{fdname}, the
        socket is named as systemd itself always names them
        (C{LISTEN_FDNAMES}), else only C{LISTEN_FDS} is set, as by
        C{systemd-socket-activate} without C{--fdname}, C{systemfd} or
        C{watchexec --socket}.
        """
        activate = program("systemd-socket-activate")
        port = freePort()
        named = ["--fdname=echo"] if fdname else []
        process = self.runProgram(
            [activate, "--listen", f"127.0.0.1:{port}", *named, *twistdCommand(*args)]
        )
        process.waitFor(rf"Listening on 127\.0\.0\.1:{port} as \d+\.")
        return process, port

    def checkInheritedSocket(self, listener: str, fdname: bool) -> None:
        process, port = self.activate("--port", listener, fdname=fdname)
        payload = random.Random(5).randbytes(2 * 1024 * 1024)
        with connect(port) as first:
            self.assertEqual(echo(first, payload), payload)
        process.waitFor(rf"Listening on {re.escape(listener)} at 127\.0\.0\.1:{port}\n")
        with connect(port) as second:
            self.assertEqual(echo(second, b"again"), b"again")
        process.waitFor(r"closed \(client closed\) after 5 bytes")
        self.assertEqual(process.stop(), -signal.SIGTERM, process.output())
        self.assertIn("Server Shut Down", process.output())
        self.assertNotIn("Traceback", process.output())

    def test_inheritedSocket(self) -> None:
        """twistd started by socket activation echoes on the inherited socket
        (the first connection included) and logs its listener."""
        self.checkInheritedSocket("systemd:domain=INET:index=0", fdname=True)

    def test_inheritedSocketByName(self) -> None:
        """A named inherited socket is found by its name."""
        self.checkInheritedSocket("systemd:domain=INET:name=echo", fdname=True)

    def test_inheritedSocketWithoutNames(self) -> None:
        """Without LISTEN_FDNAMES (only LISTEN_FDS, which Twisted's own
        systemd: endpoint ignores) the socket is still found by index."""
        self.checkInheritedSocket("systemd:domain=INET:index=0", fdname=False)

    def checkNotInherited(self, listener: str, fdname: bool, error: str) -> None:
        activate = program("systemd-socket-activate")
        port = freePort()
        named = ["--fdname=echo"] if fdname else []
        process = self.runProgram(
            [
                activate,
                "--listen",
                f"127.0.0.1:{port}",
                *named,
                *twistdCommand("--port", listener),
            ]
        )
        process.waitFor(rf"Listening on 127\.0\.0\.1:{port} as \d+\.")
        with connect(port) as sock:
            self.assertTrue(isClosedByServer(sock, timeout=20))
        process.process.wait(20)
        self.assertEqual(process.process.returncode, 1)
        output = process.output()
        self.assertNotIn("Traceback", output)
        self.assertRegex(output, rf"error: --port: '{re.escape(listener)}': {error}")

    def test_noInheritedSocket(self) -> None:
        """An index or a name that was not inherited is a one-line start-up
        error naming the listener, not a traceback."""
        self.checkNotInherited(
            "systemd:domain=INET:index=1", False, r"no inherited socket at index 1"
        )

    def test_nameNeedsNames(self) -> None:
        """Without LISTEN_FDNAMES every socket is unnamed (systemd's
        "unknown"), so a name= listener is a one-line start-up error."""
        self.checkNotInherited(
            "systemd:domain=INET:name=echo", False, r"no inherited socket named 'echo'"
        )


class SystemdUnitTests(DeployTestCase):
    def verify(self, socketUnit: str, serviceUnit: str) -> subprocess.CompletedProcess[str]:
        """
        Run C{systemd-analyze verify} on the two units, written as
        echotw.socket and echotw.service in a temporary directory.
        """
        analyze = program("systemd-analyze")
        directory = temporaryDirectory(self)
        (directory / "echotw.socket").write_text(socketUnit)
        (directory / "echotw.service").write_text(serviceUnit)
        return subprocess.run(
            [analyze, "verify", "echotw.socket", "echotw.service"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=directory,
            stdin=subprocess.DEVNULL,
        )

    def units(self) -> tuple[str, str]:
        """
        The contrib units, ExecStart pointing at this environment's twistd
        (verify requires the program to exist).
        """
        socketUnit = (CONTRIB / "echotw.socket").read_text()
        serviceUnit = (CONTRIB / "echotw.service").read_text()
        twistd = Path(sys.executable).parent / "twistd"
        if not twistd.exists():
            raise SkipTest(f"{twistd} is missing: systemd-analyze verify needs ExecStart's program")
        serviceUnit, replaced = re.subn(
            r"^ExecStart=/usr/bin/twistd ", f"ExecStart={twistd} ", serviceUnit, flags=re.M
        )
        self.assertEqual(replaced, 1, "echotw.service should run /usr/bin/twistd")
        return socketUnit, serviceUnit

    def setUp(self) -> None:
        # Can systemd-analyze verify run here at all?  A container without
        # systemd may refuse to even load a trivial unit; that is the
        # environment, not the units, so skip.
        probe = self.verify(
            "[Socket]\nListenStream=127.0.0.1:7\n",
            f"[Service]\nExecStart={sys.executable} -c pass\n",
        )
        if probe.returncode != 0 or probe.stdout.strip() or probe.stderr.strip():
            raise SkipTest(
                f"systemd-analyze verify cannot run here: {(probe.stderr or probe.stdout)[:300]}"
            )

    def test_unitsVerify(self) -> None:
        """systemd-analyze verify accepts contrib/echotw.socket and
        contrib/echotw.service without a single warning."""
        result = self.verify(*self.units())
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))

    def test_brokenUnitsFail(self) -> None:
        """The check can fail: a misspelt setting (a warning) and a missing
        program (an error) are both caught."""
        socketUnit, serviceUnit = self.units()
        misspelt = serviceUnit.replace("Restart=on-failure", "Restart=sometimes")
        self.assertNotEqual(misspelt, serviceUnit)
        result = self.verify(socketUnit, misspelt)
        self.assertIn("sometimes", result.stdout + result.stderr)
        missing = re.sub(
            r"^ExecStart=\S+", "ExecStart=/nonexistent/twistd", serviceUnit, flags=re.M
        )
        result = self.verify(socketUnit, missing)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("/nonexistent/twistd", result.stdout + result.stderr)

    def test_unitsContents(self) -> None:
        """The service runs twistd in the foreground on the inherited socket,
        as an unprivileged user, restarting on failure, hardened; the socket
        listens for it."""
        socketUnit = (CONTRIB / "echotw.socket").read_text()
        serviceUnit = (CONTRIB / "echotw.service").read_text()
        self.assertRegex(socketUnit, r"(?m)^ListenStream=\S+")
        self.assertRegex(socketUnit, r"(?m)^Accept=no$")
        [execStart] = re.findall(r"(?m)^ExecStart=(.*)$", serviceUnit)
        self.assertIn("--nodaemon", execStart)
        self.assertIn("--pidfile=", execStart)
        self.assertIn("--port systemd:domain=INET:index=0", execStart)
        self.assertRegex(serviceUnit, r"(?m)^(DynamicUser=yes|User=(?!root)\w+)$")
        for setting in [
            "Restart=on-failure",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
        ]:
            self.assertRegex(serviceUnit, rf"(?m)^{re.escape(setting)}$")


class UDPTests(DeployTestCase):
    def startUDP(self, *args: str) -> tuple[EchoServer, int]:
        server = self.start("--port", LOOPBACK, "--udp", "udp:0:interface=127.0.0.1", *args)
        server.waitFor(r"Listening on udp:0:interface=127\.0\.0\.1 at ")
        [address] = re.findall(r"Listening on udp:\S+ at (\S+)", server.output())
        return server, int(address.rsplit(":", 1)[1])

    def client(self, source: str = "127.0.0.1", port: int = 0) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind((source, port))
        sock.settimeout(5)
        return sock

    def assertNoReply(self, sock: socket.socket) -> None:
        """
        C{sock} has no reply, checked once the server has answered a
        datagram sent after C{sock}'s: the server handles datagrams in the
        order they arrive and sends in order, so a reply to the earlier one
        would already be here.
        """
        sock.setblocking(False)
        with self.assertRaises(BlockingIOError):
            sock.recvfrom(65536)

    def test_echoIntact(self) -> None:
        """Datagrams of every size up to the IPv4 maximum, 65,507 bytes,
        come back whole to their source."""
        _, port = self.startUDP()
        sock = self.client()
        rng = random.Random(862)
        for size in [0, 1, 512, 1472, 8192, 8193, 40000, 65507]:
            payload = rng.randbytes(size)
            sock.sendto(payload, ("127.0.0.1", port))
            data, address = sock.recvfrom(65536)
            self.assertEqual((len(data), data, address), (size, payload, ("127.0.0.1", port)))

    def test_ipv6(self) -> None:
        """A udp6: listener on ::1 echoes a maximum-size IPv6 datagram whole."""
        if not socket.has_ipv6:
            raise SkipTest("no IPv6")
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
                probe.bind(("::1", 0))
        except OSError as e:
            raise SkipTest(f"no IPv6 loopback: {e}") from None
        server = self.start("--port", LOOPBACK, "--udp", "udp6:0:interface=\\:\\:1")
        match = server.waitFor(r"Listening on udp6:\S+ at \[::1\]:(\d+)")
        port = int(match[1])
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(("::1", 0))
        sock.settimeout(5)
        payload = random.Random(6).randbytes(65527)
        sock.sendto(payload, ("::1", port))
        data, address = sock.recvfrom(65536)
        self.assertEqual((data, address[:2]), (payload, ("::1", port)))

    def test_deny(self) -> None:
        """--deny drops datagrams from the denied address without a reply,
        while other sources are answered."""
        server, port = self.startUDP("--deny", "127.0.0.2")
        denied, allowed = self.client("127.0.0.2"), self.client()
        denied.sendto(b"denied", ("127.0.0.1", port))
        allowed.sendto(b"allowed", ("127.0.0.1", port))
        self.assertEqual(allowed.recvfrom(100), (b"allowed", ("127.0.0.1", port)))
        server.waitFor(r"Dropped datagram from 127\.0\.0\.2:\d+ on udp:")
        self.assertNoReply(denied)

    def test_lowSourcePortDropped(self) -> None:
        """A datagram from a privileged source port (where auto-answering
        services live) gets no reply: no echo loops."""
        server, port = self.startUDP()
        sock = None
        for low in range(1023, 900, -1):
            candidate = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                candidate.bind(("127.0.0.1", low))
            except PermissionError:
                candidate.close()
                raise SkipTest("binding a port below 1024 needs root") from None
            except OSError:
                candidate.close()
                continue
            sock = candidate
            break
        if sock is None:
            raise SkipTest("no free UDP port below 1024 on 127.0.0.1")
        self.addCleanup(sock.close)
        sock.sendto(b"loop?", ("127.0.0.1", port))
        control = self.client()
        control.sendto(b"fine", ("127.0.0.1", port))
        self.assertEqual(control.recvfrom(100)[0], b"fine")
        server.waitFor(rf"Dropped datagram from 127\.0\.0\.1:{sock.getsockname()[1]} on udp:")
        self.assertNoReply(sock)

    def test_rateLimit(self) -> None:
        """With --udp-rate 5 --udp-burst 5, a burst of 50 datagrams from one
        source gets the burst and little more."""
        server, port = self.startUDP("--udp-rate", "5", "--udp-burst", "5")
        sock = self.client()
        started = time.monotonic()
        for i in range(50):
            sock.sendto(b"%d" % i, ("127.0.0.1", port))
        control = self.client("127.0.0.2")
        control.sendto(b"after", ("127.0.0.1", port))
        self.assertEqual(control.recvfrom(100)[0], b"after")
        elapsed = time.monotonic() - started
        replies = []
        sock.setblocking(False)
        while True:
            try:
                replies.append(sock.recvfrom(100)[0])
            except BlockingIOError:
                break
        # The burst, plus at most what the rate refilled meanwhile.
        self.assertGreaterEqual(len(replies), 5)
        self.assertLessEqual(len(replies), 5 + int(5 * elapsed) + 1, replies)
        self.assertEqual(replies[:5], [b"0", b"1", b"2", b"3", b"4"])
        server.waitFor(r"Dropped datagram from 127\.0\.0\.1:\d+ on udp:\S+: rate-limited")
