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
    or a C{Transfer-Encoding} of any value) gets C{413} and the connection
    closes;
  - each request complete within L{REQUEST_TIMEOUT} seconds of the
    connection opening or of its previous response (the idle keep-alive
    timeout and the deadline for a slow request in one, not reset by each
    byte), else the connection closes;
  - one request at a time: the next one is parsed only once the response to
    the previous one is written and the transport is not full, and nothing
    more is read meanwhile, so a pipelining client that does not read holds
    at most a few tens of kilobytes here.

The channel sees one complete request head at a time
(L{echotw.webchannel.GuardedChannel} frames them on the blank line that ends
a head, its lines ended by CRLF or a bare LF: with no bodies allowed, it
ends the request too).  The path C{*} is looked up as any other, so
C{OPTIONS *} gets 501 as C{OPTIONS} on any path does.  Closing the connection flushes what was written,
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

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import IResource
from twisted.web.server import Site

from echotw import loglevel
from echotw.addresses import formatAddress
from echotw.ratelimit import LogThrottle, unloggedNote
from echotw.webchannel import GuardedChannel, GuardedRequest

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
    requestFactory = GuardedRequest
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
