# -*- test-case-name: tests.integration.test_nativelane -*-
"""
The native lane as one reactor sees it: the C extension (if it was built),
and L{LaneReader}, a reactor's one lane.  In echotw's reactor the lane's
connections are in the reactor's own epoll set, and the lane's C{poll} is
that reactor's one wait per turn; in any other reactor the lane has a set
of its own, whose descriptor is a single reader there while it serves any
connection.
"""

from __future__ import annotations

import os
import time
from time import monotonic
from typing import Any, Protocol
from weakref import WeakKeyDictionary

from twisted.logger import Logger
from twisted.python.failure import Failure

try:
    from echotw.transport import _lane
except ImportError as e:  # not built: no compiler, or not Linux
    _lane = None  # type: ignore[assignment]
    NOT_BUILT = f"the native lane is not built ({e})"
    _CLOSED = _RESET = _ACCEPTED = _ACCEPT_FAILED = -1
else:
    NOT_BUILT = ""
    _CLOSED, _RESET = _lane.CLOSED, _lane.RESET
    _ACCEPTED, _ACCEPT_FAILED = _lane.ACCEPTED, _lane.ACCEPT_FAILED

native = _lane
"""The C extension, or L{None} where it was not built (L{NOT_BUILT} says why)."""

_log = Logger()

REST_WITHOUT_MEMORY = 0.1
"""Seconds the lane rests after a wake-up it could not serve for want of memory."""


class LaneMember(Protocol):
    """
    A connection in the lane, as its reader tells it how it left
    (L{echotw.transport.lane.LaneEchoProtocol}).
    """

    def laneEnded(self, kind: int, err: int) -> None: ...

    def laneClosed(self, reset: bool, received: int, unsent: int) -> None: ...

    def laneLost(self, reason: Failure) -> None: ...


class LaneListening(Protocol):
    """
    A listening socket the lane accepts on, as its reader hands it what
    was accepted (L{echotw.transport.laneport.LaneListener}).
    """

    def accepted(self, fd: int, client: Any) -> None: ...

    def acceptFailed(self, err: int) -> None: ...


class LaneReader:
    """
    The lane of one reactor: which protocol each connection in it is, and
    which listener each listening socket; and how the reactor waits on it.

    A reactor that offers its epoll set (C{epollForLane}: echotw's reactor)
    gets the lane's connections in that set, and waits through L{poll}:
    one system call per turn, as a loop of its own would make, where a lane
    with a set of its own costs that wait and the lane's own.  Any other
    reactor watches the lane's own set as a reader (L{doRead}) while it
    serves any connection or listening socket.
    """

    dispatchWithoutLogContext = True
    servedAt = 0.0
    """When the lane last served (C{time.monotonic}): the time of every
    accept and end it reported then, so that a connection's start and end
    cost no clock reading of their own."""

    def __init__(self, reactor: Any) -> None:
        assert _lane is not None
        self.reactor = reactor
        self.members: dict[int, LaneMember] = {}
        self.listeners: dict[int, LaneListening] = {}
        self._failures = 0  # serve() calls in a row that found no memory
        offer = getattr(reactor, "epollForLane", None)
        epfd = offer() if offer is not None else None
        self.lane = _lane.Lane() if epfd is None else _lane.Lane(epfd)
        self.shared = epfd is not None
        """Whether the lane is in the reactor's own set (see L{poll})."""
        self._watched = self.shared  # a shared set is the reactor's wait
        if self.shared:
            # Only once the lane is made: a reactor must never wait through
            # a lane that failed to be.
            reactor.waitThroughLane(self)

    def fileno(self) -> int:
        return self.lane.fileno()

    def logPrefix(self) -> str:
        return "echotw-lane"

    def _watch(self) -> None:
        if not self._watched:
            self._watched = True
            self.reactor.addReader(self)

    def _unwatchIfIdle(self) -> None:
        # An idle lane is not watched: nothing of it outlives its
        # connections and listeners (a test's clean reactor, a stopping server).
        if self._watched and not self.members and not self.listeners and not self.shared:
            self._watched = False
            self.reactor.removeReader(self)

    def join(self, fd: int, protocol: LaneMember, limit: int, flags: int = 0) -> None:
        """
        Serve C{fd}, C{protocol}'s connection, which the reactor does not
        watch; echo at most C{limit} bytes (0: no limit); C{flags}: the
        lane's C{NODELAY} and C{OWNED} (see L{_lane}).
        """
        self.lane.add(fd, limit, flags)
        self.members[fd] = protocol
        if not self._watched:
            self._watch()

    def leave(self, fd: int) -> tuple[int, bytes]:
        """
        Stop serving C{fd}: the bytes it received, and those not sent back.
        """
        result = self.lane.remove(fd)  # if this fails, still served
        del self.members[fd]
        self._unwatchIfIdle()
        return result

    def listen(self, fd: int, listener: LaneListening) -> None:
        """
        Accept the connections of the listening socket C{fd} (which the
        reactor does not watch) and hand each to C{listener}.
        """
        self.lane.listen(fd)
        self.listeners[fd] = listener
        self._watch()

    def unlisten(self, fd: int) -> None:
        """
        Stop accepting on C{fd}, which stays open.
        """
        if self.listeners.pop(fd, None) is not None:
            self.lane.unlisten(fd)
            self._unwatchIfIdle()

    def doRead(self) -> None:
        """
        Serve the ready connections and listening sockets of the lane's own
        set; hand what needs Python to it (L{_handle}).
        """
        try:
            report = self.lane.serve()
        except MemoryError:
            self._rest()
            return
        if self._failures:
            self._memoryBack()
        if report is not None:
            self._handle(report)

    def poll(self, timeout: float | None) -> list[tuple[int, int]] | None:
        """
        The reactor's wait, where the lane is in its set: wait up to
        C{timeout} seconds (L{None}: until something is ready), serve the
        lane's ready connections and listening sockets, hand what needs
        Python to it (L{_handle}), and return the reactor's other ready
        descriptors as C{[(fd, events)]}, or L{None}.
        """
        try:
            events, report = self.lane.poll(timeout)
        except MemoryError:
            self._rest()
            return None
        if self._failures:
            self._memoryBack()
        if report is not None:
            self._handle(report)
        return events

    def _memoryBack(self) -> None:
        _log.info(
            "The native lane serves again after {failures} wake-ups without memory",
            event="lane-memory-back",
            failures=self._failures,
        )
        self._failures = 0

    def _handle(self, report: list[tuple[int, int, int, Any]]) -> None:
        """
        Hand each entry of a report to what it concerns: connections that
        ended or left, connections accepted, a listener that failed.
        """
        self.servedAt = monotonic()
        members = self.members
        listeners = self.listeners
        for fd, kind, value, more in report:
            try:
                if kind == _ACCEPTED:
                    listener = listeners.get(value)
                    if listener is not None:
                        listener.accepted(fd, more)
                    else:  # stopped listening earlier in this report
                        os.close(fd)
                elif kind == _CLOSED or kind == _RESET:
                    # The lane closed it already and forgot it.
                    ended = members.pop(fd, None)
                    if ended is not None:
                        ended.laneClosed(kind == _RESET, value, more)
                elif kind == _ACCEPT_FAILED:
                    # The lane took the listening socket out of its set.
                    failed = listeners.get(fd)
                    self.unlisten(fd)
                    if failed is not None:
                        failed.acceptFailed(value)
                else:
                    protocol = members.get(fd)
                    if protocol is not None:
                        protocol.laneEnded(kind, value)
                    else:  # never expected: forget it rather than hold its number
                        self.lane.remove(fd)
            except Exception:
                # One connection's failure must not lose the others in this
                # report (nor the lane, which the reactor would drop).
                _log.failure("The native lane's report on descriptor {fd}", fd=fd)
        self._unwatchIfIdle()

    def _rest(self) -> None:
        """
        C{serve()} or C{poll()} found no memory to report in, and did
        nothing (they report whatever they did): rather than fail, which
        would make the reactor drop the lane and every connection in it, or
        be called again at once while memory is short, the lane is not
        watched for a moment.  What was ready stays ready (epoll is
        level-triggered).  A lane in the reactor's set cannot be left out
        of its wait: there the reactor itself rests.
        """
        self._failures += 1
        if self._failures == 1:
            _log.warn(
                "The native lane is out of memory: it tries again every {seconds}s",
                event="lane-no-memory",
                seconds=REST_WITHOUT_MEMORY,
            )
        if self.shared:
            time.sleep(REST_WITHOUT_MEMORY)
        elif self._watched:
            self._watched = False
            self.reactor.removeReader(self)
            self.reactor.callLater(REST_WITHOUT_MEMORY, self._rested)

    def _rested(self) -> None:
        if self.members or self.listeners:
            self._watch()

    def connectionLost(self, reason: Failure) -> None:
        """
        The reactor is stopping (or the lane's descriptor failed): every
        connection still in the lane is lost with it, as the reactor does
        with the ones it watches itself; listening sockets stay their ports'.
        """
        self._watched = self.shared
        for fd in list(self.listeners):
            self.unlisten(fd)
        for protocol in list(self.members.values()):
            protocol.laneLost(reason)


_readers: WeakKeyDictionary[Any, LaneReader] = WeakKeyDictionary()
_last: list[Any] = [None, None]
"""The reactor last asked about, and its lane: nearly always the one."""


def readerFor(reactor: Any) -> LaneReader | None:
    """
    C{reactor}'s lane, made when first needed; L{None} if there can be none
    (not built, or no descriptor left for its epoll set).
    """
    if _last[0] is reactor:
        reader: LaneReader | None = _last[1]
        return reader
    reader = _readers.get(reactor)
    if reader is None and _lane is not None:
        try:
            reader = _readers[reactor] = LaneReader(reactor)
        except OSError:
            return None
    _last[:] = [reactor, reader]
    return reader
