# -*- test-case-name: tests.integration.test_nativelane -*-
"""
The native echo lane: plain TCP and Unix echo connections served by
compiled code (C{echotw/transport/_lane.c}), so that the interpreter no longer runs
once per read.
C{--native auto|on|off} (default: the C{ECHOTW_NATIVE} environment variable,
else C{auto}) chooses; see L{laneServes}.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.usage import UsageError

from echotw import loglevel
from echotw.coercers import nativeSetting
from echotw.config import nativeDefault
from echotw.protocol import EchoProtocol
from echotw.transport.fastpath import canWriteDirectly
from echotw.transport.lanereader import NOT_BUILT, LaneReader, readerFor
from echotw.transport.lanereader import native as _lane
from echotw.transport.state import kernelPendingBytesOf, pendingBytes
from echotw.transport.tcpport import EchoServer

_unavailable = NOT_BUILT
_OWNED = _lane.OWNED if _lane is not None else 0
_NODELAY_OWNED = _OWNED | _lane.NODELAY if _lane is not None else 0
_DONE = Failure(ConnectionDone())
_LOST = Failure(ConnectionLost())

try:
    from twisted.internet import unix

    _PLAIN: tuple[type, ...] = (EchoServer, tcp.Server, unix.Server)
except ImportError:  # pragma: no cover (no Unix sockets)
    _PLAIN = (EchoServer, tcp.Server)


def unavailableBecause() -> str:
    """
    Why the lane cannot serve here, or C{""} if it can.
    """
    return _unavailable


def checkNativeSetting(setting: str) -> str:
    """
    C{--native}'s value, checked (its default, from C{ECHOTW_NATIVE}, is not
    coerced): a L{UsageError} with the line to show for a bad one, or for
    C{on} where the lane cannot serve.
    """
    try:
        nativeSetting(setting)
    except ValueError as e:
        raise UsageError(f"--native: {setting!r}: {e}") from None
    if setting == "on" and _unavailable:
        raise UsageError(f"--native on: {_unavailable}")
    return setting


def laneServes(setting: str) -> bool:
    """
    Whether connections are served by the lane under C{--native}
    C{setting}: C{off} never, C{auto} where it is built, C{on} always (the
    options refuse C{on} where it is not built).
    """
    return setting != "off" and _lane is not None


def defaultProtocol() -> type[EchoProtocol]:
    """
    The protocol of an echo factory not told which: L{LaneEchoProtocol}
    where the lane serves under C{--native}'s default, else L{EchoProtocol}.
    """
    return LaneEchoProtocol if laneServes(nativeDefault()) else EchoProtocol


def logLane(setting: str, impaired: bool) -> None:
    """
    Say at start-up which lane serves plain echo connections, and why.
    """
    if impaired:
        lane, why = "python", "impairment is on"
    elif setting == "off":
        lane, why = "python", "--native off"
    elif _lane is None:
        lane, why = "python", _unavailable
    else:
        lane, why = "native", f"--native {setting}"
    _log.info(
        "Plain TCP and Unix echo connections are served by the {lane} lane ({why})",
        event="lane",
        lane=lane,
        why=why,
    )


_log = Logger(observer=loglevel.observer)


def canJoin(protocol: EchoProtocol, transport: Any) -> bool:
    """
    Whether C{protocol}'s connection may be served by the lane: a plain
    TCP or Unix connection, wholly its own (no wrapper between), open, its
    own producer, with nothing queued.
    """
    return (
        type(transport) in _PLAIN
        and transport.protocol is protocol
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and transport.producer is transport
        and not transport.dataBuffer
        and not transport._tempDataLen
    )


class _CountedInLane:
    """
    L{LaneEchoProtocol.bytesReceived}: the lane's count while it serves the
    connection, and what it had counted once it let go of it (C{_counted}).
    A connection that left the lane for the Python path counts on in an
    attribute of its own, which hides this one (a non-data descriptor).
    """

    def __get__(self, protocol: LaneEchoProtocol | None, owner: type) -> Any:
        if protocol is None:
            return self
        reader = protocol._reader
        if reader is None:
            return protocol._counted
        return reader.lane.received(protocol._fd)


class LaneEchoProtocol(EchoProtocol):
    """
    L{EchoProtocol} that hands its connection to the lane once connected,
    if it is a plain one (L{canJoin}); otherwise, and once it has left the
    lane, it is L{EchoProtocol} unchanged.

    A connection is admitted, counted and logged in Python as before; then,
    if it is a plain one (its transport is Twisted's TCP or Unix server
    transport, with no TLS, no PROXY wrapper and no impairment), its socket
    leaves the reactor and joins the lane's epoll set.  The lane's own epoll
    descriptor is one reader in the reactor (L{LaneReader}): each time it is
    readable the lane serves every ready connection in a loop (read, send back,
    keep what the kernel did not take, at most one read of 64 KiB, and stop
    reading while it holds anything), and comes back to Python only for a
    connection that needs it.

    A connection leaves the lane, and from then on is the Python path's again,
    when its client half-closes or resets it, when it reaches
    C{--max-session-bytes} (the lane reads no byte past the limit), and before
    Python itself ends it (L{LaneEchoProtocol.finish}, L{LaneEchoProtocol.abort}:
    the drain, a reload's deny, the idle sweep, C{--max-session-seconds}).
    Leaving, whatever the lane had not sent yet goes to the transport's buffer,
    so the lingering close, the half-close and the counts of unsent bytes work
    exactly as on the Python path.  While in the lane, the counts the idle sweep,
    the drain and C{/metrics} read (L{LaneEchoProtocol.bytesReceived},
    L{LaneEchoProtocol.pendingBytes}) come from the lane.
    """

    startsReadingItself = True
    _reader: LaneReader | None = None
    _fd = -1
    bytesReceived = _CountedInLane()
    _counted = 0
    _leftUnsent = 0
    _accepted: tuple[Any, Any] = (None, None)
    instanceNames = (
        *EchoProtocol.instanceNames,
        "_reader",
        "_fd",
        "_counted",
        "_leftUnsent",
        "_accepted",
    )

    def startInLane(self, reader: LaneReader, fd: int, client: Any, port: Any) -> None:
        """
        Start as a connection accepted straight into the lane
        (L{echotw.transport.laneport}): C{fd}, just accepted by C{port} from
        C{client} (its address as C{accept} gave it), is counted and logged
        as connected, then served by the lane without a transport; one is
        made (L{_materialize}) only if the connection ever leaves the lane
        other than by its clean end.
        """
        self._accepted = (port, client)
        self._fd = fd
        self.startedAt = reader.servedAt
        self.factory.connectionOpened(self)
        try:
            reader.join(fd, self, self.byteLimit, _NODELAY_OWNED if self.noDelay else _OWNED)
        except (OSError, ValueError):
            self._materialize().startReading()
            return
        self._reader = reader

    def _materialize(self) -> Any:
        """
        Give a connection accepted into the lane the transport it was
        spared, as its port would have built it; not reading yet.
        """
        port, client = self._accepted
        sock = socket.socket(port.addressFamily, socket.SOCK_STREAM, 0, self._fd)
        transport = port.transportFor(sock, self, client)
        transport.__dict__.pop("readingWithheld", None)
        self.transport = transport
        self.connected = 1
        transport.registerProducer(transport, True)
        self.direct = canWriteDirectly(transport)
        return transport

    @property
    def inLane(self) -> bool:
        """
        Whether the lane serves this connection now.
        """
        return self._reader is not None

    def connectionMade(self) -> None:
        super().connectionMade()
        transport: Any = self.transport
        withheld = transport.__dict__.pop("readingWithheld", False)
        if not self._join(transport, withheld) and withheld:
            transport.startReading()

    def _join(self, transport: Any, withheld: bool) -> bool:
        """
        Hand the connection to the lane, if it may join; whether it did.
        """
        if self.closed or self.finishing or not canJoin(self, transport):
            return False
        reader = readerFor(transport.reactor)
        if reader is None:
            return False
        fd = transport.fileno()
        limit = self.byteLimit - self.bytesReceived if self.byteLimit else 0
        if not withheld:
            transport.stopReading()
        try:
            reader.join(fd, self, limit)
        except (OSError, ValueError):
            if not withheld:
                transport.startReading()
            return False
        self._reader = reader
        self._fd = fd
        return True

    def _leave(self) -> bytes:
        """
        Leave the lane: take its count and return what it had not sent.
        """
        reader = self._reader
        assert reader is not None
        received, unsent = reader.leave(self._fd)  # if this fails, still in the lane
        self._reader = None
        self._counted = received
        if self.transport is None:
            self._materialize()
        return unsent

    def _resume(self, unsent: bytes) -> None:
        """
        Be the Python path's from now on: the reactor reads the socket
        again, and what the lane had not sent is queued first.
        """
        transport: Any = self.transport
        transport.startReading()
        if unsent:
            transport.write(unsent)

    def laneEnded(self, kind: int, err: int) -> None:
        """
        The lane let go of this connection: its client half-closed or reset
        it, or it reached C{byteLimit}.
        """
        unsent = self._leave()
        transport: Any = self.transport
        if kind == _lane.EOF:
            # As Twisted's reactor does for a half-closeable protocol; the
            # lane reads nothing while it holds unsent bytes, so none wait.
            transport.readConnectionLost(_DONE)
        elif kind == _lane.LIMIT:
            self._resume(unsent)
            self.finish("max-session-bytes")
        else:
            if unsent:
                transport.write(unsent)  # counted as unsent when it closes
            transport.connectionLost(_LOST)

    def laneClosed(self, reset: bool, received: int, unsent: int) -> None:
        """
        The lane closed this connection (accepted into it) when it ended:
        the client's end of stream, everything echoed; or a reset, with
        C{unsent} bytes never sent.
        """
        reader = self._reader
        assert reader is not None
        self._reader = None
        self._counted = received
        timer = self._sessionTimer
        if timer is not None and timer.active():
            timer.cancel()
        self.closed = True
        if reset:
            self._leftUnsent = self.bytesUnsent = unsent
            self.factory.connectionClosed(self, _LOST, reader.servedAt, received - unsent)
        else:
            self.factory.connectionClosed(self, _DONE, reader.servedAt, received)

    def queuedInKernel(self) -> int:
        if self.transport is None:
            return kernelPendingBytesOf(self._fd)
        return super().queuedInKernel()

    def laneLost(self, reason: Failure) -> None:
        """
        The lane itself is gone (the reactor is stopping): lose the
        connection as the reactor would.
        """
        unsent = self._leave()
        transport: Any = self.transport
        if unsent:
            transport.write(unsent)
        transport.connectionLost(reason)

    def pendingBytes(self) -> int:
        reader = self._reader
        if reader is not None:
            return reader.lane.pending(self._fd)
        return pendingBytes(self.transport) + self._leftUnsent

    def finish(self, reason: str, deadline: float | None = None) -> None:
        if self._reader is not None:
            self._resume(self._leave())
        super().finish(reason, deadline)

    def abort(self, reason: str) -> None:
        if self._reader is not None:
            self._resume(self._leave())
        super().abort(reason)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._reader is not None:
            # Closed by someone other than this protocol while in the lane:
            # the descriptor is closed already and, in this same call,
            # nothing can have reused its number; forget it now.
            self._leftUnsent = len(self._leave())
        super().connectionLost(reason)
