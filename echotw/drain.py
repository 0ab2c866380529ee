# -*- test-case-name: tests.unit.test_drain -*-
"""
Closing connections once they are quiet, for the shutdown drain and the
connections a rule reload denies: a connection the server wants gone may
still have bytes in flight, and L{QuietCloser} closes it without losing them.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from echotw.protocol import Connection

TICK = 0.1
"""Seconds between two looks at the connections being closed."""


class _Closing:
    __slots__ = ("graceUntil", "lingerUntil", "reason", "seen")

    def __init__(self, reason: str, graceUntil: float, lingerUntil: float | None) -> None:
        self.reason = reason
        self.graceUntil = graceUntil
        self.lingerUntil = lingerUntil
        self.seen: int | None = None


class QuietCloser:
    """
    Close connections gracefully as soon as each is quiet (see below), or
    once its grace period is over.

    A connection the server wants gone may still have bytes in flight: in
    Twisted's buffer, in the kernel's buffers both ways, or unread because its
    client stopped reading for a while (backpressure then pauses the server's
    reading too).  Closing it at once would lose them.  L{QuietCloser} keeps
    echoing it until it is quiet, then closes it gracefully (a lingering close,
    see L{echotw.protocol.EchoProtocol.finish}), so a client that has stopped
    sending gets every byte back, then EOF.

    Quiet means: at two consecutive ticks nothing was queued to send (so
    reading was not paused by backpressure) and no byte arrived in between.
    One tick is not enough: the tick that sees an emptied buffer can run just
    before the reactor reads what the resumed socket holds.

    A client that never goes quiet (it keeps sending) is closed gracefully
    anyway once its C{graceUntil} time passes: it stops being echoed, gets what
    was echoed so far, then EOF.  What happens after that, if it also never
    reads or never closes, is the lingering close's business (and the drain's
    deadline, which aborts whatever is still open).
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._closing: dict[Connection, _Closing] = {}
        self._loop: LoopingCall | None = None

    def __len__(self) -> int:
        """Connections waiting to be quiet."""
        return len(self._closing)

    def close(
        self,
        connections: Iterable[Connection],
        reason: str,
        grace: float,
        lingerUntil: float | None = None,
    ) -> None:
        """
        Close each of C{connections} with C{reason} once it is quiet, or
        after C{grace} seconds at the latest; their lingering closes end by
        C{lingerUntil} (a clock time), if given.
        """
        graceUntil = self.clock.seconds() + grace
        for connection in connections:
            if not (connection.finishing or connection.closed) and connection not in self._closing:
                self._closing[connection] = _Closing(reason, graceUntil, lingerUntil)
        if self._closing and self._loop is None:
            self._loop = LoopingCall(self._tick)
            self._loop.clock = self.clock
            self._loop.start(TICK, now=True)

    def _tick(self) -> None:
        now = self.clock.seconds()
        for connection, state in list(self._closing.items()):
            if connection.finishing or connection.closed:
                del self._closing[connection]
                continue
            echoed = connection.bytesReceived if connection.pendingBytes() == 0 else None
            if now >= state.graceUntil or (echoed is not None and echoed == state.seen):
                del self._closing[connection]
                connection.finish(state.reason, state.lingerUntil)
            else:
                state.seen = echoed
        if not self._closing:
            self.stop()

    def stop(self) -> None:
        """
        Stop looking; connections not closed yet are left as they are.
        """
        self._closing.clear()
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()


def connections(count: int) -> str:
    """
    The word for C{count} connections in a log line: "1 connection".
    """
    return "connection" if count == 1 else "connections"
