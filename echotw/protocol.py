"""
The echo handler: one L{EchoProtocol} per connection.
"""

from __future__ import annotations

from time import monotonic
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

from echotw.fastpath import bufferedBytes, canWriteDirectly, writeDirectly


class ConnectionTracker(TypingProtocol):
    """
    What a connection needs from its factory: to be counted when it opens
    and released when it closes (see L{echotw.factory.EchoFactory}).
    """

    def connectionOpened(self, connection: EchoProtocol) -> None: ...

    def connectionClosed(self, connection: EchoProtocol, why: Failure) -> None: ...


class Connection(TypingProtocol):
    """
    What the server's housekeeping (the idle sweep, reloads, the drain) needs
    from an open connection.
    """

    listener: str
    peer: IAddress | None
    bytesEchoed: int
    finishing: bool

    def finish(self, reason: str) -> None: ...

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

    @ivar bytesEchoed: bytes received and queued to be sent back.
    @ivar peer: the client address the connection was verified with.
    @ivar source: the key this connection counts under for per-source limits.
    @ivar closeReason: why the server ended the connection, if it did.
    @ivar direct: whether echoes are sent at once (L{echotw.fastpath}).
    @ivar byteLimit: close (after echoing) once this many bytes were echoed.
    @ivar noDelay: whether to set C{TCP_NODELAY} (not needed where the
        listening socket has it: Linux copies it to accepted sockets).
    @ivar logged: whether this connection's events are logged (see
        C{--log-connections}).
    @ivar healthCheck: a balancer's own connection (a PROXY C{LOCAL}
        header): logged at debug level only.
    @cvar dispatchWithoutLogContext: echotw logs with explicit fields, so
        L{echotw.reactor.EchoReactor} may skip the legacy log context when
        dispatching this connection's events.
    """

    factory: ConnectionTracker
    listener = ""
    peer: IAddress | None = None
    source: str | None = None
    bytesEchoed = 0
    closeReason: str | None = None
    finishing = False
    direct = False
    byteLimit = 0
    healthCheck = False
    logged = False
    noDelay = True
    startedAt = 0.0
    _sessionTimer: IDelayedCall | None = None
    _idleMark = -1
    _idleSince = 0.0
    dispatchWithoutLogContext = True

    def admit(
        self,
        factory: ConnectionTracker,
        listener: str,
        peer: IAddress,
        *,
        source: str | None = None,
        byteLimit: int = 0,
        healthCheck: bool = False,
        noDelay: bool = True,
    ) -> None:
        """
        Set up an accepted connection, before it is connected: who counts it,
        where it came from, and its limits.
        """
        self.factory = factory
        self.listener = listener
        self.peer = peer
        self.source = source
        self.byteLimit = byteLimit
        self.healthCheck = healthCheck
        self.noDelay = noDelay

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
        no timer of its own and a read costs nothing extra.
        """
        echoed = self.bytesEchoed
        if echoed != self._idleMark:
            self._idleMark = echoed
            self._idleSince = now
            return False
        return now - self._idleSince >= timeout

    def pendingBytes(self) -> int:
        """
        Bytes received and not yet handed to the kernel: what the transport
        still buffers, where it says (plain TCP, see L{echotw.fastpath});
        0 where it does not.
        """
        return bufferedBytes(self.transport) if self.direct else 0

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
        self.bytesEchoed += len(data)
        if self.direct:
            writeDirectly(self.transport, data)
        else:
            self.transport.write(data)  # type: ignore[union-attr]
        if self.byteLimit and self.bytesEchoed >= self.byteLimit:
            self.finish("max-session-bytes")

    def readConnectionLost(self) -> None:
        """
        The client shut down its sending side: finish echoing, then close.
        """
        self._closeAfterEchoing()

    def writeConnectionLost(self) -> None:
        """
        Nothing can be sent any more, so there is nothing left to echo.
        """
        self.abort("error")

    def finish(self, reason: str) -> None:
        """
        Close after echoing whatever is already queued.
        """
        if self.closeReason is None:
            self.closeReason = reason
        self._closeAfterEchoing()

    def _closeAfterEchoing(self) -> None:
        # A registered producer would keep loseConnection from ever finishing.
        if self.finishing:
            return
        self.finishing = True
        transport = self.transport
        assert transport is not None
        IConsumer(transport).unregisterProducer()
        transport.loseConnection()

    def abort(self, reason: str) -> None:
        """
        Close at once, dropping anything queued: for peers that stopped reading.
        """
        if self.closeReason is None:
            self.closeReason = reason
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        timer = self._sessionTimer
        if timer is not None and timer.active():
            timer.cancel()
        self.factory.connectionClosed(self, reason)
