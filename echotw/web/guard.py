# -*- test-case-name: tests.unit.test_webguard -*-
"""
Limits for echotw's own small HTTP listeners (C{--metrics}, C{--health}).
They serve a few hundred bytes to Prometheus and to Kubernetes or balancer
probes, on ports any peer may reach; twisted.web alone lets one peer hold
them, and the process, without bound: a pipelining client that never reads
piles up responses in memory, a header sent a byte at a time resets the idle
timeout with each byte, a request body is spooled to disk whatever its
announced size, and connections are not capped.  L{GuardedSite} bounds each of these.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import IResource
from twisted.web.server import Site

from echotw import loglevel
from echotw.rules.addresses import formatAddress
from echotw.throttlelog import LogThrottle, unloggedNote
from echotw.web.channel import GuardedChannel
from echotw.web.request import HEAD_END, GuardedRequest

MAX_CONNECTIONS = 64
"""Connections one listener serves at once; scrapers and probes need a few."""

MAX_REQUESTS = 100
"""Requests one connection may make; its last answer says C{Connection:
close}.  A scraper's keep-alive connection makes one every scrape interval
and reconnects now and then; a client that pipelines without reading has
at most this many answers made for it."""

MAX_PIPELINED = 4
"""Requests one connection may send before it could have read the answer
to the one before (already waiting when that answer left), past which its
answer says C{Connection: close}.  Scrapers and probes never pipeline; a
client that pipelines without reading would otherwise have an answer made
for it each time the kernel took the one before, as many as its receive
buffer holds (some hundred kilobytes)."""

CLOSING_PER_SLOT = 4
"""Closing connections (flushing a last answer, then lingering) a listener
keeps per connection of L{MAX_CONNECTIONS}, past which the oldest is aborted."""

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


def deferAccepts(port: Any, seconds: float = REQUEST_TIMEOUT) -> bool:
    """
    Have the kernel hand a TCP listener's connections to C{accept} only
    once their client has sent something (Linux's C{TCP_DEFER_ACCEPT}, what
    nginx's C{deferred} does; an HTTP client speaks first), or after
    C{seconds}.  A probe's request is then waiting when it is accepted, and
    is answered at once (see L{GuardedSite.screenAccepted}), however fast
    the listen queue moves; connections that send nothing wait in the
    kernel rather than in the listener's places.  Returns whether it was
    set.
    """
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    sock = getattr(port, "socket", None)
    if option is None or not isinstance(sock, socket.socket):
        return False
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, max(1, int(seconds)))
    except OSError:
        return False
    return True


class GuardedSite(Site):
    """
    A L{Site} for echotw's own HTTP listeners, with the limits below and
    no access log: a probe or a scrape every few seconds would otherwise put
    a line in the server's log for each one.

    It keeps twisted.web's parsing and resources and adds, per
    listener:

      - at most L{MAX_CONNECTIONS} connections hold a place at once, and a
        new one always finds one unless every place has an answer being sent
        at that very moment: at the cap, the connection that costs most gives
        up its place (L{GuardedSite._victim}), from the source holding the most
        places, first one whose answer has not left since an earlier turn of
        the reactor (its client does not read), then the oldest that never
        completed a request (idle, or slow to send one), then the one served
        least recently, so a scraper's keep-alive connection outlasts a flood;
      - while every place is taken, a connection accepted with no complete
        request waiting on it is closed before anything is built for it
        (L{GuardedSite.screenAccepted}, where the port asks, as
        L{echotw.transport.tcpport.EchoPort} does): a few system calls each, so that the
        listen queue moves fast enough under a flood of thousands of
        connections for a probe queued behind them to be answered in time; a
        probe's request is usually there when it is accepted, and is read and
        answered at once, before it needs a place;
      - a request head (request line and headers) of at most L{MAX_HEAD} bytes,
        else C{431} and the connection closes;
      - no request body: a request announcing one (a C{Content-Length} above 0,
        or a C{Transfer-Encoding} of any value) gets C{413} and the connection
        closes;
      - each request complete within L{REQUEST_TIMEOUT} seconds of the
        connection opening or of the previous answer leaving (the idle
        keep-alive timeout and the deadline for a slow request in one, not
        reset by each byte, nor by answers the client does not read), else the
        connection closes;
      - one request at a time: the next one is read only once the answer to
        the one before has left for the kernel, so a client that does not read
        stops being read;
      - at most L{MAX_PIPELINED} requests sent before the client could have
        read the answer before (pipelined: scrapers and probes never do) and
        L{MAX_REQUESTS} in all per connection; the answer past either says
        C{Connection: close}, so a client that pipelines without reading has
        at most a handful of answers made for it;
      - a backlog of C{SOMAXCONN} unless the endpoint sets one (see
        L{echotw.web.health.WebService}).

    The channel sees one complete request head at a time
    (L{echotw.web.channel.GuardedChannel} frames them on the blank line that ends
    a head, its lines ended by CRLF or a bare LF: with no bodies allowed, it
    ends the request too).  The path C{*} is looked up as any other, so
    C{OPTIONS *} gets 501 as C{OPTIONS} on any path does.  Closing the
    connection flushes what was written, closes the sending side and reads and
    discards (a few kilobytes at most) for up to L{LINGER} seconds, so the
    client reads a C{413} rather than a reset; then it aborts.  A closing
    connection holds no place; past L{CLOSING_PER_SLOT} per place, the oldest
    is aborted.  Every refusal is counted by reason (L{GuardedSite.rejected},
    served as a metric) and logged at most once a second per reason.

    A client that half-closes after its requests (C{printf ... | nc -N}, some
    probe scripts) gets its answers, then the end of the stream: twisted.web
    alone would drop them when the client's side closes.

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
        self.maxRequests = MAX_REQUESTS
        self.maxPipelined = MAX_PIPELINED
        self.maxHead = MAX_HEAD
        self.requestTimeout = REQUEST_TIMEOUT
        self.linger = LINGER
        self._channels: dict[GuardedChannel, None] = {}  # least recently served first
        self._closing: dict[GuardedChannel, None] = {}  # oldest first
        self._perSource: dict[str, int] = {}  # connections in _channels per source
        self._turn = 0
        self._turning: Any = None
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

    def turn(self) -> int:
        """
        The number of the reactor's current turn (counted only while
        someone asks), to tell an answer that has not left yet from one
        that the client does not read.
        """
        if self._turning is None or not self._turning.active():
            self._turning = self.reactor.callLater(0, self._nextTurn)
        return self._turn

    def _nextTurn(self) -> None:
        self._turn += 1

    def screenAccepted(self, sock: socket.socket) -> bool:
        """
        Whether a socket just accepted should have a connection built for
        it (asked by L{echotw.transport.tcpport.EchoPort}, before it builds anything):
        while every place is taken, only if a complete request is waiting
        on it already, such as a probe's.  The others are closed at once,
        for a few system calls each, so that under a flood the listen queue
        moves fast enough for a probe queued behind thousands of
        connections to be reached within its timeout.
        """
        if self.connections < self.maxConnections:
            return True
        try:
            waiting = sock.recv(self.maxHead, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except OSError:
            waiting = b""
        if HEAD_END.search(waiting) is not None:
            return True
        try:
            host, port = sock.getpeername()[:2]
        except (OSError, ValueError):
            host, port = "", 0
        kind = IPv6Address if sock.family == socket.AF_INET6 else IPv4Address
        self.reject("too many connections", kind("TCP", host, port))
        return False

    def admit(self, channel: GuardedChannel) -> None:
        """
        Give a new connection its place, once what it had sent before it
        was accepted has been read (and perhaps answered): at the cap, the
        connection that costs most gives up its place (L{_victim}); the
        newcomer is closed instead only if every other one is having an
        answer sent right now.
        """
        if channel.closing:
            return  # answered and closing already: it needs no place
        if self.connections >= self.maxConnections:
            victim = self._victim()
            if victim is None:
                self.reject("too many connections", channel.peer())
                channel.turnAway()
                return
            self._leave(victim)
            self.reject("too many connections", victim.peer())
            victim.evict()
        self._channels[channel] = None
        self._perSource[channel.source] = self._perSource.get(channel.source, 0) + 1

    def _leave(self, channel: GuardedChannel) -> None:
        """
        C{channel} gives up its place, if it has one.
        """
        if self._channels.pop(channel, False) is None:
            left = self._perSource[channel.source] - 1
            if left:
                self._perSource[channel.source] = left
            else:
                del self._perSource[channel.source]

    def _victim(self) -> GuardedChannel | None:
        """
        The connection to close for a new one: from the source holding the
        most connections, the first of: one whose answer has waited to
        leave since an earlier turn (its client does not read); one waiting
        for a request it has never completed, oldest first (a slow or idle
        connection); one served before and idle, least recently served
        first (a scraper's keep-alive connection outlasts a flood).  An
        answer being sent now is never cut off.
        """
        turn = self.turn()
        now = self.reactor.seconds()
        perSource = self._perSource
        for count in sorted(set(perSource.values()), reverse=True):
            oldest: list[GuardedChannel | None] = [None, None, None]
            for channel in self._channels:
                if perSource[channel.source] != count:
                    continue
                tier = channel.tier(turn, now)
                if tier == 0:
                    return channel
                if tier is not None and oldest[tier] is None:
                    oldest[tier] = channel
            if oldest[1] is not None or oldest[2] is not None:
                return oldest[1] or oldest[2]
        return None

    def served(self, channel: GuardedChannel) -> None:
        # Served last, evicted last among the served.
        if self._channels.pop(channel, False) is None:
            self._channels[channel] = None

    def closing(self, channel: GuardedChannel) -> None:
        """
        C{channel} is closing (flushing its last answer, then lingering):
        it gives up its place, and past L{CLOSING_PER_SLOT} closing
        connections per place, the oldest of them is aborted.
        """
        self._leave(channel)
        self._closing[channel] = None
        if len(self._closing) > CLOSING_PER_SLOT * self.maxConnections:
            oldest = next(iter(self._closing))
            del self._closing[oldest]
            oldest.evict()

    def closed(self, channel: GuardedChannel) -> None:
        self._leave(channel)
        self._closing.pop(channel, None)

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
