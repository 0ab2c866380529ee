# -*- test-case-name: tests.unit.test_protocol -*-
"""
The echo handler: one L{EchoProtocol} per connection.
"""

from __future__ import annotations

from collections.abc import Callable
from time import monotonic
from typing import ClassVar
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IDelayedCall,
    IHalfCloseableProtocol,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from echotw.transport.fastpath import canWriteDirectly, closeIfFlushed, writeDirectly
from echotw.transport.state import canHalfClose, kernelPendingBytes, pendingBytes

LINGER_TIME = 30.0
"""Seconds a lingering close waits, at most, for the client to close its side."""

LINGER_TIMEOUT = 5.0
"""Seconds a lingering close waits while nothing moves (no input, no output drained)."""

LINGER_CHECK = 1.0
"""Seconds between a lingering close's checks."""


class ConnectionTracker(TypingProtocol):
    """
    What a connection needs from its factory: to be counted when it opens
    and released when it closes (see L{echotw.factory.EchoFactory}), and a
    clock for its own deadlines.
    """

    clock: IReactorTime

    def connectionOpened(self, connection: EchoProtocol) -> None: ...

    def connectionClosed(
        self,
        connection: EchoProtocol,
        why: Failure,
        now: float | None = ...,
        sent: int | None = ...,
    ) -> None: ...


class Connection(TypingProtocol):
    """
    What the server's housekeeping (the idle sweep, reloads, the drain) needs
    from an open connection.
    """

    listener: str
    peer: IAddress | None
    bytesReceived: int
    finishing: bool
    closed: bool

    def finish(self, reason: str, deadline: float | None = None) -> None: ...

    def abort(self, reason: str) -> None: ...

    def isIdle(self, now: float, timeout: float) -> bool: ...

    def pendingBytes(self) -> int: ...


@implementer(IHalfCloseableProtocol)
class EchoProtocol(Protocol):
    """
    Write back every byte received, in order, with bounded memory.

    The transport is registered as its own streaming producer: when its write
    buffer fills (a client that sends but does not read) it pauses reading,
    and resumes once the buffer drains, so at most about one buffer's worth
    (64 KiB) is held per connection.  When the client half-closes, whatever is
    still queued is sent before the connection closes.

    The factory sets a connection up with L{admit} before it is connected,
    and its own fields are changed only through its methods.

    @ivar bytesReceived: bytes received and accepted for the echo: queued
        to be sent back, not necessarily handed to the kernel yet (those
        past C{byteLimit} count in C{bytesDiscarded} instead).
    @ivar bytesDiscarded: bytes received and not echoed, because the server
        was closing the connection (see L{finish}) or they came past
        C{byteLimit}.
    @ivar bytesUnsent: once closed, bytes that were queued to be sent back
        but never handed to the kernel (the connection was aborted or reset).
    @ivar peer: the client address the connection was verified with.
    @ivar source: the key this connection counts under for per-source limits.
    @ivar closeReason: why the server ended the connection, if it did.
    @ivar finishing: whether the connection is closing gracefully (the
        server's L{finish}, or the client's half-close).
    @ivar closed: whether the connection is gone.
    @ivar direct: whether echoes are sent at once (L{echotw.transport.fastpath}).
    @ivar byteLimit: echo this many bytes at most, then close (L{finish});
        a read that crosses it is echoed up to it.
    @ivar noDelay: whether to set C{TCP_NODELAY} (not needed where the
        listening socket has it: Linux copies it to accepted sockets).
    @ivar logged: whether this connection's events are logged (see
        C{--log-connections}).
    @ivar healthCheck: a balancer's own connection (a PROXY C{LOCAL}
        header): logged at debug level only.
    @cvar dispatchWithoutLogContext: echotw logs with explicit fields, so
        L{echotw.transport.reactor.EchoReactor} may skip the legacy log context when
        dispatching this connection's events.
    @cvar startsReadingItself: an L{echotw.transport.tcpport.EchoServer} transport
        does not start reading this protocol's connection; the protocol
        starts it, or hands the connection to the native lane, when
        connected (L{echotw.transport.lane.LaneEchoProtocol}).
    """

    factory: ConnectionTracker
    listener = ""
    peer: IAddress | None = None
    source: str | None = None
    bytesReceived = 0
    closeReason: str | None = None
    finishing = False
    closed = False
    direct = False
    byteLimit = 0
    healthCheck = False
    logged = False
    noDelay = True
    startedAt = 0.0
    bytesDiscarded = 0
    bytesUnsent = 0
    _sessionTimer: IDelayedCall | None = None
    _linger: _Linger | None = None
    _idleSeen: tuple[int, int, int, float] = (-1, 0, 0, 0.0)
    dispatchWithoutLogContext = True
    startsReadingItself = False
    instanceNames: ClassVar[tuple[str, ...]] = (
        *("transport", "connected"),  # Twisted's makeConnection
        *("factory", "listener", "peer", "source", "byteLimit", "noDelay", "healthCheck"),
        *("startedAt", "logged", "direct", "bytesReceived", "bytesDiscarded", "bytesUnsent"),
        *("finishing", "closed", "closeReason", "dataReceived"),
        *("_sessionTimer", "_linger", "_idleSeen"),
    )
    """Every attribute name an instance may set (see L{enterInstanceNames})."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        enterInstanceNames(cls)

    def admit(
        self,
        factory: ConnectionTracker,
        listener: str,
        peer: IAddress,
        source: str | None = None,
        byteLimit: int = 0,
        noDelay: bool = True,
        healthCheck: bool = False,
    ) -> None:
        """
        Set up an accepted connection, before it is connected: who counts it,
        where it came from, and its limits.  Called for every connection, so
        its arguments may be positional (keywords cost more per call).
        """
        self.factory = factory
        self.listener = listener
        self.peer = peer
        self.source = source
        self.byteLimit = byteLimit
        self.healthCheck = healthCheck
        self.noDelay = noDelay
        # Read at every close: CPython 3.11 reads an instance's own value
        # faster than its class's default.
        self.logged = False
        self.bytesDiscarded = self.bytesUnsent = 0
        self._sessionTimer = None

    def limitDuration(self, clock: IReactorTime, seconds: float) -> None:
        """
        Close, after echoing, C{seconds} from now (C{--max-session-seconds}).
        """
        self._sessionTimer = clock.callLater(seconds, self.finish, "max-session-seconds")

    def logEvents(self) -> None:
        """
        Log this connection's events (it fits the C{--log-connections} budget).
        """
        self.logged = True

    def isIdle(self, now: float, timeout: float) -> bool:
        """
        Whether no byte has moved for C{timeout} seconds, as seen by periodic
        calls (the server's idle sweep) at times C{now}: a connection costs
        no timer of its own and a read costs nothing extra.  A lingering
        close has deadlines of its own and is never idle.

        Bytes move when the client sends them, and when the echo leaves:
        Twisted's buffer emptying into the kernel, or the kernel's send
        queue shrinking as the client reads (L{kernelPendingBytes}).  A
        client that sent everything at once and reads its echo slowly is
        busy until the last byte is delivered; one that neither sends nor
        reads is idle, whatever is queued for it.
        """
        if self._linger is not None:
            return False
        received = self.bytesReceived
        buffered = self.pendingBytes()
        # What the last sweep saw, and when.
        seenReceived, seenBuffered, seenInKernel, seenAt = self._idleSeen
        if received == seenReceived and buffered == seenBuffered:
            # Nothing was read, nor handed to the kernel: only the kernel's
            # queue may have moved, and an empty one cannot have.
            inKernel = seenInKernel and self.queuedInKernel()
            if inKernel == seenInKernel:
                return now - seenAt >= timeout
        else:
            inKernel = self.queuedInKernel()
        self._idleSeen = (received, buffered, inKernel, now)
        return False

    def queuedInKernel(self) -> int:
        """
        Bytes the kernel still holds to send (L{kernelPendingBytes}): one
        system call, for periodic checks.
        """
        return kernelPendingBytes(self.transport)

    def connectionMade(self) -> None:
        self.startedAt = monotonic()
        transport = self.transport
        assert transport is not None
        # The transport is its own producer; no interface adaptation here,
        # it costs more than the call.
        transport.registerProducer(transport, True)  # type: ignore[attr-defined]
        if self.noDelay:
            setTcpNoDelay = getattr(transport, "setTcpNoDelay", None)
            if setTcpNoDelay is not None:
                try:
                    setTcpNoDelay(True)
                except OSError:
                    pass  # not TCP after all: older Twisteds give Unix sockets this too
        if canWriteDirectly(transport):
            self.direct = True
        self.factory.connectionOpened(self)

    def dataReceived(self, data: bytes) -> None:
        self.bytesReceived += len(data)
        if self.byteLimit and self.bytesReceived >= self.byteLimit:
            self._echoLast(data)
            return
        if self.direct:
            writeDirectly(self.transport, data)
        else:
            self.transport.write(data)  # type: ignore[union-attr]

    def _echoLast(self, data: bytes) -> None:
        """
        C{data} reached C{byteLimit}: echo the part of it within the limit,
        count the rest as discarded, and close (L{finish}).
        """
        over = self.bytesReceived - self.byteLimit
        if over:
            self.bytesReceived = self.byteLimit
            self.bytesDiscarded += over
            data = data[: len(data) - over]
        if data:
            self._echo(data)
        self.finish("max-session-bytes")

    def _echo(self, data: bytes) -> None:
        """
        Send C{data} back: what L{dataReceived} does inline, to keep a
        call off the path every read takes.
        """
        if self.direct:
            writeDirectly(self.transport, data)
        else:
            self.transport.write(data)  # type: ignore[union-attr]

    def readConnectionLost(self) -> None:
        """
        The client shut down its sending side: finish echoing, then close.
        While lingering, this is the end the server was waiting for.
        """
        if self._linger is not None:
            self._stopLingering()
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if self.finishing:
            return
        self.finishing = True
        transport = self.transport
        assert transport is not None
        # A registered producer would keep loseConnection from ever finishing.
        IConsumer(transport).unregisterProducer()
        if self.direct and closeIfFlushed(transport):
            return
        transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """
        The server's half-close went out (see L{finish}): everything echoed
        is with the kernel, followed by the FIN.  Keep reading (and
        discarding) until the client closes its side.
        """

    def pendingBytes(self) -> int:
        """
        Bytes accepted for the echo but not yet handed to the kernel.
        """
        return pendingBytes(self.transport)

    def finish(self, reason: str, deadline: float | None = None) -> None:
        """
        Close gracefully, without ever destroying what was echoed: stop
        echoing, send everything already queued, half-close (FIN), then read
        and discard whatever the client still sends until it closes its side.

        Closing a socket whose receive queue holds unread bytes makes the
        kernel answer with a reset, and a reset makes the client's kernel
        throw away echoed bytes its application has not read yet; this
        lingering close (nginx's C{lingering_close}) avoids that.  It ends
        when the client closes its side; when neither input arrives nor
        output drains for L{LINGER_TIMEOUT} seconds; or at L{LINGER_TIME}
        seconds (or C{deadline}, a clock time, if sooner), after which a
        connection with bytes still queued is aborted.  Transports that cannot
        half-close (TLS) are closed after the flush instead.
        """
        if self.closeReason is None:
            self.closeReason = reason
        if self.finishing or self.closed:
            return
        self.finishing = True
        transport = self.transport
        assert transport is not None
        # Bytes from now on are not echoed: an instance attribute shadows the
        # method, so the echo path itself carries no check for this.
        self.dataReceived = self._discard  # type: ignore[method-assign]
        IConsumer(transport).unregisterProducer()
        if not canHalfClose(transport):
            transport.loseConnection()
            return
        clock = self.factory.clock
        now = clock.seconds()
        giveUp = now + LINGER_TIME if deadline is None else min(now + LINGER_TIME, deadline)
        self._linger = _Linger(clock, giveUp, self._lingerCheck)
        # Reading may be paused by backpressure: resume it, to discard.
        transport.resumeProducing()  # type: ignore[attr-defined]
        transport.loseWriteConnection()  # type: ignore[attr-defined]

    def _discard(self, data: bytes) -> None:
        self.bytesDiscarded += len(data)

    def _lingerCheck(self, now: float) -> bool:
        """
        Whether to keep lingering: something moved (input discarded, output
        drained) within L{LINGER_TIMEOUT}, and the deadline has not passed.
        """
        linger = self._linger
        assert linger is not None
        buffered = self.pendingBytes()
        progress = (self.bytesDiscarded, buffered, kernelPendingBytes(self.transport))
        if progress != linger.progress:
            linger.progress = progress
            linger.movedAt = now
        if now < linger.giveUp and now - linger.movedAt < LINGER_TIMEOUT:
            return True
        self._linger = None
        if buffered:
            self.abort(self.closeReason or "linger timeout")
        else:
            # Everything echoed is with the kernel; the client just never
            # closed its side.
            self.transport.loseConnection()  # type: ignore[union-attr]
        return False

    def _stopLingering(self) -> None:
        linger, self._linger = self._linger, None
        if linger is not None:
            linger.stop()

    def abort(self, reason: str) -> None:
        """
        Close at once, dropping anything queued: for peers that stopped reading.
        """
        if self.closeReason is None:
            self.closeReason = reason
        self._stopLingering()
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        timer = self._sessionTimer
        if timer is not None and timer.active():
            timer.cancel()
        if self._linger is not None:
            self._stopLingering()
        self.closed = True
        self.bytesUnsent = self.pendingBytes()
        self.factory.connectionClosed(self, reason)


def enterInstanceNames(cls: type[EchoProtocol]) -> None:
    """
    Enter every name in C{cls.instanceNames} in the table of attribute names
    that CPython (3.11 on) shares among a class's instances, before the first
    connection.  Each new instance leaves room for one name fewer, so once
    about 30 connections have been made the table takes no new name; a name
    first set after that (one set only when a connection closes, say, while
    many are open) would make every later connection build a dictionary of
    its own, about 2,600 instructions more per connection (simulated).
    """
    sample = object.__new__(cls)
    for name in cls.instanceNames:
        # A property (a data descriptor) stores under names of its own.
        if not hasattr(getattr(cls, name, None), "__set__"):
            setattr(sample, name, None)


enterInstanceNames(EchoProtocol)


class _Linger:
    """
    The timer of one lingering close: a check every L{LINGER_CHECK} seconds
    while C{check(now)} says to go on.
    """

    def __init__(self, clock: IReactorTime, giveUp: float, check: Callable[[float], bool]) -> None:
        self.clock = clock
        self.giveUp = giveUp
        self.check = check
        self.movedAt = clock.seconds()
        self.progress: tuple[int, int, int] = (-1, -1, -1)
        self._call = clock.callLater(LINGER_CHECK, self._tick)

    def _tick(self) -> None:
        if self.check(self.clock.seconds()):
            self._call = self.clock.callLater(LINGER_CHECK, self._tick)

    def stop(self) -> None:
        if self._call.active():
            self._call.cancel()
