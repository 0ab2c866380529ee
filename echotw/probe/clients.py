# -*- test-case-name: tests.unit.test_probe_clients -*-
"""
The probe's Twisted protocols: one per TCP or TLS connection
(L{StreamProbe}) and one per UDP flow (L{DatagramProbe}).

Each sends messages on a L{Schedule} (L{echotw.probe.timing}), checks every byte that comes back
(L{echotw.probe.pattern}) and reports round trips, mismatches, losses and
failures to a L{ProbeRun}.  Each keeps one timer for its oldest message in
flight, not one per message.
"""

from __future__ import annotations

import errno
import os
import socket
from collections import deque
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
)
from twisted.internet.protocol import DatagramProtocol, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from echotw.probe.pattern import DatagramCheck, Mismatch, StreamCheck
from echotw.probe.timing import Deadline, Flow, Schedule

REFUSED = "connection refused: nothing listens on that UDP port"

CHUNK = 64 * 1024
"""Bytes of a message handed to the transport at a time."""

HeaderBuilder = Callable[[IAddress, IAddress], bytes]
"""Builds the bytes sent before the stream from (local, peer) addresses."""


def describeFailure(reason: Failure) -> str:
    """
    One line for why a connection failed or was lost.
    """
    name = reason.type.__name__ if reason.type is not None else "error"
    message = reason.getErrorMessage()
    return f"{name}: {message}" if message else name


@implementer(IHandshakeListener, IPushProducer)
class StreamProbe(Protocol):
    """
    One verified TCP or TLS connection: C{plan.count} messages (or until
    C{plan.stopAt}), each checked byte for byte; then a clean close.

    A message is written in chunks, and only while the transport takes
    more (the probe is its own streaming producer): against a path that
    stops reading, messages due on an interval wait their turn as stream
    offsets, not as bytes, so the probe's memory stays a chunk or two per
    connection whatever C{--size} and C{--interval} say.  A round trip
    runs from when its message was due, so time spent waiting here counts
    as the path's, as it would in a send buffer.

    Over TLS (C{handshake}), the first message goes out once the handshake
    is over, which has C{plan.timeout} of its own: a round trip is the
    echo's, not the handshake's, so that a slow handshake does not decide
    the p99 of a short run.

    @ivar finished: fires with C{None} once the connection is closed and
        everything it found is reported.
    """

    def __init__(
        self, flow: Flow, header: HeaderBuilder | None = None, handshake: bool = False
    ) -> None:
        self.finished: Deferred[None] = Deferred()
        self._index = flow.index
        self._plan = flow.plan
        self._run = flow.run
        self._now = flow.now
        self._header = header
        self._check = StreamCheck(flow.plan.seed, flow.index)
        # (stream offset where the message ends, when it was due), oldest first.
        self._inFlight: deque[tuple[int, float]] = deque()
        # The stream is due up to here; messages are all plan.size bytes, so
        # those wholly written are check.sent // plan.size.
        self._due = 0
        self._counted = 0  # messages reported sent
        self._paused = False
        self._schedule = Schedule(flow, self._send, self._maybeFinish)
        self._deadline = Deadline(flow, self._timedOut)
        self._clock = flow.clock
        self._closing: IDelayedCall | None = None
        self._handshaking = handshake
        self._over = False

    handshakeName = "the TLS handshake"
    """What L{_timedOut} says did not complete before the first message."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        if self._header is not None:
            self.transport.write(self._header(self.transport.getHost(), self.transport.getPeer()))
        if self._handshaking:
            self._deadline.arm(self._now())
        else:
            self._schedule.start()

    def handshakeCompleted(self) -> None:
        self._handshakeDone()

    def _handshakeDone(self) -> None:
        """
        The connection is ready for messages: start sending them.
        """
        if not self._handshaking or self._over:
            return
        self._handshaking = False
        self._deadline.arm(None)
        self._schedule.start()

    def _send(self) -> None:
        self._due += self._plan.size
        self._inFlight.append((self._due, self._now()))
        if len(self._inFlight) == 1:
            self._armTimer()
        self._write()

    def _write(self) -> None:
        """
        Hand the transport what is due, a chunk at a time, until it is all
        written or the transport asks for a pause.
        """
        check, transport, size = self._check, self.transport, self._plan.size
        assert transport is not None
        while not self._paused and not self._over and check.sent < self._due:
            self._emit(min(CHUNK, self._due - check.sent))
            while self._counted < check.sent // size:
                self._counted += 1
                self._run.sent(size)

    def _emit(self, length: int) -> None:
        """
        Write the next C{length} bytes of the stream.
        """
        self.transport.write(self._check.nextBytes(length))  # type: ignore[union-attr]

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._write()

    def stopProducing(self) -> None:
        self._paused = True

    def dataReceived(self, data: bytes) -> None:
        if not self._over and self._verify(data):
            self._credit(self._check.verified)

    def _verify(self, data: bytes) -> bool:
        """
        Check echoed bytes; on a mismatch, report it and end.
        """
        mismatch = self._check.received(data)
        if mismatch is not None:
            self._mismatched(mismatch)
            return False
        return True

    def _mismatched(self, mismatch: Mismatch) -> None:
        self._run.mismatch(self._index, mismatch)
        self._end(abort=True)

    def _credit(self, verified: int) -> None:
        """
        The stream is echoed and verified up to C{verified}: the messages
        that end there or before came back.
        """
        inFlight = self._inFlight
        if not inFlight or verified < inFlight[0][0]:
            return
        now = self._now()
        while inFlight and verified >= inFlight[0][0]:
            _, sentAt = inFlight.popleft()
            self._run.echoed(now - sentAt, self._plan.size)
        self._armTimer()
        if not inFlight:
            self._schedule.settled()
            self._maybeFinish()

    def _armTimer(self) -> None:
        oldest = self._inFlight[0][1] if self._inFlight and not self._over else None
        self._deadline.arm(oldest)

    def _timedOut(self) -> None:
        if self._handshaking:
            what = f"{self.handshakeName} not completed"
        else:
            what = f"byte offset {self._check.verified} not echoed"
        self._run.failed(self._index, f"timed out: {what} within {self._plan.timeout:g} s")
        self._end(abort=True)

    def _maybeFinish(self) -> None:
        if not self._over and not self._inFlight and self._schedule.exhausted:
            self._end(abort=False)

    def _end(self, abort: bool) -> None:
        """
        The outcome is recorded: stop sending and close.
        """
        self._over = True
        self._run.concluded()
        self._schedule.stop()
        self._armTimer()
        assert self.transport is not None
        # A TLS transport would put off its close until the producer goes.
        self.transport.unregisterProducer()  # type: ignore[attr-defined]
        if abort:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        else:
            self._close()
            # A TLS close waits for the server's close_notify, which a
            # broken server may never send: the outcome is known, so give
            # it C{timeout} seconds, then drop the connection.
            self._closing = self._clock.callLater(self._plan.timeout, self._closeTimedOut)

    def _close(self) -> None:
        """
        Begin a clean close, once the outcome is known.
        """
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _closeTimedOut(self) -> None:
        self._closing = None
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._closing is not None and self._closing.active():
            self._closing.cancel()
        self._closing = None
        if not self._over:
            self._over = True
            self._run.concluded()
            if reason.check(ConnectionDone):
                mismatch = self._check.closed()
                if mismatch is not None:
                    self._run.mismatch(self._index, mismatch)
                else:
                    self._run.failed(self._index, "the peer closed the connection early")
            else:
                self._run.failed(self._index, describeFailure(reason))
            self._schedule.stop()
            self._armTimer()
        self.finished.callback(None)


class DatagramProbe(DatagramProtocol):
    """
    One verified UDP flow from its own port: datagrams of C{plan.size}
    bytes, each matched to its echo by sequence number; a datagram not
    echoed within C{plan.timeout} counts as lost.

    @ivar finished: fires with C{None} once the flow is over and reported.
    """

    def __init__(self, flow: Flow, host: str, port: int) -> None:
        self.finished: Deferred[None] = Deferred()
        self._index = flow.index
        self._plan = flow.plan
        self._run = flow.run
        self._now = flow.now
        self._host = host
        self._port = port
        self._check = DatagramCheck(flow.plan.seed, flow.index, flow.plan.size)
        # Sequence number -> when sent; insertion order is oldest first.
        self._inFlight: dict[int, float] = {}
        self._schedule = Schedule(flow, self._send, self._maybeFinish)
        self._deadline = Deadline(flow, self._expire)
        self._answers = 0
        self._over = False
        self._listening: object = None

    def startProtocol(self) -> None:
        assert self.transport is not None
        self._listening = self.transport
        self.transport.connect(self._host, self._port)
        self._schedule.start()

    def _send(self) -> None:
        assert self.transport is not None
        sequence, data = self._check.nextDatagram()
        self._inFlight[sequence] = self._now()
        self._run.sent(len(data))
        if len(self._inFlight) == 1:
            self._armTimer()
        # A connected UDP port writes to its peer: no address.
        self.transport.write(data)  # type: ignore[call-arg]

    def datagramReceived(self, data: bytes, addr: object) -> None:
        if self._over:
            return
        # Whatever it is, something answers at the far end.
        self._answers += 1
        kind, sequence, mismatch = self._check.received(data)
        if kind == DatagramCheck.DUPLICATE:
            assert mismatch is not None
            self._run.duplicated(self._index, mismatch)
        elif kind in (DatagramCheck.CORRUPT, DatagramCheck.TRUNCATED):
            assert mismatch is not None
            self._run.mismatch(self._index, mismatch)
        elif kind == DatagramCheck.LATE:
            self._run.late()
        else:
            assert sequence is not None
            if kind == DatagramCheck.REORDERED:
                self._run.reordered()
            self._run.echoed(self._now() - self._inFlight[sequence], len(data))
        if sequence is not None and sequence in self._inFlight:
            self._settle(sequence)

    def _settle(self, sequence: int) -> None:
        head = next(iter(self._inFlight))
        del self._inFlight[sequence]
        if head == sequence:
            self._armTimer()
        if not self._inFlight:
            self._schedule.settled()
            self._maybeFinish()

    def _armTimer(self) -> None:
        oldest = next(iter(self._inFlight.values())) if self._inFlight and not self._over else None
        self._deadline.arm(oldest)

    def _expire(self) -> None:
        now = self._now()
        timeout = self._plan.timeout
        for sequence, sentAt in list(self._inFlight.items()):
            # The same sum the timer was set from, give or take rounding: a
            # timer that fires a hair early must not be re-armed for ever.
            if sentAt + timeout > now + 1e-9:
                break
            del self._inFlight[sequence]
            self._check.lost(sequence)
            self._run.lost()
        self._armTimer()
        if not self._inFlight:
            self._schedule.settled()
            self._maybeFinish()

    def connectionRefused(self) -> None:
        """
        The host answered a datagram with ICMP port unreachable (reported
        here by some reactors; see L{stopProtocol} for the others).
        """
        if not self._over:
            self._run.failed(self._index, REFUSED)
            self._end()

    def stopProtocol(self) -> None:
        """
        The port stopped: either because the flow ended, or because the
        reactor closed it after the socket reported an error, which is how
        Twisted's epoll reactor handles ICMP port unreachable on a
        connected UDP socket.
        """
        if not self._over:
            self._run.failed(self._index, self._socketError())
            self._end(stopListening=False)

    def _socketError(self) -> str:
        # Twisted has already let go of the transport; the port object still
        # holds the socket until stopProtocol returns.
        handle = getattr(self._listening, "getHandle", lambda: None)()
        if isinstance(handle, socket.socket):
            code = handle.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code == errno.ECONNREFUSED:
                return REFUSED
            if code:
                return f"the UDP socket failed: {os.strerror(code)}"
        return "the UDP socket was closed"

    def _maybeFinish(self) -> None:
        if not self._over and not self._inFlight and self._schedule.exhausted:
            if not self._answers and self._check.sent:
                self._run.failed(self._index, f"no echo came back within {self._plan.timeout:g} s")
            self._end()

    def _end(self, stopListening: bool = True) -> None:
        self._over = True
        self._run.concluded()
        self._schedule.stop()
        self._inFlight.clear()
        self._armTimer()
        stopped = None
        if stopListening and self.transport is not None:
            stopped = self.transport.stopListening()
        if isinstance(stopped, Deferred):
            stopped.addBoth(lambda _: self.finished.callback(None))
        else:
            self.finished.callback(None)
