# -*- test-case-name: tests.integration.test_reactor -*-
"""
An epoll reactor that dispatches echo connections' events without Twisted's
legacy log context (L{EchoReactor}), which under echo load cost more than
everything else echotw does in Python.  When the user picked a reactor
(C{twistd -r NAME}), that reactor runs unchanged.
"""

from __future__ import annotations

import select
import socket
import sys
from typing import Any

from twisted.internet import main
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger
from twisted.python import log
from twisted.python.failure import Failure

from echotw.transport.tcpport import EchoPort, EchoServer

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # no epoll on this platform
    EPollReactor = None  # type: ignore[assignment,misc]

_INTERNALS = ("_poller", "_selectables", "_doReadOrWrite", "_reads", "_writes")

_TIMER_INTERNALS = (
    "_pendingTimedCalls",
    "_newTimedCalls",
    "_justStopped",
    "_cancellations",
    "threadCallQueue",
)
_LONGEST_WAIT = 2147483
"""The longest wait Twisted's C{timeout} answers (epoll counts milliseconds in an int)."""

_IN = getattr(select, "EPOLLIN", 1)
_OUT = getattr(select, "EPOLLOUT", 4)

_log = Logger(namespace="twisted.internet.base")
"""As Twisted's loop logs, so that its lines read the same."""

_ENDED = {
    ConnectionDone: Failure(ConnectionDone()),
    ConnectionLost: Failure(ConnectionLost()),
}


if EPollReactor is not None:

    class EchoReactor(EPollReactor):
        """
        L{EPollReactor} whose event loop leaves out the log context for
        connections that asked for that.  If this Twisted's epoll reactor
        lacks the internals it uses, it behaves exactly as its parent.

        For every ready descriptor, Twisted's epoll reactor calls
        C{log.callWithLogger}: it asks the descriptor for its log prefix, copies the
        current log context twice and pushes and pops it on a thread-local stack, so
        that an old-style C{log.msg} made while handling the event is tagged with
        the connection.  Under echo load that bookkeeping cost more than everything
        else echotw does in Python (about 1.4 of 2.5 µs of user CPU per round trip,
        measured with 50 connections x 1 KiB), and echotw logs through
        C{twisted.logger} with explicit fields, so the context tags nothing.

        L{EchoReactor} skips it only for connections whose protocol sets
        C{dispatchWithoutLogContext}, and for listening ports that set it
        themselves (L{echotw.transport.tcpport.EchoPort}); every other descriptor (TLS and
        PROXY-protocol connections, the metrics server's connections, UDP) is
        dispatched exactly as Twisted does.  Its TCP listening ports, bound or
        adopted, are L{echotw.transport.tcpport.EchoPort}s, which accept with less Python
        per connection.  Their echo connections' reads are dispatched straight to
        C{doRead}, and a closing one goes straight to its own C{connectionLost},
        which leaves the reactor in one step (L{EchoReactor.forgetDescriptor}).
        The subclass overrides the loop and the disconnection, and uses the
        reactor's own C{_poller}, C{_selectables}, C{_reads}, C{_writes} and
        C{_doReadOrWrite}, and its timed calls' C{_pendingTimedCalls},
        C{_newTimedCalls}, C{_cancellations}, C{_justStopped} and
        C{threadCallQueue}; if a Twisted release lacks them it falls back to
        its parent's loop.

        The native lane's connections are in this reactor's own epoll set
        (L{epollForLane}), and the lane's C{poll} is the loop's wait: each
        turn makes one C{epoll_wait}, serves the lane's ready connections in
        C, and dispatches the other ready descriptors here.
        """

        laneReader: Any = None
        """The native lane in this reactor's set, once one joined it (L{waitThroughLane})."""

        def __init__(self) -> None:
            super().__init__()
            self.quietDispatch = all(hasattr(self, name) for name in _INTERNALS) and isinstance(
                self._selectables, dict
            )
            self.quietTimers = all(hasattr(self, name) for name in _TIMER_INTERNALS)

        def epollForLane(self) -> int | None:
            """
            The descriptor of this reactor's epoll set, for a native lane
            to put its connections in (L{waitThroughLane}); L{None} (the
            lane keeps a set of its own) where the loop is its parent's or
            a lane has the set already.
            """
            if not self.quietDispatch or self.laneReader is not None:
                return None
            fd: int = self._poller.fileno()
            return fd

        def waitThroughLane(self, reader: Any) -> None:
            """
            From now on the loop waits through the C{poll} of C{reader}
            (L{echotw.transport.lanereader.LaneReader}), whose lane is in
            this reactor's set, and loses its connections with its own at
            shutdown.
            """
            self.laneReader = reader
            self.addSystemEventTrigger(
                "during", "shutdown", reader.connectionLost, Failure(main.CONNECTION_LOST)
            )

        def doPoll(self, timeout: float | None) -> None:
            """
            Wait for events and dispatch each ready descriptor.
            """
            if not self.quietDispatch:
                super().doPoll(timeout)
                return
            lane = self.laneReader
            if lane is None:
                events = self._poller.poll(
                    -1 if timeout is None else timeout, len(self._selectables)
                )
            else:
                events = lane.poll(timeout)
                if events is None:
                    return
            selectables = self._selectables
            for fd, event in events:
                selectable = selectables.get(fd)
                if selectable is None:
                    continue
                # A connection's protocol, or the listening port itself.
                owner = getattr(selectable, "protocol", selectable)
                if not getattr(owner, "dispatchWithoutLogContext", False):
                    log.callWithLogger(selectable, self._doReadOrWrite, selectable, fd, event)
                elif selectable.__class__ is EchoServer and event & _IN and not event & _OUT:
                    # An echo connection with input, or its end, to read:
                    # what _doReadOrWrite does, less its checks for cases
                    # that cannot arise here (the descriptor is watched only
                    # while open).
                    why: BaseException | None
                    try:
                        why = selectable.doRead()
                    except BaseException:
                        why = sys.exc_info()[1]
                        log.err()
                    if why:
                        self._disconnectSelectable(selectable, why, True)
                else:
                    self._doReadOrWrite(selectable, fd, event)

        doIteration = doPoll

        def mainLoop(self) -> None:
            """
            Twisted's loop, with its handler of unexpected errors entered
            once rather than on every turn, and its timed calls run only
            when there is something for them to do: the
            turns are many when the native lane serves every wake-up at
            once, and each of Twisted's costs six calls more.
            """
            if not self.quietTimers:
                super().mainLoop()
                return
            seconds = self.seconds
            while self._started:
                try:
                    while self._started:
                        now = seconds()
                        pending = self._pendingTimedCalls
                        if (
                            self.threadCallQueue
                            or self._newTimedCalls
                            or self._justStopped
                            or (pending and pending[0].time <= now)
                            or (
                                self._cancellations > 50 and self._cancellations > len(pending) >> 1
                            )
                        ):
                            # Calls from threads, new or due timed calls, the
                            # stop, or the clean-up of cancelled calls that
                            # runUntilCurrent would make (Twisted's condition).
                            self.runUntilCurrent()
                            timeout = self.timeout()
                        elif pending:
                            # Not due, nothing new: what timeout() answers.
                            timeout = pending[0].time - now
                            if timeout > _LONGEST_WAIT:
                                timeout = _LONGEST_WAIT
                        else:
                            timeout = None
                        self.doIteration(self.running and timeout)
                except BaseException:
                    _log.failure("Unexpected error in main loop")
            _log.info("Main loop terminated.")

        def forgetDescriptor(self, selectable: Any) -> None:
            """
            Stop watching C{selectable} for reading and writing, in one
            step: what C{removeReader} and C{removeWriter} do together.
            """
            fd = selectable.fileno()
            selectables = self._selectables
            if self.quietDispatch and fd != -1 and selectables.get(fd) is selectable:
                del selectables[fd]
                self._reads.discard(fd)
                self._writes.discard(fd)
                self._poller.unregister(fd)
                return
            self.removeReader(selectable)
            self.removeWriter(selectable)

        def _disconnectSelectable(
            self, selectable: Any, why: Any, isRead: bool, *args: Any, **kwargs: Any
        ) -> None:
            """
            End a descriptor whose read or write reported C{why}.  An
            L{EchoServer} that is closing (anything but its client's
            half-close, which its protocol answers) leaves the reactor in
            its own C{connectionLost}, so it goes straight there; everything
            else as Twisted does it.
            """
            if isinstance(selectable, EchoServer) and not (
                isRead and why.__class__ is ConnectionDone
            ):
                ended = _ENDED.get(why.__class__)
                selectable.connectionLost(ended if ended is not None else Failure(why))
                return
            super()._disconnectSelectable(selectable, why, isRead, *args, **kwargs)

        def listenTCP(
            self,
            port: int,
            factory: IProtocolFactory,
            backlog: int = 50,
            interface: str = "",
        ) -> IListeningPort:
            """
            Listen on a TCP port with an L{EchoPort}.
            """
            p = EchoPort(port, factory, backlog, interface, self)
            p.startListening()
            return p

        def adoptStreamPort(
            self, fileDescriptor: int, addressFamily: Any, factory: IProtocolFactory
        ) -> IListeningPort:
            """
            Listen on an inherited TCP socket with an L{EchoPort} (other
            kinds of socket as Twisted does).
            """
            if addressFamily not in (socket.AF_INET, socket.AF_INET6):
                port: IListeningPort = super().adoptStreamPort(
                    fileDescriptor, addressFamily, factory
                )
                return port
            p = EchoPort._fromListeningDescriptor(self, fileDescriptor, addressFamily, factory)
            p.startListening()
            return p


def install() -> None:
    """
    Install L{EchoReactor} as the global reactor (C{twistd -r echotw},
    C{trial --reactor=echotw}).
    """
    from twisted.internet.main import installReactor

    installReactor(EchoReactor())


def installIfUnchosen() -> bool:
    """
    Install L{EchoReactor} as the global reactor unless one is installed
    already (C{twistd -r NAME}, a test runner, an embedding program) or
    there is no epoll.  Returns whether it was installed.
    """
    if EPollReactor is None or "twisted.internet.reactor" in sys.modules:
        return False
    install()
    return True
