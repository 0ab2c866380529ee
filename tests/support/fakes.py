"""
Fakes of the transports, ports and reactor that unit tests hand to echotw,
one of each, so that a test reads what the code under test is given rather
than another variant of it.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger


class AbortableTransport(StringTransport):
    """
    A L{StringTransport} that can be aborted, as every real one can: the
    abort is recorded in C{aborted} and, like C{loseConnection}, leaves the
    transport C{disconnecting}.
    """

    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True


class ClosingTransport(AbortableTransport):
    """
    Like a real transport, C{loseConnection} does not finish while a producer
    is still registered (it waits for it to be unregistered).
    """

    def loseConnection(self) -> None:
        if self.producer is None:
            super().loseConnection()


class FakeDatagramTransport:
    """
    A UDP port as a L{DatagramProtocol} sees it: records C{write(data, addr)}
    calls in C{written}; raises C{error} instead if set; hands each datagram
    to C{peer}'s C{datagramReceived} if set.
    """

    def __init__(self, host: str = "0.0.0.0", port: int = 7) -> None:
        self.written: list[tuple[bytes, tuple[str, int]]] = []
        self.error: Exception | None = None
        self.host = (
            IPv6Address("UDP", host, port) if ":" in host else IPv4Address("UDP", host, port)
        )
        self.peer: Any = None

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.error is not None:
            raise self.error
        self.written.append((data, addr))
        if self.peer is not None:
            self.peer.datagramReceived(data, (self.host.host, self.host.port))

    def getHost(self) -> IPv4Address | IPv6Address:
        return self.host


class FakePort:
    """
    A listening TCP port: its address, whether it listens (C{stopped}) and
    whether it accepts (C{reading}).
    """

    connected = True
    stopped = False

    def __init__(self) -> None:
        self.reading = True
        self._logger = Logger()

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 43210)

    def stopListening(self) -> None:
        self.stopped = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class FakeUDPPort:
    """
    A UDP port as a listener service sees it (C{host}, C{stopped}) and, given
    the C{protocol} on it, as a connected client protocol does: C{connect},
    C{write} into C{written}, and a real socket as its handle, which the
    test closes.
    """

    def __init__(self, host: IPv4Address | IPv6Address | None = None, protocol: Any = None) -> None:
        self.host = host
        self.protocol = protocol
        self.written: list[bytes] = []
        self.connected: tuple[str, int] | None = None
        self.stopped = False
        if protocol is not None:
            self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def getHost(self) -> IPv4Address | IPv6Address | None:
        return self.host

    def connect(self, host: str, port: int) -> None:
        self.connected = (host, port)

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def stopListening(self) -> None:
        self.stopped = True
        if self.protocol is not None:
            self.protocol.doStop()

    def getHandle(self) -> socket.socket:
        return self.socket


class FakeReactor(Clock):
    """
    A L{Clock} that records what is asked of a running reactor: calls when
    running, system event triggers, and stops (C{stopped} counts them;
    C{running} is false after the first).
    """

    running = True

    def __init__(self) -> None:
        super().__init__()
        self.whenRunning: list[Any] = []
        self.triggers: list[Any] = []
        self.stopped = 0

    def callWhenRunning(self, f: Any, *a: Any) -> None:
        self.whenRunning.append(f)

    def addSystemEventTrigger(self, phase: str, event: str, f: Any) -> None:
        self.triggers.append(f)

    def callFromThread(self, f: Any, *a: Any) -> None:
        f(*a)

    def stop(self) -> None:
        self.stopped += 1
        self.running = False


class FakeProcess:
    """
    A child process as its protocol sees it: its pid and the signals sent to it.
    """

    def __init__(self) -> None:
        self.signals: list[int] = []
        self.pid = 4242

    def signalProcess(self, sig: int) -> None:
        self.signals.append(sig)


class FakeCounters:
    """
    The supervisor's counters as a worker reports to them.
    """

    def __init__(self) -> None:
        self.reports: list[tuple[int, bytes]] = []

    def report(self, index: int, line: bytes) -> None:
        self.reports.append((index, line))

    def ended(self, index: int, restarting: bool) -> None:
        pass


class FailingSpawnReactor(Clock):
    """
    A reactor whose first C{failures} spawns fail as with no descriptors left.
    """

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.spawned = 0

    def spawnProcess(self, *args: Any, **kw: Any) -> FakeProcess:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        self.spawned += 1
        return FakeProcess()
