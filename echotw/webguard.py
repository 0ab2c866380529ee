"""
Limits for echotw's own small HTTP listeners (C{--metrics}, C{--health}).

They serve a few hundred bytes to Prometheus and to Kubernetes or balancer
probes, on ports any peer may reach; twisted.web alone lets one peer hold
them, and the process, without bound: a pipelining client that never reads
piles up responses in memory, a header sent a byte at a time resets the idle
timeout with each byte, a request body is spooled to disk whatever its
announced size, and connections are not capped.  L{GuardedSite} keeps
twisted.web's parsing and resources and adds, per listener:

  - at most L{MAX_CONNECTIONS} connections at once: a new one past that
    closes a connection waiting for a request (idle, or still sending one),
    as nginx reuses idle connections, so a flood of idle connections cannot
    lock out a probe: first the oldest that never completed a request, then
    the one served least recently, so a scraper's keep-alive connection
    outlasts a flood of connections that never ask for anything; when every
    one is being answered, the new one is closed at once;
  - a request head (request line and headers) of at most L{MAX_HEAD} bytes,
    else C{431} and the connection closes;
  - no request body: a request announcing one (a C{Content-Length} above 0,
    or C{Transfer-Encoding}) gets C{413} and the connection closes;
  - each request complete within L{REQUEST_TIMEOUT} seconds of the
    connection opening or of its previous response (the idle keep-alive
    timeout and the deadline for a slow request in one, not reset by each
    byte), else the connection closes;
  - one request at a time: the next one is parsed only once the response to
    the previous one is written and the transport is not full, and nothing
    more is read meanwhile, so a pipelining client that does not read holds
    at most a few tens of kilobytes here.

The channel sees one complete request head at a time (L{GuardedChannel}
frames them on the blank line that ends a head: with no bodies allowed, it
ends the request too).  Closing the connection flushes what was written,
closes the sending side and reads and discards for up to L{LINGER} seconds,
so the client reads a C{413} rather than a reset; then it aborts.  Every
refusal is counted by reason (L{GuardedSite.rejected}, served as a metric)
and logged at most once a second per reason.

A client that half-closes after its requests (C{printf ... | nc -N}, some
probe scripts) gets its answers, then the end of the stream: twisted.web
alone would drop them when the client's side closes.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import abstract
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import IResource
from twisted.web.server import Site
from zope.interface import implementer

from echotw import loglevel
from echotw.addresses import formatAddress
from echotw.ratelimit import LogThrottle, unloggedNote

MAX_CONNECTIONS = 64
"""Connections one listener serves at once; scrapers and probes need a few."""

MAX_HEAD = 8192
"""Bytes of request line and headers; Prometheus and kubelet send a few hundred."""

REQUEST_TIMEOUT = 10.0
"""Seconds a connection has to complete each request, counted from its
opening or from its previous response."""

LINGER = 2.0
"""Seconds a closing connection may take to flush and to be closed by the
client before it is aborted."""

LOG_INTERVAL = 1.0
"""Seconds between two log lines for one reason on one listener."""

HEAD_END = b"\r\n\r\n"

RESPONSES = {
    "request body": b"413 Content Too Large",
    "headers too large": b"431 Request Header Fields Too Large",
}


def closingResponse(status: bytes, text: bytes) -> bytes:
    """
    A complete response that ends its connection, for a request refused
    before twisted.web sees it.
    """
    body = text + b"\n"
    return (
        b"HTTP/1.1 %s\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (status, len(body), body)
    )


@implementer(IHalfCloseableProtocol)
class GuardedChannel(http.HTTPChannel):
    """
    An L{http.HTTPChannel} fed one complete request head at a time, never a
    body, and only while no response is pending (see the module docstring).

    Bytes read but not yet handed on wait in C{_pending}; reading stops
    while C{_pending} holds a complete request that cannot be handled yet,
    so it never holds more than L{MAX_HEAD} and one read.
    """

    site: GuardedSite
    callLater: Any

    def __init__(self) -> None:
        super().__init__()
        self._pending = bytearray()
        self._busy = False  # a request handed on, its response not finished
        self._full = False  # the transport asked us to stop writing
        self._feeding = False
        self._closing = False
        self._clientDone = False  # the client closed its sending side
        self.hasBeenServed = False
        self._deadline: IDelayedCall | None = None
        self._reading: IPushProducer | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._reading = IPushProducer(self.transport, None)
        self.site.opened(self)
        self._arm(self.site.requestTimeout)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return  # read and discarded while closing
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
            while not (self._busy or self._full or self._closing or self._disconnecting()):
                end = self._pending.find(HEAD_END, 0, self.site.maxHead)
                if end < 0:
                    if len(self._pending) >= self.site.maxHead:
                        self._refuse("headers too large")
                    break
                end += len(HEAD_END)
                head = bytes(self._pending[:end])
                del self._pending[:end]
                self._busy = True
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
        if self._closing:
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
        if self._busy or self._full or self._closing or self._disconnecting():
            return
        if self._pending.find(HEAD_END, 0, self.site.maxHead) >= 0:
            return
        self._closing = True
        self._pending = bytearray()
        transport: Any = self.transport
        transport.unregisterProducer()
        transport.loseConnection()
        self._arm(self.site.linger)

    def _steerReading(self) -> None:
        if self._reading is None or self._closing or self._disconnecting():
            return
        waiting = self._pending.find(HEAD_END, 0, self.site.maxHead) >= 0
        if self._busy or self._full or waiting:
            self._reading.pauseProducing()
        else:
            self._reading.resumeProducing()

    def waiting(self) -> bool:
        """
        Whether this connection waits for a request (idle, or receiving one)
        rather than being answered or closed.
        """
        return not (self._busy or self._full or self._closing)

    def evict(self) -> None:
        """
        Close at once, to make room for a new connection.
        """
        self._closing = True
        self._pending = bytearray()
        transport: Any = self.transport
        getattr(transport, "abortConnection", transport.loseConnection)()

    def peer(self) -> IAddress:
        peer: IAddress = self.transport.getPeer()  # type: ignore[union-attr]
        return peer

    def _disconnecting(self) -> bool:
        return bool(getattr(self.transport, "disconnecting", False))

    def allHeadersReceived(self) -> None:
        # A length of 0 means neither Content-Length above 0 nor chunked.
        if self.length != 0:
            self._refuse("request body")
            return
        super().allHeadersReceived()

    def requestDone(self, request: http.Request) -> None:
        super().requestDone(request)
        self.site.served(self)
        self._busy = False
        self._arm(self.site.requestTimeout)
        self._feed()

    def pauseProducing(self) -> None:
        self._full = True
        super().pauseProducing()
        if not self._feeding:
            self._steerReading()

    def resumeProducing(self) -> None:
        self._full = False
        super().resumeProducing()
        self._feed()

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
        if self._closing:
            return
        self._closing = True
        self._pending = bytearray()
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
        if self._closing or self._disconnecting():
            getattr(transport, "abortConnection", transport.loseConnection)()
            return
        if self._pending or self._busy or self._full:
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


class Refused(Protocol):
    """
    What a connection over L{GuardedSite.maxConnections} gets: closed at
    once, whatever the transport (a TLS wrapper cannot take L{None}).
    """

    def connectionMade(self) -> None:
        transport: Any = self.transport
        getattr(transport, "abortConnection", transport.loseConnection)()


class GuardedSite(Site):
    """
    A L{Site} for echotw's own HTTP listeners, with the limits of this
    module, and no access log: a probe or a scrape every few seconds would
    otherwise put a line in the server's log for each one.

    @param listener: the listener's endpoint description, for log lines.
    @ivar rejected: connections closed by a limit, by reason.
    """

    noisy = False
    displayTracebacks = False
    protocol = GuardedChannel  # type: ignore[assignment]
    _log = Logger(observer=loglevel.observer)

    def __init__(
        self,
        resource: IResource,
        name: str,
        listener: str = "",
        reactor: Any = None,
        maxConnections: int = MAX_CONNECTIONS,
    ) -> None:
        # No twisted.web idle timeout: GuardedChannel keeps its own deadline.
        super().__init__(resource, timeout=None, reactor=reactor)
        self.name = name
        self.listener = listener or name
        self.maxConnections = maxConnections
        self.maxHead = MAX_HEAD
        self.requestTimeout = REQUEST_TIMEOUT
        self.linger = LINGER
        self._channels: dict[GuardedChannel, None] = {}  # least recently served first
        self.rejected: dict[str, int] = {}
        clock: IReactorTime = self.reactor
        self.throttle = LogThrottle(LOG_INTERVAL, clock, report=self._logHeld)
        self._flusher = LoopingCall(self.throttle.flush)
        self._flusher.clock = clock

    def log(self, request: http.Request) -> None:
        pass

    def logPrefix(self) -> str:
        return f"echotw {self.name}"

    @property
    def connections(self) -> int:
        """Connections open now, less those evicted and not yet gone."""
        return len(self._channels)

    def buildProtocol(self, addr: Any) -> Any:
        if self.connections >= self.maxConnections and not self._evictOne():
            self.reject("too many connections", addr)
            return Refused()
        return super().buildProtocol(addr)

    def _evictOne(self) -> bool:
        waiting = [channel for channel in self._channels if channel.waiting()]
        unserved = [channel for channel in waiting if not channel.hasBeenServed]
        for channel in unserved or waiting:
            del self._channels[channel]
            self.reject("too many connections", channel.peer())
            channel.evict()
            return True
        return False

    def served(self, channel: GuardedChannel) -> None:
        # Served last, evicted last among the served.
        channel.hasBeenServed = True
        if self._channels.pop(channel, False) is None:
            self._channels[channel] = None

    def opened(self, channel: GuardedChannel) -> None:
        self._channels[channel] = None

    def closed(self, channel: GuardedChannel) -> None:
        self._channels.pop(channel, None)

    def countRejected(self, reason: str) -> None:
        """
        Count a connection closed for C{reason}, without logging it (for
        refusals logged elsewhere, such as accept errors).
        """
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def reject(self, reason: str, peer: IAddress) -> None:
        """
        Count a connection closed for C{reason}, and log it unless a line
        for the same reason went out less than a second ago.
        """
        self.countRejected(reason)
        held = self.throttle.admit(reason, formatAddress(peer))
        if held is None:
            return
        self._log.info(
            "Closed an HTTP connection from {client} on {listener}: {reason}"
            + unloggedNote(held, "for this reason"),
            event="http-rejected",
            client=formatAddress(peer),
            listener=self.listener,
            reason=reason,
            unlogged=held,
        )

    def _logHeld(self, key: Any, held: int, last: Any) -> None:
        # A reason gone quiet with lines held back: say how many.  The
        # port's accept errors (L{echotw.listening.AcceptErrors}) share this
        # throttle under a key of their own.
        reason = key if isinstance(key, str) else "cannot accept"
        self._log.info(
            "{unlogged} more HTTP connections on {listener} closed ({reason}),"
            " not logged one by one",
            event="http-rejected-unlogged",
            listener=self.listener,
            reason=reason,
            client=str(last or ""),
            unlogged=held,
        )

    def startFactory(self) -> None:
        super().startFactory()
        if not self._flusher.running:
            self._flusher.start(LOG_INTERVAL, now=False)

    def stopFactory(self) -> None:
        if self._flusher.running:
            self._flusher.stop()
        super().stopFactory()
