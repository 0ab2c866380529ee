"""
Run a real C{twistd -n echo ...} process for end-to-end tests, and plain
blocking-socket clients to talk to it.  Every wait here has a deadline.
"""

from __future__ import annotations

import atexit
import errno
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from twisted.trial.unittest import SynchronousTestCase

from tests import ROOT

BIN = Path(sys.executable).parent
LISTENING = re.compile(r"Listening on (?P<listener>\S+) at (?P<address>\S+)")
SERVING = re.compile(r"Serving (?P<what>.+?) on (?P<listener>\S+) at (?P<address>\S+)")
START_TIMEOUT = 20.0
LOOPBACK = "tcp:0:interface=127.0.0.1"
TWISTD = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
)
"""
C{twistd}, with SIGINT handled as when started from a terminal even if the
tests run where it is ignored (a shell's background job): Twisted leaves an
ignored SIGINT ignored.
"""


_serverDirectory: Path | None = None


def serverDirectory() -> Path:
    """
    An empty directory, removed at exit, to run servers in: the current
    directory comes first on a Python process's path, so running in a shared
    directory such as /tmp would let any stray C{timeit.py} there shadow
    the standard library.
    """
    global _serverDirectory
    if _serverDirectory is None:
        _serverDirectory = Path(tempfile.mkdtemp(prefix="echotw-servers-"))
        atexit.register(shutil.rmtree, _serverDirectory, True)
    return _serverDirectory


def twistdCommand(*args: str, runner: str = "twistd", reactor: str = "") -> list[str]:
    """
    The command line for C{twistd -n [-r REACTOR] echo ARGS} (or C{twist echo
    ARGS}) from this interpreter's environment.
    """
    chosen = [f"--reactor={reactor}"] if reactor else []
    if runner == "twist":
        return [sys.executable, "-m", "twisted", *chosen, "--log-format=text", "echo", *args]
    return [sys.executable, "-c", TWISTD, "--nodaemon", "--pidfile=", *chosen, "echo", *args]


def run(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """
    Run C{twistd -n echo ARGS} to completion (for start-up errors).
    """
    return subprocess.run(
        twistdCommand(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=serverDirectory(),
        stdin=subprocess.DEVNULL,
    )


def optionValues(args: tuple[str, ...], *names: str) -> list[str]:
    """
    The values given to the options C{names} (C{--port X}, C{-p X},
    C{--port=X}) in C{args}.
    """
    values = []
    for i, arg in enumerate(args):
        name, equals, value = arg.partition("=")
        if name in names and equals:
            values.append(value)
        elif arg in names and i + 1 < len(args):
            values.append(args[i + 1])
    return values


def expectedListeners(args: tuple[str, ...]) -> tuple[int, int]:
    """
    How many "Listening on" lines (TCP-based and UDP listeners) and
    "Serving" lines (C{--metrics}, C{--health}) a server started with the
    echo options C{args} logs once everything it listens on is bound.
    """
    ports = len(optionValues(args, "--port", "-p"))
    udp = len(optionValues(args, "--udp"))
    web = len(optionValues(args, "--metrics", "--health"))
    return (ports or (0 if udp else 1)) + udp, web


class EchoServer:
    """
    A running echotw process whose log goes to a file we can read.

    It is ready when it has logged every listener its options name, the
    C{--metrics} and C{--health} ones included (the first "Listening on"
    line comes before the others are bound); C{listeners} overrides the
    count of "Listening on" lines (0: wait for nothing, for a log level
    that hides them).
    """

    def __init__(
        self,
        *args: str,
        runner: str = "twistd",
        reactor: str = "",
        listeners: int | None = None,
        env: dict[str, str] | None = None,
        newSession: bool = False,
        cwd: Path | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.logPath = Path(tempfile.mkstemp(prefix="echotw-", suffix=".log")[1])
        self._log = self.logPath.open("wb")
        self.process = subprocess.Popen(
            command or twistdCommand(*args, runner=runner, reactor=reactor),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd or serverDirectory(),
            env=env,
            # Its own process group, for tests that signal the whole group.
            start_new_session=newSession,
        )
        listening, serving = expectedListeners(args)
        if listeners is not None:
            listening, serving = listeners, serving if listeners else 0
        self.addresses = self._waitListening(listening, serving)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def port(self) -> int:
        return int(self.addresses[0].rsplit(":", 1)[1])

    def output(self) -> str:
        return self.logPath.read_text(errors="replace")

    def _waitListening(self, count: int, serving: int = 0) -> list[str]:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            output = self.output()
            found = [m["address"] for m in LISTENING.finditer(output)]
            if len(found) >= count and len(SERVING.findall(output)) >= serving:
                return found
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        self.stop(signal.SIGKILL)
        raise AssertionError(f"echotw did not start:\n{self.output()}")

    def webAddress(self) -> str:
        """
        C{host:port} of the first C{--metrics} or C{--health} listener, as
        it logged (bound by the time the server is ready).
        """
        match = SERVING.search(self.output())
        assert match is not None, self.output()
        return match["address"]

    def waitFor(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """
        Wait until the log matches C{pattern}.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output())
            if match:
                return match
            time.sleep(0.02)
        raise AssertionError(f"{pattern!r} not logged within {timeout}s:\n{self.output()}")

    def waitForCount(self, pattern: str, count: int, timeout: float = 10.0) -> None:
        """
        Wait until the log has C{count} matches of C{pattern}.
        """
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, self.output())) < count:
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{count} of {pattern!r} not logged within {timeout}s:\n{self.output()}"
                )
            time.sleep(0.02)

    def rssKiB(self) -> int:
        """
        The server's resident set size, from /proc.
        """
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """
        Signal the process (only ours, by PID) and wait for it to exit.
        """
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
                raise AssertionError(f"echotw ignored signal {sig}:\n{self.output()}") from None
        self._log.close()
        return self.process.returncode

    def wait(self, timeout: float = 20.0) -> int:
        """
        Wait for the process to exit by itself.
        """
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"echotw did not exit within {timeout}s:\n{self.output()}"
            ) from None

    def close(self) -> None:
        """
        Clean-up: kill if still running and remove the log.
        """
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self._log.close()
        self.logPath.unlink(missing_ok=True)


def connect(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)


def echo(sock: socket.socket, payload: bytes, timeout: float = 30.0) -> bytes:
    """
    Send C{payload} and half-close while reading; return everything received
    until the server's EOF (or reset: a refused connection can be gone
    before the client has sent or half-closed, on a fast or a slow machine).
    """
    sock.setblocking(False)
    view = memoryview(payload)
    sent = 0
    received = bytearray()
    deadline = time.monotonic() + timeout
    shut = False
    while True:
        if time.monotonic() > deadline:
            raise AssertionError(f"echo timed out: sent {sent}, received {len(received)}")
        if sent == len(payload) and not shut:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError as e:
                if e.errno != errno.ENOTCONN:
                    raise
                return bytes(received)
            shut = True
        wants = [sock] if not shut else []
        readable, writable, _ = select.select([sock], wants, [], 1.0)
        if writable:
            try:
                sent += sock.send(view[sent : sent + 262144])
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                return bytes(received)
        if readable:
            try:
                chunk = sock.recv(262144)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                return bytes(received)
            if not chunk:
                return bytes(received)
            received += chunk


def isClosedByServer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """
    True if the server closes C{sock} (EOF or reset) without sending data.
    """
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def refusedFrom(port: int, source: str) -> bool:
    """
    Connect from the loopback address C{source} (e.g. 127.0.0.2); True if
    the server closes the connection without echoing anything.
    """
    with socket.socket() as sock:
        sock.bind((source, 0))
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        return isClosedByServer(sock)


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def environmentWithRoot() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


T = TypeVar("T")


def waitUntil(predicate: Callable[[], T], what: str, timeout: float = 10.0) -> T:
    """
    Poll C{predicate()} until it is true, and return what it returned; fail
    after C{timeout} seconds, saying C{what} did not happen.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} within {timeout}s")
        time.sleep(0.02)


def temporaryDirectory(test: SynchronousTestCase, prefix: str = "echotw-test-") -> Path:
    """
    A new directory removed, with everything in it, when C{test} ends: short
    enough for Unix socket paths and absolute, as the server processes run
    elsewhere.
    """
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    test.addCleanup(shutil.rmtree, directory, True)
    return directory


class ServerTestCase(SynchronousTestCase):
    """
    A test case whose C{start} runs an L{EchoServer} that is killed and
    cleaned up after the test, whatever happens.
    """

    def temporaryDirectory(self) -> Path:
        """
        A new directory outside the checkout, removed after the test.
        """
        return temporaryDirectory(self)

    def start(self, *args: str, **kw: object) -> EchoServer:
        server = EchoServer(*args, **kw)  # type: ignore[arg-type]
        self.addCleanup(server.close)
        return server
