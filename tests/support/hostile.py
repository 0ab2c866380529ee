"""
Hostile HTTP clients for the end-to-end tests of echotw's HTTP listeners
(C{--metrics}, C{--health}): pipelining clients that never read, slow
headers, reconnect floods, each run in a process of its own
(L{AttackProcess}, so that its loop does not hold up the test's probes)
against one port, bounded in connections and in time; and a probe that
does what a Kubernetes probe does (a new connection, one request, a 1 s
timeout).

Only 127.0.0.0/8 is used.
"""

from __future__ import annotations

import errno
import json
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tests import ROOT

GET_METRICS = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
PROBE = b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


@dataclass
class Probe:
    """
    What one probe saw: whether a 200 came back within its timeout, and
    how long it took.
    """

    ok: bool
    seconds: float
    error: str = ""


def probe(port: int, timeout: float = 1.0, source: str = "127.0.0.1") -> Probe:
    """
    One readiness probe: connect, ask for C{/readyz}, read the answer to
    its end, all within C{timeout} seconds, as the kubelet does.
    """
    started = time.monotonic()
    deadline = started + timeout
    got = b""
    try:
        with socket.socket() as sock:
            sock.settimeout(timeout)
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
            sock.sendall(PROBE)
            while b"\r\n" not in got or not got.startswith(b"HTTP/1.1 "):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no status line in time")
                sock.settimeout(left)
                chunk = sock.recv(4096)
                if not chunk:
                    break
                got += chunk
    except OSError as e:
        return Probe(False, time.monotonic() - started, f"{type(e).__name__}: {e}")
    seconds = time.monotonic() - started
    ok = got.startswith(b"HTTP/1.1 200 ") and seconds <= timeout
    return Probe(ok, seconds, "" if ok else repr(got[:60]))


@dataclass
class Attack:
    """
    A hostile client population run in a thread until L{stop} or its
    C{duration}: C{connections} sockets at once, each reopened when the
    server closes it (at most C{reopenLimit} times in all).

    @ivar opened: connections made in all.
    @ivar closedByServer: connections the server closed or reset.
    """

    port: int
    connections: int
    duration: float = 30.0
    source: str = "127.0.0.1"
    reopenLimit: int = 1_000_000
    opened: int = 0
    closedByServer: int = 0
    sockets: list[socket.socket] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> dict[str, Any]:
        """
        Attack until stopped or C{duration} has passed; what it saw.
        """
        self._run()
        report = self.report()
        for sock in self.sockets:
            sock.close()
        self.sockets = []
        return report

    def report(self) -> dict[str, Any]:
        return {"opened": self.opened, "closedByServer": self.closedByServer}

    def _open(self, selector: selectors.BaseSelector) -> None:
        if self.opened >= self.reopenLimit:
            return
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.bind((self.source, 0))
        except OSError:
            sock.close()
            return
        err = sock.connect_ex(("127.0.0.1", self.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            return
        self.opened += 1
        self.sockets.append(sock)
        selector.register(sock, selectors.EVENT_WRITE | selectors.EVENT_READ, self.newState())

    def _drop(self, selector: selectors.BaseSelector, sock: socket.socket) -> None:
        selector.unregister(sock)
        sock.close()
        self.sockets.remove(sock)

    def newState(self) -> dict[str, object]:
        return {"sent": 0, "next": 0.0}

    def _run(self) -> None:
        deadline = time.monotonic() + self.duration
        selector = selectors.DefaultSelector()
        for _ in range(self.connections):
            self._open(selector)
        while not self._stop.is_set() and time.monotonic() < deadline:
            for key, events in selector.select(0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if not self.act(sock, key.data, events):
                    self.closedByServer += 1
                    self._drop(selector, sock)
                    self._open(selector)
            self.tick(selector)
        selector.close()

    def act(self, sock: socket.socket, state: dict[str, object], events: int) -> bool:
        """
        Do what this client does when its socket is ready; L{False} once
        the server has closed it.
        """
        raise NotImplementedError

    def tick(self, selector: selectors.BaseSelector) -> None:
        """
        Called after each round of events.
        """


def _send(sock: socket.socket, data: bytes) -> int | None:
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0
    except OSError:
        return None


def _closed(sock: socket.socket) -> bool:
    """
    Whether the server closed C{sock}, read without consuming anything
    that is not the end of the stream.
    """
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class PipeliningNonReaders(Attack):
    """
    Clients that pipeline C{/metrics} requests as fast as the server takes
    them and never read a byte of the answers (the end of a connection
    shows as a failed send).  Each asks for a receive buffer of 4 MiB (the
    kernel grants what C{rmem_max} allows), so that answers the server
    makes for it land here to be counted rather than wait in the server.

    @ivar mostAnswers: the most answers found unread on one connection.
    """

    burst = GET_METRICS * 64
    mostAnswers = 0

    def _open(self, selector: selectors.BaseSelector) -> None:
        before = len(self.sockets)
        super()._open(selector)
        if len(self.sockets) > before:
            sock = self.sockets[-1]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            selector.modify(sock, selectors.EVENT_WRITE, selector.get_key(sock).data)

    def _drop(self, selector: selectors.BaseSelector, sock: socket.socket) -> None:
        self.mostAnswers = max(self.mostAnswers, _answers(sock))
        super()._drop(selector, sock)

    def act(self, sock: socket.socket, state: dict[str, object], events: int) -> bool:
        return _send(sock, self.burst) is not None

    def report(self) -> dict[str, Any]:
        most = max([self.mostAnswers, *(_answers(sock) for sock in self.sockets)])
        return {**super().report(), "mostAnswers": most}


def _answers(sock: socket.socket) -> int:
    """
    How many answers C{sock} has received and not read, peeked at
    (reading would let the server send more).
    """
    try:
        data = sock.recv(64 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return 0
    return data.count(b"HTTP/1.1 ")


class SlowHeaders(Attack):
    """
    Slowloris: each client sends a request line, then a header byte every
    C{interval} seconds, never ending its head.
    """

    interval = 1.0

    def act(self, sock: socket.socket, state: dict[str, object], events: int) -> bool:
        if events & selectors.EVENT_READ and _closed(sock):
            return False
        if events & selectors.EVENT_WRITE and not state["sent"]:
            if _send(sock, b"GET /healthz HTTP/1.1\r\nX: ") is None:
                return False
            state["sent"] = 1
        return True

    def tick(self, selector: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for key in list(selector.get_map().values()):
            state = key.data
            if state["sent"] and now >= state["next"]:  # type: ignore[operator]
                state["next"] = now + self.interval
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if _send(sock, b"a") is None:
                    self.closedByServer += 1
                    self._drop(selector, sock)
                    self._open(selector)
            elif state["sent"]:
                # Only readable events from now on.
                if key.events & selectors.EVENT_WRITE:
                    selector.modify(key.fileobj, selectors.EVENT_READ, state)


class ReconnectFlood(Attack):
    """
    Clients that connect, send half a request line and, as soon as the
    server closes them, connect again.
    """

    def act(self, sock: socket.socket, state: dict[str, object], events: int) -> bool:
        if events & selectors.EVENT_READ and _closed(sock):
            return False
        if events & selectors.EVENT_WRITE and not state["sent"]:
            if _send(sock, b"GET /metr") is None:
                return False
            state["sent"] = 1
        return True

    def tick(self, selector: selectors.BaseSelector) -> None:
        for key in list(selector.get_map().values()):
            if key.data["sent"] and key.events & selectors.EVENT_WRITE:
                selector.modify(key.fileobj, selectors.EVENT_READ, key.data)


def roundTrip(sock: socket.socket, payload: bytes = b"x" * 100, timeout: float = 30.0) -> float:
    """
    Seconds for C{payload} to come back on an open echo connection.
    """
    started = time.monotonic()
    sock.settimeout(timeout)
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(len(payload) - len(got))
        if not chunk:
            raise ConnectionError("the echo connection closed")
        got += chunk
    return time.monotonic() - started


ATTACKS: dict[str, type[Attack]] = {
    "pipelining": PipeliningNonReaders,
    "slow-headers": SlowHeaders,
    "reconnect": ReconnectFlood,
}


class AttackProcess:
    """
    An L{Attack} in a process of its own, stopped by L{stop} or at the end
    of its C{duration}.
    """

    def __init__(self, kind: str, port: int, connections: int, duration: float) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.hostile",
                kind,
                str(port),
                str(connections),
                str(duration),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        self.duration = duration

    def stop(self) -> dict[str, Any]:
        """
        Stop the attack; what it saw.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=self.duration + 60)
        report: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        return report

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def main(kind: str, port: str, connections: str, duration: str) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    attack = ATTACKS[kind](int(port), int(connections), float(duration))
    signal.signal(signal.SIGTERM, lambda *_: attack._stop.set())
    print(json.dumps(attack.run()), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
