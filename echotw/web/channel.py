# -*- test-case-name: tests.unit.test_webguard -*-
"""
One connection of echotw's guarded HTTP listeners (L{echotw.web.guard}): an
L{http.HTTPChannel} handed one complete request head at a time, never a
body, with its own deadline, a lingering close, and answers for a client
that half-closes after its requests.

What it enforces per connection (the head's size, no bodies, one request at
a time, the request deadline) comes from its site's attributes, so that the
limits stay in one place, L{echotw.web.guard.GuardedSite}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import abstract
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    ISSLTransport,
)
from twisted.web import http
from zope.interface import implementer

from echotw.web.request import RESPONSES, closingResponse, hasHead, takeHead
from echotw.web.state import ChannelState, Event, after


@implementer(IHalfCloseableProtocol)
class GuardedChannel(http.HTTPChannel):
    """
    An L{http.HTTPChannel} fed one complete request head at a time, never a
    body, and only while no response is pending (see L{echotw.web.guard.GuardedSite}).

    Bytes read but not yet handed on wait in C{_pending}; reading stops
    while C{_pending} holds a complete request that cannot be handled yet,
    so it never holds more than L{MAX_HEAD} and one read.

    Over a socket (not TLS), the channel is its transport's pull producer
    rather than a push one: the transport then calls L{resumeProducing}
    each time its buffer has gone to the kernel, which is when the next
    request is read (an answer "has left").  A push producer hears only of
    a buffer past 64 KiB, so a client that never reads had answers made
    for it as long as the kernel took them, megabytes of them.  Over TLS
    (whose transport turns a pull producer into a loop) the channel stays a
    push producer, and its cost is bounded by the requests a connection may
    make.

    Where it is in its cycle is one L{ChannelState} (L{state}), moved only
    by L{_move}: C{READING}, C{ANSWERING} once a head is handed on, then
    C{SENDING} until the answer has left (C{ANSWERING_HELD} while the
    transport is full before the answer is finished), C{READING} again; or
    C{CLOSING}, from any state and for good.  The client's half-close
    (C{_clientDone}) is a fact about the other direction, possible in every
    state, and kept beside it.

    @ivar state: the current L{ChannelState}.
    @ivar answered: answers finished on this connection.
    @ivar pipelined: requests already waiting when the answer before left.
    """

    site: Any  # echotw.web.guard.GuardedSite, which imports this module
    callLater: Any

    def __init__(self) -> None:
        super().__init__()
        self._pending = bytearray()
        self.state = ChannelState.READING
        self._heldSince = 0  # the site's turn when the state last became held
        self._heldAt = 0.0  # and the time
        self._pull = False  # fixed at connectionMade: the transport's pull producer
        self.answered = 0
        self.source = ""  # the client's address without its port
        self.pipelined = 0
        self._discarded = 0
        self._feeding = False  # within _feed: a reentrant call returns at once
        self._clientDone = False  # the client closed its sending side
        self._bodyAnnounced = False  # a Transfer-Encoding header in this request
        self._deadline: IDelayedCall | None = None
        self._reading: IPushProducer | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        transport: Any = self.transport
        self.source = str(getattr(transport.getPeer(), "host", ""))
        self._reading = IPushProducer(transport, None)
        socketLevel = isinstance(transport, abstract.FileDescriptor) and not (
            ISSLTransport.providedBy(transport) or getattr(transport, "TLS", False)
        )
        if socketLevel:
            transport.unregisterProducer()
            self._pull = True
            transport.registerProducer(self, False)
        self._arm(self.site.requestTimeout)
        if socketLevel:
            self._readWaiting(transport)
        self.site.admit(self)

    def _readWaiting(self, transport: Any) -> None:
        """
        Read what the client sent before its connection was accepted: a
        probe's request is usually there already, and is answered before
        the connection needs a place among the site's connections, so that
        no flood of connections accepted after it can take that place
        before its request is read.  The end of the stream, or an error,
        is left for the reactor to find.
        """
        try:
            data = transport.getHandle().recv(self.site.maxHead)
        except OSError:
            return
        if data:
            self.dataReceived(data)

    def _move(self, event: Event) -> None:
        """
        The one place L{state} changes (see L{echotw.web.state.TRANSITIONS}).
        """
        self.state = after(self.state, event)

    def _hold(self) -> None:
        """
        An answer has not left, or the transport is full: note when, so
        that a client that does not read can be told from a slow one.
        """
        self._move(Event.HELD)
        self._heldSince = self.site.turn()
        self._heldAt = self.site.reactor.seconds()

    def dataReceived(self, data: bytes) -> None:
        if self.state is ChannelState.CLOSING:
            # Read and discarded while closing, up to a bound: a client
            # that keeps sending is not waiting for its answer, and is
            # left to the linger deadline, unread and costing nothing.
            self._discarded += len(data)
            limited = self._discarded > self.site.maxHead
            if limited and self._reading is not None and not self._disconnecting():
                self._reading.pauseProducing()
            return
        self._pending += data
        self._feed()

    def _feed(self) -> None:
        """
        Hand complete request heads to twisted.web one at a time, while
        nothing stops us; then read only if we could take more.
        """
        if self._feeding:
            return
        self._feeding = True
        try:
            while self.state is ChannelState.READING and not self._disconnecting():
                head = takeHead(self._pending, self.site.maxHead)
                if head is None:
                    if len(self._pending) >= self.site.maxHead:
                        self._refuse("headers too large")
                    break
                self._move(Event.HANDED_ON)
                self._bodyAnnounced = False
                super().dataReceived(head)
        finally:
            self._feeding = False
        if self._clientDone:
            self._endIfAnswered()
        else:
            self._steerReading()

    def readConnectionLost(self) -> None:
        """
        The client will send nothing more: answer the requests it
        completed, one at a time as ever, then close.
        """
        self._clientDone = True
        if self.state is ChannelState.CLOSING:
            # A lingering close (see _close) was waiting for this.
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self._feed()

    def writeConnectionLost(self) -> None:
        """
        Our side's half-close (see L{_close}) went out; the client's end,
        or the linger deadline, comes next.
        """

    def _endIfAnswered(self) -> None:
        """
        After the client's half-close: close once no request remains to
        answer (a partial head never will be) and the answers are flushed.
        """
        if self.state is not ChannelState.READING or self._disconnecting():
            return
        if self._requestWaiting():
            return
        self._close()

    def _requestWaiting(self) -> bool:
        """
        Whether C{_pending} holds a complete request head not yet handed on.
        """
        return hasHead(self._pending, self.site.maxHead)

    def _steerReading(self) -> None:
        if self._reading is None or self.state is ChannelState.CLOSING or self._disconnecting():
            return
        if self.state is not ChannelState.READING or self._requestWaiting():
            self._reading.pauseProducing()
        else:
            self._reading.resumeProducing()

    def waiting(self) -> bool:
        """
        Whether this connection waits for a request (idle, or receiving one)
        rather than being answered or closed.
        """
        return self.state is ChannelState.READING

    def tier(self, turn: int, now: float) -> int | None:
        """
        How readily this connection gives up its place to a new one (see
        L{echotw.web.guard.GuardedSite._victim}): 0 if an answer has waited
        to leave since before the reactor's previous turn, or for a second
        (its client does not read), 1 if it waits for a request and has
        never been served, 2 if it waits for one after being served,
        L{None} while an answer is being made or sent.
        """
        if self.state is ChannelState.SENDING:
            stalled = turn > self._heldSince + 1 or now - self._heldAt >= 1.0
            return 0 if stalled else None
        if self.state is not ChannelState.READING:
            return None
        # An answer finished on a connection still open: it has been served.
        return 2 if self.answered else 1

    @property
    def closing(self) -> bool:
        return self.state is ChannelState.CLOSING

    def turnAway(self) -> None:
        """
        No place for this new connection: close it at once, or, if it has
        an answer to send, once that has left.
        """
        if self.state.held:
            self._close()
        else:
            self.evict()

    def evict(self) -> None:
        """
        Close at once, to make room for a new connection.
        """
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self._move(Event.CLOSED)
        self._pending = bytearray()
        transport: Any = self.transport
        getattr(transport, "abortConnection", transport.loseConnection)()

    def peer(self) -> IAddress:
        peer: IAddress = self.transport.getPeer()  # type: ignore[union-attr]
        return peer

    def _disconnecting(self) -> bool:
        return bool(getattr(self.transport, "disconnecting", False))

    def lineReceived(self, line: bytes) -> None:
        """
        As twisted.web, but nothing more once the connection closes: after
        its 400 for a malformed request line, twisted.web would read the
        rest of the head as a request's, since over a socket the lingering
        close does not stop it (and raise, having no request line).
        """
        if self.state is not ChannelState.CLOSING:
            super().lineReceived(line)

    def headerReceived(self, line: bytes) -> bool:
        """
        Note a C{Transfer-Encoding} header, whatever its value, rather than
        hand it to twisted.web, which ignores C{identity} (and answers the
        request) and answers 400 to values it does not know: any of them
        announces a body, which gets 413 (see L{allHeadersReceived}).
        """
        name = line.split(b":", 1)[0]
        if name.strip().lower() == b"transfer-encoding":
            self._bodyAnnounced = True
            return True
        ok: bool = super().headerReceived(line)
        return ok

    def allHeadersReceived(self) -> None:
        # A length of 0 means no Content-Length above 0.
        if self.length != 0 or self._bodyAnnounced:
            # Not 0, so that twisted.web waits for a body, which never comes.
            self.length = None
            self._refuse("request body")
            return
        super().allHeadersReceived()

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        """
        As twisted.web decides, but the last request a connection may make
        (L{echotw.web.guard.MAX_REQUESTS}), or the last it may pipeline
        (L{echotw.web.guard.MAX_PIPELINED}), is answered with
        C{Connection: close}, and the connection then closes.
        """
        persistent: bool = super().checkPersistence(request, version)
        if not persistent:
            return False
        if self.pipelined >= self.site.maxPipelined:
            self.site.reject("pipelined without reading", self.peer())
        elif self.answered + 1 < self.site.maxRequests:
            return True
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        return False

    def requestDone(self, request: http.Request) -> None:
        self.answered += 1
        super().requestDone(request)
        if self.state is ChannelState.CLOSING:
            return
        self._move(Event.ANSWERED)
        self.site.served(self)
        if self._pull:
            # Read on once the answer has left (resumeProducing).
            self._hold()
        else:
            self._arm(self.site.requestTimeout)
        self._feed()

    def pauseProducing(self) -> None:
        if self.state in (ChannelState.READING, ChannelState.ANSWERING):  # not held yet
            self._hold()
        super().pauseProducing()
        if not self._feeding:
            self._steerReading()

    def resumeProducing(self) -> None:
        if self._pull and self.state.held:
            # The answer has left: the next request has the whole timeout.
            self._arm(self.site.requestTimeout)
            if self._requestWaiting():
                # Sent before the client could have read that answer.
                self.pipelined += 1
        self._move(Event.LEFT)
        super().resumeProducing()
        self._feed()

    def loseConnection(self) -> None:
        """
        twisted.web's close (after a last answer, or its own 400): the
        lingering close of L{_close}, so the client reads its answer.
        """
        self._close()

    def _refuse(self, reason: str) -> None:
        """
        Answer a request twisted.web must not handle, and close.
        """
        transport: Any = self.transport
        self.site.reject(reason, transport.getPeer())
        status = RESPONSES[reason]
        transport.write(closingResponse(status, status.split(b" ", 1)[1]))
        self._close()

    def _close(self) -> None:
        """
        Flush, close the sending side, and read and discard until the
        client closes or L{LINGER} seconds pass: closing with unread input
        would reset the connection, and the client would lose the response.
        """
        if self.state is ChannelState.CLOSING:
            return
        self._move(Event.CLOSED)
        self._pending = bytearray()
        self.site.closing(self)
        transport: Any = self.transport
        transport.unregisterProducer()
        if self._clientDone:
            # Nothing more will come to read and discard: flush and close.
            transport.loseConnection()
        elif isinstance(transport, abstract.FileDescriptor):
            transport.loseWriteConnection()
            transport.resumeProducing()
        else:  # TLS: no half-close
            transport.loseConnection()
        self._arm(self.site.linger)

    def _arm(self, seconds: float) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = self.callLater(seconds, self._expired)

    def _expired(self) -> None:
        self._deadline = None
        transport: Any = self.transport
        if self.state is ChannelState.CLOSING or self._disconnecting():
            getattr(transport, "abortConnection", transport.loseConnection)()
            return
        if self.state.held and self._pull:
            # An answer that has not left in all this time: its client
            # does not read, and will not read a last one either.
            self.site.reject("request timeout", transport.getPeer())
            self.evict()
            return
        if self._pending or self.state is not ChannelState.READING:
            # A request not finished in time, or a response not read.
            self.site.reject("request timeout", transport.getPeer())
        # else an idle keep-alive connection: closed without a word.
        self._close()

    def timeoutConnection(self) -> None:
        # twisted.web's own idle timeout, off in a GuardedSite; were it on,
        # it would log a line per connection.
        self._close()

    def connectionLost(self, reason: Any = None) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self.site.closed(self)
        super().connectionLost(reason)
