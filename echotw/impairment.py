# -*- test-case-name: tests.unit.test_impairment,tests.integration.test_impairment -*-
"""
The echo of a slow, jittery or narrow peer on purpose: C{--delay},
C{--jitter} and C{--bandwidth} on stream listeners (TCP, TLS, Unix, PROXY),
by L{ImpairedEchoProtocol}, which the factory builds instead of the plain
echo only when one of those is set.  UDP's side is
L{echotw.shaping.DatagramImpairment}.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from random import Random

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from echotw.protocol import EchoProtocol
from echotw.shaping import StreamShaper
from echotw.transport.fastpath import writeDirectly

PAUSE_ABOVE = 65536
"""
Stop reading while more than this many bytes wait in the shaper: one
transport buffer's worth (Twisted's C{bufferSize}), as without impairment.
"""

RESUME_BELOW = PAUSE_ABOVE // 2
"""Read again once the shaper holds no more than this (hysteresis: a slow
stream does not flip reading on and off for every piece it sends)."""


@implementer(IPushProducer)
class ReadGate:
    """
    The producer registered with an impaired connection's transport: reads
    from it while nothing holds it back.  Reading pauses while the transport
    says its write buffer is full (L{pauseProducing}), while the shaper is
    full (L{holdForQueue}), and for good once the connection is closing
    (L{close}).

    Memory stays bounded as without impairment: a L{ReadGate} is the
    transport's producer, and reading pauses while the transport's write buffer
    is full (what the plain echo does) or while more than L{PAUSE_ABOVE} bytes
    wait in the shaper, and resumes only when neither holds.  The transport
    alone cannot be its own producer here: draining its write buffer would
    resume reading while the shaper is still full.
    """

    __slots__ = ("closed", "consumerFull", "queueFull", "reading", "transport")

    def __init__(self, transport: IPushProducer) -> None:
        self.transport = transport
        self.consumerFull = False
        self.queueFull = False
        self.closed = False
        self.reading = True

    def pauseProducing(self) -> None:
        self.consumerFull = True
        self._apply()

    def resumeProducing(self) -> None:
        self.consumerFull = False
        self._apply()

    def stopProducing(self) -> None:
        # The transport is gone or going; nothing is read any more.
        self.closed = True
        self.reading = False

    def holdForQueue(self, full: bool) -> None:
        """
        Pause (C{True}) or release (C{False}) reading for the shaper's sake.
        """
        self.queueFull = full
        self._apply()

    def close(self) -> None:
        """
        Stop reading for good: the connection is closing.
        """
        self.closed = True
        self._apply()

    def _apply(self) -> None:
        read = not (self.consumerFull or self.queueFull or self.closed)
        if read != self.reading:
            self.reading = read
            if read:
                self.transport.resumeProducing()
            else:
                self.transport.pauseProducing()


class ImpairedEchoProtocol(EchoProtocol):
    """
    The echo with C{delay}, C{jitter} and a C{bandwidth} cap (bytes a
    second, 0 for none) on what it sends back.

    Its overrides of L{EchoProtocol} are few on purpose: L{dataReceived}
    queues instead of writing (L{_echo}), L{pendingBytes} and L{isIdle} count what
    waits in the shaper, and L{finish} and L{readConnectionLost} run the
    plain echo's own close once the shaper is empty.

    L{ImpairedEchoProtocol} is what the factory builds instead of
    L{EchoProtocol} when any of C{--delay}, C{--jitter} and C{--bandwidth}
    is set (see L{echotw.build}); the plain
    echo is untouched, so with impairment off nothing costs more.  Each read is
    put in the connection's L{StreamShaper}, which hands it back, in order, when
    its time has come and the bandwidth allows.

    Closing waits for the shaper: a close the server starts (L{finish}: the
    drain, a reload, a session limit) or the client's half-close stops reading
    at once, lets every byte already received leave at its time, then closes as
    the plain echo does.  While bytes wait on a delay the connection is busy,
    not idle.
    """

    def __init__(
        self,
        clock: IReactorTime,
        delay: float = 0.0,
        jitter: float = 0.0,
        bandwidth: float = 0.0,
        random: Random | None = None,
    ) -> None:
        self.shaper = StreamShaper(clock, self._release, delay, jitter, bandwidth, random)
        self.gate: ReadGate | None = None
        self._whenReleased: list[tuple[str, Callable[[], None]]] = []

    def connectionMade(self) -> None:
        super().connectionMade()
        transport = self.transport
        if transport is None or self.finishing:
            return
        # The plain echo registered the transport as its own producer;
        # this one needs the gate in between (see L{ReadGate}).
        transport.unregisterProducer()  # type: ignore[attr-defined]
        self.gate = ReadGate(transport)  # type: ignore[arg-type]
        transport.registerProducer(self.gate, True)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.finishing:
            # The plain echo's close has begun: a read means what it says.
            super().dataReceived(data)
            return
        self.bytesReceived += len(data)
        if self.byteLimit and self.bytesReceived >= self.byteLimit:
            self._echoLast(data)
            return
        self._echo(data)

    def _echo(self, data: bytes) -> None:
        """
        Queue C{data} in the shaper, and stop reading if that fills it.
        """
        shaper = self.shaper
        shaper.put(data)
        gate = self.gate
        if shaper.pendingBytes > PAUSE_ABOVE and gate is not None and not gate.queueFull:
            gate.holdForQueue(True)

    def _release(self, data: bytes) -> None:
        """
        The shaper let C{data} go: send it, read again if the shaper has
        room, and close if that was all a close waited for.
        """
        if self.direct:
            writeDirectly(self.transport, data)
        else:
            self.transport.write(data)  # type: ignore[union-attr]
        waiting = self.shaper.pendingBytes
        gate = self.gate
        if gate is not None and gate.queueFull and waiting <= RESUME_BELOW:
            gate.holdForQueue(False)
        if not waiting and self._whenReleased:
            closes, self._whenReleased = self._whenReleased, []
            for _, close in closes:
                close()

    def pendingBytes(self) -> int:
        """
        The transport's bytes and those still waiting in the shaper.
        """
        return super().pendingBytes() + self.shaper.pendingBytes

    def isIdle(self, now: float, timeout: float) -> bool:
        """
        Bytes waiting on a delay or the bandwidth make a connection busy;
        it is idle once nothing has moved, nor waited, for C{timeout}.
        """
        idle = super().isIdle(now, timeout)
        shaper = self.shaper
        return idle and not shaper.pendingBytes and now - shaper.releasedAt >= timeout

    def finish(self, reason: str, deadline: float | None = None) -> None:
        """
        Stop reading now; close as the plain echo does once every byte
        already received has left the shaper, at its time.
        """
        if not self.shaper.pendingBytes:
            super().finish(reason, deadline)
            return
        if self.closeReason is None:
            self.closeReason = reason
        self._closeWhenReleased("finish", partial(super().finish, reason, deadline))

    def readConnectionLost(self) -> None:
        """
        The client half-closed: echo what waits, at its time, then close.
        """
        if not self.shaper.pendingBytes:
            super().readConnectionLost()
            return
        self._closeWhenReleased("eof", super().readConnectionLost)

    def _closeWhenReleased(self, kind: str, close: Callable[[], None]) -> None:
        """
        Stop reading; run C{close} once the shaper is empty, after the
        closes asked for before it (a finish, then the client's EOF, is
        what the plain echo would have seen), each kind once.
        """
        if self.gate is not None:
            self.gate.close()
        if all(pending != kind for pending, _ in self._whenReleased):
            self._whenReleased.append((kind, close))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # The plain echo counts what was still queued as unsent: the shaper
        # is emptied after it has looked.
        super().connectionLost(reason)
        self.shaper.cancel()
        self._whenReleased = []


def impairedProtocols(
    clock: IReactorTime,
    delay: float = 0.0,
    jitter: float = 0.0,
    bandwidth: float = 0.0,
    random: Random | None = None,
) -> Callable[[], ImpairedEchoProtocol]:
    """
    What a factory calls to build each connection's impaired protocol; all
    of them share C{clock} and C{random}.
    """
    return partial(
        ImpairedEchoProtocol,
        clock,
        delay,
        jitter,
        bandwidth,
        random if random is not None else Random(),
    )
